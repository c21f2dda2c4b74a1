"""The prior correction in calibration and the job (jobs/calibration.py, jobs/calibrate.py,
jobs/profiles.py; docs/jobs.md "Calibration"): the cross-fitted on/off rule, the profile carrying the
priors (config_hash follows them, contradicting flags are refused), calibration end to end on tiny
saved members, and an uncovered choice as an error row of the job."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import pytest

from ensemble.labeling import LabelParams, best
from ensemble.priors import ChoicePriors
from jobs import calibration as cal
from jobs.cli import parse_config
from jobs.config import JobConfig
from jobs.profiles import load_profile
from tests.jobs.test_calibrate import BASE, _job_rows, _profile, dev_file, tiny_dirs  # noqa: F401 (fixtures)


def _biased(n: int, yes_rate: float, bias: float, ev: float = 3.0, reliable: float = 1.0, seed: int = 0):
    """A yes/no member on ``n`` rows: evidence ``ev``:1 for the gold label (for the other one on a
    ``1 - reliable`` share of the rows), times ``bias`` for 'yes'; gold 'yes' at ``yes_rate``.
    Returns (log scores, choice sets, golds)."""
    rng = random.Random(seed)
    logs, sets, golds = [], [], []
    for _ in range(n):
        gold = "yes" if rng.random() < yes_rate else "no"
        points = gold if rng.random() < reliable else ("no" if gold == "yes" else "yes")
        order = ["yes", "no"] if rng.random() < 0.5 else ["no", "yes"]
        logs.append([math.log((ev if c == points else 1.0) * (bias if c == "yes" else 1.0)) for c in order])
        sets.append(order)
        golds.append(order.index(gold))
    return logs, sets, golds


def _picks(x):
    return [best(p) for p in x[0]]


def test_cross_fitting_turns_priors_on_for_a_bias_and_off_for_a_base_rate():
    logs, sets, golds = _biased(200, 0.5, 6.0)  # a bias the labels do not have: the correction helps
    on, rec = cal.decide_priors([logs], sets, golds, _picks)
    assert on and rec["on"] > rec["off"] and rec["keyed_by"] == "text" and rec["keys"] == 2
    assert [f["fit"] for f in rec["folds"]] == ["even", "odd"] and sum(f["rows"] for f in rec["folds"]) == 200
    assert rec["on"] == pytest.approx(sum(f["on"] * f["rows"] for f in rec["folds"]) / 200)
    # labels mostly 'yes' and a noisy member leaning to 'yes': its lean is the base rate, dividing it out hurts
    logs, sets, golds = _biased(200, 0.9, 3.0, ev=2.0, reliable=0.7)
    on, rec = cal.decide_priors([logs], sets, golds, _picks)
    assert not on and rec["on"] < rec["off"] - 0.1
    assert cal.decide_priors([logs[:1]], sets[:1], golds[:1], _picks) == (
        False, {"applied": False, "why": "1 dev row(s): too few to cross-fit"})
    # a held-out row whose position the fitted half never had counts as wrong
    rec = cal.cross_fit_priors([[[0.0, 1.0], [0.0, 1.0, 2.0]]], [["a", "b"], ["c", "d", "e"]], [1, 2], _picks)
    assert rec["uncovered"] == 1 and rec["keyed_by"] == "position"


def test_fit_priors_per_member_and_fused():
    logs, sets, _ = _biased(50, 0.5, 6.0)
    pri = cal.fit_priors([logs, logs], sets, "token", ["a", "b"], fused=(logs[:10], sets[:10]))
    assert pri.members == ("a", "b") and pri.keys == ("no", "yes") and pri.rows == 50
    assert pri.tables[0] == pri.tables[1] and pri.tables[0][1] > 0.7 and pri.fused is not None
    fixed = cal.corrected_logs(logs, sets, pri.tables[0], pri.keys)
    assert fixed[0] == [x - math.log(pri.tables[0][pri.keys.index(c)]) for x, c in zip(logs[0], sets[0])]


PRIORS = {"keyed_by": "position", "norm": "pmi", "members": ["a", "b", "c"], "tables": [[0.5, 0.3, 0.2]] * 3,
          "keys": None, "fused": [0.4, 0.3, 0.3], "rows": 8}


def test_the_profile_carries_the_priors_and_config_hash_follows_them(tmp_path):
    path = _profile(tmp_path, priors=PRIORS)
    prof = load_profile(path)
    assert prof.priors == ChoicePriors.from_mapping(PRIORS) and json.loads(open(path).read())["priors"] == PRIORS
    cfg = parse_config(BASE + ["--profile", path])
    assert cfg.label.priors == prof.priors
    with_priors = cfg.config_hash
    assert parse_config(BASE + ["--profile", path]).config_hash == with_priors
    _profile(tmp_path, "off.json")
    off = parse_config(BASE + ["--profile", str(tmp_path / "off.json")]).config_hash
    assert off != with_priors
    _profile(tmp_path, priors={**PRIORS, "fused": [0.3, 0.3, 0.4]})
    assert parse_config(BASE + ["--profile", path]).config_hash not in (with_priors, off)
    # a profile without the key (written before priors existed) applies none, with the hash it had
    old = json.loads(open(tmp_path / "off.json").read())
    del old["priors"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert parse_config(BASE + ["--profile", str(tmp_path / "old.json")]).config_hash == off
    # the off path's hash does not name the priors at all (a run from before keeps its hash)
    assert "priors" not in JobConfig(input="i", output="o").output_affecting()["label"]
    # the run's recorded config (_run.json) rebuilds the same job, priors included
    assert JobConfig(**json.loads(cfg.to_json())) == cfg


def test_choice_priors_flag_agrees_with_or_contradicts_the_profile(tmp_path):
    path = _profile(tmp_path, priors=PRIORS)
    same = parse_config(BASE + ["--profile", path, "--choice-priors", path])  # the profile's own priors
    assert same.label.priors == load_profile(path).priors
    short = {k: v for k, v in PRIORS.items() if k != "keys"}  # a config file's mapping, defaults left out
    (tmp_path / "job.json").write_text(json.dumps({"input": "i", "output": "o", "label": {"priors": short}}))
    assert parse_config(["--config", str(tmp_path / "job.json"), "--profile", path]).label.priors == same.label.priors
    for flags, match in [(["--choice-priors", "none"], r"--choice-priors is None but the profile .* sets priors to "
                                                       r"ChoicePriors\(keyed_by='position'"),
                         (["--choice-priors", _profile(tmp_path, "o.json", priors={**PRIORS, "rows": 9})],
                          r"--choice-priors is ChoicePriors\(.*rows=9\) but the profile .* sets priors")]:
        with pytest.raises(ValueError, match=match):
            parse_config(BASE + ["--profile", path] + flags)
    off = _profile(tmp_path, "off.json")
    with pytest.raises(ValueError, match=r"--choice-priors is ChoicePriors\(.*\) but the profile .* sets priors to None"):
        parse_config(BASE + ["--profile", off, "--choice-priors", path])
    # without a profile: the flag alone, checked against the job's members and method
    flags = BASE + ["--method", "deepen", "--members", "a", "b", "c", "--choice-priors", path]
    assert parse_config(flags).label.priors.members == ("a", "b", "c")
    with pytest.raises(ValueError, match=r"label priors were estimated for members \['a', 'b', 'c'\], but the job "
                                         r"runs \['a', 'b'\]"):
        parse_config(BASE + ["--method", "deepen", "--members", "a", "b", "--choice-priors", path])
    with pytest.raises(ValueError, match="label priors hold a fused table \\(DeePEn's\\), but the method is 'specfuse'"):
        parse_config(BASE + ["--method", "specfuse", "--members", "a", "b", "c", "--choice-priors", path])
    members_only = _profile(tmp_path, "members-only.json", priors={**PRIORS, "fused": None})
    assert parse_config(BASE + ["--method", "specfuse", "--members", "a", "b", "c", "--choice-priors", members_only])
    with pytest.raises(ValueError, match="label priors for DeePEn need a fused table"):
        parse_config(BASE + ["--method", "deepen", "--members", "a", "b", "c", "--choice-priors", members_only])
    with pytest.raises(ValueError, match="priors were estimated under norm 'pmi', but norm is 'token'"):
        parse_config(flags + ["--choice-norm", "token"])
    with pytest.raises(ValueError, match="estimated for the profile's members"):
        _profile(tmp_path, "bad.json", priors={**PRIORS, "members": ["x", "b", "c"]})
    good = json.loads(open(path).read())
    for bad in (5, [0.5, 0.5], "priors.json"):  # not an object of priors: refused naming the field and the value
        (tmp_path / "bad.json").write_text(json.dumps({**good, "priors": bad}))
        with pytest.raises(ValueError, match="profile: priors must be None or an object of priors .*got "
                                             + re.escape(repr(bad))):
            load_profile(tmp_path / "bad.json")


def test_calibrate_chooses_and_applies_priors_end_to_end(tiny_dirs, dev_file, tmp_path):  # noqa: F811
    from jobs.calibrate import calibrate

    path, rows = dev_file
    auto = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "auto.json"), gap=None)
    rec = auto.chosen_on["priors"]
    assert rec["keyed_by"] == "position" and rec["applied"] == (rec["on"] > rec["off"])
    assert (auto.priors is not None) == rec["applied"]
    off = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "off.json"), gap=None, priors="off")
    assert off.priors is None and off.chosen_on["priors"] == {"applied": False, "why": "left off (--priors off)"}
    on = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "on.json"), gap=None, priors="on")
    assert on.priors is not None and on.chosen_on["priors"]["forced"] and on.priors.members == on.members
    assert on.priors.rows == 8 and on.priors.norm == on.choice_norm and on.priors.fused is None
    assert load_profile(tmp_path / "on.json") == on
    with pytest.raises(ValueError, match=r"priors must be one of \('auto', 'on', 'off'\), got 'yes'"):
        calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "x.json"), priors="yes")
    # the job applies the priors; its labels on dev are what calibration predicted offline
    cfg = dataclasses.replace(parse_config(["--input", path, "--output", str(tmp_path / "o"), "--profile",
                                            str(tmp_path / "on.json")]), max_new_tokens=4)
    assert cfg.label.priors == on.priors
    got = _job_rows(cfg, rows)
    answers = {r["id"]: r["answer"] for r in rows}
    assert all(r["status"] == "ok" for r in got)
    assert sum(r["label"] == answers[r["id"]] for r in got) / 8 == pytest.approx(on.chosen_on["gated_accuracy"])
    # DeePEn: the fused prior comes from its own cached dev labels
    deep = calibrate(path, tiny_dirs, "deepen", str(tmp_path / "deep.json"), gap=None, deepen_dev_limit=4,
                     priors="on")
    assert deep.method == "deepen" and deep.priors.fused is not None and len(deep.priors.tables) == 2


def test_an_uncovered_choice_is_an_error_row_of_the_job(tiny_dirs, dev_file, tmp_path):  # noqa: F811
    from jobs.calibrate import calibrate

    path, rows = dev_file
    on = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "on.json"), gap=None, priors="on")
    cfg = dataclasses.replace(parse_config(["--input", path, "--output", str(tmp_path / "o"), "--profile",
                                            str(tmp_path / "on.json")]), max_new_tokens=4)
    wide = [dict(rows[0], id="wide", choices=rows[0]["choices"] + ["one more"])] + rows[1:3]
    got = {r["id"]: r for r in _job_rows(cfg, wide)}
    assert got["wide"]["status"] == "error" and got["wide"]["error_kind"] == "input"  # bad input, no error budget
    assert "a row of 4 choices has no prior for position 4" in got["wide"]["error"]
    assert all(got[r["id"]]["status"] == "ok" for r in rows[1:3])
    assert on.priors.keyed_by == "position"


@pytest.mark.slow
@pytest.mark.spark
def test_a_profile_with_priors_through_the_spark_job(tiny_dirs, dev_file, tmp_path):  # noqa: F811
    """The Spark job applies a profile holding priors: every row ok, the labels calibration predicted,
    the config_hash of the priors, and the run's recorded config holds them."""
    from jobs.calibrate import calibrate
    from jobs.cli import main

    path, rows = dev_file
    on = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "on.json"), gap=None, priors="on")
    out = tmp_path / "job"
    argv = ["--input", path, "--output", str(out), "--profile", str(tmp_path / "on.json"), "--partitions", "2",
            "--batch-size", "3", "--master", "local[1]", "--max-new-tokens", "4", "--no-report"]
    assert main(argv) == 0
    import pyarrow.parquet as pq

    got = pq.read_table(out / "data").to_pylist()
    answers = {r["id"]: r["answer"] for r in rows}
    assert len(got) == 8 and all(r["status"] == "ok" for r in got)
    assert {r["config_hash"] for r in got} == {parse_config(argv).config_hash}
    assert sum(r["label"] == answers[r["id"]] for r in got) / 8 == pytest.approx(on.chosen_on["gated_accuracy"])
    run = json.loads((out / "_run.json").read_text())
    assert ChoicePriors.from_mapping(run["config"]["label"]["priors"]) == on.priors
