"""Param validation: the defaults are valid (scheduled runs use them), and a trigger with a bad
value is refused when the run is created, before any task runs."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest



def served(dag):
    """The DAG as the scheduler and the API server hold it (serialized): a trigger's conf is
    validated by ``params.deep_merge(conf).validate()`` on it."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


def rejected():
    from airflow.exceptions import ParamValidationError

    return pytest.raises(ParamValidationError)


GOOD = {"input": "/data/in.jsonl", "output_root": "/data/out", "members": ["smollm2-135m-instruct"]}

BAD_COMMON = [
    {"method": "beam"},
    {"method": None},
    {"members": []},
    {"members": "smollm2-135m-instruct"},
    {"members": ["a", "a"]},
    {"members": ["--master"]},
    {"members": [""]},
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
    assert dag.params.validate()["method"] == "single"
    assert dag.params.deep_merge(GOOD | {"seed": 7, "method": "deepen",
                                         "members": ["a", "b"]}).validate()["seed"] == 7


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


@pytest.mark.parametrize("conf", [{"method": "beam"}, {"temperature": 0}, {"members": ["-x"]}], ids=str)
def test_bad_trigger_is_refused_before_anything_runs(load_dag, airflow_db, tmp_path, conf):
    """Through the code path of a trigger (create_dagrun validates the conf): no run, no task."""
    dag = load_dag("synthetic_generation")
    logical = datetime(2025, 3, 4, tzinfo=timezone.utc)
    with rejected():
        dag.test(logical_date=logical, run_conf=GOOD | {"output_root": str(tmp_path)} | conf)
    assert list(tmp_path.iterdir()) == []
