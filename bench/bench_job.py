"""Job scaling and overhead benchmark (issue: production job).

1. Rows/s on the sample dataset with a standalone cluster of one worker vs two workers (one core
   each), through spark-submit: the scaling ratio.
2. Per-row overhead of the job around the fuser: job time (spark-submit wall time, one worker)
   / fuser-only time (the same fuser, in process, same rows, same micro-batch size).

    python bench/bench_job.py [--members smollm2-135m-instruct] [--max-new-tokens 16] [--repeats 1]

Writes bench/results/job.json and bench/results/job.md; prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.standalone import standalone_cluster, submit  # noqa: E402

log = logging.getLogger("bench.job")


def fuser_only(members: list[str], method: str, rows: list[dict], max_new: int, batch: int) -> float:
    from ensemble import DecodeParams
    from ensemble.fusers.registry import make_fuser

    fuser = make_fuser(method, members, device="cpu")
    t0 = time.perf_counter()
    gen = [r for r in rows if not r.get("choices")]
    lab = [r for r in rows if r.get("choices")]
    for i in range(0, len(lab), batch):
        chunk = lab[i:i + batch]
        fuser.label([r["prompt"] for r in chunk], [r["choices"] for r in chunk], [r.get("system") for r in chunk])
    for i in range(0, len(gen), batch):
        chunk = gen[i:i + batch]
        fuser.generate([r["prompt"] for r in chunk],
                       [DecodeParams(max_new_tokens=min(r.get("max_new_tokens") or max_new, max_new),
                                     system=r.get("system")) for r in chunk])
    return time.perf_counter() - t0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--method", default="single")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--input", default=str(REPO / "data" / "sample.jsonl"))
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.input)]
    common = ["--input", args.input, "--method", args.method, "--members", *args.members,
              "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
              "--partitions", "4", "--no-report", "--device", "cpu"]
    times: dict[str, list[float]] = {"1 worker": [], "2 workers": [], "fuser only": []}
    for rep in range(args.repeats):
        for workers in (1, 2):
            with standalone_cluster(workers=workers, cores=1, memory="6g") as master:
                out = Path(tempfile.mkdtemp(prefix="bench-job-")) / "out"
                t0 = time.perf_counter()
                submit(common + ["--output", str(out)], master=master,
                       conf={"spark.executor.cores": "1", "spark.task.cpus": "1"})
                times[f"{workers} worker{'s' if workers > 1 else ''}"].append(time.perf_counter() - t0)
        times["fuser only"].append(fuser_only(args.members, args.method, rows, args.max_new_tokens, args.batch_size))
        log.info("repeat %d: %s", rep, {k: v[-1] for k, v in times.items()})
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(rows)
    result = {
        "settings": vars(args), "rows": n, "median_seconds": med,
        "rows_per_s": {k: n / v for k, v in med.items()},
        "scaling_2_vs_1_workers": med["1 worker"] / med["2 workers"],
        "job_over_fuser_1_worker": med["1 worker"] / med["fuser only"],
        "overhead_s_per_row_1_worker": (med["1 worker"] - med["fuser only"]) / n,
    }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "job.json").write_text(json.dumps(result, indent=1))
    md = ["| setting | median s | rows/s |", "|---|---|---|"]
    md += [f"| {k} | {med[k]:.1f} | {n / med[k]:.2f} |" for k in med]
    md += ["", f"scaling 2 vs 1 workers: **{result['scaling_2_vs_1_workers']:.2f}x**; "
               f"job time / fuser-only time (1 worker): **{result['job_over_fuser_1_worker']:.2f}** "
               f"({result['overhead_s_per_row_1_worker']:.2f} s per row of fixed job overhead: JVM, "
               f"executor start, model load, Parquet commit)"]
    (REPO / "bench" / "results" / "job.md").write_text("\n".join(md) + "\n")
    sys.stdout.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
