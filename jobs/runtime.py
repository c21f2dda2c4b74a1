"""Per-Python-worker runtime: the ensemble is built once per worker process (not per partition or
batch) and placed on the GPU Spark assigned to the task, or the CPU when it assigned none."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
_FUSERS: dict[tuple, Any] = {}
LOADS = {"count": 0}  # how many times this process built an ensemble (tests read it)


def task_device(requested: str = "auto") -> str:
    """The device for the current task: the GPU in ``TaskContext.resources()['gpu']`` when Spark
    assigned one, else CPU (or what ``requested`` forces)."""
    if requested == "cpu":
        return "cpu"
    addresses: list[str] = []
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is not None and "gpu" in ctx.resources():
            addresses = list(ctx.resources()["gpu"].addresses)
    except ImportError:
        pass
    if addresses:
        return f"cuda:{addresses[0]}"
    return "cuda" if requested == "cuda" else "cpu"


def build_fuser(settings: dict[str, Any], device: str):
    """Build (or reuse) the fuser described by ``settings`` on ``device``."""
    key = (tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items())), device)
    if key not in _FUSERS:
        from ensemble.fusers.registry import make_fuser

        log.info("building %s ensemble of %s on %s", settings["method"], list(settings["members"]), device)
        _FUSERS[key] = make_fuser(settings, device=device)
        LOADS["count"] += 1
    return _FUSERS[key]
