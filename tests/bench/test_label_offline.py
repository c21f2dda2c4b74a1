"""bench/label_offline.py: SpecFuse's label recomputed from each member's own Single run equals
``SpecFuse.label`` (tiny real members, every pool, a gate), and the calibration cache seeded from
member runs is what ``jobs.calibrate`` reads without a model call."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import label_offline as lo  # noqa: E402

from ensemble import Single  # noqa: E402
from ensemble.fusers.specfuse import SpecFuse  # noqa: E402
from ensemble.labeling import LabelParams  # noqa: E402

PROMPTS = ["Is fire hot? Answer yes or no.", "What is the capital of France?", "Tell me about the cat."]
CHOICES = [["yes", "no", "maybe so"], ["Paris", "Rome", "a big house near the river"], ["The cat", "a dog"]]
ROWS = [{"id": f"t/{i}", "task": "t", "prompt": p, "choices": c, "gold": c[0]}
        for i, (p, c) in enumerate(zip(PROMPTS, CHOICES))]


def _outcomes(member, params):
    outs = Single(member).label(PROMPTS, CHOICES, params=params)
    return {r["id"]: {"label": o.label, "correct": o.label == r["gold"], "conf": max(o.probs), "calls": 2, "ms": 10.0,
                      "error": None, "stats": [dataclasses.asdict(o.member_stats[0])]} for r, o in zip(ROWS, outs)}


@pytest.mark.parametrize("kind, gate_at, weights, member_t", [
    ("linear", None, (0.5, 0.5), None), ("loglinear", None, (0.7, 0.3), None), ("linear", 0.2, (0.6, 0.4), None),
    ("linear", 0.05, (0.6, 0.4), (0.5, 3.0)), ("loglinear", None, (0.5, 0.5), (2.0, 0.25))])
def test_offline_pool_equals_specfuse_label(bpe_member, sp_member, kind, gate_at, weights, member_t):
    params = LabelParams(gate=gate_at, temperature=1.7, member_temperatures=member_t)
    want = SpecFuse([bpe_member, sp_member], weights=weights, label_pool=kind).label(PROMPTS, CHOICES, params=params)
    alone = params.with_(gate=None, member_temperatures=None)
    per_row = {"smollm2": _outcomes(bpe_member, alone), "gemma": _outcomes(sp_member, alone)}
    rule = lo.PoolRule(("smollm2", "gemma"), weights, params.norm, params.temperature, kind, gate_at,
                       member_temperatures=member_t)
    got = lo.pooled_outcomes(rule, per_row, ROWS)
    for r, w in zip(ROWS, want):
        g = got[r["id"]]
        assert g["label"] == w.label and g["conf"] == pytest.approx(max(w.probs), abs=1e-6)
        assert g["gated"] == w.gated and g["calls"] == 4 and g["ms"] == 20.0
    if gate_at is not None:
        assert any(g["gated"] for g in got.values()) or not any(w.gated for w in want)


def test_rule_parsing_defaults_and_bad_input():
    rule = lo.parse_rule("defaults:smollm2,gemma")
    assert rule.members == ("smollm2", "gemma") and rule.weights == (0.5, 0.5) and rule.gate is None
    assert rule.norm == LabelParams().norm and rule.pool == "linear"
    assert lo.parse_rule("profile:x/{task}/p.json") == "x/{task}/p.json"
    tuned = lo.parse_rule("defaults:smollm2,gemma:norm=sum,pool=loglinear")
    assert (tuned.norm, tuned.pool, tuned.weights) == ("sum", "loglinear", (0.5, 0.5))
    with pytest.raises(ValueError, match="key in \\['norm', 'pool', 'temperature'\\], got 'gate=1'"):
        lo.parse_rule("defaults:smollm2:gate=1")
    with pytest.raises(ValueError, match="norm must be one of"):
        lo.parse_rule("defaults:smollm2:norm=bytes")
    with pytest.raises(ValueError, match="or profile:PATH, got 'vote:a'"):
        lo.parse_rule("vote:a")
    with pytest.raises(ValueError, match=r"members must be among .*got \['llama'\]"):
        lo.parse_rule("defaults:llama")


def test_a_member_without_scores_makes_an_error_row(bpe_member, sp_member):
    per_row = {"smollm2": _outcomes(bpe_member, LabelParams()), "gemma": _outcomes(sp_member, LabelParams())}
    per_row["gemma"]["t/1"] = {**per_row["gemma"]["t/1"], "error": "PromptTooLong: ...", "stats": []}
    got = lo.pooled_outcomes(lo.PoolRule.defaults(["smollm2", "gemma"]), per_row, ROWS)
    assert got["t/1"]["error"] == "members without scores for the row: ['gemma']" and not got["t/1"]["correct"]
    assert got["t/0"]["error"] is None


def test_seeded_cache_is_read_by_calibrate_without_model_calls(bpe_member, tmp_path, monkeypatch):
    from jobs import dev_scores
    from jobs.devset import read_dev

    dev_file = tmp_path / "dev.jsonl"
    dev_file.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "choices": r["choices"],
                                            "answer": r["gold"]}) + "\n" for r in ROWS))
    dev = read_dev(str(dev_file))
    outs = _outcomes(bpe_member, LabelParams())
    rows = lo.seed_rows(outs, ROWS)
    rt, params = dev_scores.Runtime(), LabelParams()
    dev_scores.seed_member_scores(dev, "m", params, rt, tmp_path / "cache", rows)

    def no_model(*a, **k):
        raise AssertionError("a model call despite the seeded cache")

    monkeypatch.setattr(dev_scores, "_score_in_process", no_model)
    got = dev_scores.member_scores(dev, "m", params, rt, tmp_path / "cache")
    assert sorted(got) == [r["id"] for r in ROWS]
    assert list(got["t/1"].logprob) == outs["t/1"]["stats"][0]["choice_logprobs"]
    with pytest.raises(ValueError, match=r"ids not in the dev set .*\['x/9'\]"):
        dev_scores.seed_member_scores(dev, "m", params, rt, tmp_path / "cache", [{**rows[0], "id": "x/9"}])


def test_offline_rule_with_priors_equals_specfuse_label(bpe_member, sp_member):
    from ensemble.priors import ChoicePriors

    pri = ChoicePriors(keyed_by="position", norm="token", members=("a", "b"), tables=((0.6, 0.3, 0.1), (0.2, 0.5, 0.3)))
    params = LabelParams(norm="token", temperature=1.3, gate=0.2, priors=pri)
    want = SpecFuse([bpe_member, sp_member], weights=(0.6, 0.4)).label(PROMPTS, CHOICES, params=params)
    raw = params.with_(gate=None, priors=None)
    per_row = {"smollm2": _outcomes(bpe_member, raw), "gemma": _outcomes(sp_member, raw)}
    rule = lo.PoolRule(("smollm2", "gemma"), (0.6, 0.4), "token", 1.3, "linear", 0.2, pri)
    got = lo.pooled_outcomes(rule, per_row, ROWS)
    for r, w in zip(ROWS, want):
        assert got[r["id"]]["label"] == w.label and got[r["id"]]["gated"] == w.gated
        assert got[r["id"]]["conf"] == pytest.approx(max(w.probs), abs=1e-6)
    narrow = dataclasses.replace(rule, priors=dataclasses.replace(pri, tables=((0.6, 0.4), (0.5, 0.5))))
    out = lo.pooled_outcomes(narrow, per_row, ROWS)
    assert out["t/0"]["error"].startswith("UncoveredChoice: a row of 3 choices has no prior for position 3")
    assert out["t/2"]["error"] is None  # two choices: covered
    with pytest.raises(ValueError, match=r"priors must have one table per member \(1\), got 2"):
        lo.PoolRule(("smollm2",), (1.0,), "token", 1.3, "linear", None, pri)


def test_compare_systems_pairs_on_the_same_items(monkeypatch):
    import eval_label

    rows = [{"id": f"t/{i}", "task": "t", "gold": "a"} for i in range(4)]
    monkeypatch.setattr(eval_label, "build_rows", lambda tasks, split, cap: rows)
    report = {"tasks": ["t"], "split": "test", "n": {"t": 4},
              "labels": {"x": {f"t/{i}": "a" for i in range(4)}, "y": {"t/0": "a", "t/1": "b", "t/2": None, "t/3": "a"}},
              "results": {n: {"t": {"ece": 0.1, "errors": int(n == "y")}} for n in ("x", "y")}}
    got = lo.compare_systems(report, [("x", "y")])["x vs y"]["t"]
    assert (got["accuracy_a"], got["accuracy_b"], got["delta"]) == (1.0, 0.5, 0.5)
    assert got["delta_lo"] <= 0.5 <= got["delta_hi"] and got["errors_a"] == 0
    with pytest.raises(ValueError, match=r"the report has no labels of \['z'\]"):
        lo.compare_systems(report, [("x", "z")])
