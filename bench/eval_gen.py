"""Generation evaluation through the job (issue #17 point 4): do the ensembles write better answers
than their best member, and at what cost?

    python bench/eval_gen.py --split dev  --tasks halueval_qa ifeval --n 100 --out bench/results/gen_eval_dev
    python bench/eval_gen.py --split test --tasks halueval_qa ifeval --n 300 --n-task ifeval=150 \\
        --main-from bench/results/gen_eval_dev.json --fuse-below 0.5 --out bench/results/gen_eval

Tasks (``bench/tasks.py``; dev and test splits are disjoint):

- ``halueval_qa``: extractive QA, the passage in the prompt; exact match and token F1 (SQuAD's
  normalisation) of the response's first line; ``TASK_BUDGET`` new tokens, greedy.
- ``ifeval``: prompt-level strict accuracy (benchkit's checker); ``TASK_BUDGET`` new tokens, greedy.

Systems (``systems``): each packaged member alone; DeePEn over the trio with the main member given by
``--main`` (or the best member on the dev report, ``--main-from``), gated at ``--fuse-below`` (default:
the library's default) and ungated (``fuse_below=1``); SpecFuse over the trio with model exit on (the
library's default rule) and off. ``--extra name="FLAGS"`` adds a system given as job flags (how dev
sweeps are run). ``--sampled`` runs the synthetic-data setting instead: ``--temperature`` 0.7,
``--n-samples`` 4 per prompt, each row with its own seed; measured: the pass rate (IFEval) or F1 (QA)
over all samples and distinct-2 across a prompt's samples (distinct word bigrams / all bigrams).

Each (system, task) is one ``python -m jobs.fuse`` run (local Spark, CPU) into its own output
directory under ``--work``; the job resumes by row id, so an interrupted evaluation, or a larger
``--n``, computes only the missing rows. Measured per task and system: the metric with a 95%
paired-bootstrap interval of the difference to the best member (best on this split's own figures
unless ``--best-from`` names the dev report; settings are never chosen on test), member forwards per
generated token (summed over members / ``token_count``; :func:`forwards`), and time per item and per
generated token (the row's share of its micro-batch's fuser time; error rows excluded) as a ratio to
the best member alone.

Writes ``<out>.json`` (every number and per-row scores) and ``<out>.md`` (the tables).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import eval_label  # noqa: E402
import evaluate  # noqa: E402
import tasks  # noqa: E402
from eval_label import System, paired_bootstrap  # noqa: E402

log = logging.getLogger("bench.eval_gen")

MEMBERS = {"smollm2": evaluate.SMOL, "qwen": evaluate.QWEN, "gemma": evaluate.GEMMA}
TRIO = evaluate.TRIO
TASK_BUDGET = {"halueval_qa": 32, "ifeval": 256}
"""New tokens per task: a short answer fits 32; IFEval's responses as the issue asks (256)."""
METRICS = {"halueval_qa": ("f1", "em"), "ifeval": ("pass",)}
"""Per task, the measured metrics; the first is the headline (the best member is chosen by it)."""
SAMPLED = ("--temperature", "0.7", "--n-samples", "4", "--seed", "0")


def systems(main: str | None, fuse_below: float | None) -> dict[str, System]:
    """The evaluated systems (module docstring) with DeePEn's main member ``main`` (a MEMBERS key;
    None: no DeePEn systems) and the gate ``fuse_below`` (None: no gated system)."""
    out = {name: System(name, ("--method", "single", "--members", spec)) for name, spec in MEMBERS.items()}
    out["specfuse exit"] = System("specfuse exit", ("--method", "specfuse", "--members", *TRIO, "--exit"))
    out["specfuse no-exit"] = System("specfuse no-exit", ("--method", "specfuse", "--members", *TRIO, "--no-exit"))
    if main is None:
        return out
    if main not in MEMBERS:
        raise ValueError(f"main must be one of {sorted(MEMBERS)}, got {main!r}")
    deepen = ("--method", "deepen", "--members", *TRIO, "--main", str(TRIO.index(MEMBERS[main])))
    if fuse_below is not None:
        if not 0.0 < fuse_below < 1.0:
            raise ValueError(f"fuse_below of the gated system must be in (0, 1), got {fuse_below!r}")
        out[f"deepen gated ({main})"] = System(f"deepen gated ({main})", (*deepen, "--fuse-below", repr(fuse_below)))
    out[f"deepen ungated ({main})"] = System(f"deepen ungated ({main})", (*deepen, "--fuse-below", "1.0"))
    return out


# ---------------------------------------------------------------- scoring (pure)

def score_text(task: str, text: str | None, gold) -> dict[str, float]:
    """The task's metrics of one response (an error row's text is None and scores 0)."""
    if task == "halueval_qa":
        em, f1 = tasks.qa_scores(text, gold)
        return {"em": em, "f1": f1}
    if task == "ifeval":
        return {"pass": float(text is not None and tasks.ifeval_pass(gold, text))}
    raise ValueError(f"task must be one of {sorted(TASK_BUDGET)}, got {task!r}")


def forwards(row: dict) -> int:
    """Member forward passes of one output row, summed over members: ``calls`` for Single and DeePEn
    (a call is one forward); for SpecFuse, whose calls are proposals of up to ``segment_tokens``
    forwards and verifications of one, an estimate: drafted tokens (``tokens_out``, one forward each)
    plus verification calls (``calls - proposed``)."""
    total = 0
    for m in row["member_stats"]:
        if m["calls"] is None:
            raise ValueError(f"row {row['id']!r}: member {m['name']!r} has no calls count")
        if row["method"] == "specfuse":
            total += (m["tokens_out"] or 0) + m["calls"] - (m["proposed"] or 0)
        else:
            total += m["calls"]
    return total


def distinct2(texts: list[str]) -> float | None:
    """Distinct word bigrams / all word bigrams across a prompt's samples (None without any bigram)."""
    grams = [tuple(w[i:i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else None


def per_row(table: list[dict], rows: list[dict], task: str) -> dict[str, dict]:
    """Per input id: mean metrics over its samples, forwards, tokens, ms (its share of the micro-batch
    time, summed over its ok samples), errors, distinct-2, from the job's output rows. ``table`` is
    the whole output directory: a micro-batch's time is shared by all of its rows, including rows of an
    earlier, larger run that ``rows`` does not ask for."""
    ms = evaluate.row_ms(table)
    by_id: dict[str, list[tuple[dict, float | None]]] = {}
    for r, t in zip(table, ms):
        by_id.setdefault(r["id"], []).append((r, t))
    out = {}
    for row in rows:
        got = by_id.get(row["id"])
        if not got:
            raise RuntimeError(f"row {row['id']!r} missing from the job's output")
        scores = [score_text(task, r["text"] if r["status"] == "ok" else None, row["gold"]) for r, _ in got]
        ok = [r for r, _ in got if r["status"] == "ok"]
        out[row["id"]] = {
            **{k: statistics.fmean(s[k] for s in scores) for k in scores[0]},
            "errors": len(got) - len(ok),
            "forwards": sum(forwards(r) for r in ok),
            "tokens": sum(r["token_count"] or 0 for r in ok),
            "ms": sum(t for (r, t) in got if t is not None and r["status"] == "ok"),
            "distinct2": distinct2([r["text"] for r in ok]) if len(ok) > 1 else None,
            "fused_share": _mean([m["fused_share"] for r in ok for m in r["member_stats"] or []
                                  if m["role"] == "main" and m.get("fused_share") is not None]),
            "exits": sum(1 for r in ok for m in r["member_stats"] or [] if m.get("exit_round") is not None),
        }
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarise(rows: dict[str, dict], task: str) -> dict:
    """One system's figures on one task from its per-row records."""
    tokens = sum(r["tokens"] for r in rows.values())
    return {
        "n": len(rows), **{k: statistics.fmean(r[k] for r in rows.values()) for k in METRICS[task]},
        "errors": sum(r["errors"] for r in rows.values()),
        "forwards_per_token": sum(r["forwards"] for r in rows.values()) / tokens if tokens else None,
        "tokens_per_item": tokens / len(rows),
        "ms_per_item": _mean([r["ms"] for r in rows.values() if r["errors"] == 0]),
        "ms_per_token": sum(r["ms"] for r in rows.values()) / tokens if tokens else None,
        "distinct2": _mean([r["distinct2"] for r in rows.values()]),
        "fused_share": _mean([r["fused_share"] for r in rows.values()]),
        "rows_with_exit": statistics.fmean(float(r["exits"] > 0) for r in rows.values()),
    }


def compare(results: dict[str, dict], scores: dict[str, dict[str, dict]], task: str, best: str) -> None:
    """Add to every system's figures the paired-bootstrap difference to ``best`` and its time ratio."""
    ids = sorted(scores[best])
    for name, res in results.items():
        for k in METRICS[task]:
            d, lo, hi = paired_bootstrap([scores[name][i][k] for i in ids], [scores[best][i][k] for i in ids])
            res[f"{k}_vs_best"] = {"diff": d, "lo": lo, "hi": hi}
        base = results[best]["ms_per_item"]
        res["time_ratio"] = res["ms_per_item"] / base if base and res["ms_per_item"] is not None else None
        base = results[best]["ms_per_token"]
        res["token_time_ratio"] = res["ms_per_token"] / base if base and res["ms_per_token"] is not None else None


# ---------------------------------------------------------------- running

def build_rows(task: str, split: str, n: int | None, skip: int = 0) -> list[dict]:
    """Items ``skip`` .. ``skip + n - 1`` of the task's split (all after ``skip`` when ``n`` is None)."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    return [{"id": f"{task}/{r['id']}", "task": task, "prompt": r["prompt"], "gold": r["gold"]}
            for r in tasks.load_split(task, split, None if n is None else skip + n)[skip:]]


def run(system: System, task: str, rows: list[dict], work: Path, batch_size: int, sampled: bool,
        fresh: bool = False) -> list[dict]:
    """One job run of ``system`` on one task's rows (resumed by row id); every row of its output
    directory (which may hold more rows, from an earlier larger run)."""
    import pyarrow.parquet as pq

    flags = (*system.flags, "--max-new-tokens", str(TASK_BUDGET[task]), "--mode", "generate",
             *(SAMPLED if sampled else ()))
    job = System(system.name, tuple(flags))
    job_rows = [{"id": r["id"], "prompt": r["prompt"], "choices": None} for r in rows]
    out = eval_label.run_job(job, [task], [{**r, "task": task} for r in job_rows], work / task, batch_size,
                             fresh=fresh)
    return pq.read_table(out / "data").to_pylist()


def best_member(results: dict[str, dict], task: str) -> str:
    """The member with the highest headline metric (ties: MEMBERS order)."""
    key = METRICS[task][0]
    return max(MEMBERS, key=lambda m: (results[m][key], -list(MEMBERS).index(m)))


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Generation evaluation, split **{s['split']}**" + (" (sampled)" if s["sampled"] else ""), "",
             f"Command: `{report['command']}`. Code {report['code']}. Members alone and ensembles over the trio "
             f"({', '.join(TRIO)}); DeePEn main member: {s['main']}. Time ratio: time per item / the best member's "
             "(one machine, runs at different times: ratios are indicative); time/token ratio: the same per generated token. Forwards per token: member "
             "forward passes (summed over members; SpecFuse: drafted tokens plus verifications, an estimate) per generated token.", ""]
    for task, res in report["tasks"].items():
        best = report["best"][task]
        ms = METRICS[task]
        lines += [f"## {task} ({res[best]['n']} items, {TASK_BUDGET[task]} new tokens; best member: {best}"
                  f" ({report['best_source']}))", "",
                  "| system | " + " | ".join(f"{k} | {k} vs best [95% CI]" for k in ms)
                  + " | forwards/token | tokens/item | time ratio | time/token ratio | fused share | rows with exit"
                  + (" | distinct-2" if s["sampled"] else "") + " | errors |",
                  "|---" * (2 * len(ms) + 8 + (1 if s["sampled"] else 0)) + "|"]
        for name, r in res.items():
            cells = []
            for k in ms:
                d = r[f"{k}_vs_best"]
                cells += [f"{100 * r[k]:.1f}", f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"]
            cells += [_fmt(r["forwards_per_token"], "{:.2f}"), f"{r['tokens_per_item']:.1f}", _fmt(r["time_ratio"], "{:.2f}"),
                      _fmt(r["token_time_ratio"], "{:.2f}"), _fmt(r["fused_share"], "{:.2f}"),
                      f"{r['rows_with_exit']:.2f}"]
            if s["sampled"]:
                cells.append(_fmt(r["distinct2"], "{:.3f}"))
            cells.append(str(r["errors"]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(x: float | None, f: str) -> str:
    return "-" if x is None else f.format(x)


def parse_counts(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        task, _, n = item.partition("=")
        if task not in TASK_BUDGET or not n.isdigit():
            raise SystemExit(f"--n-task takes TASK=N with TASK in {sorted(TASK_BUDGET)}, got {item!r}")
        out[task] = int(n)
    return out


def dev_report(path: Path | None, what: str, task_names: list[str]) -> dict[str, str]:
    """The best member per task of a dev report (``<out>.json`` of a ``--split dev`` run): settings
    are chosen on dev, never on test."""
    if path is None:
        return {}
    report = json.loads(path.read_text())
    if report["settings"]["split"] != "dev" or report["settings"].get("sampled"):
        raise SystemExit(f"{what} {path} must be a greedy dev report, got split {report['settings']['split']!r}")
    missing = [t for t in task_names if t not in report["best"]]
    if missing:
        raise SystemExit(f"{what} {path} has no best member for {missing} (it has {sorted(report['best'])})")
    return report["best"]


def plan(args: argparse.Namespace, mains: dict[str, str], dev_best: dict[str, str] | None = None
         ) -> dict[str, dict[str, System]]:
    """Per task, the systems to run, checked before any job starts: the comparison needs the best
    member on dev (``dev_best``) or, without a dev report, every member."""
    if args.main and args.main_from:
        raise SystemExit("give --main or --main-from, not both")
    out = {}
    for task in args.tasks:
        table = systems(args.main or mains.get(task), args.fuse_below)
        table |= {n: System(n, tuple(f)) for n, f in evaluate.parse_extra(args.extra).items()}
        names = args.systems if args.systems is not None else list(table)
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"unknown systems {unknown} (DeePEn's need --main or --main-from, the gated one "
                             f"--fuse-below); known: {list(table)}")
        need = [dev_best[task]] if dev_best else list(MEMBERS)
        if not all(m in names for m in need):
            raise SystemExit(f"{task}: the comparison needs {need} among the systems, got {names}")
        out[task] = {n: table[n] for n in names}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=tasks.SPLITS, default="dev")
    ap.add_argument("--tasks", nargs="+", choices=sorted(TASK_BUDGET), default=list(TASK_BUDGET))
    ap.add_argument("--n", type=int, default=100, help="items per task (the first n of the split)")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the split's first SKIP items (a replication on items not seen yet)")
    ap.add_argument("--n-task", nargs="*", default=[], metavar="TASK=N", help="items for one task")
    ap.add_argument("--systems", nargs="*", default=None, help="names of systems to run (default all)")
    ap.add_argument("--main", choices=sorted(MEMBERS), default=None, help="DeePEn's main member")
    ap.add_argument("--main-from", type=Path, default=None,
                    help="a dev report (<out>.json): DeePEn's main member is its best member per task")
    ap.add_argument("--best-from", type=Path, default=None, help="a dev report: the best member per task")
    ap.add_argument("--fuse-below", type=float, default=None, help="the gated DeePEn system's gate, in (0, 1)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=FLAGS", help="more systems as job flags")
    ap.add_argument("--sampled", action="store_true", help="temperature 0.7, 4 samples per prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fresh", action="store_true", help="move earlier outputs of these systems aside")
    ap.add_argument("--work", type=Path, default=REPO / "output" / "gen_eval")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gen_eval")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    counts = {t: args.n for t in args.tasks} | parse_counts(args.n_task)
    dev_best = dev_report(args.best_from, "--best-from", args.tasks)
    mains = dev_report(args.main_from, "--main-from", args.tasks)
    todo = plan(args, mains, dev_best)
    work = args.work / (args.split + ("-sampled" if args.sampled else ""))
    report = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "main": args.main or mains},
              "command": "python bench/eval_gen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "code": eval_label.git_head(REPO), "tasks": {}, "best": {}, "scores": {},
              "best_source": "best on dev" if dev_best else "best on this split"}
    t0 = time.perf_counter()
    for task, table in todo.items():
        rows = build_rows(task, args.split, counts[task], args.skip)
        scores = {n: per_row(run(system, task, rows, work, args.batch_size, args.sampled, args.fresh), rows, task)
                  for n, system in table.items()}
        results = {n: summarise(sc, task) for n, sc in scores.items()}
        best = dev_best[task] if dev_best else best_member(results, task)
        compare(results, scores, task, best)
        report["tasks"][task], report["best"][task], report["scores"][task] = results, best, scores
        log.info("%s: done (%d items, %d systems)", task, len(rows), len(table))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, sort_keys=True))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0

if __name__ == "__main__":
    sys.exit(main())
