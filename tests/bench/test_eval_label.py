"""bench/eval_label.py: the paired bootstrap, the calibration error, best-on-dev, the offline
normalisation re-scoring and the report from job outputs (no models, no Spark)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import eval_label as el  # noqa: E402

from schemas import OUTPUT_SCHEMA  # noqa: E402


def test_paired_bootstrap_difference_and_interval():
    a = [True] * 60 + [False] * 40
    b = [True] * 50 + [False] * 50
    d, lo, hi = el.paired_bootstrap(a, b)
    assert d == pytest.approx(0.10)
    assert lo < 0.10 < hi and 0.0 < lo  # a is right on every item b is: the paired difference is all >= 0
    assert el.paired_bootstrap(a, b) == (d, lo, hi)  # fixed seed
    # analytic check: paired differences in {0, 1} with p=0.1 -> interval about 0.1 +- 1.96*sqrt(.09/100)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 100), rel=0.2)
    assert el.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        el.paired_bootstrap([True], [True, False])


def test_paired_bootstrap_is_narrower_than_unpaired_when_systems_agree():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.5
    sys_ = base.copy()
    sys_[:20] = ~sys_[:20]  # differs on 20 items only
    d, lo, hi = el.paired_bootstrap(sys_, base)
    assert hi - lo < 0.05  # an unpaired interval of two 400-item accuracies would be ~0.14 wide


def test_ece_bins_and_edges():
    # two bins: conf 0.95 (1.0 falls in the last bin) all right -> |1-0.9625|; conf 0.55 half right -> |0.5-0.55|
    conf = [0.95, 1.0, 0.55, 0.55]
    ok = [True, True, True, False]
    assert el.ece(conf, ok) == pytest.approx(0.5 * abs(1 - 0.975) + 0.5 * abs(0.5 - 0.55))
    assert el.ece([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)
    assert el.ece([0.02, 0.5], [False, True], bins=10) == pytest.approx(0.5 * 0.02 + 0.5 * 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        el.ece([1.2], [True])
    with pytest.raises(ValueError, match="non-empty"):
        el.ece([], [])


def test_best_on_dev_ties_and_partial_members():
    acc = {"smollm2": {"a": 0.5, "b": 0.7}, "qwen": {"a": 0.6, "b": 0.7}, "gemma": {"a": 0.6, "b": 0.2}}
    assert el.best_on_dev(acc, ["a", "b"]) == {"a": "qwen", "b": "smollm2"}
    assert el.best_on_dev({"gemma": {"a": 0.1}}, ["a"]) == {"a": "gemma"}
    with pytest.raises(ValueError, match="missing"):
        el.best_on_dev({"gemma": {"a": 0.1}}, ["a", "b"])


def test_norm_picks_reproduce_each_normalisation():
    pytest.importorskip("ensemble.labeling")
    # choice 0: short and likely overall; choice 1: long, better per token / char; pmi favours choice 1
    stats = {"choice_logprobs": [-2.0, -3.0], "choice_tokens": [1, 3], "choice_neutral": [-1.0, -6.0]}
    assert el.norm_picks(stats, ["ab", "abcdefgh"]) == {"sum": 0, "token": 1, "char": 1, "pmi": 1}
    assert "pmi" not in el.norm_picks({**stats, "choice_neutral": None}, ["ab", "abcdefgh"])
    assert el.norm_picks({"calls": 1}, ["a", "b"]) == {}


def _stats(name, calls, scores=None):
    s = {f.name: None for f in OUTPUT_SCHEMA.field("member_stats").type.value_type}
    s.update(name=name, role="main", weight=1.0, calls=calls, tokens_in=1, tokens_out=0)
    if scores is not None and "choice_logprobs" in s:
        s.update(scores)
    return s


def _write(out: Path, rows, labels, probs, ms, calls, scores=None):
    recs = []
    for r, lab, p, c in zip(rows, labels, probs, calls):
        rec = {f: None for f in OUTPUT_SCHEMA.names}
        rec.update(id=r["id"], sample=0, run_id="r", method="single", members=["m"], label=lab, label_probs=p,
                   finish_reason="stop", status="ok", latency_ms=ms, seed=0, config_hash="h", schema_version=1,
                   member_stats=[_stats("m", c, scores and scores.get(r["id"]))])
        recs.append(rec)
    (out / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(recs, schema=OUTPUT_SCHEMA), out / "data" / "part-0.parquet")


def test_collect_reports_against_the_best_dev_member(tmp_path, monkeypatch):
    rows = [{"id": f"t/{i}", "task": "t", "prompt": "p", "choices": ["x", "y"], "gold": "x" if i % 2 else "y"}
            for i in range(4)]
    monkeypatch.setattr(el, "build_rows", lambda names, split, cap: rows)
    systems = {k: el.System(k, v) for k, v in el.SYSTEMS.items()}
    golds = [r["gold"] for r in rows]
    flip = {"x": "y", "y": "x"}
    answers = {"smollm2": golds, "qwen": [golds[0], flip[golds[1]], golds[2], golds[3]],
               "gemma": [flip[g] for g in golds]}
    for split in ("dev", "test"):
        for m, labs in answers.items():
            out = el.output_dirs(systems[m], ["t"], tmp_path / split)["t"]
            _write(out, rows, labs, [[0.9, 0.1] if lab == "x" else [0.2, 0.8] for lab in labs],
                   ms={"smollm2": 100.0, "qwen": 300.0, "gemma": 200.0}[m], calls=[1] * 4)
    rep = el.collect(systems, ["t"], "test", rows, tmp_path, None)
    assert rep["best_on_dev"] == {"t": "smollm2"} and rep["incomplete"] == ["deepen", "specfuse"]
    res = rep["results"]
    assert list(res)[0] == el.BEST and res[el.BEST]["t"]["accuracy"] == 1.0
    assert res["qwen"]["t"]["accuracy"] == 0.75 and res["qwen"]["t"]["delta"] == pytest.approx(-0.25)
    assert res["qwen"]["t"]["time_ratio"] == pytest.approx(3.0) and res["gemma"]["t"]["calls_ratio"] == 1.0
    # smollm2 right with confidence 0.9 / 0.8: ECE = mean |1 - conf|
    assert res["smollm2"]["t"]["ece"] == pytest.approx(0.15)
    assert rep["offline"]["t"]["vote"] == 0.75 and rep["offline"]["t"]["oracle"] == 1.0
    md = el.markdown({**rep, "command": "python bench/eval_label.py"})
    assert "| qwen | 75.0 (-25.0 [" in md and "not reported" in md.lower()
    el.plot(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    json.dumps(rep)  # serialisable as written


def test_extra_and_profile_systems(tmp_path):
    got = el.parse_systems(["tuned=--method deepen --members a b"], ["cal=profiles/{task}/deepen.json"])
    assert got["tuned"].flags == ("--method", "deepen", "--members", "a", "b") and not got["tuned"].per_task
    assert got["cal"].per_task and got["cal"].flags_for("boolq") == [
        "--profile", str(Path("profiles/boolq/deepen.json").absolute())]  # the job may run in another checkout
    assert el.output_dirs(got["cal"], ["a", "b"], tmp_path)["b"].name == "b"
    with pytest.raises(ValueError, match="NAME=PATH"):
        el.parse_systems([], ["cal"])
    with pytest.raises(ValueError, match="built-in"):
        el.parse_systems(["qwen=--method single"], [])


def test_a_changed_prompt_refuses_the_old_output(tmp_path):
    row = {"id": "t/1", "prompt": "p", "choices": ["a", "b"]}
    el.check_digests(tmp_path / "out", [row])
    el.check_digests(tmp_path / "out", [row, {"id": "t/2", "prompt": "q", "choices": ["a"]}])
    with pytest.raises(SystemExit, match="row 't/1' was labeled with another prompt"):
        el.check_digests(tmp_path / "out", [{**row, "prompt": "p2"}])


def test_export_dev_writes_the_calibration_format(tmp_path):
    el.export_dev(tmp_path, ["winogrande"], 3)
    lines = [json.loads(x) for x in (tmp_path / "winogrande.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {"id", "prompt", "choices", "answer"}
    assert all(x["answer"] in x["choices"] and x["id"].startswith("winogrande/") for x in lines)


@pytest.mark.slow
def test_a_member_through_the_job_and_a_larger_split_resumes(tmp_path):
    """Real member, local Spark: the dev report, then a larger prefix computes only the new rows."""
    work, out = tmp_path / "work", tmp_path / "res"
    base = ["--split", "dev", "--tasks", "boolq", "banking77", "--systems", "smollm2", "--work", str(work),
            "--out", str(out)]
    assert el.main([*base, "--n-dev", "1"]) == 0
    assert el.main([*base, "--n-dev", "2"]) == 0
    runs = [json.loads(x) for x in (work / "dev" / "runs.jsonl").read_text().splitlines()]
    assert [(r["rows"], r["computed"]) for r in runs] == [(2, 2), (4, 2)]
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["n"] == {"boolq": 2, "banking77": 2} and rep["best_on_dev"] == {"boolq": "smollm2", "banking77": "smollm2"}
    assert rep["results"]["smollm2"]["banking77"]["errors"] == 0
    assert "| smollm2 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_relabel_recomputes_a_members_labels_under_a_norm():
    rows = [{"id": "t/0", "task": "t", "choices": ["ab", "abcdefgh"], "gold": "abcdefgh"},
            {"id": "t/1", "task": "t", "choices": ["ab", "abcdefgh"], "gold": "ab"}]
    scores = {"choice_logprobs": [-2.0, -3.0], "choice_tokens": [1, 3], "choice_neutral": [-1.0, -6.0]}
    ok = {"label": "ab", "correct": None, "conf": 0.7, "calls": 2, "ms": 1.0, "error": None, "stats": [scores]}
    err = {"label": None, "correct": False, "conf": None, "calls": None, "ms": None, "error": "boom", "stats": []}
    got = el.relabel({"t/0": ok, "t/1": err}, rows, "token")
    assert got["t/0"]["label"] == "abcdefgh" and got["t/0"]["correct"] and got["t/0"]["conf"] > 0.5
    assert got["t/1"] is err
    assert el.relabel({"t/0": ok, "t/1": err}, rows, "sum")["t/0"]["label"] == "ab"
    with pytest.raises(ValueError, match="row 't/0' has no choice scores for norm 'pmi'"):
        el.relabel({"t/0": {**ok, "stats": [{**scores, "choice_neutral": None}]}, "t/1": err}, rows, "pmi")


def test_a_report_without_member_dev_outputs_has_no_comparisons(tmp_path, monkeypatch):
    rows = [{"id": f"t/{i}", "task": "t", "prompt": "p", "choices": ["x", "y"], "gold": "x"} for i in range(3)]
    monkeypatch.setattr(el, "build_rows", lambda names, split, cap: rows)
    systems = {k: el.System(k, v) for k, v in el.SYSTEMS.items()}
    _write(el.output_dirs(systems["deepen"], ["t"], tmp_path / "dev")["t"], rows, ["x", "y", "x"],
           [[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]], ms=500.0, calls=[3] * 3)
    rep = el.collect(systems, ["t"], "dev", rows, tmp_path, None)
    assert rep["best_on_dev"] == {} and list(rep["results"]) == ["deepen"]
    assert rep["results"]["deepen"]["t"]["accuracy"] == pytest.approx(2 / 3)
    assert rep["results"]["deepen"]["t"]["delta"] is None
    md = el.markdown({**rep, "command": "x"})
    assert "no best-on-dev member" in md and "| deepen | 66.7 (– [–, –]) |" in md
    el.plot(rep, tmp_path / "p.png")
