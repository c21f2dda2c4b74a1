"""Evaluation on real benchmarks, through the job itself: do the ensembles beat their members, and at
what cost?

    python bench/evaluate.py [--n-label 100] [--n-gen 20] [--gen-tokens 128] [--split test]
                         [--systems NAME ...] [--extra NAME=FLAGS ...] [--out bench/results/eval]

Data: ``bench/tasks.py`` (benchkit ARC-Challenge, PIQA, BoolQ in labeling mode; GSM8K in generation
mode, scored by exact match of the final number) with fixed, deterministic subsets: ``--split test``
is the reported subset, ``--split dev`` the disjoint one that settings are tuned on.

Systems (``SYSTEMS``): each packaged member alone, DeePEn over every pair and the trio, SpecFuse over
the trio with and without model exit. ``--extra name="--method deepen --members ... --main 1"`` adds a
system given as job flags (how the dev sweep's candidates and the tuned settings are run).

Each system is one ``python -m jobs.fuse`` run (local Spark, CPU) over all tasks' rows; the input is
ordered by task so a micro-batch holds one task. Per task and system: accuracy (error rows count as
wrong and are reported), member calls per item (sum of every member's ``calls`` in ``member_stats``),
and time per item (``latency_ms`` is the fuser time of a row's micro-batch; each row gets that
divided by the batch's rows)
as a ratio to the fastest single member on that task. Runs resume: a finished system's output is
reused when its job configuration is unchanged.

Writes ``<out>.json`` (every number), ``<out>.md`` (the table) and ``<out>.png`` (the plot).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import tasks  # noqa: E402

log = logging.getLogger("bench.eval")

SMOL, QWEN, GEMMA = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"
SHORT = {SMOL: "smollm2", QWEN: "qwen", GEMMA: "gemma"}
TRIO = (SMOL, QWEN, GEMMA)


def _members(*ms: str) -> list[str]:
    return ["--members", *ms]


SYSTEMS: dict[str, list[str]] = {
    "smollm2": ["--method", "single", *_members(SMOL)],
    "qwen": ["--method", "single", *_members(QWEN)],
    "gemma": ["--method", "single", *_members(GEMMA)],
    "deepen smollm2+qwen": ["--method", "deepen", *_members(SMOL, QWEN)],
    "deepen smollm2+gemma": ["--method", "deepen", *_members(SMOL, GEMMA)],
    "deepen qwen+gemma": ["--method", "deepen", *_members(QWEN, GEMMA)],
    "deepen trio": ["--method", "deepen", *_members(*TRIO)],
    "specfuse trio exit": ["--method", "specfuse", *_members(*TRIO), "--exit"],
    "specfuse trio no-exit": ["--method", "specfuse", *_members(*TRIO), "--no-exit"],
}
SINGLES = ("smollm2", "qwen", "gemma")
DEFAULT_TASKS = ("arc_challenge", "piqa", "boolq", "gsm8k")
"""The tasks of bench/results/eval.md (the seven labeling tasks are bench/eval_label.py's)."""


def build_rows(task_names: list[str], n_label: int, n_gen: int, split: str, gen_tokens: int) -> list[dict]:
    """Job input rows (ids prefixed by task, ordered by task) with ``gold`` kept aside by the caller."""
    rows = []
    for t in task_names:
        n = n_gen if t in tasks.GEN_TASKS else n_label
        if n == 0:
            continue
        # dev follows a test subset of fixed size so dev never overlaps any test subset up to 200.
        items = tasks.load(t, n, split="test") if split == "test" else tasks.load(t, 200, split="dev", n_dev=n)
        for r in items:
            row = {"id": f"{t}/{r['id']}", "prompt": r["prompt"], "gold": r["gold"], "task": t}
            if "choices" in r:
                row["choices"] = r["choices"]
            else:
                row["max_new_tokens"] = gen_tokens
            rows.append(row)
    return rows


def run_system(name: str, flags: list[str], input_path: Path, work: Path, gen_tokens: int,
               batch_size: int) -> tuple[Path, float]:
    """Run the job for one system; its output directory and wall seconds (0 when reused)."""
    out = work / name.replace(" ", "_").replace("+", "-").replace("=", "-")
    cmd = [sys.executable, "-m", "jobs.fuse", "--input", str(input_path), "--output", str(out),
           "--max-new-tokens", str(gen_tokens), "--batch-size", str(batch_size), "--device", "cpu",
           "--no-report", *flags]
    log.info("%s: %s", name, shlex.join(cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"system {name!r}: job failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    log.info("%s: job done in %.0f s", name, wall)
    return out, wall


def outcomes(out_dir: Path, rows: list[dict]) -> dict[str, dict]:
    """Per input row id: ``answer`` (label, or GSM8K final number), ``correct``, ``calls``, ``ms``
    (the row's share of its micro-batch time), ``error`` (None when ok), from the job's Parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(out_dir / "data").to_pylist()
    got = {r["id"]: {**r, "ms": ms} for r, ms in zip(table, row_ms(table)) if r["sample"] == 0}
    out = {}
    for row in rows:
        r = got.get(row["id"])
        if r is None:
            raise RuntimeError(f"{out_dir}: row {row['id']!r} missing from the job's output")
        if r["status"] != "ok":
            out[row["id"]] = {"answer": None, "correct": False, "calls": None, "ms": None, "error": r["error"]}
            continue
        if "choices" in row:
            answer, ok = r["label"], r["label"] == row["gold"]
        else:
            answer, ok = tasks.final_number(r["text"] or ""), tasks.gsm8k_correct(r["text"], row["gold"])
        out[row["id"]] = {"answer": answer, "correct": ok, "error": None,
                          "calls": sum(m["calls"] or 0 for m in r["member_stats"] or []),
                          "ms": r["ms"]}
    return out


def row_ms(table: list[dict]) -> list[float | None]:
    """Each output row's share of its micro-batch's fuser time: ``latency_ms`` is the time of the
    row's whole micro-batch (shared by its rows, which carry the same value), divided by those rows."""
    batch_rows = collections.Counter(r["latency_ms"] for r in table if r["latency_ms"] is not None)
    return [None if r["latency_ms"] is None else r["latency_ms"] / batch_rows[r["latency_ms"]] for r in table]


def aggregate(per_row: dict[str, dict], rows: list[dict]) -> dict[str, dict]:
    """Per task: accuracy (errors count as wrong), errors, calls per item, ms per item."""
    per: dict[str, list[dict]] = {}
    for row in rows:
        per.setdefault(row["task"], []).append(per_row[row["id"]])
    res = {}
    for t, items in per.items():
        ok = [o for o in items if o["error"] is None]
        res[t] = {"n": len(items), "accuracy": sum(o["correct"] for o in items) / len(items),
                  "errors": len(items) - len(ok),
                  "calls_per_item": statistics.fmean(o["calls"] for o in ok) if ok else None,
                  "ms_per_item": statistics.fmean(o["ms"] for o in ok) if ok else None}
    return res


def score(out_dir: Path, rows: list[dict]) -> dict[str, dict]:
    """Per task: accuracy, errors, calls per item, mean ms per item, from the job's Parquet."""
    return aggregate(outcomes(out_dir, rows), rows)


def member_baselines(per_system: dict[str, dict[str, dict]], rows: list[dict]) -> dict[str, dict[str, float]]:
    """What the single members' own outputs allow, per task, without any fusion:
    ``vote`` = accuracy of a majority vote of the members' answers (ties: the earliest member's
    answer), ``oracle`` = share of items at least one member got right (the ceiling of any selector)."""
    singles = [s for s in SINGLES if s in per_system]
    if not singles:
        return {}
    acc: dict[str, dict[str, list[bool]]] = {}
    for row in rows:
        outs = [per_system[s][row["id"]] for s in singles]
        answers = [o["answer"] for o in outs if o["answer"] is not None]
        counts = collections.Counter(answers)
        vote = max(answers, key=lambda a: (counts[a], -answers.index(a))) if answers else None
        right = vote == row["gold"] if "choices" in row else tasks.gsm8k_correct(vote, row["gold"])
        d = acc.setdefault(row["task"], {"vote": [], "oracle": []})
        d["vote"].append(vote is not None and right)
        d["oracle"].append(any(o["correct"] for o in outs))
    return {t: {k: sum(v) / len(v) for k, v in d.items()} for t, d in acc.items()}


def member_agreement(per_system: dict[str, dict[str, dict]], rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per task, how often two single members give the same answer (``bench/compat.py``'s measure)."""
    import compat

    singles = [s for s in SINGLES if s in per_system]
    out = {}
    for t in dict.fromkeys(r["task"] for r in rows):
        ids = [r["id"] for r in rows if r["task"] == t]
        out[t] = compat.pairwise_agreement({s: [per_system[s][i]["answer"] for i in ids] for s in singles})
    return out


def add_time_ratios(results: dict[str, dict[str, dict]]) -> None:
    """``time_ratio`` = ms per item / that of the fastest single member on the same task."""
    task_names = {t for r in results.values() for t in r}
    for t in task_names:
        singles = [results[s][t]["ms_per_item"] for s in SINGLES if s in results and results[s][t]["ms_per_item"]]
        base = min(singles) if singles else None
        for r in results.values():
            ms = r[t]["ms_per_item"]
            r[t]["time_ratio"] = ms / base if base and ms else None


def table(results: dict[str, dict[str, dict]], task_names: list[str]) -> str:
    head = "| system | " + " | ".join(f"{t} acc" for t in task_names) + " | mean acc | calls/item | time ratio |"
    lines = [head, "|" + "---|" * (len(task_names) + 4)]
    best_single = {t: max(results[s][t]["accuracy"] for s in SINGLES if s in results) for t in task_names
                   if any(s in results for s in SINGLES)}
    for name, r in results.items():
        cells = []
        for t in task_names:
            a = r[t]["accuracy"]
            mark = "**" if t in best_single and a > best_single[t] else ""
            err = f" ({r[t]['errors']} err)" if r[t]["errors"] else ""
            cells.append(f"{mark}{a:.3f}{mark}{err}")
        mean_acc = statistics.fmean(r[t]["accuracy"] for t in task_names)
        calls = statistics.fmean(r[t]["calls_per_item"] or 0 for t in task_names)
        ratios = [r[t]["time_ratio"] for t in task_names if r[t].get("time_ratio")]
        tr = f"{statistics.fmean(ratios):.2f}" if ratios else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_acc:.3f} | {calls:.1f} | {tr} |")
    return "\n".join(lines)


def per_task_costs(results: dict[str, dict[str, dict]], task_names: list[str]) -> str:
    lines = ["| system | " + " | ".join(f"{t} calls / time ratio" for t in task_names) + " |",
             "|" + "---|" * (len(task_names) + 1)]
    for name, r in results.items():
        cells = [f"{r[t]['calls_per_item'] or 0:.1f} / {r[t].get('time_ratio') or 0:.2f}" for t in task_names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict]], task_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [k + i * width for k in range(len(task_names))]
        ax1.bar(xs, [results[name][t]["accuracy"] for t in task_names], width, label=name)
    ax1.set_xticks([k + 0.4 - width / 2 for k in range(len(task_names))], task_names)
    ax1.set_ylabel("accuracy")
    ax1.set_title("accuracy per task")
    ax1.legend(fontsize=7, ncol=2)
    for name in names:
        ratios = [results[name][t].get("time_ratio") for t in task_names]
        ratios = [x for x in ratios if x]
        acc = statistics.fmean(results[name][t]["accuracy"] for t in task_names)
        if ratios:
            ax2.scatter(statistics.fmean(ratios), acc)
            ax2.annotate(name, (statistics.fmean(ratios), acc), fontsize=7)
    ax2.set_xlabel("time per item / fastest member's (mean over tasks)")
    ax2.set_ylabel("mean accuracy over tasks")
    ax2.set_title("cost vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(args, systems, results, per_row, walls, rows, task_names) -> str:
    """Write <out>.json/.md/.png for the systems run so far; the Markdown text."""
    add_time_ratios(results)
    baselines, agreement = member_baselines(per_row, rows), member_agreement(per_row, rows)

    md = [f"Split **{args.split}**: " + ", ".join(f"{t} {results[next(iter(results))][t]['n']} items"
                                                  for t in task_names)
          + f"; GSM8K {args.gen_tokens} new tokens, greedy. Bold: above the best single member on that task.",
          "", table(results, task_names), "", "Per task: member calls per item / time per item as a ratio to "
          "the fastest single member.", "", per_task_costs(results, task_names), ""]
    if baselines:
        md += ["Without fusion, from the members' own answers: majority vote of the members (ties: the "
               "earliest member) and the oracle (any member right).", "",
               "| | " + " | ".join(task_names) + " |", "|" + "---|" * (len(task_names) + 1),
               "| member vote | " + " | ".join(f"{baselines[t]['vote']:.3f}" for t in task_names) + " |",
               "| oracle | " + " | ".join(f"{baselines[t]['oracle']:.3f}" for t in task_names) + " |", "",
               "Pairwise agreement of the members' answers: " + "; ".join(
                   f"{t}: " + ", ".join(f"{k} {v:.2f}" for k, v in agreement[t].items()) for t in task_names), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "systems": {k: shlex.join(v) for k, v in systems.items()}, "results": results,
         "member_baselines": baselines, "member_agreement": agreement, "job_wall_s": walls,
         "answers": {name: {i: o["answer"] for i, o in pr.items()} for name, pr in per_row.items()}}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(md))
    plot(results, task_names, args.out.with_suffix(".png"))
    return "\n".join(md)


def parse_extra(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip() or not flags.strip() or not flags.strip().startswith("--"):
            raise ValueError(f"--extra must be NAME=FLAGS (no '=' in NAME, FLAGS starting with --), got {item!r}")
        out[name.strip()] = shlex.split(flags)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                    choices=(*tasks.LABEL_TASKS, "gsm8k"))  # HaluEval-QA and IFEval: bench/eval_gen.py
    ap.add_argument("--n-label", type=int, default=100, help="items per labeling task (fixed subset)")
    ap.add_argument("--n-gen", type=int, default=20, help="GSM8K items")
    ap.add_argument("--gen-tokens", type=int, default=128, help="new tokens per GSM8K item")
    ap.add_argument("--split", choices=("test", "dev"), default="test")
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS), help=f"subset of {list(SYSTEMS)}")
    ap.add_argument("--extra", nargs="*", default=[], help='extra systems: NAME="job flags"')
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=REPO / "output" / "eval", help="job outputs (resumable)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    systems = {s: SYSTEMS[s] for s in args.systems} | parse_extra(args.extra)

    rows = build_rows(args.tasks, args.n_label, args.n_gen, args.split, args.gen_tokens)
    task_names = [t for t in args.tasks if any(r["task"] == t for r in rows)]
    work = args.work / f"{args.split}-L{args.n_label}-G{args.n_gen}-T{args.gen_tokens}"
    work.mkdir(parents=True, exist_ok=True)
    input_path = work / "input.jsonl"
    keep = ("id", "prompt", "choices", "max_new_tokens")
    text = "".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in rows)
    if input_path.exists() and input_path.read_text() != text:
        # the job resumes by row id: stale outputs of other prompts would be scored as these rows'
        raise SystemExit(f"{work} holds outputs for different input rows: delete it or pass another --work")
    input_path.write_text(text)

    results, walls, per_row = {}, {}, {}
    for name, flags in systems.items():
        out, walls[name] = run_system(name, flags, input_path, work, args.gen_tokens, args.batch_size)
        per_row[name] = outcomes(out, rows)
        results[name] = aggregate(per_row[name], rows)
        log.info("%s: %s", name, {t: round(v["accuracy"], 3) for t, v in results[name].items()})
        md = write_results(args, systems, results, per_row, walls, rows, task_names)  # after each: partial runs count
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
