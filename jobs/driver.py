"""The job's driver (see docs/jobs.md): the SparkSession, the run manifest, the input pass that keys
every row once, the resume join, and :func:`run`, which hands the rows to the executor tasks
(jobs/task.py), holds the output to its error budget (jobs/budget.py) and writes the summary and,
within the budget, ``_SUCCESS``."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time

import pyarrow as pa

from jobs.budget import ErrorBudgetExceeded, outcome
from jobs.config import JobConfig
from jobs.result import RunResult
from jobs.rows import KEY_COLUMN, POS_COLUMN, PREPARED_SCHEMA, RANK_COLUMN
from jobs.sink import filesystem
from jobs.task import fuse_task, prepare_task
from schemas import INPUT_COLUMNS, spark_schema
from schemas.tables import COMMIT_SCHEMA

__all__ = ["RunResult", "check_run_manifest", "read_input", "run", "spark_session", "use_driver_python"]
log = logging.getLogger(__name__)
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def partitioned(df, cfg: JobConfig):
    """The rows to fuse in ``cfg.partitions`` partitions by row key, each in input order."""
    return df.repartition(cfg.partitions, KEY_COLUMN).sortWithinPartitions(POS_COLUMN)


def spark_session(cfg: JobConfig):
    """The SparkSession of a run: the configured master, else local[*] unless spark-submit set one."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(f"ensemble-fuse:{cfg.method}")
    if cfg.master:
        builder = builder.master(cfg.master)
    elif not _submitted():
        builder = builder.master("local[*]")
    builder = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(max(cfg.batch_size, 64)))
    builder = builder.config("spark.ui.showConsoleProgress", "false")
    # --partitions must hold: when spark.sql.shuffle.partitions equals it, Spark drops the job's
    # repartition as redundant with the duplicate ranking's shuffle, and adaptive execution would then
    # merge that shuffle's small partitions (prompt data is far below its 64 MB target) into one task
    builder = builder.config("spark.sql.adaptive.coalescePartitions.enabled", "false")
    logging.getLogger("py4j").setLevel(logging.WARNING)  # its INFO lines are connection chatter
    use_driver_python(cfg.master)
    return builder.getOrCreate()


def use_driver_python(master: str | None) -> None:
    """Local mode runs Python workers on this machine: unless the user chose an interpreter
    (PYSPARK_PYTHON), use the one running the driver, so workers see the same packages (the bare
    `python3` on PATH usually lacks pyarrow and torch). PySpark reads only the environment here."""
    if not os.environ.get("PYSPARK_PYTHON") and (master or ("" if _submitted() else "local")).startswith("local"):
        os.environ["PYSPARK_PYTHON"] = sys.executable


def _submitted() -> bool:
    """True when spark-submit launched us (it sets the master in the conf)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def read_input(spark, cfg: JobConfig):
    """The input as PREPARED_SCHEMA rows with their duplicate rank. One Python pass (``prepare_task``)
    keys every row with ``jobs.rows.row_key``, parses each JSON line once and validates the row, so a
    bad line or value becomes an error row on its executor instead of failing the job."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if cfg.input.endswith(JSONL_SUFFIXES):
        df = spark.read.text(cfg.input)  # one ``value`` column of lines
    else:
        df = spark.read.parquet(cfg.input)
        df = df.select(*[c for c in df.columns if c in INPUT_COLUMNS])
    df = df.withColumn(POS_COLUMN, F.monotonically_increasing_id())
    prep = functools.partial(prepare_task, run_seed=cfg.seed, job_max_new=cfg.max_new_tokens, mode=cfg.mode)
    df = df.mapInArrow(prep, spark_schema(PREPARED_SCHEMA))
    # duplicates are ranked by input position, so the same row wins in every run
    return df.withColumn(RANK_COLUMN, F.row_number().over(Window.partitionBy(KEY_COLUMN).orderBy(POS_COLUMN)))


def check_run_manifest(cfg: JobConfig) -> None:
    """Refuse to mix two different configurations in one output directory."""
    fs, root = filesystem(cfg.output)
    manifest = f"{root}/_run.json"
    info = fs.get_file_info(manifest)
    if info.type != pa.fs.FileType.NotFound:
        with fs.open_input_stream(manifest) as f:
            old = json.loads(f.read().decode())
        if old.get("config_hash") != cfg.config_hash:
            raise ValueError(
                f"output {cfg.output!r} holds run {old.get('run_id')!r} with config_hash {old.get('config_hash')}, "
                f"this run has {cfg.config_hash}: use a new output directory"
            )
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(manifest) as f:
        f.write(json.dumps({"run_id": cfg.effective_run_id, "config_hash": cfg.config_hash,
                            "config": json.loads(cfg.to_json())}, indent=1).encode())
    success = f"{root}/_SUCCESS"
    if fs.get_file_info(success).type != pa.fs.FileType.NotFound:
        fs.delete_file(success)


def committed(spark, data_dir: str):
    """The rows committed in ``data_dir`` as a DataFrame, or None when there are none."""
    fs, root = filesystem(data_dir)
    info = fs.get_file_info(pa.fs.FileSelector(root, allow_not_found=True))
    if not any(i.path.endswith(".parquet") for i in info):
        return None
    return spark.read.parquet(data_dir)


def committed_counts(spark, data_dir: str):
    """(id, n) of rows already committed in this run's output (sample 0 only), or None. Error rows
    of either kind count: a committed fuser error is not retried (docs/jobs.md)."""
    data = committed(spark, data_dir)
    if data is None:
        return None
    from pyspark.sql import functions as F

    done = data.where(F.col("sample") == 0)
    return done.groupBy(F.col("id").alias("_done_id")).agg(F.count("*").alias("_done_n"))


def run(spark, cfg: JobConfig) -> RunResult:
    """Run the job on an existing SparkSession. Raises :class:`jobs.budget.ErrorBudgetExceeded` (after
    committing every row and writing the report, without ``_SUCCESS``) when the output's fuser errors
    are over ``cfg.max_fuser_error_rate``."""
    t0 = time.perf_counter()
    check_run_manifest(cfg)
    data_dir = cfg.output.rstrip("/") + "/data"
    df = read_input(spark, cfg)
    done = committed_counts(spark, data_dir)
    if done is not None:  # resume: the k-th occurrence of an id is done when k rows of it are committed
        from pyspark.sql import functions as F

        df = df.join(done, df[KEY_COLUMN] == done["_done_id"], "left")
        df = df.where(F.col("_done_n").isNull() | (F.col(RANK_COLUMN) > F.col("_done_n")))
        df = df.drop("_done_id", "_done_n")
    log.info("run %s: %s over %s, input %s, %d partitions%s", cfg.effective_run_id, cfg.method,
             ", ".join(cfg.members), cfg.input, cfg.partitions,
             " (resuming: rows already committed are skipped)" if done is not None else "")
    task = functools.partial(fuse_task, config=cfg, data_dir=data_dir)
    commits = [r.asDict() for r in partitioned(df, cfg).mapInArrow(task, spark_schema(COMMIT_SCHEMA)).collect()]
    seconds = time.perf_counter() - t0
    result = RunResult(cfg.output, data_dir, commits, done is not None, seconds)
    held = outcome(committed(spark, data_dir), cfg.max_fuser_error_rate)
    if cfg.report:
        from jobs.report import write_summary

        write_summary(spark, cfg, result, held)
    log.info("run %s: %d rows computed (%d ok) in %.1fs, %d tokens, %.1f tokens/s; output in %s: rows by "
             "(status, error_kind) %s; %s", cfg.effective_run_id, result.rows, sum(c["ok_rows"] for c in commits),
             seconds, result.tokens, result.tokens / max(seconds, 1e-9), cfg.output, held.tally(), held.describe())
    if held.exceeded:
        raise ErrorBudgetExceeded(held.message(cfg.output), held, result)
    fs, root = filesystem(cfg.output)
    with fs.open_output_stream(f"{root}/_SUCCESS") as f:
        f.write(b"")
    return result
