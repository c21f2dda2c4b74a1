"""The generation evaluation (bench/eval_gen.py): systems, scoring from the job's Parquet, the
comparison with the best member, and one real run through the job."""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import eval_gen as eg  # noqa: E402


def _row(rid, text, *, sample=0, ms=100.0, calls=(2, 3), tokens=4, status="ok", exit_round=None, fused=None,
         method="deepen"):
    stats = [{"name": f"m{i}", "role": "main" if i == 0 else "member", "calls": c, "tokens_in": 1, "tokens_out": 5,
              "proposed": 1, "exit_round": exit_round if i == 1 else None, "fused_share": fused if i == 0 else None}
             for i, c in enumerate(calls)]
    return {"id": rid, "sample": sample, "method": method, "text": text if status == "ok" else None, "status": status,
            "error": None if status == "ok" else "boom", "token_count": tokens if status == "ok" else None,
            "latency_ms": ms, "member_stats": stats if status == "ok" else None}


def test_systems_put_the_main_member_in_deepen_and_need_one():
    table = eg.systems("gemma", 0.5)
    gated = table["deepen gated (gemma)"].flags
    assert gated[gated.index("--main") + 1] == str(eg.TRIO.index(eg.MEMBERS["gemma"]))
    assert gated[-2:] == ("--fuse-below", "0.5")
    assert table["deepen ungated (gemma)"].flags[-2:] == ("--fuse-below", "1.0")
    assert {"smollm2", "qwen", "gemma", "specfuse exit", "specfuse no-exit"} <= set(table)
    assert not any(n.startswith("deepen") for n in eg.systems(None, None))
    assert "deepen gated (qwen)" not in eg.systems("qwen", None) and "deepen ungated (qwen)" in eg.systems("qwen", None)
    with pytest.raises(ValueError, match="main must be one of .*got 'llama'"):
        eg.systems("llama", None)
    with pytest.raises(ValueError, match=r"in \(0, 1\), got 1.0"):
        eg.systems("qwen", 1.0)


def test_scores_distinct2_and_per_row_records():
    assert eg.score_text("halueval_qa", "Answer: Paris\nmore", "paris") == {"em": 1.0, "f1": 1.0}
    assert eg.score_text("halueval_qa", None, "paris") == {"em": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="got 'gsm8k'"):
        eg.score_text("gsm8k", "1", "1")
    assert eg.distinct2(["a b c", "a b d"]) == pytest.approx(3 / 4)
    assert eg.distinct2(["a", ""]) is None
    rows = [{"id": "q/1", "gold": "Paris"}, {"id": "q/2", "gold": "Rome"}]
    table = [_row("q/1", "Paris", sample=0, ms=300.0, exit_round=2), _row("q/1", "Lyon", sample=1, ms=300.0),
             _row("q/2", None, status="error", ms=300.0)]
    got = eg.per_row(table, rows, "halueval_qa")
    assert got["q/1"]["em"] == 0.5 and got["q/1"]["forwards"] == 10 and got["q/1"]["tokens"] == 8
    assert got["q/1"]["ms"] == pytest.approx(200.0) and got["q/1"]["exits"] == 1
    assert got["q/1"]["distinct2"] is None  # one word per sample: no bigram
    assert got["q/2"] == {**got["q/2"], "em": 0.0, "errors": 1, "forwards": 0, "tokens": 0}
    # a row of an earlier, larger run in the same micro-batch still takes its share of the time
    got = eg.per_row(table + [_row("q/9", "x", ms=300.0)], rows, "halueval_qa")
    assert got["q/1"]["ms"] == pytest.approx(150.0) and "q/9" not in got
    with pytest.raises(RuntimeError, match="row 'q/3' missing"):
        eg.per_row(table, rows + [{"id": "q/3", "gold": "x"}], "halueval_qa")


def test_forwards_count_specfuse_drafts_and_verifications():
    assert eg.forwards(_row("a", "x", calls=(2, 3))) == 5
    # SpecFuse: per member 5 drafted tokens + (calls - 1 proposal) verifications
    assert eg.forwards(_row("a", "x", calls=(2, 3), method="specfuse")) == (5 + 1) + (5 + 2)
    bad = _row("a", "x")
    bad["member_stats"][1]["calls"] = None
    with pytest.raises(ValueError, match="row 'a': member 'm1' has no calls count"):
        eg.forwards(bad)


def test_compare_gives_paired_differences_and_time_ratios_to_the_best_member():
    def recs(f1s, ms):
        return {f"q/{i}": {"f1": f, "em": f, "errors": 0, "forwards": 4, "tokens": 2, "ms": ms, "distinct2": None,
                           "fused_share": None, "exits": 0} for i, f in enumerate(f1s)}
    scores = {"smollm2": recs([0, 0, 1, 0], 100.0), "qwen": recs([1, 1, 0, 1], 200.0),
              "gemma": recs([0, 1, 0, 0], 100.0), "ens": recs([1, 1, 1, 1], 600.0)}
    results = {n: eg.summarise(s, "halueval_qa") for n, s in scores.items()}
    assert results["qwen"]["f1"] == 0.75 and results["qwen"]["forwards_per_token"] == 2.0
    best = eg.best_member(results, "halueval_qa")
    assert best == "qwen"
    eg.compare(results, scores, "halueval_qa", best)
    assert results["ens"]["f1_vs_best"]["diff"] == pytest.approx(0.25)
    assert results["ens"]["time_ratio"] == 3.0 and results["qwen"]["f1_vs_best"]["diff"] == 0.0
    md = eg.markdown({"settings": {"split": "dev", "sampled": False, "main": "qwen"}, "command": "c", "code": "x",
                      "tasks": {"halueval_qa": results}, "best": {"halueval_qa": best}, "best_source": "s"})
    assert "| ens | 100.0 | +25.0 [" in md and "| 3.00 | 3.00 |" in md
    assert results["ens"]["token_time_ratio"] == 3.0


def test_settings_come_from_a_dev_report_and_are_checked_before_any_run(tmp_path):
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps({"settings": {"split": "dev", "sampled": False}, "best": {"ifeval": "qwen"}}))
    assert eg.dev_report(dev, "--best-from", ["ifeval"]) == {"ifeval": "qwen"}
    with pytest.raises(SystemExit, match=r"has no best member for \['halueval_qa'\]"):
        eg.dev_report(dev, "--best-from", ["halueval_qa"])
    test = tmp_path / "test.json"
    test.write_text(json.dumps({"settings": {"split": "test", "sampled": False}, "best": {"ifeval": "qwen"}}))
    with pytest.raises(SystemExit, match="must be a greedy dev report, got split 'test'"):
        eg.dev_report(test, "--main-from", ["ifeval"])

    def args(**kw):
        base = {"tasks": ["ifeval"], "main": None, "main_from": None, "fuse_below": None, "extra": [], "systems": None}
        return argparse.Namespace(**{**base, **kw})
    assert set(eg.plan(args(), {"ifeval": "gemma"})["ifeval"]) == {
        "smollm2", "qwen", "gemma", "specfuse exit", "specfuse no-exit", "deepen ungated (gemma)"}
    with pytest.raises(SystemExit, match=r"needs \['smollm2', 'qwen', 'gemma'\]"):
        eg.plan(args(systems=["qwen", "specfuse exit"]), {})
    # with the best member on dev, that member alone is the comparison's baseline
    assert set(eg.plan(args(systems=["qwen", "specfuse exit"]), {}, {"ifeval": "qwen"})["ifeval"]) == {
        "qwen", "specfuse exit"}
    with pytest.raises(SystemExit, match=r"needs \['gemma'\]"):
        eg.plan(args(systems=["qwen", "specfuse exit"]), {}, {"ifeval": "gemma"})
    with pytest.raises(SystemExit, match=r"unknown systems \['deepen gated \(qwen\)'\]"):
        eg.plan(args(main="qwen", systems=["smollm2", "qwen", "gemma", "deepen gated (qwen)"]), {})
    with pytest.raises(SystemExit, match="not both"):
        eg.plan(args(main="qwen", main_from=dev), {})


def test_counts_are_validated():
    assert eg.parse_counts(["ifeval=150"]) == {"ifeval": 150}
    with pytest.raises(SystemExit, match="got 'gsm8k=3'"):
        eg.parse_counts(["gsm8k=3"])


@pytest.mark.slow
def test_eval_gen_runs_the_members_through_the_job(tmp_path):
    out = tmp_path / "res"
    assert eg.main(["--split", "dev", "--tasks", "halueval_qa", "--n", "2", "--systems", "smollm2", "qwen", "gemma",
                    "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    res = rep["tasks"]["halueval_qa"]
    assert set(res) == {"smollm2", "qwen", "gemma"} and all(r["n"] == 2 and r["errors"] == 0 for r in res.values())
    for name, rows in rep["scores"]["halueval_qa"].items():
        assert res[name]["f1"] == pytest.approx(sum(r["f1"] for r in rows.values()) / 2)
        assert all(r["tokens"] > 0 and r["forwards"] > 0 for r in rows.values())
    assert res[rep["best"]["halueval_qa"]]["time_ratio"] == 1.0
    assert "| qwen |" in out.with_suffix(".md").read_text()


def test_skip_gives_the_next_items_of_the_split_disjoint_from_the_first():
    first = eg.build_rows("halueval_qa", "test", 5)
    later = eg.build_rows("halueval_qa", "test", 3, skip=5)
    both = eg.build_rows("halueval_qa", "test", 8)
    assert [r["id"] for r in first + later] == [r["id"] for r in both]
    assert not {r["id"] for r in first} & {r["id"] for r in later}
    with pytest.raises(ValueError, match="skip must be >= 0, got -1"):
        eg.build_rows("halueval_qa", "test", 3, skip=-1)
