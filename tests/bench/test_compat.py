"""The compatibility check (bench/compat.py) and the benchmark task loader (bench/tasks.py)."""
import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import compat  # noqa: E402
import tasks  # noqa: E402

from jobs.config import JobConfig  # noqa: E402
from tests import tiny  # noqa: E402


def test_adapt_weights_follow_accuracy_and_feed_the_job():
    w = compat.adapt_weights([0.6, 0.3, 0.1])
    assert w == pytest.approx([0.6, 0.3, 0.1]) and sum(w) == 1.0
    assert compat.adapt_weights([0.0, 0.0]) == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"accuracies must lie in \[0, 1\], got \[1.5, 0.2\]"):
        compat.adapt_weights([1.5, 0.2])
    w = tuple(compat.adapt_weights([0.31, 0.27, 0.29]))
    cfg = JobConfig(input="i", output="o", method="deepen", members=("a", "b", "c"), fuser={"weights": w})
    assert cfg.fuser.weights == w


def test_pairwise_agreement():
    got = compat.pairwise_agreement({"a": ["x", "y", "x", "z"], "b": ["x", "y", "y", "z"], "c": ["y", "y", "y", "y"]})
    assert got == {"a|b": 0.75, "a|c": 0.25, "b|c": 0.5}


def test_check_on_tiny_members_and_a_dev_file(tmp_path):
    rows = [{"prompt": f"q{i}", "choices": ["alpha", "beta", "gamma"], "gold": ["alpha", "beta", "gamma"][i % 3]}
            for i in range(6)]
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps(r) for r in rows))
    read = compat.read_dev(str(dev))
    members = [tiny.member_bpe(), tiny.member_sp()]
    res = compat.check(members, read, batch=4)
    assert res["items"] == 6 and set(res["accuracy"]) == {m.name for m in members}
    for m in members:  # accuracy recomputed from each member's own labels
        from ensemble import Single
        labels = [o.label for o in Single(m).label([r["prompt"] for r in rows], [r["choices"] for r in rows])]
        assert res["accuracy"][m.name] == sum(a == r["gold"] for a, r in zip(labels, rows)) / 6
    assert sum(res["adapt_weights"].values()) == pytest.approx(1.0)
    assert res["job_flags"].startswith("--weights ")
    # the printed flag (6 decimals, not summing to 1 exactly) goes straight into the job's CLI
    from jobs.cli import parse_config
    cfg = parse_config(["--input", "i", "--output", "o", "--method", "deepen",
                        "--members", *(m.name for m in members), *res["job_flags"].split()])
    assert cfg.fuser.weights == pytest.approx(tuple(res["adapt_weights"].values()), abs=1e-6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "choices": ["a"], "gold": "b"}))
    with pytest.raises(ValueError, match="bad.jsonl:1: a dev row needs"):
        compat.read_dev(str(bad))


def test_task_subsets_are_fixed_and_disjoint():
    for task in tasks.TASKS:
        test = tasks.load(task, 20)
        dev = tasks.load(task, 20, split="dev", n_dev=10)
        assert len(test) == 20 and len(dev) == 10
        assert not {r["id"] for r in test} & {r["id"] for r in dev}
        assert [r["id"] for r in tasks.load(task, 5)] == [r["id"] for r in test[:5]]
        # the fixed shuffle: items ordered by sha256 of their id, the dev subset right after the test one
        order = [hashlib.sha256(r["id"].encode()).hexdigest() for r in test + dev]
        assert order == sorted(order)
        for r in test:
            assert r["prompt"].strip() and r["gold"]
            if task in tasks.LABEL_TASKS:
                assert r["gold"] in r["choices"]
            elif task == "gsm8k":  # the gold is a number, and an answer stating it is scored correct
                assert tasks.final_number(r["gold"]) and tasks.gsm8k_correct(f"The answer is {r['gold']}.", r["gold"])
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.load("nope", 1)
    assert tasks.gsm8k_correct("so the answer is 1,234.", "1234") and not tasks.gsm8k_correct("7", "8")
