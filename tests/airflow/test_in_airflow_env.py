"""The Airflow DAGs' tests (tests/airflow) run in the Airflow environment that
scripts/setup_airflow.sh creates (.venv-airflow): Airflow is never installed into the main one.
This test runs them there, with this interpreter as the Python of the Spark job, and fails when
they fail, when none ran, or when a test that needs the main environment (the real Spark runs, the
job's parser) did not pass, e.g. was skipped."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("AIRFLOW_VENV", REPO / ".venv-airflow"))
MAIN_ENV_TESTS = ("test_end_to_end_synthetic_generation_on_local_spark", "test_end_to_end_labeling_on_local_spark",
                  "test_end_to_end_calibrated_labeling_on_local_spark", "test_a_failed_job_publishes_nothing",
                  "test_calibration_flags_are_accepted_by_calibrate_and_the_job",
                  "test_every_flag_a_dag_passes_is_accepted_by_the_job[ensemble_labeling-label]",
                  "test_every_flag_a_dag_passes_is_accepted_by_the_job[synthetic_generation-generate]")


@pytest.mark.slow
@pytest.mark.airflow
def test_airflow_dags_in_their_environment(tmp_path):
    python = VENV / "bin" / "python"
    if not python.exists():
        message = f"{python} does not exist: run `bash scripts/setup_airflow.sh` first"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    junit = tmp_path / "airflow-tests.xml"
    env = {**os.environ, "ENSEMBLE_MAIN_PYTHON": sys.executable}
    proc = subprocess.run(
        [str(python), "-m", "pytest", "tests/airflow", "-q", "-p", "no:cacheprovider", "-rfEs",
         f"--junitxml={junit}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    tail = (proc.stdout + "\n" + proc.stderr)[-8000:]
    assert proc.returncode == 0, f"tests/airflow failed (exit {proc.returncode}):\n{tail}"
    assert junit.exists(), tail

    cases = ET.parse(junit).getroot().iter("testcase")
    outcome = {}
    for case in cases:
        bad = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome[case.get("name")] = bad[0] if bad else "passed"
    passed = [name for name, result in outcome.items() if result == "passed"]
    assert passed, f"no Airflow test ran:\n{tail}"
    assert not [n for n, r in outcome.items() if r in ("failure", "error")], tail
    not_passed = {name: outcome.get(name) for name in MAIN_ENV_TESTS if outcome.get(name) != "passed"}
    assert not not_passed, f"tests that need the main environment did not pass: {not_passed}\n{tail}"
    sys.stdout.write(f"\ntests/airflow: {len(passed)} passed, {len(outcome) - len(passed)} not passed\n")
