"""The run's error budget (docs/jobs.md, "Guarantees"): fuser errors counted against
``--max-fuser-error-rate``.

Input errors (bad rows: ``error_kind = input``) never fail a run. A fuser error is a row whose
micro-batch and own retry both raised (``error_kind = fuser``, jobs/partition.py). The rate is

    fuser-error rows / rows the fuser attempted (ok rows + fuser-error rows)

counted per prompt (``sample = 0``: a prompt's samples are generated together and fail as one error
row), over every row committed in the output directory, this run's and earlier runs' alike. So a
systematic failure (every micro-batch fails: rate 1) fails the run loudly, a rare bad row does not,
and a rerun into the directory of a failed run, which skips the committed error rows (they are not
retried), reaches the same verdict. Above the budget the driver writes the report but no
``_SUCCESS`` and raises :class:`ErrorBudgetExceeded` (the CLI exits 3).
"""
from __future__ import annotations

import dataclasses
from typing import Any

ROW_KINDS: tuple[tuple[str, str | None], ...] = (("ok", None), ("error", "input"), ("error", "fuser"))
"""The (status, error_kind) pairs of committed rows, in report order."""
FIRST_ERRORS = 3  # fuser errors quoted in the failure message (the report lists the reasons)
_QUOTED_CHARS = 200


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the output directory holds, and the budget it is held to."""

    rows: dict[tuple[str, str | None], int]
    """Committed rows by (status, error_kind): ``("ok", None)``, ``("error", "input")``, ``("error", "fuser")``."""
    attempted: int
    """Prompts the fuser attempted: ok and fuser-error rows of sample 0."""
    fuser_errors: int
    """Fuser-error rows (always sample 0)."""
    first_errors: tuple[tuple[str | None, str], ...]
    """(id, error) of the first fuser errors by id."""
    budget: float
    """``max_fuser_error_rate``."""

    @property
    def rate(self) -> float:
        return self.fuser_errors / self.attempted if self.attempted else 0.0

    @property
    def exceeded(self) -> bool:
        return self.rate > self.budget

    def tally(self) -> str:
        """Rows by status and kind, e.g. ``ok 40, error/input 3, error/fuser 1``."""
        order = {k: i for i, k in enumerate(ROW_KINDS)}
        keys = sorted(self.rows, key=lambda k: (order.get(k, 3), str(k)))
        return ", ".join(f"{status}/{kind} {self.rows[status, kind]}" if kind else f"{status} {self.rows[status, kind]}"
                         for status, kind in keys) or "no rows"

    def describe(self) -> str:
        """One line: the fuser errors, the rows attempted, the rate and the budget."""
        return (f"{self.fuser_errors} of {self.attempted} rows the fuser attempted failed "
                f"(rate {self.rate:.4g} {'>' if self.exceeded else '<='} --max-fuser-error-rate {self.budget:g})")

    def message(self, output: str) -> str:
        """The failure message of a run over its budget: the rate, the budget and the first errors."""
        quoted = "; ".join(f"{rid!r}: {_cut(err)}" for rid, err in self.first_errors)
        return (f"fuser error budget exceeded: {self.describe()}. The rows are committed in {output}/data "
                f"(error_kind 'fuser'); _SUCCESS is not written. First errors: {quoted}. A rerun into this "
                f"directory does not retry committed rows: write to a new --output to recompute them, or "
                f"rerun with a larger --max-fuser-error-rate to accept this output.")


class ErrorBudgetExceeded(RuntimeError):
    """A run whose fuser errors are over its budget: its rows are committed, ``_SUCCESS`` is not."""

    def __init__(self, message: str, outcome: Outcome, result: Any):
        super().__init__(message)
        self.outcome = outcome
        self.result = result  # the run's jobs.result.RunResult


def _cut(text: str) -> str:
    return text if len(text) <= _QUOTED_CHARS else text[:_QUOTED_CHARS - 3] + "..."


def tallied(groups, first_errors, budget: float) -> Outcome:
    """The :class:`Outcome` of ``groups``, one ``(status, error_kind, rows, rows of sample 0)`` per
    (status, error_kind) of the committed rows."""
    groups = list(groups)
    fuser = sum(prompts for _, kind, _, prompts in groups if kind == "fuser")
    attempted = fuser + sum(prompts for status, _, _, prompts in groups if status == "ok")
    return Outcome({(status, kind): n for status, kind, n, _ in groups}, attempted, fuser, tuple(first_errors), budget)


def outcome(data, budget: float) -> Outcome:
    """The :class:`Outcome` of a Spark DataFrame of committed OUTPUT_SCHEMA rows (None: nothing committed)."""
    if data is None:
        return tallied((), (), budget)
    from pyspark.sql import functions as F

    groups = [(g["status"], g["error_kind"], g["rows"], g["prompts"]) for g in data.groupBy("status", "error_kind").agg(
        F.count("*").alias("rows"), F.sum((F.col("sample") == 0).cast("long")).alias("prompts")).collect()]
    first = []
    if any(kind == "fuser" for _, kind, _, _ in groups):
        first = [(r["id"], r["error"]) for r in data.where(F.col("error_kind") == "fuser").orderBy("id")
                 .select("id", "error").limit(FIRST_ERRORS).collect()]
    return tallied(groups, first, budget)
