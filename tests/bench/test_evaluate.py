"""The evaluation command (bench/evaluate.py): rows, scoring from the job's Parquet, cost ratios, and one
real run through the job."""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import evaluate as ev  # noqa: E402

from schemas import OUTPUT_SCHEMA  # noqa: E402


def _out_row(rid, *, label=None, text=None, ms=100.0, calls=(1,), status="ok"):
    stats = [{"name": f"m{i}", "role": "member", "weight": None, "calls": c, "tokens_in": 1, "tokens_out": 1,
              "agreement": None, "mean_kl": None, "proposed": None, "accepted": None, "mean_score": None,
              "rounds_active": None, "exit_round": None} for i, c in enumerate(calls)]
    return {"id": rid, "sample": 0, "run_id": "r", "method": "single", "members": ["m0"], "text": text,
            "label": label, "label_probs": None, "finish_reason": "stop", "status": status,
            "error": None if status == "ok" else "boom", "token_count": None, "latency_ms": ms, "seed": 0,
            "config_hash": "h", "schema_version": 1, "member_stats": stats if status == "ok" else None}


def test_build_rows_are_ordered_by_task_and_dev_is_disjoint_from_test():
    test = ev.build_rows(["arc_challenge", "gsm8k"], 5, 3, "test", 64)
    assert [r["task"] for r in test] == ["arc_challenge"] * 5 + ["gsm8k"] * 3
    assert all(r["id"].startswith(r["task"] + "/") for r in test)
    assert all(r["gold"] in r["choices"] for r in test[:5])
    assert all("choices" not in r and r["max_new_tokens"] == 64 for r in test[5:])
    dev = ev.build_rows(["arc_challenge", "gsm8k"], 5, 3, "dev", 64)
    assert len(dev) == 8 and not {r["id"] for r in dev} & {r["id"] for r in ev.build_rows(
        ["arc_challenge", "gsm8k"], 200, 200, "test", 64)}


def test_score_counts_errors_as_wrong_and_shares_batch_latency(tmp_path):
    rows = [{"id": "a/1", "task": "a", "choices": ["x", "y"], "gold": "x"},
            {"id": "a/2", "task": "a", "choices": ["x", "y"], "gold": "y"},
            {"id": "a/3", "task": "a", "choices": ["x", "y"], "gold": "y"},
            {"id": "g/1", "task": "g", "gold": "42"}]
    out = [_out_row("a/1", label="x", ms=300.0, calls=(2, 3)), _out_row("a/2", label="x", ms=300.0, calls=(2, 3)),
           _out_row("a/3", status="error", ms=None),
           _out_row("g/1", text="6 * 7 = 42. The answer is 42.", ms=50.0, calls=(10, 10))]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA), tmp_path / "data" / "part-0.parquet")
    got = ev.score(tmp_path, rows)
    assert got["a"] == {"n": 3, "accuracy": pytest.approx(1 / 3), "errors": 1, "calls_per_item": 5.0,
                        "ms_per_item": 150.0}
    assert got["g"]["accuracy"] == 1.0 and got["g"]["ms_per_item"] == 50.0 and got["g"]["calls_per_item"] == 20
    with pytest.raises(RuntimeError, match="row 'a/9' missing"):
        ev.score(tmp_path, rows + [{"id": "a/9", "task": "a", "choices": ["x"], "gold": "x"}])


def test_time_ratios_are_relative_to_the_fastest_single_member_per_task():
    def r(ms):
        return {"t": {"accuracy": 0.5, "errors": 0, "calls_per_item": 1.0, "ms_per_item": ms}}
    res = {"smollm2": r(100.0), "qwen": r(300.0), "deepen trio": r(450.0)}
    ev.add_time_ratios(res)
    assert [res[k]["t"]["time_ratio"] for k in res] == [1.0, 3.0, 4.5]
    md = ev.table(res, ["t"])
    assert "| deepen trio | 0.500 | 0.500 | 1.0 | 4.50 |" in md


def test_extra_systems_need_a_name_and_flags():
    assert ev.parse_extra(['tuned=--method deepen --members a b --main 1']) == {
        "tuned": ["--method", "deepen", "--members", "a", "b", "--main", "1"]}
    with pytest.raises(ValueError, match="NAME=FLAGS .*, got .tuned."):
        ev.parse_extra(["tuned"])


@pytest.mark.slow
def test_eval_runs_a_member_through_the_job(tmp_path):
    out = tmp_path / "res"
    assert ev.main(["--tasks", "boolq", "gsm8k", "--n-label", "2", "--n-gen", "1", "--gen-tokens", "4",
                    "--systems", "smollm2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())["results"]["smollm2"]
    assert res["boolq"]["n"] == 2 and res["gsm8k"]["n"] == 1
    assert res["boolq"]["errors"] == 0 and res["boolq"]["calls_per_item"] >= 1 and res["boolq"]["time_ratio"] == 1.0
    assert "| smollm2 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_member_vote_oracle_and_agreement_from_the_members_answers():
    rows = [{"id": f"a/{i}", "task": "a", "choices": ["x", "y", "z"], "gold": g} for i, g in enumerate("xyz")]
    rows.append({"id": "g/0", "task": "g", "gold": "7"})

    def o(answer, gold):
        return {"answer": answer, "correct": answer == gold, "error": None, "calls": 1, "ms": 1.0}
    answers = {"smollm2": "xzx7", "qwen": "xyy7", "gemma": "yzz3"}  # per row: a/0, a/1, a/2, g/0
    per = {s: {r["id"]: o(a, r["gold"]) for r, a in zip(rows, ans)} for s, ans in answers.items()}
    base = ev.member_baselines(per, rows)
    # a/0: vote x (right); a/1: vote z (wrong, qwen right); a/2: x,y,z tie -> smollm2 x (wrong, gemma right)
    assert base["a"] == {"vote": pytest.approx(1 / 3), "oracle": 1.0}
    assert base["g"] == {"vote": 1.0, "oracle": 1.0}
    agree = ev.member_agreement(per, rows)
    assert agree["a"] == {"smollm2|qwen": pytest.approx(1 / 3), "smollm2|gemma": pytest.approx(1 / 3),
                          "qwen|gemma": 0.0}
