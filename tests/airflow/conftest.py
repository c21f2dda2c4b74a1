"""Airflow test environment: a temporary AIRFLOW_HOME with SQLite, migrated once per session, the
DAG folder of this repository, no example DAGs; and the Spark settings the deployment would give
(connection ``spark_default`` and the Variable ``ensemble_spark_env``), pointing at the main
environment's pyspark and Python.

The main environment has no Airflow: there these files are not collected (test_in_airflow_env.py,
which the main suite collects, runs them in .venv-airflow instead; that environment skips it)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FOLDER = REPO / "airflow_dags"

RUNNER = "test_in_airflow_env.py"  # the main suite's test that runs this folder in .venv-airflow

if importlib.util.find_spec("airflow") is None:
    collect_ignore = [p.name for p in Path(__file__).parent.glob("test_*.py") if p.name != RUNNER]
else:
    collect_ignore = [RUNNER]
    # Airflow reads its configuration when first imported: set it before any test module imports it.
    _HOME = Path(tempfile.mkdtemp(prefix="airflow-home-"))
    os.environ["AIRFLOW_HOME"] = str(_HOME)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAG_FOLDER)
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME / 'airflow.db'}"
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
    for _name in [n for n in os.environ if n.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))]:
        del os.environ[_name]  # only what the tests set

    def pytest_sessionfinish(session, exitstatus):
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """`airflow db migrate` into the session's temporary home (SQLite, a few seconds)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return home


@pytest.fixture(scope="session")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAG_FOLDER))


@pytest.fixture
def load_dag():
    """A freshly parsed DAG for each ``dag.test()``: an in-process ``dag.test()`` writes the run's
    conf into its tasks' params, so a DAG object must not serve two runs."""
    from airflow.dag_processing.dagbag import DagBag

    def load(dag_id: str):
        bag = DagBag(dag_folder=str(DAG_FOLDER))
        assert bag.import_errors == {}
        return bag.dags[dag_id]

    return load


def main_python() -> Path:
    """The main environment's interpreter (has pyspark and the project)."""
    return Path(os.environ.get("ENSEMBLE_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def spark_home() -> Path:
    py = main_python()
    if not py.exists():
        pytest.skip(f"main environment {py} not found (set ENSEMBLE_MAIN_PYTHON)")
    proc = subprocess.run([str(py), "-c", "import os, pyspark; print(os.path.dirname(pyspark.__file__))"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"{py} has no pyspark: {proc.stderr[-500:]}")
    home = Path(proc.stdout.strip())
    assert (home / "bin" / "spark-submit").exists(), home
    return home


@pytest.fixture
def spark_deployment(monkeypatch, airflow_db, spark_home):
    """What a deployment configures outside the DAG code: spark-submit on PATH, the connection,
    and the Python that the driver and the executors run."""
    py = str(main_python())
    monkeypatch.setenv("SPARK_HOME", str(spark_home))
    monkeypatch.setenv("PATH", f"{spark_home / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", "spark://local?deploy-mode=client")
    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_SPARK_ENV",
                       json.dumps({"PYSPARK_PYTHON": py, "PYSPARK_DRIVER_PYTHON": py}))
    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_SPARK_CONF",
                       json.dumps({"spark.driver.memory": "2g", "spark.sql.shuffle.partitions": "2"}))
    return {"python": py, "spark_home": spark_home}
