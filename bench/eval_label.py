"""Labeling evaluation through the job (issue 16, point 5): do the ensembles beat the member a user
would pick without one, and at what cost?

    python bench/eval_label.py --split dev  --systems smollm2 qwen gemma [--n-dev N]
    python bench/eval_label.py --split test --systems smollm2 qwen gemma deepen specfuse [--n-test N]
                               [--extra NAME=FLAGS ...] [--profile NAME=PROFILE.json ...]
    python bench/eval_label.py --split test --report-only        # tables and plot from what has run
    python bench/eval_label.py --export-dev DIR                   # DIR/<task>.jsonl for jobs.calibrate

Data (``bench/tasks.py``): the seven labeling tasks, fixed dev (200 items) and test (500; OpenBookQA
300, BANKING77 ``tasks.TEST_CAP``) splits, and ``--split holdout|holdout2`` (blocks of items after the
test split's, for checking a rule written after the earlier splits were seen; reported as test is); ``--n-dev``/``--n-test`` take the first N items of each
task's split (a prefix, so a larger N later resumes the smaller run).

Systems: each packaged member alone (``smollm2``, ``qwen``, ``gemma``); ``deepen`` and ``specfuse``
over the three with the library's defaults; ``--extra NAME=FLAGS`` any job flags, and ``--profile
NAME=PATH`` the flags ``--profile PATH`` (a profile of ``python -m jobs.calibrate``). In FLAGS and
PATH, ``{task}`` stands for the task's name: such a system runs once per task (a profile calibrated
on a task's dev split is applied to that task's test split). The best member on dev is not a run: per
task, the member with the highest dev accuracy (ties: the earlier of smollm2, qwen, gemma; on the
dev split this is chosen on the same items, i.e. optimistic) and its outputs.

Runs: one ``python -m jobs.fuse`` (local Spark, CPU) per system and split (per task for ``{task}``
systems), output in ``<work>/<split>/<system>-<digest of its flags>``. The job resumes by row id: a
rerun (or a larger N) computes only rows not yet committed. Rows keep a digest of their prompt and
choices next to the output, and a changed prompt refuses to reuse it. ``--fresh`` moves an output
aside (e.g. after a code change the job's config_hash does not see). Every run's rows, wall time and
rows/s are logged and kept in ``<work>/<split>/runs.jsonl``.

Measures per task and system (errors count as wrong):
- accuracy, and its difference from the best-on-dev member with a paired-bootstrap 95% interval
  (:func:`paired_bootstrap`: the same items resampled for both, 2,000 resamples, seed 0, percentile
  interval);
- expected calibration error of the label probabilities (:func:`ece`: confidence = the top
  probability of ``label_probs``; 10 equal-width bins over [0, 1], the last one closed; the sum over
  bins of the bin's share of rows times |accuracy - mean confidence|; error rows left out);
- member calls and time per item as ratios to the best-on-dev member's (calls: the sum over
  ``member_stats`` of ``calls``; time: ``latency_ms``, a micro-batch's fuser time, shared equally by
  its rows; the job runs 2 partitions side by side, so rows/s is about twice 1000 / ms per item).
Offline, from the members' own outputs (no model calls): the members' majority vote (ties: the
earlier member) and the oracle (any member right); when ``member_stats`` carries
``choice_logprobs``/``choice_tokens`` (and ``choice_neutral`` for pmi), each member's accuracy under
every normalisation of ``ensemble.labeling`` and the uniform linear / log-linear pools of the three
members' posteriors under each.

Writes ``<out>.json`` (every number and each system's labels), ``<out>.md`` and ``<out>.png``
(accuracy differences from the best-on-dev member with their intervals). Default ``<out>``:
``bench/results/label_eval`` for test, ``bench/results/label_eval_dev`` for dev.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import evaluate  # noqa: E402
import label_offline  # noqa: E402
import tasks  # noqa: E402

from ensemble.labeling import CHOICE_NORMS  # noqa: E402
from jobs.calibration import ECE_BINS, ece  # noqa: E402  (the one ECE, also calibration's)

log = logging.getLogger("bench.eval_label")

MEMBERS = evaluate.SINGLES  # ("smollm2", "qwen", "gemma"), in tie-break order
TRIO = evaluate.TRIO
MEMBER_NORM = ("--choice-norm", "pmi")
"""Members run with pmi: their rows then carry every score (sum, token counts, neutral), so each
normalisation's labels come offline (``--member-norm``) without a model call."""
SYSTEMS: dict[str, tuple[str, ...]] = {
    **{s: (*evaluate.SYSTEMS[s], *MEMBER_NORM) for s in MEMBERS},
    "deepen": ("--method", "deepen", "--members", *TRIO),
    "specfuse": ("--method", "specfuse", "--members", *TRIO),
}
BEST = "best member (dev)"
N_BOOT, BOOT_SEED = 2000, 0


@dataclass(frozen=True)
class System:
    name: str
    flags: tuple[str, ...]

    @property
    def per_task(self) -> bool:
        return any("{task}" in f for f in self.flags)

    def flags_for(self, task: str) -> list[str]:
        return [f.replace("{task}", task) for f in self.flags]

    @property
    def slug(self) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")
        return f"{base}-{hashlib.sha256(shlex.join(self.flags).encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- measures (pure)

def paired_bootstrap(system: Sequence[bool], base: Sequence[bool], n_boot: int = N_BOOT,
                     seed: int = BOOT_SEED) -> tuple[float, float, float]:
    """Accuracy difference ``system - base`` on the same items and its 95% paired-bootstrap interval
    (items resampled with replacement, the same draw for both; 2.5 and 97.5 percentiles)."""
    a, b = np.asarray(system, dtype=float), np.asarray(base, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equally long non-empty vectors, got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    diffs = (a - b)[idx].mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def norm_posteriors(stats: dict, choices: Sequence[str]) -> dict[str, list[float]]:
    """A member's posterior under every normalisation it has the scores for (``ensemble.labeling``),
    from its ``member_stats`` entry; {} when the entry has no ``choice_logprobs``."""
    s = label_offline.choice_scores(stats, choices)
    if s is None:
        return {}
    from ensemble.labeling import posterior

    return {n: posterior(s, n) for n in CHOICE_NORMS if n != "pmi" or s.neutral is not None}


def norm_picks(stats: dict, choices: Sequence[str]) -> dict[str, int]:
    """A member's pick under every normalisation it has the scores for (see :func:`norm_posteriors`)."""
    from ensemble.labeling import best

    return {n: best(p) for n, p in norm_posteriors(stats, choices).items()}


def relabel(per_row: dict[str, dict], rows: list[dict], norm: str) -> dict[str, dict]:
    """A member's outcomes with its label, confidence and correctness recomputed offline under ``norm``
    from the choice scores in its ``member_stats`` (error rows stay errors); a row without those scores
    is an error naming it (a run without them cannot be relabeled)."""
    out = {}
    for row in rows:
        o = per_row[row["id"]]
        if o["error"] is not None:
            out[row["id"]] = o
            continue
        posts = norm_posteriors(o["stats"][0], row["choices"])
        if norm not in posts:
            raise ValueError(f"row {row['id']!r} has no choice scores for norm {norm!r} in member_stats "
                             f"(have {sorted(posts)}): run the member with --choice-norm pmi")
        from ensemble.labeling import best

        p = posts[norm]
        label = row["choices"][best(p)]
        out[row["id"]] = {**o, "label": label, "correct": label == row["gold"], "conf": max(p)}
    return out


def best_on_dev(dev_acc: dict[str, dict[str, float]], task_names: Sequence[str]) -> dict[str, str]:
    """Per task, the member with the highest dev accuracy (ties: the earlier in MEMBERS), among the
    members in ``dev_acc`` (a partial evaluation: those run so far)."""
    have = [m for m in MEMBERS if m in dev_acc]
    missing = [(m, t) for m in have for t in task_names if t not in dev_acc[m]]
    if not have or missing:
        raise ValueError(f"best-on-dev needs members' dev accuracies on every task; have {have}, missing "
                         f"(member, task): {missing}")
    return {t: max(have, key=lambda m: (dev_acc[m][t], -MEMBERS.index(m))) for t in task_names}


# ---------------------------------------------------------------- rows and runs

def build_rows(task_names: Sequence[str], split: str, cap: int | None) -> list[dict]:
    """Job input rows (ids ``task/task_id``, ordered by task) with ``gold`` and ``task`` kept aside."""
    rows = []
    for t in task_names:
        for r in tasks.load_split(t, split, cap):
            rows.append({"id": f"{t}/{r['id']}", "task": t, "prompt": r["prompt"], "choices": r["choices"],
                         "gold": r["gold"]})
    return rows


def row_digest(row: dict) -> str:
    return hashlib.sha256(json.dumps([row["prompt"], row["choices"]]).encode()).hexdigest()[:16]


def check_digests(out: Path, rows: list[dict]) -> None:
    """Refuse an output written for other prompts of the same ids; record these rows' digests."""
    path = out.parent / f"{out.name}.rows.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    for r in rows:
        if known.get(r["id"], row_digest(r)) != row_digest(r):
            raise SystemExit(f"{out}: row {r['id']!r} was labeled with another prompt or choices than it has now "
                             f"(bench/tasks.py changed): rerun with --fresh")
        known[r["id"]] = row_digest(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, sort_keys=True))


def git_head(code: Path) -> str:
    """The checkout's commit, ``+dirty`` when its ensemble/, jobs/ or schemas/ have uncommitted changes;
    for a copy that is no checkout, the contents of its ``SNAPSHOT`` file."""
    if (code / "SNAPSHOT").exists():
        return (code / "SNAPSHOT").read_text().strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "ensemble", "jobs", "schemas"], cwd=code,
                           capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_job(system: System, task_group: list[str], rows: list[dict], split_dir: Path, batch_size: int,
            fresh: bool, code: Path = REPO) -> Path:
    """One job run of ``system`` over ``rows`` (the tasks of ``task_group``): its output directory."""
    out = split_dir / (system.slug if not system.per_task else f"{system.slug}/{task_group[0]}")
    if fresh and out.exists():
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        log.info("%s: moved the earlier output aside to %s", system.name, aside)
    check_digests(out, rows)
    text = "".join(json.dumps({k: r[k] for k in ("id", "prompt", "choices")}) + "\n" for r in rows)
    input_path = split_dir / f"input-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    input_path.write_text(text)
    flags = system.flags_for(task_group[0])
    cmd = [sys.executable, "-m", "jobs.fuse", "--input", str(input_path), "--output", str(out), "--mode", "label",
           "--batch-size", str(batch_size), "--device", "cpu", "--no-report", *flags]
    log.info("%s: %s", system.name, shlex.join(cmd[1:]))
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        hint = (" (the output holds another configuration: pass --fresh to move it aside)"
                if "use a new output directory" in proc.stderr else "")
        raise RuntimeError(f"system {system.name!r}: job failed (exit {proc.returncode}){hint}:\n{proc.stderr[-4000:]}")
    m = re.search(r"Wrote (\d+) rows in (\d+)s", proc.stdout)
    done = int(m.group(1)) if m else 0
    rec = {"system": system.name, "tasks": task_group, "rows": len(rows), "computed": done, "wall_s": round(wall, 1),
           "rows_per_s": round(done / wall, 4) if done else None, "code": git_head(code), "output": str(out),
           "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with (split_dir / "runs.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    log.info("%s: %d of %d rows computed in %.0f s (%.3f rows/s incl. Spark and model start)", system.name, done,
             len(rows), wall, done / wall if done else 0.0)
    return out


def output_dirs(system: System, task_names: Sequence[str], split_dir: Path) -> dict[str, Path]:
    """Per task, the output directory holding ``system``'s rows."""
    if system.per_task:
        return {t: split_dir / system.slug / t for t in task_names}
    return {t: split_dir / system.slug for t in task_names}


def run_system(system: System, rows: list[dict], task_names: Sequence[str], split_dir: Path, batch_size: int,
               fresh: bool, code: Path = REPO) -> None:
    groups = [[t] for t in task_names] if system.per_task else [list(task_names)]
    for g in groups:
        run_job(system, g, [r for r in rows if r["task"] in g], split_dir, batch_size, fresh, code)


def read_outcomes(dirs: dict[str, Path], rows: list[dict]) -> dict[str, dict] | None:
    """Per row id: ``label``, ``correct``, ``conf`` (top probability), ``calls``, ``ms``, ``error``,
    ``stats`` (member_stats); None when an output is missing or lacks one of the rows."""
    import pyarrow.parquet as pq

    got: dict[str, dict] = {}
    for d in dict.fromkeys(dirs.values()):
        if not (d / "data").exists():
            return None
        table = pq.read_table(d / "data").to_pylist()
        ms = evaluate.row_ms(table)
        got.update({r["id"]: {**r, "ms": m} for r, m in zip(table, ms) if r["sample"] == 0})
    out = {}
    for row in rows:
        r = got.get(row["id"])
        if r is None:
            return None
        if r["status"] != "ok":
            out[row["id"]] = {"label": None, "correct": False, "conf": None, "calls": None, "ms": None,
                              "error": r["error"], "stats": []}
            continue
        out[row["id"]] = {"label": r["label"], "correct": r["label"] == row["gold"], "conf": max(r["label_probs"]),
                          "calls": sum(m["calls"] or 0 for m in r["member_stats"] or []), "ms": r["ms"],
                          "error": None, "stats": r["member_stats"] or []}
    return out


# ---------------------------------------------------------------- aggregation

def task_measures(per_row: dict[str, dict], ids: list[str]) -> dict:
    """accuracy, errors, ECE, calls and ms per item of one system on one task's rows."""
    items = [per_row[i] for i in ids]
    ok = [o for o in items if o["error"] is None]
    return {"n": len(items), "accuracy": sum(o["correct"] for o in items) / len(items), "errors": len(items) - len(ok),
            "delta": None, "delta_lo": None, "delta_hi": None, "calls_ratio": None, "time_ratio": None,
            "ece": ece([o["conf"] for o in ok], [o["correct"] for o in ok]) if ok else None,
            "calls_per_item": statistics.fmean(o["calls"] for o in ok) if ok else None,
            "ms_per_item": statistics.fmean(o["ms"] for o in ok if o["ms"] is not None) if ok else None}


def compare(results: dict[str, dict[str, dict]], per_row: dict[str, dict[str, dict]], ids: dict[str, list[str]],
            best: dict[str, str]) -> None:
    """Add each system's difference from the best-on-dev member (with its interval) and cost ratios."""
    for t, b in best.items():
        base, base_ok = results[b][t], [per_row[b][i]["correct"] for i in ids[t]]
        for name, res in results.items():
            r = res[t]
            r["delta"], r["delta_lo"], r["delta_hi"] = paired_bootstrap([per_row[name][i]["correct"] for i in ids[t]],
                                                                        base_ok)
            r["calls_ratio"] = (r["calls_per_item"] / base["calls_per_item"]
                                if r["calls_per_item"] and base["calls_per_item"] else None)
            r["time_ratio"] = r["ms_per_item"] / base["ms_per_item"] if r["ms_per_item"] and base["ms_per_item"] else None


def offline(per_row: dict[str, dict[str, dict]], rows: list[dict]) -> dict[str, dict]:
    """Per task, from the members' outputs only: vote, oracle (bench/evaluate.py's), and when the
    members' choice scores are there, each member's accuracy under every normalisation and the uniform
    linear / log-linear pools of the three members' posteriors under each."""
    members = [m for m in MEMBERS if m in per_row]
    if not members:
        return {}
    answers = {m: {i: {"answer": o["label"], "correct": o["correct"]} for i, o in per_row[m].items()} for m in members}
    res = {t: dict(v) for t, v in evaluate.member_baselines(answers, rows).items()}
    from ensemble.labeling import best, pool

    for t in res:
        trows = [r for r in rows if r["task"] == t]
        posts = {m: [norm_posteriors((per_row[m][r["id"]]["stats"] or [{}])[0], r["choices"]) for r in trows]
                 for m in members}
        golds = [r["choices"].index(r["gold"]) for r in trows]
        # a row without a member's scores (an error row) counts as wrong, as in the accuracies
        norms = {m: {n: statistics.fmean(n in p and best(p[n]) == g for p, g in zip(posts[m], golds))
                     for n in dict.fromkeys(n for p in posts[m] for n in p)} for m in members}
        if any(norms.values()):
            res[t]["norms"] = norms
            res[t]["norms_ece"] = {m: {n: ece([max(p[n]) for p in posts[m] if n in p],
                                              [best(p[n]) == g for p, g in zip(posts[m], golds) if n in p])
                                       for n in v} for m, v in norms.items()}
        shared = set.intersection(*(set(v) for v in norms.values())) if len(members) == len(MEMBERS) else set()
        pools = {}
        for n in sorted(shared):
            for kind in ("linear", "loglinear"):
                picks = [best(pool([posts[m][k][n] for m in members], [1.0] * len(members), kind))
                         if all(n in posts[m][k] for m in members) else None for k in range(len(trows))]
                pools[f"{kind} {n}"] = statistics.fmean(p == g for p, g in zip(picks, golds))
        if pools:
            res[t]["pools"] = pools
    return res


# ---------------------------------------------------------------- report

def _pct(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    task_names, res, best = report["tasks"], report["results"], report["best_on_dev"]
    split = report["split"]
    chosen = (f"Best member on dev (per task, among {', '.join(report['dev_accuracy'])}): "
              + ", ".join(f"{t} {best[t]}" for t in task_names) + "." if best
              else "No member has dev outputs: no best-on-dev member.")
    md = [f"Split **{split}**: " + ", ".join(f"{t} {report['n'][t]}" for t in task_names) + " items. "
          f"Members' labels: {'as run' if report['member_norm'] == 'run' else 'norm ' + report['member_norm']}. "
          + chosen, "",
          "Accuracy (%) and, in brackets, the difference from the best-on-dev member in points with its "
          f"paired-bootstrap 95% interval ({N_BOOT} resamples, seed {BOOT_SEED}); errors count as wrong.", "",
          "| system | " + " | ".join(task_names) + " | mean |", "|" + "---|" * (len(task_names) + 2)]
    for name, r in res.items():
        cells = []
        for t in task_names:
            x = r[t]
            err = f", {x['errors']} err" if x["errors"] else ""
            cells.append(f"{_pct(x['accuracy'])} ({_pct(x['delta'], True)} [{_pct(x['delta_lo'], True)}, "
                         f"{_pct(x['delta_hi'], True)}]{err})")
        mean = statistics.fmean(r[t]["accuracy"] for t in task_names)
        md.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(mean)} |")
    md += ["", f"Expected calibration error of the label probabilities (%; {ECE_BINS} equal-width bins of the top "
           "probability) / member calls per item as a ratio to the best member's / time per item as a ratio "
           "to the best member's.", "",
           "| system | " + " | ".join(task_names) + " |", "|" + "---|" * (len(task_names) + 1)]
    for name, r in res.items():
        md.append(f"| {name} | " + " | ".join(
            f"{_pct(r[t]['ece'])} / {_ratio(r[t]['calls_ratio'])} / {_ratio(r[t]['time_ratio'])}"
            for t in task_names) + " |")
    md += ["", "Time per item (ms, a micro-batch's fuser time shared by its rows; 2 partitions run side by side):", "",
           "| system | " + " | ".join(task_names) + " |", "|" + "---|" * (len(task_names) + 1)]
    for name, r in res.items():
        if name != BEST:
            md.append(f"| {name} | " + " | ".join(f"{r[t]['ms_per_item']:.0f}" if r[t]["ms_per_item"] else "–"
                                                  for t in task_names) + " |")
    off = report["offline"]
    if off:
        md += ["", "Offline, from the members' outputs (no model calls): majority vote (ties: the earlier member) "
               "and oracle (any member right), %.", "", "| | " + " | ".join(task_names) + " |",
               "|" + "---|" * (len(task_names) + 1),
               "| member vote | " + " | ".join(_pct(off[t]["vote"]) for t in task_names) + " |",
               "| oracle | " + " | ".join(_pct(off[t]["oracle"]) for t in task_names) + " |"]
        norm_rows = sorted({(m, n) for t in task_names for m, v in off[t].get("norms", {}).items() for n in v},
                           key=lambda mn: (MEMBERS.index(mn[0]), CHOICE_NORMS.index(mn[1])))
        for m, n in norm_rows:
            md.append(f"| {m}, norm {n}: accuracy (ECE) | " + " | ".join(
                f"{_pct(off[t].get('norms', {}).get(m, {}).get(n))} ({_pct(off[t].get('norms_ece', {}).get(m, {}).get(n))})"
                for t in task_names) + " |")
        for k in sorted({k for t in task_names for k in off[t].get("pools", {})}):
            md.append(f"| pool {k} (uniform) | " + " | ".join(_pct(off[t].get("pools", {}).get(k))
                                                             for t in task_names) + " |")
    if report.get("incomplete"):
        md += ["", "Not reported (outputs missing or incomplete for these rows): " + ", ".join(report["incomplete"])]
    md += ["", "Systems: " + "; ".join(f"{k}: `{v}`" for k, v in report["systems"].items()), "",
           "Runs (job wall time includes Spark and model start; code: the checkout's commit):", ""]
    md += [f"- {r['system']} on {', '.join(r['tasks'])}: {r['computed']} of {r['rows']} rows computed in "
           f"{r['wall_s']:.0f} s ({r['rows_per_s'] or 0:.3f} rows/s), code {r['code']}, {r['at']}"
           for r in report.get("runs", [])]
    md += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(md)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = report["tasks"]
    names = [n for n in report["results"] if n != BEST]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(task_names)), 5))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        r = report["results"][name]
        xs = [i - 0.4 + (k + 0.5) * width for i in range(len(task_names))]
        if any(r[t]["delta"] is None for t in task_names):
            continue
        ys = [100 * r[t]["delta"] for t in task_names]
        err = [[100 * (r[t]["delta"] - r[t]["delta_lo"]) for t in task_names],
               [100 * (r[t]["delta_hi"] - r[t]["delta"]) for t in task_names]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=name)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(task_names)), task_names, rotation=20)
    ax.set_ylabel("accuracy − best-on-dev member's (points)")
    ax.set_title(f"{report['split']} split: difference from the best member on dev, paired-bootstrap 95% intervals")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line

def parse_systems(extra: Sequence[str], profiles: Sequence[str]) -> dict[str, System]:
    out = {k: System(k, tuple(v)) for k, v in evaluate.parse_extra(list(extra)).items()}
    for item in profiles:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--profile must be NAME=PATH (PATH may contain {{task}}), got {item!r}")
        # absolute: the job runs in the --code checkout, which may not be the working directory
        out[name.strip()] = System(name.strip(), ("--profile", str(Path(path.strip()).absolute())))
    clash = sorted(set(out) & (set(SYSTEMS) | {BEST}))
    if clash:
        raise ValueError(f"extra systems must not reuse the names of built-in systems, got {clash}")
    return out


def registry(split_dir: Path, new: dict[str, System]) -> dict[str, System]:
    """Every system ever run in this work directory's split (built-ins, then extras in order)."""
    path = split_dir / "systems.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known.update({k: list(v.flags) for k, v in new.items()})
    split_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=1))
    return {**{k: System(k, v) for k, v in SYSTEMS.items()}, **{k: System(k, tuple(v)) for k, v in known.items()}}


def export_dev(directory: Path, task_names: Sequence[str], cap: int | None) -> None:
    """The dev split of each task as ``<directory>/<task>.jsonl`` rows of ``id``, ``prompt``,
    ``choices``, ``answer`` (the DEV file of ``python -m jobs.calibrate``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for t in task_names:
        rows = build_rows([t], "dev", cap)
        (directory / f"{t}.jsonl").write_text("".join(json.dumps(
            {"id": r["id"], "prompt": r["prompt"], "choices": r["choices"], "answer": r["gold"]}) + "\n" for r in rows))
        log.info("wrote %s (%d rows)", directory / f"{t}.jsonl", len(rows))


def member_outcomes(system: System, task_names: Sequence[str], split_dir: Path, rows: list[dict],
                    member_norm: str) -> dict[str, dict] | None:
    got = read_outcomes(output_dirs(system, task_names, split_dir), rows)
    return got if got is None or member_norm == "run" else relabel(got, rows, member_norm)


def offline_systems(rules: Mapping[str, "label_offline.PoolRule | str"], per_row: dict[str, dict[str, dict]],
                    task_names: Sequence[str], rows: list[dict]) -> dict[str, dict[str, dict]]:
    """SpecFuse systems computed from the members' outcomes (``bench/label_offline.py``), per rule."""
    out = {}
    for name, rule in rules.items():
        out[name] = {}
        for t in task_names:
            out[name].update(label_offline.pooled_outcomes(label_offline.rule_for(rule, t), per_row,
                                                           [r for r in rows if r["task"] == t]))
    return out


def collect(systems: dict[str, System], task_names: list[str], split: str, rows: list[dict], work: Path,
            dev_cap: int | None, member_norm: str = "run",
            offline_rules: Mapping[str, "label_offline.PoolRule | str"] | None = None) -> dict:
    """Every number of the report from the outputs present (no model calls); members' labels as run,
    or recomputed under ``member_norm``; ``offline_rules`` adds SpecFuse systems computed from the
    members' outcomes as run (``bench/label_offline.py``)."""
    split_dir = work / split
    per_row, incomplete = {}, []
    for name, system in systems.items():
        got = (member_outcomes(system, task_names, split_dir, rows, member_norm) if name in MEMBERS
               else read_outcomes(output_dirs(system, task_names, split_dir), rows))
        if got is None:
            incomplete.append(name)
        else:
            per_row[name] = got
    if offline_rules:
        as_run = {m: per_row[m] if member_norm == "run" else read_outcomes(
            output_dirs(systems[m], task_names, split_dir), rows) for m in MEMBERS if m in per_row}
        per_row.update(offline_systems(offline_rules, as_run, task_names, rows))
    if split == "dev":
        dev_acc = {m: {t: task_measures(per_row[m], [r["id"] for r in rows if r["task"] == t])["accuracy"]
                       for t in task_names} for m in MEMBERS if m in per_row}
    else:
        dev_rows = build_rows(task_names, "dev", dev_cap)
        dev_acc = {}
        for m in MEMBERS:
            got = member_outcomes(systems[m], task_names, work / "dev", dev_rows, member_norm)
            if got is not None:
                dev_acc[m] = {t: task_measures(got, [r["id"] for r in dev_rows if r["task"] == t])["accuracy"]
                              for t in task_names}
    ids = {t: [r["id"] for r in rows if r["task"] == t] for t in task_names}
    best: dict[str, str] = {}
    if dev_acc:
        try:
            best = best_on_dev(dev_acc, task_names)
        except ValueError as exc:
            raise SystemExit(f"run members on the dev split first ({exc})") from exc
        missing = [m for m in set(best.values()) if m not in per_row]
        if missing:
            raise SystemExit(f"the best-on-dev members {missing} have no complete outputs on {split}: run them first")
        per_row[BEST] = {i: per_row[best[t]][i] for t in task_names for i in ids[t]}
    else:
        log.warning("no member has outputs on the dev split: no best-on-dev member, differences or ratios")
    order = [BEST] * bool(best) + [n for n in per_row if n != BEST]
    results = {n: {t: task_measures(per_row[n], ids[t]) for t in task_names} for n in order}
    compare(results, per_row, ids, best)
    return {"split": split, "tasks": task_names, "n": {t: len(ids[t]) for t in task_names}, "best_on_dev": best,
            "member_norm": member_norm,
            "dev_accuracy": dev_acc, "results": results, "offline": offline(per_row, rows), "incomplete": incomplete,
            "systems": {n: shlex.join(s.flags) for n, s in systems.items()},
            "offline_systems": {n: r if isinstance(r, str) else repr(r) for n, r in (offline_rules or {}).items()},
            "labels": {n: {i: o["label"] for i, o in pr.items()} for n, pr in per_row.items() if n != BEST}}


def reproduce(args: argparse.Namespace, report: dict) -> str:
    """The command that runs every reported system on this split (then writes this report)."""
    cmd = ["python", "bench/eval_label.py", "--split", args.split, "--tasks", *args.tasks]
    for flag, value in (("--n-dev", args.n_dev), ("--n-test", args.n_test)):
        if value is not None:
            cmd += [flag, str(value)]
    names = [n for n in report["results"] if n != BEST]
    if args.member_norm != "run":
        cmd += ["--member-norm", args.member_norm]
    cmd += ["--systems", *[n for n in names if n in SYSTEMS]]
    extra = [f"{n}={report['systems'][n]}" for n in names if n not in SYSTEMS and n in report["systems"]]
    cmd += ["--extra", *extra] if extra else []
    return shlex.join(cmd + (["--offline", *args.offline] if args.offline else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=tasks.ALL_SPLITS, default="test",
                    help="holdout, holdout2: further test splits (bench/tasks.py), reported like test")
    ap.add_argument("--tasks", nargs="+", default=list(tasks.LABEL_TASKS), choices=tasks.LABEL_TASKS)
    ap.add_argument("--n-dev", type=int, default=None, help="first N items of each task's dev split (default: all)")
    ap.add_argument("--n-test", type=int, default=None, help="first N items of each task's test (or holdout) split (default: all)")
    ap.add_argument("--systems", nargs="*", default=[], help=f"built-in systems to run: {list(SYSTEMS)}")
    ap.add_argument("--extra", nargs="*", default=[], help='extra systems to run: NAME="job flags" ({task} allowed)')
    ap.add_argument("--profile", nargs="*", default=[], help="calibrated systems to run: NAME=PROFILE.json ({task} allowed)")
    ap.add_argument("--offline", nargs="*", default=[], help="SpecFuse systems computed from the members' runs, "
                    "no model calls (bench/label_offline.py): NAME=defaults:MEMBER,MEMBER or "
                    "NAME=profile:PATH ({task} allowed)")
    ap.add_argument("--member-norm", default="run", choices=("run", *CHOICE_NORMS),
                    help="members' labels: as the job gave them (run), or recomputed offline under this "
                    "normalisation from their choice scores (best-on-dev is chosen under it too)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; report what has run")
    ap.add_argument("--fresh", action="store_true", help="move the runs' earlier outputs aside first")
    ap.add_argument("--export-dev", type=Path, help="write DIR/<task>.jsonl dev files for jobs.calibrate and exit")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose job runs (e.g. a git worktree of a "
                    "commit; default this one); its commit is recorded with each run")
    ap.add_argument("--work", type=Path, default=REPO / "output" / "label_eval", help="job outputs (resumable)")
    ap.add_argument("--out", type=Path, default=None, help="results prefix (default bench/results/label_eval[_dev])")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.export_dev:
        export_dev(args.export_dev, args.tasks, args.n_dev)
        return 0
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {list(SYSTEMS)} (others through --extra / --profile)")
    try:
        new = parse_systems(args.extra, args.profile)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        offline_rules = {}
        for item in args.offline:
            name, sep, rule = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"--offline must be NAME=RULE, got {item!r}")
            offline_rules[name.strip()] = label_offline.parse_rule(rule.strip())
    except ValueError as exc:
        ap.error(str(exc))
    cap = args.n_dev if args.split == "dev" else args.n_test
    rows = build_rows(args.tasks, args.split, cap)
    split_dir = args.work / args.split
    systems = registry(split_dir, new)
    if not args.report_only:
        for name in [*args.systems, *new]:
            run_system(systems[name], rows, args.tasks, split_dir, args.batch_size, args.fresh, args.code.resolve())
    try:
        report = collect(systems, list(args.tasks), args.split, rows, args.work, args.n_dev, args.member_norm,
                         offline_rules)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    report["command"] = reproduce(args, report)
    report["runs"] = [json.loads(x) for x in (split_dir / "runs.jsonl").read_text().splitlines()] \
        if (split_dir / "runs.jsonl").exists() else []
    out = args.out or REPO / "bench" / "results" / {"test": "label_eval", "dev": "label_eval_dev"}.get(
        args.split, f"label_eval_{args.split}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    plot(report, out.with_suffix(".png"))
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
