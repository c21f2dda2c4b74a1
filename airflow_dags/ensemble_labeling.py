"""Airflow DAG ``ensemble_labeling``: label a dataset with an ensemble, one partition per logical date.

plan (check Params, resolve settings) >> fuse (SparkSubmitOperator: jobs/fuse.py --mode label)
>> publish (after the job committed: Asset ``ensemble_fuse.labels``).

Rows need ``choices``; a row without them becomes an error row (by design of label mode).
Deployment settings come from the connection ``spark_default`` and Variables (see fuse_submit.py).
"""
from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Asset

_DAG_FOLDER = str(Path(__file__).resolve().parent)
if _DAG_FOLDER not in sys.path:  # Airflow puts the DAG bundle on sys.path; a bare DagBag does not
    sys.path.append(_DAG_FOLDER)

from fuse_submit import common_params, plan, publish

LABELS = Asset(name="ensemble_fuse.labels", uri="ensemble-fuse://labels")

with DAG(
    dag_id="ensemble_labeling",
    description="Ensemble labeling of a dataset (choose among given labels, with probabilities)",
    schedule="@daily",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=common_params(max_new_tokens=16),
    tags=["ensemble", "spark", "labeling"],
    doc_md=__doc__,
):
    submission = plan(mode="label")
    fuse = SparkSubmitOperator(
        task_id="fuse",
        conn_id="spark_default",
        application=submission["application"],
        application_args=submission["args"],
        conf=submission["conf"],
        env_vars=submission["env"],
        retries=2,  # safe: the job is idempotent and resumes the partition's committed rows
        retry_delay=timedelta(minutes=1),
        name=submission["name"],
    )
    published = publish.override(outlets=[LABELS])(submission["output"], submission["ds"])
    submission >> fuse >> published
