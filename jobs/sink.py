"""Commit output batches as Parquet files with deterministic names.

A file's name is ``part-<partition>-<digest>.parquet`` where the digest covers the (id, sample) keys
it holds, so a retried task rewrites (overwrites) exactly its own files, and a resumed run, which
only computes rows not yet committed, writes new names and never clobbers committed ones. Files are
written under a temporary name and moved into place, so readers never see half a file.
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from schemas import OUTPUT_SCHEMA
from schemas.tables import COMMIT_SCHEMA

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by the fault-injection option (``fail_after_rows``) to kill a task partway."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or a URI (s3://, hdfs://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def file_name(partition: int, table: pa.Table) -> str:
    keys = sorted(f"{i}\x1f{s}" for i, s in zip(table.column("id").to_pylist(), table.column("sample").to_pylist()))
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return f"part-{partition:05d}-{digest}.parquet"


def committed_counts(data_dir: str, partition: int) -> Counter:
    """How many rows of each id (sample 0) the partition's committed files hold: what an earlier
    attempt of its task committed before it died (and, on a resumed run, what earlier runs did)."""
    fs, root = filesystem(data_dir)
    prefix = f"part-{partition:05d}-"
    counts: Counter = Counter()
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.base_name.startswith(prefix) and info.base_name.endswith(".parquet"):
            t = pq.read_table(info.path, columns=["id", "sample"], filesystem=fs)
            counts.update(i for i, s in zip(t.column("id").to_pylist(), t.column("sample").to_pylist()) if s == 0)
    return counts


def write_atomic(fs: pafs.FileSystem, directory: str, name: str, table: pa.Table) -> str:
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
    pq.write_table(table, tmp, filesystem=fs, use_compliant_nested_type=True)
    final = f"{directory}/{name}"
    fs.move(tmp, final)
    return final


def commit_partition(
    out_batches: Iterable[pa.RecordBatch],
    *,
    data_dir: str,
    partition: int,
    total_rows: int,
    commit_rows: int,
    fail_after_rows: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Write ``out_batches`` in files of about ``commit_rows`` rows; yield one COMMIT_SCHEMA row per file.
    Each commit logs the partition's progress: rows done of ``total_rows`` and its tokens/s so far."""
    fs, root = filesystem(data_dir)
    buffered: list[pa.RecordBatch] = []
    n_buffered = done = done_tokens = 0
    t_start = t_file = time.perf_counter()

    def flush() -> pa.RecordBatch:
        nonlocal buffered, n_buffered, done, done_tokens, t_file
        table = pa.Table.from_batches(buffered, schema=OUTPUT_SCHEMA)
        path = write_atomic(fs, root, file_name(partition, table), table)
        ok = pa.compute.sum(pa.compute.equal(table.column("status"), "ok")).as_py() or 0
        tokens = pa.compute.sum(table.column("token_count")).as_py() or 0
        # micro-batch latency is shared by its rows: count it once per distinct batch
        fuser_s = sum(set(x for x in table.column("latency_ms").to_pylist() if x is not None)) / 1000
        now = time.perf_counter()
        done += table.num_rows
        done_tokens += tokens
        elapsed = now - t_start
        log.info("partition %d: %d of %d rows done, %d tokens in %.1fs, %.1f tokens/s (committed %s)",
                 partition, done, total_rows, done_tokens, elapsed, done_tokens / max(elapsed, 1e-9),
                 path.rsplit("/", 1)[-1])
        rec = pa.RecordBatch.from_pylist(
            [{"partition": partition, "file": path, "rows": table.num_rows, "ok_rows": ok, "tokens": tokens,
              "fuser_s": fuser_s, "wall_s": now - t_file}], schema=COMMIT_SCHEMA)
        buffered, n_buffered, t_file = [], 0, now
        return rec

    for batch in out_batches:
        buffered.append(batch)
        n_buffered += batch.num_rows
        if n_buffered >= commit_rows:
            yield flush()
            if fail_after_rows is not None and done >= fail_after_rows:
                raise InjectedFailure(f"injected failure in partition {partition} after {done} committed rows")
    if n_buffered:
        yield flush()
