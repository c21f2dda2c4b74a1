"""The job's configuration from one source: flags generated from the config dataclasses (a sync test,
as litgpt guards its CLI), the nested fuser config, config_hash over the resolved configuration, the
console script, and the flags the Airflow DAGs and the bench scripts pass."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import tomllib
import types
from enum import Enum
from pathlib import Path

import pytest

from ensemble.config import (FUSERS, MAX_SEED, METHODS, ROW_STORES, DeePEnConfig, SpecFuseConfig, fuser_config,
                             hashed_fields)
from jobs import cli
from jobs.cli import build_parser, field_docs, job_flags, parse_config
from ensemble.labeling import LabelParams
from jobs.config import DEFAULT_MEMBERS, GROUPS, NESTED, JobConfig

REPO = Path(__file__).resolve().parents[2]
BASE = ["--input", "i", "--output", "o"]
DEEPEN = BASE + ["--method", "deepen", "--members", "a", "b"]
SPECFUSE = BASE + ["--method", "specfuse", "--members", "a", "b"]
CONFIGS = [JobConfig, LabelParams] + [spec.config for spec in FUSERS.values() if spec.config]


def _options(parser) -> dict[str, object]:
    """{option string: action} of the visible flags (not -h, not the hidden misspellings)."""
    import argparse

    return {o: a for a in parser._actions for o in a.option_strings
            if a.help is not argparse.SUPPRESS and o not in ("-h", "--help")}


# ---- sync: every field has exactly one flag, every flag a field -------------------------------------
def test_every_config_field_has_exactly_one_flag_and_a_docstring():
    flags = job_flags()
    targets = [t for f in flags for t in f.targets]
    fields = [(cls, f.name) for cls in CONFIGS for f in dataclasses.fields(cls) if not (cls is JobConfig and f.name in NESTED)]
    assert sorted(targets, key=str) == sorted(fields, key=str)  # each field once, nothing else
    for cls, name in fields:
        assert field_docs(cls).get(name), f"{cls.__name__}.{name} has no docstring (its flag's help)"
    shared = {f.flag: [c.__name__ for c, _ in f.targets] for f in flags if len(f.targets) > 1}
    assert shared == {"--weights": ["DeePEnConfig", "SpecFuseConfig"]}  # one flag, both methods' field


def test_every_flag_maps_to_a_field():
    parser = build_parser()
    options = _options(parser)
    flags = {f.flag: f for f in job_flags()}
    negated = {"--no-" + f[2:] for f in flags}  # BooleanOptionalAction's --no-X
    assert set(options) - negated == set(flags) | {"--config"}
    for opt, action in options.items():
        if opt == "--config":
            continue
        flag = flags.get(opt) or flags["--" + opt[len("--no-"):]]
        assert action.dest == flag.key


def test_no_two_flags_are_confusable():
    parser = build_parser()
    assert parser.allow_abbrev is False  # --deepen-top is an error, not --deepen-topk
    names = [o for o in _options(parser) if not o.startswith("--no-")]
    squashed = [o.replace("-", "").lower() for o in names]
    assert len(set(squashed)) == len(squashed), names
    assert "--topk" not in names and "--top-k" in names and "--deepen-topk" in names


@pytest.mark.parametrize("old, new", [
    ("--topk", "--deepen-topk"), ("--top-mass", "--deepen-top-mass"), ("--main-top-mass", "--deepen-main-top-mass"),
    ("--refine-margin", "--deepen-refine-margin"), ("--anchor-subset", "--deepen-anchor-subset"),
    ("--max-rounds", "--specfuse-max-rounds"), ("--norm", "--choice-norm"), ("--gate", "--label-gate"),
    # DeePEn's label normalisation became every method's --choice-norm (issue 16)
    ("--deepen-label-norm", "--choice-norm"), ("--label-norm", "--choice-norm"),
])
def test_removed_flags_name_the_new_one(old, new, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(DEEPEN + [old, "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"there is no {old}: " in err and f" is {new}" in err


def test_help_is_grouped_and_its_defaults_come_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit):
        cli.entry(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: ensemble-fuse ")
    titles = [f"\n{g}:\n" for g in GROUPS]
    assert [out.index(t) for t in titles] == sorted(out.index(t) for t in titles)
    assert list(GROUPS) == ["input/output", "decoding", "ensemble", "labeling", "DeePEn", "SpecFuse", "execution"]
    help_of = {f.flag: cli._argument(f)["help"] for f in job_flags()}
    assert help_of["--deepen-top-mass"].endswith(f"(default: {DeePEnConfig.top_mass})")
    assert help_of["--exit-delta"].endswith(f"(default: {SpecFuseConfig.exit_delta})")
    assert help_of["--deepen-eos-policy"].endswith("(default: main)")
    assert help_of["--members"].endswith(f"(default: {DEFAULT_MEMBERS[0]})")
    assert help_of["--deepen-topk"].startswith(field_docs(DeePEnConfig)["topk"])
    assert help_of["--choice-norm"].endswith(f"(default: {LabelParams.norm})")
    assert help_of["--label-gate"].startswith(field_docs(LabelParams)["gate"])


def test_console_script_and_subcommands(capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ensemble-fuse"] == "jobs.cli:entry"
    with pytest.raises(SystemExit):
        cli.entry(["fuse", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: ensemble-fuse fuse ") and "ensemble-fuse fuse ...   run the fusion job" in out
    assert cli.entry(["fuse"] + BASE + ["--members", "a", "b"]) == 2  # a bad configuration: exit 2, nothing run
    with pytest.raises(SystemExit):
        cli.entry(["calibrate", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: ensemble-fuse calibrate ") and "--deepen-dev-limit" in out
    assert "calibrate" in cli.COMMANDS


def test_every_label_param_is_hashed_and_set_by_flag_or_file(tmp_path):
    base = JobConfig(input="i", output="o")
    for f in dataclasses.fields(LabelParams):
        if f.name == "member_temperatures":
            continue  # SpecFuse's only: below
        value = {"norm": "token", "neutral_context": "Q:", "target_delimiter": "", "gate": 0.25,
                 "temperature": 2.0, "priors": {"keyed_by": "position", "norm": "pmi", "members": [DEFAULT_MEMBERS[0]],
                                                "tables": [[0.6, 0.4]]}}[f.name]
        assert JobConfig(input="i", output="o", label={f.name: value}).config_hash != base.config_hash, f.name
    pair = ["--method", "specfuse", "--members", *DEFAULT_MEMBERS[:2]]
    spec = parse_config(BASE + pair)
    tempered = parse_config(BASE + pair + ["--member-temperatures", "1.5", "0.5"])
    assert tempered.label.member_temperatures == (1.5, 0.5) and tempered.config_hash != spec.config_hash
    with pytest.raises(ValueError, match=r"member_temperatures must have one entry per member \(2\), got \[1.5\]"):
        parse_config(BASE + pair + ["--member-temperatures", "1.5"])
    with pytest.raises(ValueError, match=r"member_temperatures are SpecFuse's .* not deepen's"):
        parse_config(BASE + ["--method", "deepen", "--members", *DEFAULT_MEMBERS[:2], "--member-temperatures", "1", "1"])
    cfg = parse_config(BASE + ["--choice-norm", "char", "--label-gate", "0.4", "--target-delimiter", "",
                               "--label-temperature", "2.5"])
    assert cfg.label == LabelParams(norm="char", gate=0.4, target_delimiter="", temperature=2.5)
    assert parse_config(BASE).label == LabelParams(norm="pmi", temperature=1.0)  # the defaults
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got"):
            parse_config(BASE + ["--label-temperature", bad])
    f = tmp_path / "job.yaml"
    f.write_text("input: i\noutput: o\nlabel: {norm: token, neutral_context: 'Answer:'}\n")
    assert parse_config(["--config", str(f), "--label-gate", "none"]).label == LabelParams(norm="token")
    f.write_text("input: i\noutput: o\nchoice_norm: pmi\n")
    with pytest.raises(ValueError, match=r"'choice_norm' is a labeling setting: write it as label: \{norm: ...\} "
                                         r"\(flag --choice-norm\)"):
        parse_config(["--config", str(f)])
    f.write_text("input: i\noutput: o\nmethod: deepen\nmembers: [a, b]\nfuser: {label_norm: sum}\n")
    with pytest.raises(ValueError, match=r"label_norm.*was removed.*--choice-norm"):
        parse_config(["--config", str(f)])
    with pytest.raises(ValueError, match="norm must be one of"):
        JobConfig(input="i", output="o", label={"norm": "mean"})


# ---- the nested fuser config --------------------------------------------------------------------
def test_flags_and_file_fill_the_methods_config(tmp_path):
    cfg = parse_config(DEEPEN + ["--deepen-topk", "8", "--main", "1", "--weights", "0.25", "0.75",
                                 "--deepen-eos-policy", "any", "--deepen-row-store", "float32"])
    assert cfg.fuser == DeePEnConfig(main=1, weights=(0.25, 0.75), topk=8, eos_policy="any", row_store="float32")
    f = tmp_path / "job.json"
    f.write_text(json.dumps({"input": "i", "output": "o", "method": "deepen", "members": ["a", "b"],
                             "fuser": {"topk": 16, "tau": 50.0}}))
    assert parse_config(["--config", str(f), "--deepen-steps", "2"]).fuser == DeePEnConfig(topk=16, tau=50.0, steps=2)
    f.write_text(json.dumps({"input": "i", "output": "o", "topk": 16}))
    with pytest.raises(ValueError, match=r"'topk' is a DeePEn setting: write it as fuser: \{topk: ...\} "
                                         r"\(flag --deepen-topk\)"):
        parse_config(["--config", str(f)])
    assert parse_config(SPECFUSE + ["--specfuse-max-rounds", "7", "--no-exit"]).fuser == \
        SpecFuseConfig(max_rounds=7, exit=False)
    assert parse_config(BASE).fuser is None


def test_specfuse_refuses_main_and_other_methods_settings():
    assert parse_config(SPECFUSE + ["--main", "0"]).fuser == SpecFuseConfig()  # the first member: what it does
    with pytest.raises(ValueError, match=r"main \(--main\) is a setting of DeePEn, not of method specfuse: "
                                         r"SpecFuse has no main member; got 1"):
        parse_config(SPECFUSE + ["--main", "1"])
    with pytest.raises(ValueError, match=r"topk \(--deepen-topk\) is a setting of DeePEn, not of method specfuse; got 8"):
        parse_config(SPECFUSE + ["--deepen-topk", "8"])
    with pytest.raises(ValueError, match=r"segment_tokens \(--segment-tokens\) is a setting of SpecFuse, not of "
                                         r"method deepen; got 4"):
        parse_config(DEEPEN + ["--segment-tokens", "4"])
    with pytest.raises(ValueError, match=r"weights \(--weights\) is a setting of DeePEn and SpecFuse, not of method "
                                         r"single; got \[1.0\]"):
        parse_config(BASE + ["--weights", "1"])
    with pytest.raises(ValueError, match=r"exit_delta must be in \[0, 1\], got 2.0"):
        parse_config(SPECFUSE + ["--exit-delta", "2"])
    with pytest.raises(ValueError, match=r"fuser must be a DeePEnConfig or a mapping for method deepen, got SpecFuseConfig"):
        JobConfig(input="i", output="o", method="deepen", members=("a", "b"), fuser=SpecFuseConfig())


def test_config_roundtrips_through_its_json():
    cfg = parse_config(DEEPEN + ["--deepen-eos-policy", "any", "--weights", "0.5", "0.5", "--stop", "\n\n"])
    again = JobConfig(**json.loads(cfg.to_json()))
    assert again == cfg and again.config_hash == cfg.config_hash
    assert json.loads(cfg.to_json())["fuser"]["eos_policy"] == "any"


# ---- config_hash: the resolved configuration ---------------------------------------------------------
def _other_value(cls, f: dataclasses.Field):
    """A valid value of a config field other than its default."""
    d = f.default
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != (d.value if isinstance(d, Enum) else d))
    if f.name == "weights":
        return (0.5, 0.5)
    if f.name == "exit_alpha":  # None: the exit rule's own level
        return 0.05
    if isinstance(d, bool):
        return not d
    if isinstance(d, int):
        return d + 1
    if isinstance(d, float):
        return d / 2 if d > 0 else 0.5
    if d is None:
        return 3
    raise AssertionError(f"no other value for {cls.__name__}.{f.name}")


@pytest.mark.parametrize("method", ["deepen", "specfuse"])
def test_every_output_field_of_the_fuser_config_is_hashed(method):
    cls = FUSERS[method].config
    base = JobConfig(input="i", output="o", method=method, members=("a", "b"))
    for f in dataclasses.fields(cls):
        changed = JobConfig(input="i", output="o", method=method, members=("a", "b"),
                            fuser={f.name: _other_value(cls, f)})
        same = changed.config_hash == base.config_hash
        assert same is (not f.metadata.get("hashed", True)), f"{cls.__name__}.{f.name}"
    assert base.output_affecting()["fuser"] == hashed_fields(fuser_config(method))


@pytest.mark.parametrize("cls, name, value", [(DeePEnConfig, "row_store", "float32"), (DeePEnConfig, "tau", 50.0),
                                              (SpecFuseConfig, "exit_min_temperature", 0.1)])
def test_a_changed_library_default_changes_the_hash(monkeypatch, cls, name, value):
    method = next(m for m, spec in FUSERS.items() if spec.config is cls)
    before = JobConfig(input="i", output="o", method=method, members=("a", "b")).config_hash
    names = [f.name for f in dataclasses.fields(cls)]  # every field has a default: __defaults__ is all of them
    defaults = list(cls.__init__.__defaults__)
    defaults[names.index(name)] = value
    monkeypatch.setattr(cls.__init__, "__defaults__", tuple(defaults))
    assert getattr(cls(), name) == value  # a "new library version"
    assert JobConfig(input="i", output="o", method=method, members=("a", "b")).config_hash != before


def test_hash_covers_the_code_version_and_not_speed(monkeypatch):
    import jobs.config

    cfg = JobConfig(input="i", output="o", method="deepen", members=("a", "b"))
    for name, value in [("input", "i2"), ("output", "o2"), ("run_id", "r"), ("report", False), ("partitions", 7),
                        ("batch_size", 2), ("commit_rows", 3), ("master", "local[1]"), ("device", "cpu"),
                        ("fail_after_rows", 1)]:
        assert dataclasses.replace(cfg, **{name: value}).config_hash == cfg.config_hash, name
    for name, value in [("mode", "label"), ("max_new_tokens", 5), ("temperature", 0.5), ("top_p", 0.9),
                        ("top_k", 5), ("seed", 1), ("n_samples", 2), ("stop", ("x",)), ("max_prompt_tokens", 9),
                        ("long_prompt", "truncate"), ("members", ("a", "c")), ("dtype", "bfloat16")]:
        assert dataclasses.replace(cfg, **{name: value}).config_hash != cfg.config_hash, name
    before = cfg.config_hash
    monkeypatch.setattr(jobs.config, "OUTPUTS_VERSION", jobs.config.OUTPUTS_VERSION + 1)
    assert cfg.config_hash != before


# ---- one definition of each constant; the driver needs no torch ------------------------------------
def test_job_config_and_cli_import_no_torch():
    code = "import sys, jobs.cli, jobs.config, ensemble.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_row_stores_are_the_row_sources():
    from ensemble.relative import RowSource

    assert tuple(RowSource.STORES) == ROW_STORES


def test_library_keywords_build_the_same_config(bpe_member, sp_member):
    from ensemble import DeePEn, SpecFuse

    fused = DeePEn([bpe_member, sp_member], main=1, weights=(0.5, 0.5), lr=0.1, steps=2, topk=8, top_mass=None)
    assert fused.config == DeePEnConfig(main=1, weights=(0.5, 0.5), lr=0.1, steps=2, topk=8, top_mass=None)
    spec = SpecFuse([bpe_member, sp_member], segment_tokens=4, exit=False, exit_delta=0.2, weights=[0.3, 0.7])
    assert spec.config == SpecFuseConfig(segment_tokens=4, exit=False, exit_delta=0.2, weights=(0.3, 0.7))
    assert SpecFuse.from_config([bpe_member, sp_member], spec.config).weights == pytest.approx((0.3, 0.7))


# ---- the flags other code passes -------------------------------------------------------------------
@pytest.fixture
def fuse_submit(monkeypatch):
    """airflow_dags/fuse_submit.py loaded without Airflow (its pure functions need only Param and task)."""
    sdk = types.ModuleType("airflow.sdk")
    sdk.Param = type("Param", (), {"__init__": lambda self, value=None, **schema: setattr(self, "value", value)})
    sdk.task = lambda *a, **kw: (lambda fn: fn)
    monkeypatch.setitem(sys.modules, "airflow", types.ModuleType("airflow"))
    monkeypatch.setitem(sys.modules, "airflow.sdk", sdk)
    spec = importlib.util.spec_from_file_location("fuse_submit_stubbed", REPO / "airflow_dags" / "fuse_submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_airflow_constants_match_the_project(fuse_submit):
    # the DAG files import no project code (the Airflow environment does not have it): literal copies
    assert fuse_submit.MAX_SEED == MAX_SEED
    assert fuse_submit.METHODS == METHODS
    assert fuse_submit.PACKAGED_MEMBERS == DEFAULT_MEMBERS


@pytest.mark.parametrize("mode, extra", [
    ("label", {"method": "deepen", "members": ["a", "b"], "report": False}),
    ("generate", {"method": "specfuse", "members": ["a", "b"], "top_k": 40, "seed": MAX_SEED}),
    ("generate", {}),
])
def test_every_flag_the_dags_pass_is_accepted_by_the_job(fuse_submit, tmp_path, mode, extra):
    config = tmp_path / "job.yaml"
    config.write_text("max_prompt_tokens: 512\n")
    params = {k: p.value for k, p in fuse_submit.common_params(max_new_tokens=16).items()}
    params |= {k: p.value for k, p in fuse_submit.sampling_params().items()} | extra
    params["config_file"] = str(config)
    fuse_submit.check_params(params)
    args = fuse_submit.job_args(params, mode=mode, input_path="/in/x.jsonl", output="/out/ds=2025-01-02",
                                run_id="dag__20250102", seed=params["seed"] or 20250102)
    cfg = parse_config(args)
    assert (cfg.mode, cfg.method, list(cfg.members)) == (mode, params["method"], params["members"])
    assert cfg.max_prompt_tokens == params["max_prompt_tokens"]  # the flag after --config wins


def test_bench_systems_are_valid_job_flags():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import evaluate
        import sweep
    finally:
        sys.path.remove(str(REPO / "bench"))
    systems = list(evaluate.SYSTEMS.values()) + [s.split() for s in sweep.variants([0.333333, 0.307692, 0.358974]).values()]
    for flags in systems:
        parse_config(BASE + flags)
