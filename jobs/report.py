"""Run summary (Parquet, SUMMARY_SCHEMA) and a human-readable report (Markdown + PNG plots).

Per member: rows, calls, calls per row, tokens in/out, mean agreement and KL (DeePEn), win rate
(share of accepted segments, SpecFuse), exit rate and mean exit round (SpecFuse), tokens/s; and on every row the run's committed rows by status and error kind and the error
budget's verdict (jobs/budget.py), also in the report.
Plots: win rates (or agreement), throughput per partition, and exit rounds when rows exited.
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.budget import ROW_KINDS, Outcome
from jobs.config import JobConfig
from jobs.result import RunResult
from jobs.sink import filesystem
from schemas import SUMMARY_SCHEMA

log = logging.getLogger(__name__)


def member_summary(spark, cfg: JobConfig, data_dir: str, fuser_seconds: float) -> list[dict]:
    from pyspark.sql import functions as F

    df = spark.read.parquet(data_dir).where(F.col("status") == "ok")
    stats = df.select(F.explode("member_stats").alias("m")).select("m.*")
    agg = stats.groupBy("name").agg(
        F.count("*").alias("rows"), F.sum("calls").alias("calls"), F.sum("tokens_in").alias("tokens_in"),
        F.sum("tokens_out").alias("tokens_out"), F.avg("agreement").alias("agreement"),
        F.avg("mean_kl").alias("mean_kl"), F.sum("accepted").alias("accepted"),
        F.avg(F.col("exit_round").isNotNull().cast("double")).alias("exit_rate"),
        F.avg("exit_round").alias("mean_exit_round"),
        F.max(F.col("proposed").isNotNull().cast("int")).alias("has_rounds"),
    ).collect()
    total_accepted = sum(r["accepted"] or 0 for r in agg)
    order = {name: i for i, name in enumerate(cfg.members)}
    out = []
    for r in sorted(agg, key=lambda r: order.get(r["name"], 99)):
        rounds = bool(r["has_rounds"])
        out.append({
            "run_id": cfg.effective_run_id, "member": r["name"], "rows": r["rows"], "calls": r["calls"],
            "calls_per_row": (r["calls"] or 0) / max(r["rows"], 1), "tokens_in": r["tokens_in"],
            "tokens_out": r["tokens_out"], "agreement": r["agreement"], "mean_kl": r["mean_kl"],
            "win_rate": (r["accepted"] or 0) / total_accepted if rounds and total_accepted else None,
            "exit_rate": r["exit_rate"] if rounds else None, "mean_exit_round": r["mean_exit_round"],
            "tokens_per_s": ((r["tokens_in"] or 0) + (r["tokens_out"] or 0)) / fuser_seconds if fuser_seconds else None,
        })
    return out


RUN_COLUMNS = ("rows_ok", "rows_input_error", "rows_fuser_error", "fuser_error_rate", "budget_exceeded")
"""SUMMARY_SCHEMA's run-level columns: the same on every member's row."""


def with_run_counts(rows: list[dict], cfg: JobConfig, held: Outcome) -> list[dict]:
    """``rows`` with the run-level columns (:data:`RUN_COLUMNS`) from ``held``; one row with a null
    member when no member has a row (nothing ok), so the counts are always in the summary."""
    unknown = sorted(f"{s}/{k}" for s, k in held.rows if (s, k) not in ROW_KINDS)
    if unknown:  # a status or kind the schema has no column for: fail rather than drop rows from the count
        raise ValueError(f"committed rows with an unknown (status, error_kind): {unknown}")
    run = {col: held.rows.get(kind, 0) for col, kind in zip(RUN_COLUMNS, ROW_KINDS)}
    run.update(fuser_error_rate=held.rate, budget_exceeded=held.exceeded)
    return [{**r, **run} for r in rows] or [{"run_id": cfg.effective_run_id, "member": None, **run}]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_summary(spark, cfg: JobConfig, result: RunResult, held: Outcome) -> None:
    """summary.parquet and report.md (+ report.png); ``held`` is the output's :class:`Outcome`."""
    from pyspark.sql import functions as F

    fs, root = filesystem(cfg.output)
    commits = result.commits
    fuser_s = sum(c["fuser_s"] for c in commits)
    rows = with_run_counts(member_summary(spark, cfg, result.data_dir, fuser_s), cfg, held)
    pq.write_table(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA), f"{root}/summary.parquet", filesystem=fs)
    data = spark.read.parquet(result.data_dir)
    errors = (data.where(F.col("status") == "error").groupBy("error_kind", "error").count()
              .orderBy(F.desc("count"), "error").limit(10).collect())
    examples = data.where((F.col("status") == "ok")).orderBy("id", "sample").limit(5).collect()
    exit_rounds = [r["m"]["exit_round"] for r in data.select(F.explode("member_stats").alias("m"))
                   .where(F.col("m.exit_round").isNotNull()).select("m").limit(100000).collect()]

    lines = [f"# Run `{cfg.effective_run_id}`", "",
             f"method **{cfg.method}**, members {', '.join(f'`{m}`' for m in cfg.members)}, "
             f"config_hash `{cfg.config_hash[:12]}`", "",
             f"rows by status and kind: {held.tally()}; computed this run: "
             f"{result.rows} rows in {result.seconds:.1f}s "
             f"(fuser time {fuser_s:.1f}s){' — resumed, committed rows skipped' if result.skipped_committed else ''}",
             "", f"error budget: {held.describe()}: "
             + ("**exceeded, the run failed (no `_SUCCESS`)**" if held.exceeded else "within budget"),
             "", "## Members", ""]
    cols = [f.name for f in SUMMARY_SCHEMA if f.name != "run_id" and f.name not in RUN_COLUMNS]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    members = [r for r in rows if r["member"] is not None]  # not the run-level row of a run with none ok
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in members]
    lines += ["", "## Partitions", "", "| partition | files | rows | tokens | tokens/s |", "|---|---|---|---|---|"]
    parts: dict[int, list] = {}
    for c in commits:
        parts.setdefault(c["partition"], []).append(c)
    tput = {}
    for p, cs in sorted(parts.items()):
        wall = sum(c["wall_s"] for c in cs)
        tput[p] = sum(c["tokens"] for c in cs) / wall if wall else 0.0
        lines.append(f"| {p} | {len(cs)} | {sum(c['rows'] for c in cs)} | {sum(c['tokens'] for c in cs)} | {tput[p]:.1f} |")
    if errors:
        lines += ["", "## Errors", "", "| kind | reason | rows |", "|---|---|---|"]
        lines += [f"| {e['error_kind']} | {e['error']} | {e['count']} |" for e in errors]
    if examples:
        lines += ["", "## Examples", ""]
        for e in examples:
            out = e["text"] if e["text"] is not None else f"label: {e['label']} {[round(p, 3) for p in e['label_probs']]}"
            lines.append(f"- `{e['id']}`: {out!r}"[:400])
    lines += _plots(cfg, members, exit_rounds, tput, fs, root)
    with fs.open_output_stream(f"{root}/report.md") as f:
        f.write(("\n".join(lines) + "\n").encode())


def _plots(cfg, rows, exit_rounds, tput, fs, root) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: report without plots (pip install '.[report]')")
        return []
    import io

    names = [r["member"] for r in rows]
    wins = any(r["win_rate"] for r in rows)
    agreement = any(r["agreement"] is not None for r in rows)
    panels = [  # (title, draw): only the panels with data (no exit rounds for single or DeePEn)
        ("tokens/s per partition", lambda ax: _bars(ax, tput, list(tput.values()), "#47a")),
    ]
    if wins or agreement:
        panels.insert(0, ("win rate" if wins else "agreement with fused token", lambda ax: _bars(
            ax, names, [(r["win_rate"] if wins else r["agreement"]) or 0 for r in rows], "#4a7")))
    if exit_rounds:
        panels.append((f"exit rounds ({len(exit_rounds)} exits)", lambda ax: ax.hist(
            exit_rounds, bins=range(0, max(exit_rounds) + 2), color="#a74")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, (title, draw) in zip(axes[0], panels):
        draw(ax)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    with fs.open_output_stream(f"{root}/report.png") as f:
        f.write(buf.getvalue())
    return ["", "## Plots", "", f"![{', '.join(title for title, _ in panels)}](report.png)"]


def _bars(ax, labels, values, color) -> None:
    """A bar per label at numeric positions (string positions make matplotlib log about categorical units)."""
    labels = [str(x) for x in labels]
    ax.bar(range(len(labels)), values, color=color, tick_label=labels)
