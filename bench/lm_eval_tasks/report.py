"""Tabulate ``python -m ensemble.lm_eval`` runs on the ef_* tasks next to the job's labeling
evaluation on the same items (docs/lm_eval.md):

    python -m bench.lm_eval_tasks.report --runs bench/results/lm_eval --job bench/results/label_eval_dev_sum.json \\
        --pair smollm2=smollm2 gemma=gemma specfuse_pair_loglinear=specfuse_sum --out bench/results/lm_eval.md

(``label_eval_dev_sum.json``: ``bench/eval_label.py --split dev --n-dev 40 --member-norm sum --offline
"specfuse_sum=defaults:smollm2,gemma:norm=sum,pool=loglinear" --report-only``: lm-eval's ``acc`` is
the job's norm ``sum``.)

``--runs``: one folder per system, each holding what ``--output_path RUNS/<system>/results.json
--log_samples`` wrote (``results_<date>.json`` and ``samples_<task>_<date>.jsonl``; the latest of
each is read). Per system and task: lm-eval's ``acc`` and ``acc_norm`` and its item count; with
``--pair SYSTEM=JOB_SYSTEM`` also, on the same items (by row id), the job system's accuracy from
``bench/eval_label.py``'s JSON (its ``labels``) and the share of items where lm-eval's ``acc`` pick
(the argmax of the choices' log-likelihoods) is the job's label.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("bench.lm_eval_tasks.report")
PREFIX = "ef_"


def latest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


def task_of(name: str) -> str:
    """``ef_piqa`` / ``ef_piqa_test`` -> ``piqa``."""
    return name[len(PREFIX):].removesuffix("_test")


def read_system(folder: Path) -> dict[str, dict]:
    """{task: {acc, acc_norm, n, picks: {row id: chosen choice text}}} of one system's run."""
    res = latest(folder, "results_*.json")
    if res is None:
        raise ValueError(f"{folder} holds no results_*.json (run with --output_path {folder}/results.json)")
    results = json.loads(res.read_text())
    out: dict[str, dict] = {}
    for name, metrics in results["results"].items():
        if not name.startswith(PREFIX) or "acc,none" not in metrics or name in results.get("groups", {}):
            continue  # not an ef_* task's metrics (a group such as ef_label aggregates its tasks)
        picks = {}
        samples = latest(folder, f"samples_{name}_*.jsonl")
        for line in samples.read_text().splitlines() if samples else []:
            s = json.loads(line)
            lls = [float(r[0]) for r in s["filtered_resps"]]
            picks[s["doc"]["id"]] = s["doc"]["choices"][max(range(len(lls)), key=lls.__getitem__)]
        out[task_of(name)] = {"acc": metrics["acc,none"], "acc_norm": metrics.get("acc_norm,none"),
                              "n": results.get("n-samples", {}).get(name, {}).get("effective"), "picks": picks}
    return out


def compare(picks: dict[str, str], task: str, job: dict, system: str) -> dict | None:
    """The job system's accuracy and its agreement with lm-eval's picks on the items both labeled."""
    labels = job.get("labels", {}).get(system)
    if not labels:
        return None
    golds = {r["id"]: r["gold"] for r in _split_rows(task, job["split"])}
    ids = [i for i in picks if f"{task}/{i}" in labels]
    if not ids:
        return None
    return {"n": len(ids), "job_acc": sum(labels[f"{task}/{i}"] == golds[i] for i in ids) / len(ids),
            "agree": sum(labels[f"{task}/{i}"] == picks[i] for i in ids) / len(ids)}


def _split_rows(task: str, split: str) -> list[dict]:
    from bench import tasks

    return tasks.load_split(task, split)


def markdown(systems: dict[str, dict], job: dict | None, pairs: dict[str, str]) -> str:
    task_names = sorted({t for s in systems.values() for t in s})
    head = "| system | " + " | ".join(task_names) + " |\n|---|" + "---|" * len(task_names) + "\n"
    lines = ["lm-eval `acc` / `acc_norm` (%), items per task in brackets:", "", head.rstrip("\n")]
    for name, per in systems.items():
        cells = [f"{100 * per[t]['acc']:.1f} / {100 * (per[t]['acc_norm'] or 0):.1f} ({per[t]['n']})" if t in per else ""
                 for t in task_names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if job and pairs:
        lines += ["", f"The job's labels on the same items ({job['split']} split): job accuracy (%) / share of items "
                  "where lm-eval's `acc` pick is the job's label (%):", "", head.rstrip("\n")]
        for name, system in pairs.items():
            cells = []
            for t in task_names:
                c = compare(systems.get(name, {}).get(t, {}).get("picks", {}), t, job, system)
                cells.append(f"{100 * c['job_acc']:.1f} / {100 * c['agree']:.1f} ({c['n']})" if c else "")
            lines.append(f"| {name} vs job {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="one folder per system (lm-eval --output_path)")
    ap.add_argument("--job", type=Path, help="bench/eval_label.py's JSON (e.g. bench/results/label_eval_dev.json)")
    ap.add_argument("--pair", nargs="*", default=[], help="SYSTEM=JOB_SYSTEM: compare with the job's labels")
    ap.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    systems = {d.name: read_system(d) for d in sorted(args.runs.iterdir()) if d.is_dir()}
    if args.pair and not args.job:
        ap.error("--pair needs --job (the eval_label JSON whose labels it compares with)")
    bad = [p for p in args.pair if "=" not in p]
    if bad:
        ap.error(f"--pair items are SYSTEM=JOB_SYSTEM, got {bad}")
    pairs = dict(p.split("=", 1) for p in args.pair)
    job = json.loads(args.job.read_text()) if args.job else None
    unknown = sorted(set(pairs) - set(systems))
    if unknown:
        raise ValueError(f"--pair names systems without a run in {args.runs}: {unknown}")
    no_labels = sorted(v for v in pairs.values() if v not in (job or {}).get("labels", {}))
    if no_labels:
        raise ValueError(f"--pair names job systems without labels in {args.job}: {no_labels} "
                         f"(have {sorted((job or {}).get('labels', {}))})")
    text = markdown(systems, job, pairs)
    if args.out:
        args.out.write_text(text)
        log.info("wrote %s", args.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
