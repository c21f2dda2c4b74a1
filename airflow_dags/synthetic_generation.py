"""Airflow DAG ``synthetic_generation``: sample synthetic text with an ensemble, one partition per
logical date.

plan (check Params, resolve settings) >> fuse (SparkSubmitOperator: jobs/fuse.py --mode generate,
sampled, per-row seeds derived from the run seed) >> publish (after the job committed: Asset
``ensemble_fuse.synthetic``).

Deployment settings come from the connection ``spark_default`` and Variables (see fuse_submit.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from airflow.sdk import Asset

_DAG_FOLDER = str(Path(__file__).resolve().parent)
if _DAG_FOLDER not in sys.path:  # Airflow puts the DAG bundle on sys.path; a bare DagBag does not
    sys.path.append(_DAG_FOLDER)

from fuse_submit import common_params, dag_params, fuse_dag, sampling_params  # noqa: E402

SYNTHETIC = Asset(name="ensemble_fuse.synthetic", uri="ensemble-fuse://synthetic")

dag = fuse_dag(
    dag_id="synthetic_generation",
    description="Bulk synthetic data generation with an ensemble (sampled text, per-row seeds)",
    mode="generate",
    params=dag_params({**common_params(max_new_tokens=256), **sampling_params()}),
    asset=SYNTHETIC,
    tags=["ensemble", "spark", "generation"],
    doc_md=__doc__,
)
