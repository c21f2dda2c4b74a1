"""What the Spark tasks run (through ``mapInArrow``; see docs/jobs.md): the input pass that keys,
parses and validates every row once (:func:`prepare_task`), and the executor task that fuses a
partition's rows and commits them (:func:`fuse_task`)."""
from __future__ import annotations

import functools
import logging
from typing import Iterator

import pyarrow as pa

from jobs.config import JobConfig
from jobs.rows import KEY_COLUMN, RANK_COLUMN, prepare
from jobs.sink import commit_partition, committed_counts

log = logging.getLogger(__name__)


def prepare_task(batches: Iterator[pa.RecordBatch], *, run_seed: int, job_max_new: int,
                 mode: str) -> Iterator[pa.RecordBatch]:
    """Input rows (typed columns, or JSON lines) -> PREPARED_SCHEMA rows (see jobs/rows.py)."""
    for batch in batches:
        yield prepare(batch, run_seed=run_seed, job_max_new=job_max_new, mode=mode)


def fuse_task(batches: Iterator[pa.RecordBatch], *, config: JobConfig, data_dir: str) -> Iterator[pa.RecordBatch]:
    """Fuse a partition's prepared rows and commit them; yields one COMMIT_SCHEMA row per file."""
    from pyspark import TaskContext

    from jobs.partition import process_partition
    from jobs.runtime import build_fuser, pin_threads, task_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = TaskContext.get()
    partition = ctx.partitionId() if ctx else 0
    inputs = list(batches)  # prompts are small; knowing the total lets us log progress
    inputs = _uncommitted(inputs, data_dir, partition)
    total = sum(b.num_rows for b in inputs)
    if total == 0:  # e.g. a resumed run whose rows here are all committed: nothing to load
        return
    device = task_device(config.device)
    if device == "cpu":
        pin_threads()
    log.info("partition %d: %d rows to fuse on %s", partition, total, device)
    make = functools.partial(build_fuser, config.method, config.members, config.fuser, config.dtype,
                             config.max_batch_tokens, device)
    out = process_partition(inputs, make_fuser=make, config=config)
    yield from commit_partition(out, data_dir=data_dir, partition=partition, total_rows=total,
                                commit_rows=config.commit_rows, fail_after_rows=config.fail_after_rows)


def _uncommitted(inputs: list[pa.RecordBatch], data_dir: str, partition: int) -> list[pa.RecordBatch]:
    """The rows an earlier attempt of this task has not committed: a retried task (its Python worker
    or executor died) skips them by the resume rule, the k-th occurrence of an id (``_rank``) being
    done when k rows of it are committed. Committed rows are a prefix of the partition's sorted rows,
    so the retry's files start where the earlier attempt's stopped."""
    done = committed_counts(data_dir, partition)
    if not done:
        return inputs
    kept = [b.filter(pa.array([r > done[k] for k, r in zip(b.column(KEY_COLUMN).to_pylist(),
                                                          b.column(RANK_COLUMN).to_pylist())]))
            for b in inputs]
    skipped = sum(b.num_rows for b in inputs) - sum(b.num_rows for b in kept)
    log.info("partition %d: %d rows already committed by an earlier attempt are skipped", partition, skipped)
    return kept
