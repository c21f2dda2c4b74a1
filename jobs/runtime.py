"""Per-Python-worker runtime: the ensemble is built once per worker process (not per partition or
batch) and placed on the GPU Spark assigned to the task, or the CPU when it assigned none."""
from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)
_FUSERS: dict[tuple, Any] = {}


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


def task_threads() -> int | None:
    """Torch CPU threads for the current task: ``spark.task.cpus`` (1 by default), so that the tasks
    Spark runs side by side on an executor share its cores instead of oversubscribing them (two local
    tasks with torch's default of one thread per core each ran slower than one). None outside Spark."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        return max(1, int(ctx.cpus())) if ctx is not None else None
    except ImportError:
        return None


def pin_threads() -> None:
    """Apply :func:`task_threads` to torch (once per worker; changing it later is harmless)."""
    n = task_threads()
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            log.info("torch threads: %d -> %d (spark.task.cpus)", torch.get_num_threads(), n)
            torch.set_num_threads(n)


def build_fuser(method: str, members: Sequence[str], config: Any, dtype: str | None, max_batch_tokens: int,
                device: str):
    """Build (or reuse) ``method``'s fuser of ``members`` with its ``config`` (a frozen fuser config
    from ``JobConfig.fuser``, or None) in ``dtype`` with the memory bound ``max_batch_tokens`` on ``device``."""
    key = (method, tuple(members), config, dtype, max_batch_tokens, device)
    if key not in _FUSERS:
        from ensemble.fusers.registry import make_fuser

        log.info("building %s ensemble of %s on %s", method, list(members), device)
        _FUSERS[key] = make_fuser(method, members, config, dtype=dtype, device=device,
                                  max_batch_tokens=max_batch_tokens)
    return _FUSERS[key]
