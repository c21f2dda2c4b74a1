"""Calibration (jobs/calibrate.py, issue 16 point 4): bad dev files refused naming the row and the
field, the offline rules, the profile applied by the job (config_hash follows it), and calibration end
to end on tiny saved members in process (each member scored once, a rerun makes no model call)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ensemble.labeling import ChoiceScores, LabelParams
from jobs import calibration as cal
from jobs.cli import entry, parse_config
from jobs.devset import DevSetError, read_dev
from jobs.profiles import Profile, load_profile

BASE = ["--input", "i", "--output", "o"]
CH = ["Paris", "Rome", "the cat", "a big house near the river"]


def _write(tmp_path, rows, name="dev.jsonl"):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _row(i, **kw):
    return {"id": f"q{i}", "prompt": f"Question {i}?", "choices": CH, "answer": CH[i % 4], **kw}


# ---- the dev file --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, rows, match", [
    ("dev.jsonl", [_row(0), {k: v for k, v in _row(1).items() if k != "answer"}],
     r"line 2 \(id 'q1'\): field 'answer' must be the text of one of the choices, it is missing"),
    ("dev.jsonl", [_row(0), _row(1, answer="Berlin")],
     r"line 2 \(id 'q1'\): field 'answer' must be one of the row's choices \[.*\], got 'Berlin'"),
    ("dev.jsonl", [], r"dev file '.*dev.jsonl' is empty"),
    ("dev.jsonl", ["", "  "], r"is empty"),
    ("dev.jsonl", [_row(0), "{broken"], r"line 2: not valid JSON"),
    ("dev.jsonl", [_row(0), _row(1, choices=["only one"])],
     r"line 2 \(id 'q1'\): field 'choices' must be a list of at least two non-empty strings, got \['only one'\]"),
    ("dev.jsonl", [_row(0), _row(1, id="q0")], r"line 2 \(id 'q0'\): field 'id' must be unique, it is also at line 1"),
    ("dev.jsonl", [_row(0, prompt="  ")], r"line 1 \(id 'q0'\): field 'prompt' must be a non-empty string"),
    ("dev.parquet", [_row(0), _row(1, answer=None)], r"row 2 \(id 'q1'\): field 'answer' must be the text of one"),
    ("dev.parquet", [_row(0), _row(1, id="")], r"row 2: field 'id' must be a non-empty string, got ''"),
])
def test_a_bad_dev_file_is_refused_naming_the_row_and_the_field(tmp_path, name, rows, match):
    path = _write(tmp_path, rows, name)
    with pytest.raises(DevSetError, match=match):
        read_dev(path)


def test_the_command_refuses_a_bad_dev_file_before_any_model_call(tmp_path, caplog, monkeypatch):
    import ensemble.models

    monkeypatch.setattr(ensemble.models, "load_member", lambda *a, **k: pytest.fail("a model was loaded"))
    path = _write(tmp_path, [_row(0), _row(1, answer="Berlin")])
    with caplog.at_level(logging.ERROR):
        code = entry(["calibrate", "--dev", path, "--members", "a", "b", "--method", "specfuse",
                      "--output", str(tmp_path / "p.json")])
    assert code == 2 and "line 2 (id 'q1'): field 'answer'" in caplog.text
    assert not (tmp_path / "p.json").exists()


def test_a_good_dev_file(tmp_path):
    dev = read_dev(_write(tmp_path, [_row(i) for i in range(3)] + [_row(3, choices=["yes", "no"], answer="no")]))
    assert [r.gold for r in dev.rows] == [0, 1, 2, 1] and dev.chance == pytest.approx((0.25 * 3 + 0.5) / 4)
    again = read_dev(_write(tmp_path, [_row(i) for i in range(3)] + [_row(3, choices=["yes", "no"], answer="no")],
                            "dev.parquet"))
    assert again.rows == dev.rows and len(dev.sha256) == 64


# ---- the offline rules ---------------------------------------------------------------------------
def test_wilson_interval():
    lo, hi = cal.wilson(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert cal.wilson(0, 10)[0] == 0.0 and cal.wilson(10, 10)[1] == pytest.approx(1.0) and cal.wilson(0, 10)[1] > 0.2


def _scores(logprobs):
    return ChoiceScores(tuple(logprobs), (1,) * len(logprobs), (4,) * len(logprobs), (0.0,) * len(logprobs))


def test_norm_main_drop_and_weights():
    rep = lambda acc, lo: {n: {"accuracy": acc, "low": lo, "high": 1.0} for n in ("sum", "token", "char", "pmi")}
    reports = {"a": rep(0.6, 0.45), "b": rep(0.7, 0.55), "c": rep(0.3, 0.2), "d": rep(0.55, 0.4)}
    assert cal.choose_norm(reports) == "token"  # all tied: the first of NORM_PREFERENCE
    reports["a"]["pmi"]["accuracy"] = 0.9
    assert cal.choose_norm(reports) == "pmi"
    main, kept, dropped = cal.select_members(list(reports), reports, "token", chance=0.25)
    assert main == "b" and kept == ["a", "b"]
    assert dropped["c"].startswith("at chance") and dropped["d"].startswith("far below the best")
    w = cal.adapt_weights([0.6, 0.3, 0.1])
    assert w == pytest.approx([0.6, 0.3, 0.1]) and sum(w) == 1.0 and cal.adapt_weights([0.0, 0.0]) == [0.5, 0.5]


def test_gate_and_pool_rules():
    main_posts = [[0.9, 0.1], [0.55, 0.45], [0.5, 0.5]]
    golds = [0, 1, 1]
    # the ensemble right where the main member is unsure: the gate keeps only the confident row
    gate, accs, _ = cal.choose_gate(main_posts, [1, 1, 1], golds)
    assert accs["None"] == pytest.approx(2 / 3) and accs["0.0"] == pytest.approx(1 / 3) and gate == 0.2
    assert accs["0.2"] == 1.0
    # a tie between "never" and "always": the main member (cheaper) wins
    gate, _, _ = cal.choose_gate([[0.9, 0.1]], [0], [0])
    assert gate == 0.0
    # SpecFuse (only gate 0 saves calls): the one-row gain of 0.2 above is no evidence, so never;
    # gate 0 still competes when it is no worse (the profile is then the main member alone)
    spec = lambda g: g == 0.0  # noqa: E731
    assert cal.choose_gate(main_posts, [1, 1, 1], golds, saves=spec)[0] is None
    assert cal.choose_gate([[0.9, 0.1]], [0], [0], saves=spec)[0] == 0.0
    # six rows the gate makes right and none it makes wrong: p = 1/64 < 0.05, so it competes
    sure, unsure = [0.9, 0.1], [0.55, 0.45]
    posts, picks, ys = [sure] * 6 + [unsure] * 4, [1] * 10, [0] * 6 + [1] * 4
    gate, _, changes = cal.choose_gate(posts, picks, ys, saves=spec)
    assert changes["0.2"] == {"better": 6, "worse": 0, "p": 1 / 64} and changes["None"]["p"] == 1.0
    assert gate == 0.2
    assert cal.sign_test(3, 0) == 1 / 8 and cal.sign_test(8, 3) == pytest.approx(0.1133, abs=1e-4)
    # one member sure and right, two fairly sure and wrong: at temperature 1 the linear pool follows the
    # two (0.47 on the gold choice); hotter, the sure member's larger score difference wins (log-linear: always)
    logs = [[[0.0, -14.0]], [[0.0, math.log(4)]], [[0.0, math.log(4)]]]
    kind, accs, records = cal.choose_pool(logs, [1 / 3] * 3, [0], grid=(1.0,))
    assert set(accs) == {"linear", "loglinear"} and kind == "loglinear" and accs == {"linear": 0.0, "loglinear": 1.0}
    assert records["linear"]["temperature"] == 1.0 and records["linear"]["nll_before"] == pytest.approx(
        -math.log((1 + 0.2 + 0.2) / 3), abs=1e-5)
    kind, accs, records = cal.choose_pool(logs, [1 / 3] * 3, [0])
    assert kind == "linear" and accs == {"linear": 1.0, "loglinear": 1.0} and records["linear"]["temperature"] > 1
    assert records["linear"]["fitted_on"] == "the linear pool of the members' posteriors"


def test_ece_and_nll():
    # two bins: conf 0.95 (1.0 falls in the last bin) all right -> |1-0.975|; conf 0.55 half right -> |0.5-0.55|
    assert cal.ece([0.95, 1.0, 0.55, 0.55], [True, True, True, False]) == pytest.approx(
        0.5 * abs(1 - 0.975) + 0.5 * abs(0.5 - 0.55))
    assert cal.ece([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        cal.ece([1.2], [True])
    with pytest.raises(ValueError, match="non-empty"):
        cal.ece([], [])
    assert cal.label_ece([[0.9, 0.1], [0.8, 0.2]], [0, 1]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.8)
    assert cal.nll([[0.5, 0.5], [0.25, 0.75]], [0, 1]) == pytest.approx((math.log(2) + -math.log(0.75)) / 2)
    assert cal.nll([[1.0, 0.0]], [1]) == pytest.approx(744.44, abs=0.01)  # an underflowed 0: finite


def test_temperature_fit():
    grid = cal.TEMPERATURE_GRID
    assert grid[0] == 0.25 and grid[-1] == 16.0 and 1.0 in grid and len(grid) == 25
    assert all(b / a == pytest.approx(2 ** 0.25) for a, b in zip(grid, grid[1:]))
    # over-confident scores: right 60% of the time with a top probability of 0.88 -> a temperature > 1
    logs = [[0.0, -2.0]] * 6 + [[-2.0, 0.0]] * 4
    golds = [0] * 10
    t, rec = cal.temperature_record(lambda t: cal.tempered(logs, t), golds, grid, "test")
    assert t > 1 and rec["temperature"] == t and rec["fitted_on"] == "test" and rec["rows"] == 10
    assert rec["nll_after"] < rec["nll_before"] and rec["ece_after"] < rec["ece_before"]
    assert rec["nll"][str(t)] == min(rec["nll"].values()) and set(rec["nll"]) == {str(g) for g in grid}
    # the fitted temperature makes the top probability close to the 60% accuracy (the best is 2 / log(1.5), ~4.9)
    assert max(cal.tempered(logs, t)[0]) == pytest.approx(0.6, abs=0.01)
    # under-confident scores: right every time -> the coldest temperature
    assert cal.fit_temperature(lambda t: cal.tempered([[0.1, 0.0]] * 5, t), [0] * 5)[0] == 0.25
    # ties (every temperature gives the same NLL): the closest to 1
    assert cal.fit_temperature(lambda t: cal.tempered([[0.0, 0.0]], t), [0])[0] == 1.0


def test_member_temperatures_are_kept_when_they_win_out_of_sample():
    # member a: sharp (logit gap 10) and right on 60% of the rows; member b: mild (gap 1) and right on
    # 90%. Under one shared temperature a outvotes b wherever they disagree; each at its own
    # temperature, b's calibrated confidence carries those rows.
    n = 40
    a = [[10.0, 0.0] if i % 5 not in (0, 1) else [0.0, 10.0] for i in range(n)]
    b = [[1.0, 0.0] if i % 10 != 0 else [0.0, 1.0] for i in range(n)]
    golds = [0] * n
    temps, recs = cal.member_temperatures([a, b], ["a", "b"], golds)
    assert temps[0] == 16.0 and temps[1] < 1.0  # a flattened to the grid's top, b sharpened
    assert recs["a"]["fitted_on"] == "a's posteriors" and recs["b"]["nll_after"] < recs["b"]["nll_before"]
    rec = cal.cross_fit_member_temperatures([a, b], ["a", "b"], [0.5, 0.5], golds)
    assert rec["on"] == pytest.approx(0.9) and rec["off"] == pytest.approx(0.6) and len(rec["folds"]) == 2
    assert all(f["rows"] == 20 and f["temperatures"][0] == 16.0 for f in rec["folds"])
    # two copies of one member: their own temperatures are the shared one, no gain (not kept: strictly)
    same = cal.cross_fit_member_temperatures([b, b], ["b", "b2"], [0.5, 0.5], golds)
    assert same["on"] == same["off"]
    assert cal.scaled([[2.0, -math.inf]], 4.0) == [[0.5, -math.inf]]


# ---- the profile applied by the job ---------------------------------------------------------------
def _profile(tmp_path, name="p.json", **kw):
    fields = dict(method="deepen", members=("a", "b", "c"), main=1, weights=(0.3, 0.4, 0.3), choice_norm="pmi",
                  neutral_context="Answer:", target_delimiter=" ", gate=0.3, temperature=2.0)
    fields.update(kw)
    path = tmp_path / name
    Profile(**fields).save(path)
    return str(path)


def test_the_job_applies_a_profile_and_refuses_contradicting_flags(tmp_path):
    path = _profile(tmp_path)
    cfg = parse_config(BASE + ["--profile", path])
    assert (cfg.method, cfg.members, cfg.fuser.main, cfg.fuser.weights) == ("deepen", ("a", "b", "c"), 1, (0.3, 0.4, 0.3))
    assert cfg.label == LabelParams(norm="pmi", gate=0.3, temperature=2.0) and cfg.profile == path
    same = parse_config(BASE + ["--profile", path, "--method", "deepen", "--choice-norm", "pmi", "--main", "1",
                                "--deepen-topk", "32"])  # agreeing flags, and settings it does not make
    assert same.fuser.topk == 32
    for flags, match in [(["--method", "specfuse"], r"--method is 'specfuse' but the profile .* sets method to 'deepen'"),
                         (["--members", "a", "b"], r"--members is \['a', 'b'\] but the profile .* sets members"),
                         (["--weights", "0.2", "0.4", "0.4"], r"--weights is \[0.2, 0.4, 0.4\] but the profile .* "
                                                               r"sets weights to \[0.3, 0.4, 0.3\]"),
                         (["--label-gate", "none"], r"--label-gate is None but the profile .* sets gate to 0.3"),
                         (["--choice-norm", "token"], r"--choice-norm is 'token' but the profile .* sets norm to 'pmi'"),
                         (["--label-temperature", "1"],
                          r"--label-temperature is 1.0 but the profile .* sets temperature to 2.0")]:
        with pytest.raises(ValueError, match=match):
            parse_config(BASE + ["--profile", path] + flags)
    spec = parse_config(BASE + ["--profile", _profile(tmp_path, "s.json", method="specfuse", main=0,
                                                        label_pool="loglinear", gate=None)])
    assert spec.fuser.label_pool == "loglinear" and spec.fuser.weights == (0.3, 0.4, 0.3) and spec.label.gate is None
    # a profile written before the temperature existed applies temperature 1
    old = json.loads(open(path).read())
    del old["temperature"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert parse_config(BASE + ["--profile", str(tmp_path / "old.json")]).label.temperature == 1.0


def test_config_hash_follows_the_profile(tmp_path):
    path = _profile(tmp_path)
    before = parse_config(BASE + ["--profile", path]).config_hash
    assert parse_config(BASE + ["--profile", path]).config_hash == before
    for change in ({"gate": 0.5}, {"weights": (0.2, 0.5, 0.3)}, {"choice_norm": "char"}, {"main": 0},
                   {"target_delimiter": ""}, {"temperature": 0.5}):
        _profile(tmp_path, **change)
        assert parse_config(BASE + ["--profile", path]).config_hash != before, change
    _profile(tmp_path, dropped={"d": "at chance"})  # the record of why changes no output setting
    assert parse_config(BASE + ["--profile", path]).config_hash == before


def test_a_bad_profile_is_refused(tmp_path):
    path = tmp_path / "p.json"
    with pytest.raises(ValueError, match="does not exist"):
        load_profile(path)
    good = json.loads(open(_profile(tmp_path)).read())
    for change, match in [({"version": 99}, "version must be 1"), ({"main": 5}, "main must be an index"),
                          ({"choice_norm": "mean"}, "choice_norm must be one of"), ({"extra": 1}, "unknown keys"),
                          ({"label_pool": "linear"}, "label_pool must be one of .* for specfuse and None otherwise"),
                          ({"temperature": 0}, "temperature must be a finite number > 0, got 0")]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            load_profile(path)


# ---- end to end on tiny saved members (in process) -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tests import tiny

    dirs = []
    for name, member in (("bpe", tiny.member_bpe()), ("sp", tiny.member_sp())):
        d = tmp_path_factory.mktemp(f"tiny-{name}")
        member.model.save_pretrained(d, safe_serialization=True)
        member.tokenizer.save_pretrained(d)
        dirs.append(str(d))
    return dirs


@pytest.fixture(scope="module")
def dev_file(tiny_dirs, tmp_path_factory):
    """8 rows whose answers are mostly the second member's own picks (so that members differ on dev)."""
    from ensemble import Single, load_member

    words = ["Paris", "Rome", "the cat", "a big house near the river", "two plus two", "yes", "no", "sun"]
    rows = [{"id": f"r{i}", "prompt": f"Question {i}: which one?", "choices": [words[(i + k) % 8] for k in range(3)]}
            for i in range(8)]
    picks = Single(load_member(tiny_dirs[1])).label([r["prompt"] for r in rows], [r["choices"] for r in rows])
    for i, (r, o) in enumerate(zip(rows, picks)):
        r["answer"] = o.label if i < 6 else next(c for c in r["choices"] if c != o.label)
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


def _job_rows(cfg, rows):
    from ensemble.fusers.registry import make_fuser
    from jobs.partition import process_partition
    from jobs.rows import prepare

    batch = pa.RecordBatch.from_pydict({"value": [json.dumps({k: r[k] for k in ("id", "prompt", "choices")})
                                                  for r in rows]})
    prepared = prepare(batch, run_seed=cfg.seed, job_max_new=cfg.max_new_tokens, mode="label")
    make = lambda: make_fuser(cfg.method, cfg.members, cfg.fuser)  # noqa: E731
    return pa.Table.from_batches(list(process_partition([prepared], make_fuser=make, config=cfg))).to_pylist()


def test_calibrate_specfuse_end_to_end(tiny_dirs, dev_file, tmp_path, monkeypatch):
    from jobs.calibrate import calibrate

    import jobs.calibrate as jc

    # the tiny dev set's own choice is gate 0, which reduces the profile to the main member alone
    # (test_gate_zero_reduces_the_profile_to_the_main_member): here the best of the other gates
    real = jc.choose_gate
    monkeypatch.setattr(jc, "choose_gate", lambda *a, **k: (
        real(*a, grid=[g for g in cal.GATE_GRID if g != 0.0], **k)[0], *real(*a, **k)[1:]))
    path, rows = dev_file
    out = tmp_path / "prof" / "spec.json"
    prof = calibrate(path, tiny_dirs, "specfuse", str(out), gap=None)
    assert load_profile(out) == prof and prof.method == "specfuse" and prof.requested_method == "specfuse"
    acc = {m: prof.member_accuracy[m][prof.choice_norm]["accuracy"] for m in tiny_dirs}
    assert prof.members[0] == max(tiny_dirs, key=lambda m: (acc[m], -tiny_dirs.index(m)))  # main first
    assert prof.weights == pytest.approx(tuple(cal.adapt_weights([acc[m] for m in prof.members])))
    assert prof.dev["rows"] == prof.dev["scored"] == 8 and prof.dev["sha256"] == read_dev(path).sha256
    assert set(prof.chosen_on["gate"]) == {str(g) for g in cal.GATE_GRID} and prof.label_pool in ("linear", "loglinear")
    rec = prof.chosen_on["temperature"]
    assert prof.temperature == rec["temperature"] in cal.TEMPERATURE_GRID and rec["rows"] == 8
    assert rec["nll_after"] <= rec["nll_before"] and {"ece_before", "ece_after"} <= set(rec)
    assert prof.gate != 0.0 and "reduced" not in prof.chosen_on
    assert rec["fitted_on"] == f"the {prof.label_pool} pool of the members' posteriors" and "ece_gated" in rec
    assert list(prof.agreement) == [f"{tiny_dirs[0]}|{tiny_dirs[1]}"]
    # each member's own temperature is tried and kept only when it wins out of sample (2-fold)
    decision = prof.chosen_on["member_temperatures_decision"]
    assert {"on", "off", "folds", "applied"} <= set(decision) and decision["applied"] is (decision["on"] > decision["off"])
    assert (prof.member_temperatures is not None) is decision["applied"]
    if decision["applied"]:
        mt = prof.chosen_on["member_temperatures"]
        assert prof.member_temperatures == tuple(mt[m]["temperature"] for m in prof.members)
    cache = sorted(p.name for p in (tmp_path / "prof" / "spec.cache").iterdir())
    assert len(cache) == 2 and all(n.startswith("scores-") for n in cache)
    # a rerun makes no model call: every member's scores come from the cache
    import ensemble.models

    monkeypatch.setattr(ensemble.models, "load_member", lambda *a, **k: pytest.fail("a model was loaded"))
    assert calibrate(path, tiny_dirs, "specfuse", str(out), gap=None) == prof
    monkeypatch.undo()
    shared = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "shared.json"), gap=None,
                       fit_member_temperatures=False)
    assert shared.member_temperatures is None and "member_temperatures" not in shared.chosen_on
    # the job applies the profile, and its labels on dev are what calibration predicted offline
    cfg = dataclasses.replace(parse_config(["--input", path, "--output", str(tmp_path / "o"), "--profile", str(out)]),
                              max_new_tokens=4)
    assert (cfg.method, cfg.members, cfg.fuser.weights, cfg.fuser.label_pool) == (
        "specfuse", prof.members, prof.weights, prof.label_pool)
    assert (cfg.label.norm, cfg.label.gate, cfg.label.temperature, cfg.label.member_temperatures) == (
        prof.choice_norm, prof.gate, prof.temperature, prof.member_temperatures)
    got = _job_rows(cfg, rows)
    assert all(r["status"] == "ok" for r in got)
    answers = {r["id"]: r["answer"] for r in rows}
    assert sum(r["label"] == answers[r["id"]] for r in got) / 8 == pytest.approx(prof.chosen_on["gated_accuracy"])
    for r in got:  # gated exactly where the main member's margin reaches the gate
        main = sorted(r["member_stats"][0]["choice_probs"], reverse=True)
        assert r["gated"] is (prof.gate is not None and main[0] - main[1] >= prof.gate)
    # another profile (another gate), another config_hash
    other = dataclasses.replace(prof, gate=None if prof.gate is not None else 0.0)
    other.save(tmp_path / "other.json")
    assert parse_config(BASE + ["--profile", str(tmp_path / "other.json")]).config_hash != \
        parse_config(BASE + ["--profile", str(out)]).config_hash
    # a profile with member temperatures: the job applies them (another hash), and a contradicting flag is refused
    tempered = dataclasses.replace(prof, member_temperatures=(2.0, 0.5))
    tempered.save(tmp_path / "tempered.json")
    cfg_t = parse_config(BASE + ["--profile", str(tmp_path / "tempered.json")])
    assert cfg_t.label.member_temperatures == (2.0, 0.5)
    assert cfg_t.config_hash != dataclasses.replace(cfg_t, label=cfg_t.label.with_(member_temperatures=None)).config_hash
    with pytest.raises(ValueError, match="member-temperatures"):
        parse_config(BASE + ["--profile", str(tmp_path / "tempered.json"), "--member-temperatures", "1", "1"])


def test_calibrate_deepen_labels_a_dev_prefix_once(tiny_dirs, dev_file, tmp_path, caplog):
    from jobs.calibrate import calibrate

    path, _ = dev_file
    out = tmp_path / "deep.json"
    prof = calibrate(path, tiny_dirs, "deepen", str(out), gap=None, deepen_dev_limit=3)
    reduced = prof.chosen_on.get("reduced")  # gate 0: the profile is the main member alone
    members, main = (reduced["members"], reduced["main"]) if reduced else (prof.members, prof.main)
    assert prof.method == ("single" if reduced else "deepen") and prof.requested_method == "deepen"
    assert tuple(members) == tuple(tiny_dirs) and prof.chosen_on["gate_rows"] == 3
    assert members[main] == max(tiny_dirs, key=lambda m: (
        prof.member_accuracy[m][prof.choice_norm]["accuracy"], -tiny_dirs.index(m)))
    labels = [p for p in (tmp_path / "deep.cache").iterdir() if p.name.startswith("labels-deepen-")]
    assert len(labels) == 1 and pq.read_table(labels[0]).num_rows == 3
    rec = prof.chosen_on["temperature"]  # fitted on the cached fused probabilities of the 3 rows
    fused = rec["ensemble"] if reduced else rec  # gate 0: refitted on the main member's posteriors
    assert fused["fitted_on"] == "DeePEn's fused probabilities" and fused["rows"] == 3
    assert fused["nll_after"] <= fused["nll_before"] and bool(reduced) == (rec["rows"] == 8)
    assert prof.temperature == rec["temperature"] and rec["nll_after"] <= rec["nll_before"]
    fixed = calibrate(path, tiny_dirs, "deepen", str(out), gap=None, deepen_dev_limit=3,
                      fit_temperature=False)  # same cache, temperature kept at 1
    assert fixed.temperature == 1.0 and fixed.chosen_on["temperature"]["nll"] == {"1.0": rec["nll_before"]}
    with caplog.at_level(logging.INFO):
        calibrate(path, tiny_dirs, "deepen", str(out), gap=None, deepen_dev_limit=3)
    assert caplog.text.count("cache hit") == 3 and "labeling 3 dev rows" not in caplog.text
    # with the drop rule, members at chance on 8 rows leave the best alone: the profile is single
    alone = calibrate(path, tiny_dirs, "deepen", str(tmp_path / "alone.json"))
    if alone.dropped:
        assert alone.method == "single" and alone.weights is None and len(alone.members) == 1
        assert parse_config(BASE + ["--profile", str(tmp_path / "alone.json")]).method == "single"


def test_calibrate_one_member_is_its_own_norm_and_temperature(tiny_dirs, dev_file, tmp_path):
    from jobs.calibrate import calibrate

    path, _ = dev_file
    prof = calibrate(path, tiny_dirs[1:], "specfuse", str(tmp_path / "one.json"))
    assert (prof.method, prof.members, prof.weights, prof.gate, prof.dropped) == ("single", (tiny_dirs[1],), None,
                                                                                 None, {})
    accs = {n: r["accuracy"] for n, r in prof.member_accuracy[tiny_dirs[1]].items()}
    assert accs[prof.choice_norm] == max(accs.values())  # the member's own best normalisation on dev
    assert prof.temperature == prof.chosen_on["temperature"]["temperature"]
    assert parse_config(BASE + ["--profile", str(tmp_path / "one.json")]).members == (tiny_dirs[1],)
    with pytest.raises(ValueError, match=r"one or more distinct member specs, got \['a', 'a'\]"):
        calibrate(path, ["a", "a"], "specfuse", str(tmp_path / "x.json"))


@pytest.mark.slow
@pytest.mark.spark
def test_calibrate_through_the_spark_job_and_apply_it(tiny_dirs, dev_file, tmp_path):
    """The Spark runner (large dev sets) scores as the in-process one; the job applies the profile."""
    from jobs.calibrate import calibrate
    from jobs.cli import main
    from jobs.dev_scores import Runtime
    from schemas import OUTPUT_SCHEMA, SCHEMA_VERSION

    path, rows = dev_file
    on_spark = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "s.json"), gap=None,
                         rt=Runtime(runner="spark", master="local[1]"))
    local = calibrate(path, tiny_dirs, "specfuse", str(tmp_path / "l.json"), gap=None)
    assert (on_spark.members, on_spark.choice_norm, on_spark.label_pool, on_spark.gate) == (
        local.members, local.choice_norm, local.label_pool, local.gate)
    assert on_spark.member_accuracy == local.member_accuracy
    out = tmp_path / "job"
    argv = ["--input", path, "--output", str(out), "--profile", str(tmp_path / "s.json"), "--partitions", "1",
            "--master", "local[1]", "--max-new-tokens", "4", "--no-report"]
    assert main(argv) == 0
    table = pq.read_table(out / "data")
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    got = table.to_pylist()
    assert len(got) == 8 and all(r["status"] == "ok" and r["gated"] is not None for r in got)
    assert {r["config_hash"] for r in got} == {parse_config(argv).config_hash}
    assert {r["schema_version"] for r in got} == {SCHEMA_VERSION}
    answers = {r["id"]: r["answer"] for r in rows}
    assert sum(r["label"] == answers[r["id"]] for r in got) / 8 == pytest.approx(on_spark.chosen_on["gated_accuracy"])


@pytest.mark.parametrize("method,priors", [("specfuse", "off"), ("specfuse", "on"), ("deepen", "off")])
def test_gate_zero_reduces_the_profile_to_the_main_member(tiny_dirs, dev_file, tmp_path, monkeypatch, method, priors):
    """A gate of 0 keeps the main member's answer on every row: the profile is method single over it,
    and the job's labels and probabilities equal those of the ensemble profile it replaces, which calls
    every member for them."""
    import jobs.calibrate as jc
    from ensemble.priors import ChoicePriors

    real = jc.choose_gate
    monkeypatch.setattr(jc, "choose_gate", lambda *a, **k: (0.0, *real(*a, **k)[1:]))  # whatever dev says, gate 0
    path, rows = dev_file
    out = tmp_path / "red.json"
    prof = jc.calibrate(path, tiny_dirs, method, str(out), gap=None, deepen_dev_limit=3, priors=priors)
    r = prof.chosen_on["reduced"]
    assert (r["method"], r["gate"], len(r["members"])) == (method, 0.0, 2)
    assert (prof.method, prof.members, prof.main, prof.weights, prof.gate, prof.label_pool) == (
        "single", (r["members"][r["main"]],), 0, None, None, None)
    assert (prof.priors is not None) == (priors == "on") == (r["priors"] is not None)
    other = next(m for m in tiny_dirs if m != prof.members[0])  # the member the reduction leaves out, and why
    assert set(prof.dropped) == {other} and "the gate (0) keeps" in prof.dropped[other]
    if prof.priors is not None:  # the main member's table of the ensemble's priors
        full = ChoicePriors.from_mapping(r["priors"])
        assert prof.priors.members == prof.members and prof.priors.tables == (full.tables[r["main"]],)
    assert "reduced to method single over" in jc.summary(prof)
    rec = prof.chosen_on["temperature"]  # refitted on the main member's posteriors, the first fit kept
    assert rec["fitted_on"].startswith(f"{prof.members[0]}'s posteriors") and "ece_gated" not in rec
    assert prof.temperature == rec["temperature"] and rec["ensemble"]["fitted_on"] == (
        f"the {r['label_pool']} pool of the members' posteriors" if method == "specfuse"
        else "DeePEn's fused probabilities")
    ensemble = dataclasses.replace(prof, method=r["method"], members=tuple(r["members"]), main=r["main"],
                                   weights=tuple(r["weights"]), label_pool=r["label_pool"], gate=0.0,
                                   priors=None if r["priors"] is None else ChoicePriors.from_mapping(r["priors"]))
    ensemble.save(tmp_path / "ens.json")
    got = {}
    for name, f in (("single", out), ("ensemble", tmp_path / "ens.json")):
        cfg = dataclasses.replace(parse_config(["--input", path, "--output", str(tmp_path / name), "--profile", str(f)]),
                                  max_new_tokens=4)
        got[name] = _job_rows(cfg, rows)
        assert [x["status"] for x in got[name]] == ["ok"] * 8
    assert [x["label"] for x in got["single"]] == [x["label"] for x in got["ensemble"]]
    for a, b in zip(got["single"], got["ensemble"]):
        assert a["label_probs"] == pytest.approx(b["label_probs"], abs=1e-6)
        assert len(a["member_stats"]) == 1 and len(b["member_stats"]) == 2
        assert all(m["calls"] > 0 for m in b["member_stats"])  # the ensemble calls every member for them


def test_selection_reads_each_members_accuracy_after_the_prior_correction():
    """A member biased towards one label is right on every row once the bias is divided out: the drop
    rule, the main member and the weights read that accuracy (cross-fitted), not its biased one."""
    from jobs.calibrate import selection_reports

    golds = [0, 1] * 10
    sets = [["x", "y"]] * 20
    biased = [[3.0, 0.0] if g == 0 else [2.0, 1.0] for g in golds]  # always picks "x": 50%
    fair = [[1.0, 0.0] if (g == 0) == (i < 12) else [0.0, 1.0] for i, g in enumerate(golds)]  # right on 12 of 20
    logs = {"biased": biased, "fair": fair}
    reports = {m: {"pmi": {"accuracy": cal.accuracy([max((0, 1), key=lambda c: x[c]) for x in logs[m]], golds),
                           "low": 0.0, "high": 1.0}} for m in logs}
    assert (reports["biased"]["pmi"]["accuracy"], reports["fair"]["pmi"]["accuracy"]) == (0.5, 0.6)
    sel, rec = selection_reports(reports, "pmi", logs, sets, golds, "auto")
    assert sel["biased"]["pmi"]["accuracy"] == 1.0 and rec["biased"] == {"uncorrected": 0.5, "corrected": 1.0,
                                                                         "used": "corrected"}
    assert sel["biased"]["pmi"]["low"] == pytest.approx(cal.wilson(20, 20)[0])
    assert rec["fair"]["used"] == "uncorrected" or rec["fair"]["corrected"] > rec["fair"]["uncorrected"]
    main, kept, dropped = cal.select_members(["fair", "biased"], sel, "pmi", 0.5, 0.1)
    assert main == "biased" and "fair" in dropped  # without the correction "biased" would be at chance
    off, none = selection_reports(reports, "pmi", logs, sets, golds, "off")
    assert off is reports and none == {}
    forced, rec_on = selection_reports(reports, "pmi", logs, sets, golds, "on")
    assert all(r["used"] == "corrected" for r in rec_on.values())
    assert forced["fair"]["pmi"]["accuracy"] == rec_on["fair"]["corrected"]
    one, rec_one = selection_reports({"biased": reports["biased"]}, "pmi", {"biased": biased[:1]}, sets[:1],
                                     golds[:1], "on")  # one dev row: nothing to cross-fit, as scored
    assert one["biased"]["pmi"]["accuracy"] == 0.5 and rec_one["biased"]["used"] == "uncorrected"
