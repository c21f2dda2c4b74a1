"""The batch job's entry point: ``spark-submit jobs/fuse.py ...`` runs this file, and
``python -m jobs.fuse ...`` the same module (see docs/jobs.md).

    python -m jobs.fuse --input data/sample.jsonl --output output/sample --method deepen \
        --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct

The command line is jobs/cli.py, the driver (session, manifest, input keying, run) jobs/driver.py,
the executor task jobs/task.py. Layout of ``--output``: ``data/part-*.parquet`` (OUTPUT_SCHEMA),
``summary.parquet``, ``report.md`` (+ PNG plots), ``_run.json`` (the config), ``_SUCCESS`` (written last).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by spark-submit: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import main  # noqa: E402
from jobs.driver import RunResult, check_run_manifest, read_input, run, spark_session  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
