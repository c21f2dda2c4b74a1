"""The DAG files: they import into a DagBag without errors, have the expected shape, and are thin
(no torch/transformers/ensemble/Spark imports, no Variable, connection or process at import time)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from conftest import DAG_FOLDER, REPO

DAG_IDS = {"ensemble_labeling", "synthetic_generation"}
DAG_FILES = sorted(p for p in DAG_FOLDER.glob("*.py"))
FORBIDDEN = ("torch", "transformers", "ensemble", "jobs", "schemas", "pyspark", "pyarrow", "numpy")


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == DAG_IDS
    assert dagbag.size() == 2


def test_bundle_dagbag_as_the_dag_processor_uses_it():
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(DAG_FOLDER), bundle_path=DAG_FOLDER, bundle_name="dags-folder")
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == DAG_IDS


@pytest.mark.parametrize("dag_id, asset_name", [("ensemble_labeling", "ensemble_fuse.labels"),
                                                ("synthetic_generation", "ensemble_fuse.synthetic")])
def test_dag_shape(dagbag, dag_id, asset_name):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
    from airflow.sdk import Asset

    dag = dagbag.dags[dag_id]
    calibrates = dag_id == "ensemble_labeling"  # labeling only: calibrate on an optional dev set
    assert set(dag.task_dict) == {"plan", "fuse", "publish"} | ({"calibrate"} if calibrates else set())
    plan, fuse, publish = (dag.get_task(t) for t in ("plan", "fuse", "publish"))
    assert isinstance(fuse, SparkSubmitOperator)
    assert fuse.upstream_task_ids == {"plan"} | ({"calibrate"} if calibrates else set())
    assert publish.upstream_task_ids == {"plan", "fuse"}
    assert fuse._conn_id == "spark_default"
    assert fuse.retries >= 1 and plan.retries == 0 and publish.retries == 0
    # fuse runs after a skipped calibrate (no dev set), never after a failed one
    assert fuse.trigger_rule == ("none_failed" if calibrates else "all_success")
    if calibrates:
        calibrate = dag.get_task("calibrate")
        assert calibrate.upstream_task_ids == {"plan"} and calibrate.retries == 0 and calibrate.outlets == []
    # The Asset is published by the task after the job, and only by it.
    assert publish.outlets == [Asset(name=asset_name, uri=f"ensemble-fuse://{asset_name.split('.')[1]}")]
    assert plan.outlets == [] and fuse.outlets == []
    assert dag.schedule == "@daily" and dag.catchup is False


def _imported_names(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_folder_imports_nothing_heavy(path):
    assert not _imported_names(path) & set(FORBIDDEN), path


_PROBE = r"""
import json, subprocess, sys, time
# Airflow's own imports first (croniter runs `file` when imported): the traps are for the DAG files.
import airflow.sdk
import airflow.sdk.definitions.timetables.trigger
import airflow.providers.apache.spark.operators.spark_submit
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import Variable, BaseHook

def refuse(*a, **k):
    raise AssertionError("work at import time")

Variable.get = staticmethod(refuse)
Variable.set = staticmethod(refuse)
BaseHook.get_connection = classmethod(refuse)
subprocess.Popen = refuse
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - t0
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"errors": {k: v[-400:] for k, v in bag.import_errors.items()},
                  "dags": sorted(bag.dag_ids), "heavy": heavy, "seconds": seconds}))
"""


def _probe(folder) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(folder), json.dumps(FORBIDDEN)],
                          capture_output=True, text=True, cwd=folder, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_does_no_work_and_loads_nothing_heavy():
    """In a fresh interpreter, with Variables, connections and subprocesses forbidden, the DAG
    folder still imports, and neither torch nor Spark nor the project's packages were loaded."""
    result = _probe(DAG_FOLDER)
    assert result["errors"] == {}
    assert result["dags"] == sorted(DAG_IDS)
    assert result["heavy"] == []
    assert result["seconds"] < 20, result


def test_the_import_probe_catches_work_at_import_time(tmp_path):
    """The probe above can fail: a DAG file that reads a Variable at import is reported."""
    (tmp_path / "bad_dag.py").write_text(
        "from airflow.sdk import DAG, Variable\n"
        "with DAG(dag_id='bad', schedule=None, params={'x': Variable.get('x')}):\n    pass\n")
    result = _probe(tmp_path)
    assert "work at import time" in "".join(result["errors"].values())
