"""Param validation: the defaults are valid (scheduled runs use them), and a trigger with a bad
value, members that do not fit the method, or a dev set (calibration) with method single, is refused
when the run is created, before any task runs: through ``dag.test(run_conf=...)`` and through the
REST API's trigger (400, no run)."""
from __future__ import annotations

import sys
from datetime import datetime, timezone

import pytest
from conftest import DAG_FOLDER

sys.path.insert(0, str(DAG_FOLDER))
import fuse_submit as fs  # noqa: E402



def served(dag):
    """The DAG as the scheduler and the API server hold it (serialized): a trigger's conf is
    validated by ``params.deep_merge(conf).validate()`` on it."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


def rejected():
    from airflow.exceptions import ParamValidationError

    return pytest.raises(ParamValidationError)


GOOD = {"input": "/data/in.jsonl", "output_root": "/data/out",
        "ensemble": {"method": "single", "members": ["smollm2-135m-instruct"]}}


def ens(method="single", members=("smollm2-135m-instruct",), **extra) -> dict:
    return {"ensemble": {"method": method, "members": list(members), **extra}}


# members per method: single exactly one, deepen and specfuse at least two (and at most eight)
BAD_ENSEMBLE = [
    ens("single", ["a", "b"]),
    ens("deepen", ["a"]),
    ens("specfuse", ["a"]),
    ens("deepen", [f"m{i}" for i in range(9)]),
    ens("beam", ["a", "b"]),
    ens(None),
    ens("single", []),
    ens("single", ["a", "a"]),
    ens("deepen", ["a", "a"]),
    ens("single", ["--master"]),
    ens("single", [""]),
    ens("single", [3]),
    ens("single", weights=[1.0]),  # nothing but method and members
    {"ensemble": {"method": "deepen"}},  # both, always: a trigger replaces the whole object
    {"ensemble": {"members": ["a"]}},
    {"ensemble": {"method": "single", "members": "smollm2-135m-instruct"}},
    {"ensemble": None},
    {"ensemble": ["single", ["a"]]},
]
GOOD_ENSEMBLE = [ens("single", ["a"]), ens("deepen", ["a", "b"]), ens("specfuse", ["a", "b", "c"]),
                 ens("deepen", [f"m{i}" for i in range(8)])]
# calibration (labeling only): a dev set path, only with an ensemble method
BAD_DEV_SET = [
    ens("single", ["a"], dev_set="/data/dev.jsonl"),
    ens("deepen", ["a", "b"], dev_set=""),
    ens("deepen", ["a", "b"], dev_set="--conf=x"),
    ens("specfuse", ["a", "b"], dev_set=3),
    ens("specfuse", ["a"], dev_set="/data/dev.jsonl"),
]
GOOD_DEV_SET = [ens("single", ["a"], dev_set=None), ens("deepen", ["a", "b"], dev_set="/data/dev.jsonl"),
                ens("specfuse", ["a", "b", "c"], dev_set="dev/arc.parquet"), ens("specfuse", ["a", "b"], dev_set=None)]

BAD_COMMON = [
    *BAD_ENSEMBLE,
    {"input": ""},
    {"input": "--conf=x"},
    {"input": 3},
    {"output_root": ""},
    {"max_new_tokens": 0},
    {"max_new_tokens": "8"},
    {"max_new_tokens": 1.5},
    {"max_prompt_tokens": 0},
    {"seed": -1},
    {"seed": 2**63},
    {"seed": "1"},
    {"partitions": 0},
    {"batch_size": 0},
    {"report": "yes"},
    {"overwrite": 1},
    {"max_fuser_error_rate": -0.1},
    {"max_fuser_error_rate": 1.5},
    {"max_fuser_error_rate": "0.1"},
]
BAD_SAMPLING = [
    {"temperature": 0},
    {"temperature": -0.5},
    {"temperature": 9},
    {"top_p": 0},
    {"top_p": 1.5},
    {"top_k": 0},
    {"n_samples": 0},
    {"n_samples": 2.5},
]


@pytest.mark.parametrize("dag_id", ["ensemble_labeling", "synthetic_generation"])
def test_defaults_and_good_values_validate(dagbag, dag_id):
    dag = served(dagbag.dags[dag_id])
    default = {"method": "single", "members": ["smollm2-135m-instruct"]}
    if dag_id == "ensemble_labeling":
        default["dev_set"] = None  # shown in the trigger form; no calibration
    assert dag.params.validate()["ensemble"] == default
    assert dag.params.deep_merge(GOOD | {"seed": 7} | ens("deepen", ["a", "b"])).validate()["seed"] == 7
    for conf in GOOD_ENSEMBLE + [{"max_fuser_error_rate": 0}, {"max_fuser_error_rate": 1}]:
        assert dag.params.deep_merge(GOOD | conf).validate()


def test_dev_set_is_a_labeling_param_that_needs_an_ensemble_method(dagbag):
    labeling = served(dagbag.dags["ensemble_labeling"]).params
    for conf in GOOD_DEV_SET:
        assert labeling.deep_merge(GOOD | conf).validate()["ensemble"] == conf["ensemble"]
    for conf in BAD_DEV_SET:
        with rejected():
            labeling.deep_merge(GOOD | conf).validate()
    generation = served(dagbag.dags["synthetic_generation"]).params
    with rejected():  # generation does not calibrate
        generation.deep_merge(GOOD | ens("deepen", ["a", "b"], dev_set="/data/dev.jsonl")).validate()


def test_the_members_rule_is_stated_once(dagbag):
    """The schema's conditionals and plan's check agree (both from MEMBERS_PER_METHOD and
    CALIBRATED_METHODS), with and without a dev set."""

    params = served(dagbag.dags["ensemble_labeling"]).params
    for method in fs.METHODS:
        for n, dev_set in [(n, None) for n in range(1, 10)] + [(n, "/d.jsonl") for n in range(1, 4)]:
            conf = ens(method, [f"m{i}" for i in range(n)], dev_set=dev_set)
            try:
                params.deep_merge(GOOD | conf).validate()
                by_schema = True
            except Exception:
                by_schema = False
            try:
                fs.check_params(fs.settings_of(conf))
                by_check = True
            except ValueError:
                by_check = False
            assert by_schema is by_check, (method, n, dev_set)


@pytest.mark.parametrize("conf", BAD_COMMON, ids=str)
@pytest.mark.parametrize("dag_id", ["ensemble_labeling", "synthetic_generation"])
def test_bad_values_are_rejected(dagbag, dag_id, conf):
    with rejected():
        served(dagbag.dags[dag_id]).params.deep_merge(GOOD | conf).validate()


@pytest.mark.parametrize("conf", BAD_SAMPLING, ids=str)
def test_bad_sampling_is_rejected(dagbag, conf):
    with rejected():
        served(dagbag.dags["synthetic_generation"]).params.deep_merge(GOOD | conf).validate()


def test_labeling_takes_no_sampling_settings(dagbag):
    assert not {"temperature", "top_p", "top_k", "n_samples"} & set(dagbag.dags["ensemble_labeling"].params)


def dag_runs(dag_id: str) -> list:
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.scalars(select(DagRun.run_id).where(DagRun.dag_id == dag_id)).all()
        tis = session.scalars(select(TaskInstance.task_id).where(TaskInstance.dag_id == dag_id)).all()
        return [*runs, *tis]


@pytest.mark.parametrize("dag_id, conf", [
    ("synthetic_generation", ens("beam")), ("synthetic_generation", {"temperature": 0}),
    ("synthetic_generation", ens("single", ["-x"])), ("ensemble_labeling", ens("deepen", ["smollm2-135m-instruct"])),
    ("ensemble_labeling", ens("single", ["a", "b"])),
    ("ensemble_labeling", ens("single", ["smollm2-135m-instruct"], dev_set="/data/dev.jsonl"))], ids=str)
def test_bad_trigger_is_refused_before_anything_runs(load_dag, airflow_db, tmp_path, dag_id, conf):
    """Through the code path of a trigger (create_dagrun validates the conf): no run, no task."""
    dag = load_dag(dag_id)
    logical = datetime(2025, 3, 4, tzinfo=timezone.utc)
    before = dag_runs(dag_id)
    with rejected():
        dag.test(logical_date=logical, run_conf=GOOD | {"output_root": str(tmp_path)} | conf)
    assert dag_runs(dag_id) == before
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def api(airflow_db, monkeypatch):
    """The REST API (core app) on the test DB, every caller an admin, the DAG folder synced."""
    from fastapi.testclient import TestClient

    from airflow.api_fastapi.app import create_app
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.utils.session import create_session

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "test-" * 16)  # long enough for SHA512: no warning
    with create_session() as session:
        DagBundlesManager().sync_bundles_to_db(session=session)
    sync_bag_to_db(BundleDagBag(dag_folder=str(DAG_FOLDER), bundle_path=DAG_FOLDER, bundle_name="dags-folder"),
                   "dags-folder", None)
    return TestClient(create_app(apps="core"))


def test_rest_api_trigger_refuses_members_that_do_not_fit_the_method(api, tmp_path):
    """The trigger the UI and clients use: 400 naming the rule, and no run or task instance exists;
    the same conf with a fitting ensemble creates a queued run whose tasks have not started."""
    url = "/api/v2/dags/ensemble_labeling/dagRuns"
    conf = GOOD | {"output_root": str(tmp_path)}
    before = dag_runs("ensemble_labeling")
    for bad in (ens("deepen", ["smollm2-135m-instruct"]), ens("single", ["a", "b"]), ens("specfuse", ["a"])):
        r = api.post(url, json={"logical_date": None, "conf": conf | bad})
        assert r.status_code == 400, r.text
        assert "Invalid input for param ensemble" in r.json()["detail"] and "members" in r.json()["detail"]
    assert dag_runs("ensemble_labeling") == before
    r = api.post(url, json={"logical_date": None,
                            "conf": conf | ens("single", ["smollm2-135m-instruct"], dev_set="/data/dev.jsonl")})
    assert r.status_code == 400, r.text  # calibration needs an ensemble method
    assert "Invalid input for param ensemble" in r.json()["detail"] and "method" in r.json()["detail"]
    assert dag_runs("ensemble_labeling") == before
    r = api.post(url, json={"logical_date": None, "conf": conf | ens("deepen", ["a", "b"])})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "queued" and r.json()["conf"]["ensemble"]["method"] == "deepen"

    from sqlalchemy import select

    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        started = session.scalars(select(TaskInstance.task_id).where(
            TaskInstance.run_id == r.json()["dag_run_id"], TaskInstance.start_date.is_not(None))).all()
    assert started == []
    assert list(tmp_path.iterdir()) == []
