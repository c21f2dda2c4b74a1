"""pyarrow schemas of the job's input and output tables: the single source of truth.
Spark schemas are derived from them (``spark_schema``)."""
from schemas.tables import (
    INPUT_COLUMNS,
    INPUT_SCHEMA,
    MEMBER_STATS_TYPE,
    OUTPUT_SCHEMA,
    SCHEMA_VERSION,
    SUMMARY_SCHEMA,
    spark_schema,
)

__all__ = [
    "INPUT_COLUMNS", "INPUT_SCHEMA", "MEMBER_STATS_TYPE", "OUTPUT_SCHEMA", "SCHEMA_VERSION",
    "SUMMARY_SCHEMA", "spark_schema",
]
