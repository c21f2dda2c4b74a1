"""Job scaling at real size (issue 18, point 4): benchkit labeling rows and GSM8K generation rows
through ``spark-submit`` on a standalone cluster (jobs/standalone.py) of 1 worker, then 2 workers, of
one core each (``spark.executor.cores`` = ``spark.task.cpus`` = 1), same input, partitions and
settings. See docs/jobs.md for the job.

    python bench/bench_job.py [--label-rows 1000] [--gen-rows 100] [--max-new-tokens 32]
                              [--method single --members smollm2-135m-instruct] [--partitions 2]

Input: ``--label-rows`` rows of the labeling tasks of bench/tasks.py in equal shares (``--label-tasks``)
and ``--gen-rows`` GSM8K rows without choices (generation, ``--max-new-tokens`` each), ordered by the
sha256 of their ids (a fixed shuffle), gold answers dropped. The default ensemble is the cheapest
packaged member alone (``--method single --members smollm2-135m-instruct``), so that both runs fit in
well under half an hour on two cores; what is measured (the job around the fuser, its scaling,
partitioning and model verification) is the same machinery for every method.

Figures, as defined here:

- *job time*: the wall time of the ``spark-submit`` process (JVM start, the SparkSession, the input
  pass, executors starting and loading the members, fusion, Parquet commits, the error-budget check;
  the report is off, ``--no-report``). *rows/s* = input rows / job time; *scaling* = rows/s with 2
  workers / rows/s with 1 worker.
- *fuser time of an executor*: the sum, over the micro-batches its tasks ran, of the fuser call's
  wall time. It is read back from the output: ``latency_ms`` is the time of one ``fuser.label`` or
  ``fuser.generate`` call (jobs/partition.py), shared by that call's rows, so each distinct
  (file, latency_ms) counts once; a file's partition is in its name, and an executor's partitions
  are in its log. Prompt fitting, row building, Parquet commits and model loading are outside it.
  *fuser-only time* of a run: its largest executor fuser time, the run's length if the job added
  nothing around the fuser. *overhead ratio* = job time / fuser-only time (the 2-worker run's is the
  target); the ratio to the executors' mean fuser time (which also charges imbalance) is reported too.
- *balance*: max / min output rows per partition.
- *sha256 verifications per executor*: the ``sha256 hashed`` lines in its log (ensemble.models logs
  every file it hashes; a remembered digest is not logged); *loads*: its ``loaded member`` lines.
  Each run gets a fresh cache root (``$ENSEMBLE_CACHE_DIR``) whose converted models are hard links
  to the user's cache, so no digest is remembered from before the run and none is converted again.

``spark.sql.shuffle.partitions`` is set to ``--partitions`` (``--shuffle-partitions`` overrides it):
with Spark's default of 200, the duplicate ranking's window shuffle runs 200 tasks of a few rows
each (the job turns adaptive coalescing off, jobs/driver.py), a fixed cost that is job overhead but
not the fuser's; with it equal, the job's repartition reuses that shuffle (same key, same count), so
the partitions, hence the outputs, are the ones the job makes by default.

The load average at the start and end of each run is recorded: the machine may be shared.
Writes ``<results-dir>/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import tasks  # noqa: E402
from jobs.standalone import standalone_cluster, submit  # noqa: E402

log = logging.getLogger("bench.job")
_PARTITION = re.compile(r"partition (\d+): \d+ rows to fuse")
_FILE_PARTITION = re.compile(r"part-(\d+)-")


def make_input(path: Path, label_rows: int, gen_rows: int, label_tasks: list[str], max_new: int) -> dict[str, int]:
    """Write the benchmark's JSONL input; returns the row count per task."""
    rows: list[dict] = []
    counts: dict[str, int] = {}
    for k, task in enumerate(label_tasks):
        n = label_rows // len(label_tasks) + (k < label_rows % len(label_tasks))
        counts[task] = n
        rows += [{"id": f"{task}:{r['id']}", "prompt": r["prompt"], "choices": r["choices"]}
                 for r in tasks.load(task, n)]
    counts["gsm8k"] = gen_rows
    rows += [{"id": f"gsm8k:{r['id']}", "prompt": r["prompt"], "max_new_tokens": max_new}
             for r in tasks.load("gsm8k", gen_rows)]
    rows.sort(key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return counts


def fresh_cache(members: list[str], root: Path) -> Path:
    """A cache root under ``root`` holding hard links to the members' converted models (no stamp)."""
    from ensemble.models import resolve

    cache = Path(tempfile.mkdtemp(prefix="bench-job-cache-", dir=root))
    for spec in members:
        _, src = resolve(spec)
        dst = cache / "models" / src.name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            os.link(f, dst / f.name)
    return cache


def executor_logs(log_dir: Path) -> dict[str, dict]:
    """Per executor (``work<i>/<app>/<executor>``): its partitions, sha256 hashes and member loads."""
    out: dict[str, dict] = {}
    for stderr in sorted(log_dir.glob("work*/*/*/stderr")):
        text = stderr.read_text(errors="replace")
        name = "/".join(stderr.parent.parts[-3:])
        hashed = re.findall(r"sha256 hashed (.+?) \(", text)
        out[name] = {"partitions": sorted({int(p) for p in _PARTITION.findall(text)}),
                     "sha256_hashed": dict(Counter(hashed)), "loads": text.count("loaded member")}
    return out


def read_output(out: Path) -> tuple[dict[int, int], dict[int, float], dict[str, dict]]:
    """(rows per partition, fuser seconds per partition, the rows by (id, sample))."""
    import pyarrow.parquet as pq

    rows_per: Counter = Counter()
    fuser_per: dict[int, float] = defaultdict(float)
    rows: dict[str, dict] = {}
    for f in sorted((out / "data").glob("part-*.parquet")):
        p = int(_FILE_PARTITION.match(f.name).group(1))
        t = pq.read_table(f, columns=["id", "sample", "status", "label", "label_probs", "text",
                                      "token_count", "latency_ms"]).to_pylist()
        rows_per[p] += len(t)
        fuser_per[p] += sum({r["latency_ms"] for r in t if r["latency_ms"] is not None}) / 1000
        rows.update({f"{r['id']}\x1f{r['sample']}": r for r in t})
    return dict(rows_per), dict(fuser_per), rows


def run_once(workers: int, inp: Path, args, work: Path) -> tuple[dict, dict[str, dict]]:
    from ensemble.models import CACHE_ENV, cache_dir

    cache = fresh_cache(args.members, cache_dir())
    log_dir, out = work / f"cluster-{workers}w", work / f"out-{workers}w"
    os.environ[CACHE_ENV] = str(cache)  # the workers, hence their executors, inherit it
    job = ["--input", str(inp), "--output", str(out), "--method", args.method, "--members", *args.members,
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
           "--partitions", str(args.partitions), "--no-report", "--device", "cpu"]
    conf = {"spark.executor.cores": "1", "spark.task.cpus": "1", f"spark.executorEnv.{CACHE_ENV}": str(cache),
            "spark.sql.shuffle.partitions": str(args.shuffle_partitions or args.partitions)}
    try:
        load_start = os.getloadavg()
        with standalone_cluster(workers=workers, cores=1, memory=args.worker_memory, log_dir=log_dir) as master:
            t0 = time.perf_counter()
            res = submit(job, master=master, conf=conf, log_path=work / f"submit-{workers}w.log")
            job_s = time.perf_counter() - t0
        load_end = os.getloadavg()
        stamp = json.loads((cache / "verified.json").read_text()) if (cache / "verified.json").exists() else {}
    finally:
        del os.environ[CACHE_ENV]
        shutil.rmtree(cache, ignore_errors=True)
    run_s = re.search(r"rows computed \(\d+ ok\) in ([\d.]+)s", res.stdout + res.stderr)
    rows_per, fuser_per, rows = read_output(out)
    execs = executor_logs(log_dir)
    for e in execs.values():
        e["fuser_s"] = round(sum(fuser_per.get(p, 0.0) for p in e["partitions"]), 2)
    fuser_s = [e["fuser_s"] for e in execs.values() if e["partitions"]]
    n_rows = sum(rows_per.values())
    result = {
        "workers": workers, "job_s": round(job_s, 2), "driver_run_s": float(run_s.group(1)) if run_s else None,
        "rows": n_rows, "ok_rows": sum(r["status"] == "ok" for r in rows.values()),
        "rows_per_s": round(n_rows / job_s, 3),
        "rows_per_partition": {str(k): v for k, v in sorted(rows_per.items())},
        "balance_max_over_min": round(max(rows_per.values()) / min(rows_per.values()), 3),
        "fuser_s_per_partition": {str(k): round(v, 2) for k, v in sorted(fuser_per.items())},
        "fuser_only_s": max(fuser_s), "fuser_mean_s": round(sum(fuser_s) / len(fuser_s), 2),
        "job_over_fuser_only": round(job_s / max(fuser_s), 3),
        "job_over_fuser_mean": round(job_s / (sum(fuser_s) / len(fuser_s)), 3),
        "executors": execs, "stamp_entries": len(stamp),
        "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in load_end],
    }
    log.info("%d worker(s): %s", workers, {k: v for k, v in result.items() if k != "executors"})
    return result, rows


def same_outputs(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """Whether two runs' rows agree: ids, labels, texts and token counts equal; label probabilities' max gap."""
    gap = max((abs(x - y) for k in a.keys() & b.keys() if a[k]["label_probs"] and b[k]["label_probs"]
               for x, y in zip(a[k]["label_probs"], b[k]["label_probs"])), default=0.0)
    fields = ("status", "label", "text", "token_count")
    differ = sorted(k for k in a.keys() & b.keys() if any(a[k][f] != b[k][f] for f in fields))
    return {"same_ids": a.keys() == b.keys(), "rows_differing": len(differ), "first_differing": differ[:3],
            "max_label_prob_gap": gap}


def per_row(run: dict) -> float:
    """Fuser seconds per row of a run, summed over its executors."""
    return sum(run["fuser_s_per_partition"].values()) / run["rows"]


def markdown(res: dict) -> str:
    one, two = res["runs"]["1"], res["runs"]["2"]
    s = res["settings"]
    md = [f"Input: {res['rows']} rows ({', '.join(f'{k} {v}' for k, v in res['input_rows'].items())}; "
          f"generation {s['max_new_tokens']} new tokens at most), `--method {s['method']} --members "
          f"{' '.join(s['members'])}`, {s['partitions']} partitions, batch size {s['batch_size']}, "
          f"standalone cluster, workers of one core. Source: {res['source']}.", "",
          "| workers | job s | rows/s | driver run s | fuser-only s (max executor) | job / fuser-only "
          "| rows per partition | max/min | sha256 hashes per executor | loads per executor | load avg start -> end |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (one, two):
        hashes = "; ".join(f"{sum(e['sha256_hashed'].values())} ({', '.join(e['sha256_hashed']) or '-'})"
                           for e in r["executors"].values())
        md.append(f"| {r['workers']} | {r['job_s']:.1f} | {r['rows_per_s']:.2f} | {r['driver_run_s']} | "
                  f"{r['fuser_only_s']:.1f} | {r['job_over_fuser_only']:.3f} | "
                  f"{', '.join(map(str, r['rows_per_partition'].values()))} | {r['balance_max_over_min']:.3f} | "
                  f"{hashes} | {', '.join(str(e['loads']) for e in r['executors'].values())} | "
                  f"{r['load_avg_start'][0]:.2f} -> {r['load_avg_end'][0]:.2f} |")
    md += ["", f"- scaling, rows/s 2 workers / 1 worker: **{res['scaling_2_vs_1']:.2f}x** (target >= 1.8)",
           f"- job time / fuser-only time, 2 workers: **{two['job_over_fuser_only']:.3f}** (target <= 1.10); "
           f"to the executors' mean fuser time {two['job_over_fuser_mean']:.3f}; 1 worker "
           f"{one['job_over_fuser_only']:.3f}",
           f"- fuser seconds per row, summed over executors: 1 worker {per_row(one):.3f}, 2 workers "
           f"{per_row(two):.3f} (ratio {per_row(two) / per_row(one):.2f}; "
           + ("above 1.1: the two executors' fuser calls ran slower side by side than alone, i.e. they did not "
              "have a core each)" if per_row(two) / per_row(one) > 1.1 else "about 1: each executor had a core)"),
           f"- balance, max/min rows per partition: **{two['balance_max_over_min']:.3f}** (target <= 1.2)",
           f"- outputs of the two runs: {json.dumps(res['outputs_1w_vs_2w'])}"]
    return "\n".join(md) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label-rows", type=int, default=1000)
    ap.add_argument("--gen-rows", type=int, default=100)
    ap.add_argument("--label-tasks", nargs="+", default=["arc_challenge", "piqa", "boolq", "hellaswag"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--method", default="single")
    ap.add_argument("--members", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shuffle-partitions", type=int, default=None,
                    help="spark.sql.shuffle.partitions (default: --partitions; see the module docstring)")
    ap.add_argument("--worker-memory", default="6g")
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--name", default="job", help="results file stem")
    ap.add_argument("--source", default=None, help="what code ran (default: git HEAD of the repo, if any)")
    args = ap.parse_args()
    source = args.source or subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or "unknown"
    work = Path(tempfile.mkdtemp(prefix="bench-job-"))
    inp = work / "input.jsonl"
    counts = make_input(inp, args.label_rows, args.gen_rows, args.label_tasks, args.max_new_tokens)
    t0 = time.perf_counter()
    runs, rows = {}, {}
    for workers in (1, 2):
        runs[str(workers)], rows[workers] = run_once(workers, inp, args, work)
    res = {"settings": vars(args), "source": source, "input_rows": counts, "rows": sum(counts.values()),
           "runs": runs, "scaling_2_vs_1": round(runs["2"]["rows_per_s"] / runs["1"]["rows_per_s"], 3),
           "outputs_1w_vs_2w": same_outputs(rows[1], rows[2]), "bench_s": round(time.perf_counter() - t0, 1),
           "work_dir": str(work)}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (results / f"{args.name}.md").write_text(markdown(res))
    sys.stdout.write(markdown(res))


if __name__ == "__main__":
    main()
