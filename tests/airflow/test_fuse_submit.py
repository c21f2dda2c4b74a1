"""The pure half of airflow_dags/fuse_submit.py: the DAG's Params and the flat settings they
unpack to, the spark-submit arguments built from them (and accepted by the job's parser, in the main
environment), the calibration command and the job's arguments with its profile (accepted by
jobs.calibrate's and the job's parsers), the cross-field checks, the conf-key check, the date-keyed
partition, and the commit check that guards publishing."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import DAG_FOLDER, REPO, main_python

sys.path.insert(0, str(DAG_FOLDER))
import fuse_submit as fs  # noqa: E402


def defaults(*, sampling: bool) -> dict:
    params = {k: p.value for k, p in fs.common_params(max_new_tokens=16).items()}
    if sampling:
        params |= {k: p.value for k, p in fs.sampling_params().items()}
    return params


def flags(args: list[str]) -> dict[str, list[str]]:
    """argv -> {flag: values}."""
    out: dict[str, list[str]] = {}
    key = None
    for a in args:
        if a.startswith("--"):
            key = a
            out[key] = []
        else:
            out[key].append(a)
    return out


def test_label_args():
    p = defaults(sampling=False) | {"method": "deepen", "members": ["a-1", "b-2"], "max_new_tokens": 5,
                                    "partitions": 3, "report": False}
    args = fs.job_args(p, mode="label", input_path="/in/x.jsonl", output="/out/ds=2025-03-04",
                       run_id="ensemble_labeling__20250304", seed=20250304)
    f = flags(args)
    assert f["--input"] == ["/in/x.jsonl"] and f["--output"] == ["/out/ds=2025-03-04"]
    assert f["--mode"] == ["label"] and f["--method"] == ["deepen"] and f["--members"] == ["a-1", "b-2"]
    assert f["--run-id"] == ["ensemble_labeling__20250304"] and f["--seed"] == ["20250304"]
    assert f["--max-new-tokens"] == ["5"] and f["--partitions"] == ["3"] and "--no-report" in f
    assert not {"--temperature", "--top-p", "--n-samples", "--top-k", "--config", "--max-fuser-error-rate"} & set(f)
    f = flags(fs.job_args(p | {"max_fuser_error_rate": 0}, mode="label", input_path="i", output="o", run_id="r", seed=1))
    assert f["--max-fuser-error-rate"] == ["0.0"]


def test_generate_args_carry_sampling():
    p = defaults(sampling=True) | {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "n_samples": 3,
                                   "config_file": "/etc/ens.yaml"}
    args = fs.job_args(p, mode="generate", input_path="i", output="o", run_id="r", seed=1)
    f = flags(args)
    assert args[:2] == ["--config", "/etc/ens.yaml"]  # first, so that the flags after it override it
    assert f["--mode"] == ["generate"] and f["--temperature"] == ["0.7"] and f["--top-p"] == ["0.9"]
    assert f["--top-k"] == ["40"] and f["--n-samples"] == ["3"] and "--report" in f
    assert all(isinstance(a, str) for a in args)


@pytest.mark.parametrize("method, members, ok", [
    ("single", ["m"], True), ("single", ["m", "n"], False), ("deepen", ["m"], False),
    ("deepen", ["m", "n"], True), ("specfuse", ["m", "n", "o"], True), ("specfuse", ["m"], False)])
def test_method_and_members_are_checked_together(method, members, ok):
    p = defaults(sampling=False) | {"method": method, "members": members}
    if ok:
        fs.check_params(p)
    else:
        with pytest.raises(ValueError, match=f"members must be .* for method {method}"):
            fs.check_params(p)


@pytest.mark.parametrize("method, dev_set, ok", [
    ("single", None, True), ("single", "/d.jsonl", False), ("deepen", "/d.jsonl", True), ("specfuse", "/d.jsonl", True)])
def test_calibration_needs_an_ensemble_method(method, dev_set, ok):
    p = defaults(sampling=False) | {"method": method, "members": ["m"] if method == "single" else ["m", "n"],
                                    "dev_set": dev_set}
    if ok:
        fs.check_params(p)
    else:
        with pytest.raises(ValueError, match="dev_set .* needs method deepen or specfuse, got 'single'"):
            fs.check_params(p)


def test_calibrated_args_take_method_and_members_from_the_profile():
    """With a dev set: jobs.calibrate gets the run's members, method, budget and batch size and writes
    the profile under the partition; the job gets --profile and not --method/--members (the profile
    may drop members, down to single: the Params' would contradict it). Without one, as before."""
    p = defaults(sampling=False) | {"method": "specfuse", "members": ["a-1", "b-2"], "dev_set": "/dev/arc.jsonl",
                                    "batch_size": 4, "max_prompt_tokens": 512}
    out = "/out/ensemble_labeling/ds=2025-03-04"
    profile = fs.profile_path(out + "/")
    assert profile == out + "/_calibration/profile.json"
    cal = flags(fs.calibrate_args(p, profile=profile))
    assert cal == {"--dev": ["/dev/arc.jsonl"], "--members": ["a-1", "b-2"], "--method": ["specfuse"],
                   "--output": [profile], "--batch-size": ["4"], "--max-prompt-tokens": ["512"]}
    f = flags(fs.job_args(p, mode="label", input_path="/in.jsonl", output=out, run_id="r", seed=1, profile=profile))
    assert f["--profile"] == [profile] and not {"--method", "--members"} & set(f)
    assert f["--output"] == [out] and f["--batch-size"] == ["4"] and f["--mode"] == ["label"]
    f = flags(fs.job_args(p, mode="label", input_path="/in.jsonl", output=out, run_id="r", seed=1))
    assert f["--method"] == ["specfuse"] and f["--members"] == ["a-1", "b-2"] and "--profile" not in f


def test_calibrate_command_runs_the_project_python():
    p = defaults(sampling=False) | {"method": "deepen", "members": ["a", "b"], "dev_set": "/dev.jsonl"}
    env = {"PYSPARK_PYTHON": "/opt/exec/python", "PYSPARK_DRIVER_PYTHON": "/opt/proj/.venv/bin/python"}
    cmd = fs.calibrate_command(p, profile="/out/ds=2025-03-04/_calibration/profile.json", env=env)
    assert cmd[:3] == ["/opt/proj/.venv/bin/python", "-m", "jobs.calibrate"]
    assert flags(cmd[3:])["--output"] == ["/out/ds=2025-03-04/_calibration/profile.json"]
    cmd = fs.calibrate_command(p, profile="file:///out/p.json", env={"PYSPARK_PYTHON": "/py"})
    assert cmd[0] == "/py" and flags(cmd[3:])["--output"] == ["/out/p.json"]
    with pytest.raises(ValueError, match="set PYSPARK_DRIVER_PYTHON .* Variable ensemble_spark_env"):
        fs.calibrate_command(p, profile="/out/p.json", env={})
    with pytest.raises(ValueError, match="must be a local path, got 's3://b/o/ds=1/_calibration/profile.json'"):
        fs.calibrate_command(p, profile="s3://b/o/ds=1/_calibration/profile.json", env=env)


def test_partition_is_keyed_by_logical_date():
    ds, ds_nodash = fs.date_key(datetime(2025, 3, 4, 23, 59, tzinfo=timezone.utc))
    assert (ds, ds_nodash) == ("2025-03-04", "20250304")
    assert fs.partition_dir("/data/out/", ds) == "/data/out/ds=2025-03-04"
    assert fs.partition_dir("s3://b/x", ds) == "s3://b/x/ds=2025-03-04"


def test_read_commit_requires_success_marker(tmp_path):
    out = tmp_path / "ds=2025-03-04"
    out.mkdir()
    (out / "_run.json").write_text(json.dumps({"run_id": "r", "config_hash": "h"}))
    with pytest.raises(RuntimeError, match="no _SUCCESS"):
        fs.read_commit(str(out))
    (out / "_SUCCESS").write_text("")
    assert fs.read_commit(str(out))["config_hash"] == "h"
    assert fs.read_commit(f"file://{out}")["run_id"] == "r"


def test_delete_partition_only_touches_its_own_date(tmp_path):
    for d in ("ds=2025-03-04", "ds=2025-03-05"):
        (tmp_path / d / "data").mkdir(parents=True)
    fs.delete_partition(str(tmp_path / "ds=2025-03-04"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds=2025-03-05"]
    fs.delete_partition(str(tmp_path / "ds=2025-03-04"))  # absent: nothing to do


def test_default_application_is_the_repo_job():
    assert fs.default_application().endswith("jobs/fuse.py")
    assert (DAG_FOLDER.parent / "jobs" / "fuse.py").is_file()


@pytest.mark.parametrize("dag_id", ["ensemble_labeling", "synthetic_generation"])
def test_dag_params_are_the_settings_with_method_and_members_grouped(dagbag, dag_id):
    """What job_args gets from a DAG's defaults is common_params' (and sampling_params') defaults:
    the settings tests/jobs/test_cli.py feeds the job's parser are the ones the DAG submits."""
    params = dagbag.dags[dag_id].params
    assert "ensemble" in params and not {"method", "members"} & set(params)
    settings = fs.settings_of(params.validate())
    expected = defaults(sampling=dag_id == "synthetic_generation")
    expected["max_new_tokens"] = 16 if dag_id == "ensemble_labeling" else 256
    if dag_id == "ensemble_labeling":
        expected["dev_set"] = None  # no calibration by default
    assert settings == expected
    assert list(params)[:3] == ["input", "output_root", "ensemble"]  # the form keeps method's place


def test_check_conf_refuses_keys_that_are_not_params():
    declared = ["input", "ensemble", "seed"]
    fs.check_conf(None, declared)
    fs.check_conf({"input": "x", "ensemble": {}}, declared)
    with pytest.raises(ValueError, match=r"conf keys \['sed'\] are not Params of this DAG"):
        fs.check_conf({"sed": 1}, declared)
    with pytest.raises(ValueError, match=r"\['members', 'method'\] .*set together: \{\"ensemble\""):
        fs.check_conf({"method": "deepen", "members": ["a", "b"]}, declared)


def _all_optional_settings(dag) -> dict:
    """A DAG's defaults with every optional flag switched on."""
    settings = fs.settings_of(dag.params.validate())
    settings |= {"method": "deepen", "members": ["a", "b"], "seed": 5, "config_file": "/etc/ens.yaml",
                 "report": False, "max_fuser_error_rate": 0.25}
    if "top_k" in settings:
        settings |= {"top_k": 40, "n_samples": 2}
    return settings


@pytest.mark.parametrize("dag_id, mode", [("ensemble_labeling", "label"), ("synthetic_generation", "generate")])
def test_every_flag_a_dag_passes_is_accepted_by_the_job(dagbag, dag_id, mode, tmp_path):
    """The job's own parser (jobs.cli.parse_config, in the main environment) reads the arguments a
    DAG submits with every optional flag on, and gets back the settings."""
    py = main_python()
    if not py.exists():
        pytest.skip(f"main environment {py} not found (set ENSEMBLE_MAIN_PYTHON)")
    config = tmp_path / "job.yaml"
    config.write_text("max_prompt_tokens: 99\n")
    settings = _all_optional_settings(dagbag.dags[dag_id]) | {"config_file": str(config)}
    fs.check_params(settings)
    args = fs.job_args(settings, mode=mode, input_path="/in/x.jsonl", output="/out/ds=2025-01-02",
                       run_id=f"{dag_id}__20250102", seed=settings["seed"])
    code = ("import json, sys; from jobs.cli import parse_config; c = parse_config(sys.argv[1:]); "
            "print(json.dumps({k: getattr(c, k) for k in ('mode', 'method', 'members', 'max_new_tokens', "
            "'max_prompt_tokens', 'seed', 'partitions', 'batch_size', 'report', 'max_fuser_error_rate', "
            "'temperature', 'top_p', 'top_k', 'n_samples', 'run_id')}, default=list))")
    proc = subprocess.run([str(py), "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cfg["mode"] == mode and cfg["method"] == "deepen" and cfg["members"] == ["a", "b"]
    assert cfg["max_prompt_tokens"] == settings["max_prompt_tokens"]  # the flag after --config wins
    assert cfg["max_fuser_error_rate"] == 0.25 and cfg["report"] is False and cfg["seed"] == 5
    assert cfg["run_id"] == f"{dag_id}__20250102"
    if mode == "generate":
        assert (cfg["temperature"], cfg["top_p"], cfg["top_k"], cfg["n_samples"]) == (0.8, 0.95, 40, 2)


_CALIBRATION_PROBE = r"""
import json, sys
from jobs.calibrate import ENSEMBLES, build_parser
from jobs.cli import parse_config
from jobs.profiles import Profile

profile, calibrate_args, job_args = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
cal = vars(build_parser("jobs.calibrate").parse_args(calibrate_args))
# what calibration may write for specfuse over [a, b]: the drop rule kept only b
Profile(method="single", members=("b",), main=0, weights=None, choice_norm="token", neutral_context="Answer:",
        target_delimiter=" ", gate=None, requested_method="specfuse").save(profile)
c = parse_config(job_args)
print(json.dumps({"ensembles": list(ENSEMBLES), "calibrate": cal, "method": c.method, "members": list(c.members),
                  "norm": c.label.norm, "max_prompt_tokens": c.max_prompt_tokens, "report": c.report,
                  "max_fuser_error_rate": c.max_fuser_error_rate}))
"""


def test_calibration_flags_are_accepted_by_calibrate_and_the_job(dagbag, tmp_path):
    """jobs.calibrate's parser (main environment) reads the calibrate command's arguments, and the job's
    parser reads the labeling DAG's arguments with a profile and every optional flag on; a profile
    that chose another method and fewer members than the Params is applied, not refused. The
    methods calibration takes are jobs.calibrate's."""
    py = main_python()
    if not py.exists():
        pytest.skip(f"main environment {py} not found (set ENSEMBLE_MAIN_PYTHON)")
    config = tmp_path / "job.yaml"
    config.write_text("max_prompt_tokens: 99\n")
    settings = _all_optional_settings(dagbag.dags["ensemble_labeling"]) | {
        "config_file": str(config), "method": "specfuse", "dev_set": str(tmp_path / "dev.jsonl")}
    fs.check_params(settings)
    profile = fs.profile_path(str(tmp_path / "out" / "ds=2025-01-02"))
    Path(profile).parent.mkdir(parents=True)
    args = fs.job_args(settings, mode="label", input_path="/in/x.jsonl", output=str(tmp_path / "out" / "ds=2025-01-02"),
                       run_id="ensemble_labeling__20250102", seed=settings["seed"], profile=profile)
    cal_args = fs.calibrate_args(settings, profile=profile)
    proc = subprocess.run([str(py), "-c", _CALIBRATION_PROBE, profile, json.dumps(cal_args), json.dumps(args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuple(got["ensembles"]) == fs.CALIBRATED_METHODS
    assert got["calibrate"]["dev"] == settings["dev_set"] and got["calibrate"]["members"] == ["a", "b"]
    assert got["calibrate"]["method"] == "specfuse" and got["calibrate"]["output"] == profile
    assert got["calibrate"]["max_prompt_tokens"] == settings["max_prompt_tokens"]
    assert (got["method"], got["members"], got["norm"]) == ("single", ["b"], "token")
    assert got["max_prompt_tokens"] == settings["max_prompt_tokens"] and got["report"] is False
    assert got["max_fuser_error_rate"] == 0.25
