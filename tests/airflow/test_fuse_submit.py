"""The pure half of airflow_dags/fuse_submit.py: the spark-submit arguments built from Params,
the cross-field check, the date-keyed partition, and the commit check that guards publishing."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

import pytest
from conftest import DAG_FOLDER

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
    assert not {"--temperature", "--top-p", "--n-samples", "--top-k", "--config"} & set(f)


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
