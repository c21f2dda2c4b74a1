"""``spark-submit jobs/fuse.py`` runs the entry point as a script, so ``jobs/`` is the first entry of
``sys.path`` on the driver: a module there named like a standard-library module shadows it for every
import in the process (``jobs/profile.py`` once broke ``import pyspark``, whose profiler imports
``cProfile``, which imports ``profile``)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_no_module_of_jobs_shadows_the_standard_library():
    names = {p.stem for p in (REPO / "jobs").glob("*.py")} | {p.name for p in (REPO / "jobs").iterdir() if p.is_dir()}
    clashes = sorted(names & set(sys.stdlib_module_names))
    assert names, "jobs/ has no modules"
    assert clashes == [], f"jobs/ modules named like standard-library modules: {clashes}"
