"""Input, output and summary tables (see docs/jobs.md).

Nested lists are written with the Parquet-compliant ``element`` naming that Spark and pyarrow read.
Bump ``SCHEMA_VERSION`` on any change to OUTPUT_SCHEMA: it is part of ``config_hash``, so a run
never resumes into an output directory written with another schema (version 2 added ``error_kind``;
version 3 the label mode's ``gated`` and the members' ``choice_*`` scores in ``member_stats``; version 4
``member_stats.fused_share``, gated DeePEn's share of fused steps).
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 4
ERROR_KINDS = ("input", "fuser")
"""``error_kind`` of an error row: a bad input row, or a fuser failure (its micro-batch and its own retry
raised). Only fuser errors count against the run's error budget (docs/jobs.md)."""

INPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # stable row key
        pa.field("prompt", pa.string(), nullable=False),  # the user message
        pa.field("system", pa.string()),  # optional system message
        pa.field("choices", pa.list_(pa.string())),  # labeling mode: the allowed answers
        pa.field("seed", pa.int64()),  # per-row sampling seed
        pa.field("max_new_tokens", pa.int32()),  # per-row budget, capped by the job's
    ]
)
INPUT_COLUMNS = tuple(INPUT_SCHEMA.names)

MEMBER_STATS_TYPE = pa.struct(
    [
        pa.field("name", pa.string()),
        pa.field("role", pa.string()),  # "main" | "member"
        pa.field("weight", pa.float64()),
        pa.field("calls", pa.int64()),
        pa.field("tokens_in", pa.int64()),
        pa.field("tokens_out", pa.int64()),
        # DeePEn
        pa.field("agreement", pa.float64()),
        pa.field("mean_kl", pa.float64()),
        pa.field("fused_share", pa.float64()),  # generate: share of the row's steps that were fused (--fuse-below)
        # SpecFuse
        pa.field("proposed", pa.int64()),
        pa.field("accepted", pa.int64()),
        pa.field("mean_score", pa.float64()),
        pa.field("rounds_active", pa.int64()),
        pa.field("exit_round", pa.int64()),
        # label mode (every method; null otherwise): this member's own scores of the row's choices, in
        # its tokenisation, so that a user can audit a label and pool the members again offline
        pa.field("choice_probs", pa.list_(pa.float64())),  # its posterior under the job's choice norm
        pa.field("choice_logprobs", pa.list_(pa.float64())),  # summed continuation log-probabilities
        pa.field("choice_tokens", pa.list_(pa.int64())),  # continuation token counts
        pa.field("choice_neutral", pa.list_(pa.float64())),  # the same after the neutral context (norm pmi)
    ]
)
MEMBER_STATS_FIELDS = tuple(f.name for f in MEMBER_STATS_TYPE)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),  # null only when the input row had no usable id (status error)
        pa.field("sample", pa.int32()),  # 0..n-1 when n samples are asked, else 0
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("members", pa.list_(pa.string())),
        pa.field("text", pa.string()),  # generation
        pa.field("label", pa.string()),  # labeling
        pa.field("label_probs", pa.list_(pa.float64())),  # labeling, aligned with the input choices
        pa.field("gated", pa.bool_()),  # labeling: the gate kept the main member's label (null otherwise)
        pa.field("finish_reason", pa.string()),  # stop | length | error
        pa.field("status", pa.string(), nullable=False),  # ok | error
        pa.field("error", pa.string()),  # reason, null when ok
        pa.field("error_kind", pa.string()),  # input | fuser (ERROR_KINDS), null when ok
        pa.field("token_count", pa.int32()),
        pa.field("latency_ms", pa.float64()),  # fuser wall time of the row's micro-batch (shared by its rows)
        pa.field("seed", pa.int64()),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("member_stats", pa.list_(MEMBER_STATS_TYPE)),
    ]
)

# What a Spark task returns to the driver: one row per committed file.
COMMIT_SCHEMA = pa.schema(
    [
        pa.field("partition", pa.int32()),
        pa.field("file", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("ok_rows", pa.int64()),
        pa.field("tokens", pa.int64()),
        pa.field("fuser_s", pa.float64()),
        pa.field("wall_s", pa.float64()),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("member", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("calls", pa.int64()),
        pa.field("calls_per_row", pa.float64()),
        pa.field("tokens_in", pa.int64()),
        pa.field("tokens_out", pa.int64()),
        pa.field("agreement", pa.float64()),
        pa.field("mean_kl", pa.float64()),
        pa.field("win_rate", pa.float64()),
        pa.field("exit_rate", pa.float64()),
        pa.field("mean_exit_round", pa.float64()),
        pa.field("tokens_per_s", pa.float64()),
        # run-level, the same on every row (one row with a null member when no row is ok): the
        # committed rows by status and error kind, and the error budget's verdict (jobs/budget.py)
        pa.field("rows_ok", pa.int64()),
        pa.field("rows_input_error", pa.int64()),
        pa.field("rows_fuser_error", pa.int64()),
        pa.field("fuser_error_rate", pa.float64()),
        pa.field("budget_exceeded", pa.bool_()),
    ]
)


def spark_schema(schema: pa.Schema):
    """The Spark StructType of a pyarrow schema (imports pyspark lazily)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)
