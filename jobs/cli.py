"""The job's command line: flags -> JobConfig, then the driver's run.

    python -m jobs.fuse --input data/sample.jsonl --output output/sample --method deepen \
        --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct

The same job runs under ``spark-submit jobs/fuse.py ...`` (local, standalone, YARN, Kubernetes:
the master and resources come from configuration). Layout of ``--output``:
``data/part-*.parquet`` (OUTPUT_SCHEMA), ``summary.parquet``, ``report.md`` (+ PNG plots),
``_run.json`` (the config), ``_SUCCESS`` (written last).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from jobs.config import DEFAULT_MEMBERS, LABEL_NORMS, LONG_PROMPT, METHODS, MODES, JobConfig, load_config_file

log = logging.getLogger("jobs.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.fuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # flags left out keep the config file's value, then the default
    p.add_argument("--config", help="YAML or JSON file of job settings; flags override it")
    p.add_argument("--input", default=S, help="input Parquet or JSONL (.jsonl/.json)")
    p.add_argument("--output", default=S, help="output directory of this run")
    p.add_argument("--method", default=S, choices=METHODS)
    p.add_argument("--members", nargs="+", default=S,
                   help=f"member specs (packaged alias, HF dir, .gguf); default {DEFAULT_MEMBERS[0]}")
    p.add_argument("--mode", default=S, choices=MODES,
                   help="auto: rows with choices are labeled, the others generated")
    p.add_argument("--run-id", dest="run_id", default=S, help="run name (default: from the config hash)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=S)
    p.add_argument("--temperature", type=float, default=S, help="0 = greedy (default)")
    p.add_argument("--top-p", dest="top_p", type=float, default=S)
    p.add_argument("--top-k", dest="top_k", type=int, default=S)
    p.add_argument("--seed", type=int, default=S, help="run seed; rows without a seed derive theirs from it")
    p.add_argument("--n-samples", dest="n_samples", type=int, default=S, help="samples per prompt")
    p.add_argument("--stop", nargs="*", default=S, help="stop strings")
    g = p.add_argument_group("ensemble")
    g.add_argument("--main", type=int, default=S, help="index of the main member (output vocabulary)")
    g.add_argument("--weights", type=float, nargs="+", default=S, help="member weights summing to 1")
    g.add_argument("--deepen-lr", dest="deepen_lr", type=float, default=S, help="DeePEn search lr (0.15)")
    g.add_argument("--deepen-steps", dest="deepen_steps", type=int, default=S, help="DeePEn search steps (5)")
    g.add_argument("--topk", type=int, default=S, help="DeePEn: tokens per distribution in relative space")
    g.add_argument("--top-mass", dest="top_mass", type=optional_arg(float), default=S,
                   help="DeePEn: keep the other members' top-k tokens up to this cumulative probability "
                        "(0.9; none: all k)")
    g.add_argument("--main-top-mass", dest="main_top_mass", type=optional_arg(float), default=S,
                   help="DeePEn: the same cut for the main member, whose candidates the output token is chosen "
                        "from (0.99; none: all k)")
    g.add_argument("--refine-margin", dest="refine_margin", type=float, default=S,
                   help="DeePEn: rows whose two best fused candidates are closer than this (logits) are fused "
                        "again with every member's full top-k (0.3; 0: off)")
    g.add_argument("--anchor-subset", dest="anchor_subset", type=optional_arg(int), default=S,
                   help="DeePEn: use only this many shared anchors (default none: all)")
    g.add_argument("--label-norm", dest="label_norm", choices=LABEL_NORMS, default=S,
                   help="DeePEn labeling: sum (default) or mean fused log-probability of a choice's tokens")
    g.add_argument("--segment-tokens", dest="segment_tokens", type=int, default=S, help="SpecFuse draft length")
    g.add_argument("--exit", dest="exit", action=argparse.BooleanOptionalAction, default=S,
                   help="SpecFuse model exit (default on)")
    g.add_argument("--exit-delta", dest="exit_delta", type=float, default=S)
    g.add_argument("--exit-min-rounds", dest="exit_min_rounds", type=int, default=S)
    r = p.add_argument_group("execution")
    r.add_argument("--partitions", type=int, default=S)
    r.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="rows per fuser call")
    r.add_argument("--commit-rows", dest="commit_rows", type=int, default=S, help="rows per output file")
    r.add_argument("--max-prompt-tokens", dest="max_prompt_tokens", type=int, default=S)
    r.add_argument("--long-prompt", dest="long_prompt", choices=LONG_PROMPT, default=S)
    r.add_argument("--master", default=S, help="Spark master URL (default local[*] unless spark-submit set one)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default=S)
    r.add_argument("--dtype", default=S, help="torch dtype (default float32 on CPU, bfloat16 on GPU)")
    r.add_argument("--fail-after-rows", dest="fail_after_rows", type=int, default=S,
                   help="fault injection for tests: a task dies after committing this many rows")
    r.add_argument("--report", action=argparse.BooleanOptionalAction, default=S)
    return p


def parse_config(argv: list[str] | None = None) -> JobConfig:
    ns = vars(build_parser().parse_args(argv))
    settings: dict[str, Any] = load_config_file(ns.pop("config")) if ns.get("config") else {}
    ns.pop("config", None)
    settings.update(ns)
    missing = [k for k in ("input", "output") if k not in settings]
    if missing:
        raise ValueError(f"missing required settings {missing} (flags --input/--output or the config file)")
    return JobConfig(**settings)


def optional_arg(kind):
    """An argparse type accepting ``none`` for None."""
    def parse(value: str):
        return None if value.lower() == "none" else kind(value)

    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_config(argv)
    except (ValueError, TypeError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    from jobs.fuse import run, spark_session

    spark = spark_session(cfg)
    try:
        result = run(spark, cfg)
    finally:
        spark.stop()
    print_where(result)
    return 0


def print_where(result) -> None:
    rows = sum(c["rows"] for c in result.commits)
    resumed = " (resumed: rows committed by an earlier run of this config were skipped)" if result.skipped_committed else ""
    sys.stdout.write(
        f"\nWrote {rows} rows in {result.seconds:.0f}s to {result.data_dir}/ (Parquet){resumed}\n"
        f"Report: {result.output}/report.md   Summary: {result.output}/summary.parquet\n"
        f"Read it: python -c \"import pyarrow.parquet as pq; "
        f"print(pq.read_table('{result.data_dir}').to_pandas()[['id','status','text','label']])\"\n"
    )
