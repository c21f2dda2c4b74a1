"""Airflow DAG ``ensemble_labeling``: label a dataset with an ensemble, one partition per logical date.

plan (check Params, resolve settings) >> calibrate (``python -m jobs.calibrate`` on ``ensemble.dev_set``;
skipped without one) >> fuse (SparkSubmitOperator: jobs/fuse.py --mode label, ``--profile`` when
calibrated) >> publish (after the job committed: Asset ``ensemble_fuse.labels``).

Rows need ``choices``; a row without them becomes an error row (by design of label mode).
Deployment settings come from the connection ``spark_default`` and Variables (see fuse_submit.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from airflow.sdk import Asset

_DAG_FOLDER = str(Path(__file__).resolve().parent)
if _DAG_FOLDER not in sys.path:  # Airflow puts the DAG bundle on sys.path; a bare DagBag does not
    sys.path.append(_DAG_FOLDER)

from fuse_submit import calibration_params, common_params, dag_params, fuse_dag  # noqa: E402

LABELS = Asset(name="ensemble_fuse.labels", uri="ensemble-fuse://labels")

dag = fuse_dag(
    dag_id="ensemble_labeling",
    description="Ensemble labeling of a dataset (choose among given labels, with probabilities)",
    mode="label",
    params=dag_params({**common_params(max_new_tokens=16), **calibration_params()}),
    asset=LABELS,
    tags=["ensemble", "spark", "labeling"],
    doc_md=__doc__,
    calibration=True,
)
