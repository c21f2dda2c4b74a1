"""The batch job: read prompts, run one local ensemble per executor, commit Parquet, summarise.

    python -m jobs.fuse --input data/sample.jsonl --output output/sample --method deepen \
        --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct

The same module runs under ``spark-submit jobs/fuse.py ...`` (local, standalone, YARN, Kubernetes:
the master and resources come from configuration). Layout of ``--output``:
``data/part-*.parquet`` (OUTPUT_SCHEMA), ``summary.parquet``, ``report.md`` (+ PNG plots),
``_run.json`` (the config), ``_SUCCESS`` (written last).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # run as a file by spark-submit: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa

from jobs.cli import main, optional_arg  # noqa: F401  (the CLI lives in jobs/cli.py; spark-submit runs this file)
from jobs.config import JobConfig
from jobs.rows import NOID, POS_COLUMN, RANK_COLUMN, line_key
from jobs.sink import commit_partition, filesystem
from schemas import INPUT_COLUMNS, spark_schema
from schemas.tables import COMMIT_SCHEMA

log = logging.getLogger("jobs.fuse")
KEY_COLUMN = "_key"


# ---- executor side --------------------------------------------------------------------------------
def _task(batches: Iterator[pa.RecordBatch], *, config: JobConfig, data_dir: str) -> Iterator[pa.RecordBatch]:
    """What each Spark task runs (through mapInArrow): fuse its rows and commit them."""
    from pyspark import TaskContext

    from jobs.partition import process_partition
    from jobs.runtime import build_fuser, pin_threads, task_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = TaskContext.get()
    partition = ctx.partitionId() if ctx else 0
    inputs = list(batches)  # prompts are small; knowing the total lets us log progress
    total = sum(b.num_rows for b in inputs)
    device = task_device(config.device)
    if device == "cpu":
        pin_threads()
    make = functools.partial(build_fuser, config.method, config.members, config.fuser, config.dtype, device)
    out = process_partition(inputs, make_fuser=make, config=config)
    yield from commit_partition(out, data_dir=data_dir, partition=partition, total_rows=total,
                                commit_rows=config.commit_rows, fail_after_rows=config.fail_after_rows)


# ---- driver side ----------------------------------------------------------------------------------
def read_input(spark, cfg: JobConfig):
    from pyspark.sql import functions as F

    from pyspark.sql import Window

    path = cfg.input
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        df = spark.read.text(path)  # parse rows on the executors: a bad line becomes an error row
        df = df.withColumn(POS_COLUMN, F.monotonically_increasing_id())
        df = df.withColumn(KEY_COLUMN, F.udf(line_key, "string")("value", POS_COLUMN))
    else:
        df = spark.read.parquet(path)
        df = df.select(*[c for c in df.columns if c in INPUT_COLUMNS])
        df = df.withColumn(POS_COLUMN, F.monotonically_increasing_id())
        noid = F.concat(F.lit(NOID), F.col(POS_COLUMN).cast("string"))
        if "id" in df.columns and dict(df.dtypes)["id"] == "string":
            key = F.when(F.trim(F.col("id")) != "", F.col("id")).otherwise(noid)
        else:
            key = noid
        df = df.withColumn(KEY_COLUMN, key)
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


def committed_counts(spark, data_dir: str):
    """(id, n) of rows already committed in this run's output (sample 0 only), or None."""
    fs, root = filesystem(data_dir)
    info = fs.get_file_info(pa.fs.FileSelector(root, allow_not_found=True))
    if not any(i.path.endswith(".parquet") for i in info):
        return None
    from pyspark.sql import functions as F

    done = spark.read.parquet(data_dir).where(F.col("sample") == 0)
    return done.groupBy(F.col("id").alias("_done_id")).agg(F.count("*").alias("_done_n"))


@dataclasses.dataclass
class RunResult:
    output: str
    data_dir: str
    commits: list[dict[str, Any]]
    skipped_committed: bool
    seconds: float


def run(spark, cfg: JobConfig) -> RunResult:
    """Run the job on an existing SparkSession."""
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
    df = df.repartition(cfg.partitions, KEY_COLUMN).sortWithinPartitions(POS_COLUMN).drop(KEY_COLUMN)
    task = functools.partial(_task, config=cfg, data_dir=data_dir)
    commits = [r.asDict() for r in df.mapInArrow(task, spark_schema(COMMIT_SCHEMA)).collect()]
    seconds = time.perf_counter() - t0
    result = RunResult(cfg.output, data_dir, commits, done is not None, seconds)
    if cfg.report:
        from jobs.report import write_summary

        write_summary(spark, cfg, result)
    fs, root = filesystem(cfg.output)
    with fs.open_output_stream(f"{root}/_SUCCESS") as f:
        f.write(b"")
    rows = sum(c["rows"] for c in commits)
    log.info("run %s: %d rows computed in %.1fs; output in %s", cfg.effective_run_id, rows, seconds, cfg.output)
    return result


def spark_session(cfg: JobConfig):
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(f"ensemble-fuse:{cfg.method}")
    if cfg.master:
        builder = builder.master(cfg.master)
    elif not _submitted():
        builder = builder.master("local[*]")
    builder = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(max(cfg.batch_size, 64)))
    builder = builder.config("spark.ui.showConsoleProgress", "false")
    use_driver_python(cfg.master)
    return builder.getOrCreate()


def use_driver_python(master: str | None) -> None:
    """Local mode runs Python workers on this machine: unless the user chose an interpreter
    (PYSPARK_PYTHON), use the one running the driver, so workers see the same packages (the bare
    `python3` on PATH usually lacks pyarrow and torch). PySpark reads only the environment here."""
    import os

    if not os.environ.get("PYSPARK_PYTHON") and (master or ("" if _submitted() else "local")).startswith("local"):
        os.environ["PYSPARK_PYTHON"] = sys.executable


def _submitted() -> bool:
    """True when spark-submit launched us (it sets the master in the conf)."""
    import os

    return "PYSPARK_GATEWAY_PORT" in os.environ


if __name__ == "__main__":
    sys.exit(main())
