"""Compatibility check before a big ensemble job: folded into calibration (``python -m jobs.calibrate``,
docs/jobs.md "Calibration"), which reports each member's dev accuracy with a 95% interval, their
pairwise agreement and DeePEn-Adapt weights, and writes the profile the job applies.

What is left here is the benchkit side:

    python bench/compat.py --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m \
        --task arc_challenge [--n-dev 100] --method deepen [--out bench/results/compat]

writes a task's dev subset (``bench/tasks.py``: disjoint from the reported test subset) as a dev file
(``answer`` = the gold choice) and runs ``jobs.calibrate`` on it. :func:`check` labels rows with each
member alone (``Single``) for the bench scripts; :func:`adapt_weights` and :func:`pairwise_agreement`
are calibration's (jobs/calibration.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from jobs.calibration import adapt_weights, pairwise_agreement  # noqa: E402

__all__ = ["adapt_weights", "check", "main", "pairwise_agreement", "read_dev"]
log = logging.getLogger("bench.compat")


def check(members, rows: list[dict], batch: int = 8) -> dict:
    """Label ``rows`` (with ``gold``) with each member alone (``Single``); accuracy, agreement, adapt weights."""
    from ensemble import Single

    picks: dict[str, list[str]] = {}
    acc = {}
    for m in members:
        fuser, labels = Single(m), []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            labels += [o.label for o in fuser.label([r["prompt"] for r in chunk], [r["choices"] for r in chunk])]
        picks[m.name] = labels
        acc[m.name] = sum(lab == r["gold"] for lab, r in zip(labels, rows)) / len(rows)
        log.info("%s: dev accuracy %.3f on %d items", m.name, acc[m.name], len(rows))
    weights = adapt_weights([acc[m.name] for m in members])
    return {"items": len(rows), "accuracy": acc, "agreement": pairwise_agreement(picks),
            "adapt_weights": dict(zip(acc, weights)),
            "job_flags": "--weights " + " ".join(f"{w:.6f}" for w in weights)}


def read_dev(path: str) -> list[dict]:
    """A bench dev file (JSON lines with ``prompt``, ``choices``, ``gold``)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if not isinstance(r.get("choices"), list) or r.get("gold") not in r["choices"]:
            raise ValueError(f"{path}:{n}: a dev row needs 'choices' (a list) and 'gold' (one of them), got {r!r}")
        rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="+", required=True)
    ap.add_argument("--task", required=True, help="benchkit labeling task (bench/tasks.py LABEL_TASKS)")
    ap.add_argument("--method", choices=("deepen", "specfuse"), default="deepen")
    ap.add_argument("--n-test", type=int, default=200, help="size of the test subset the dev split follows")
    ap.add_argument("--n-dev", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compat")
    args, rest = ap.parse_known_args(argv)
    import tasks
    from jobs.calibrate import main as calibrate

    if args.task not in tasks.LABEL_TASKS:
        ap.error(f"--task must be one of {tasks.LABEL_TASKS}, got {args.task!r}")
    rows = tasks.load(args.task, args.n_test, split="dev", n_dev=args.n_dev)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dev = args.out.with_suffix(".dev.jsonl")
    dev.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "choices": r["choices"],
                                       "answer": r["gold"]}) + "\n" for r in rows))
    return calibrate(["--dev", str(dev), "--members", *args.members, "--method", args.method,
                      "--output", str(args.out.with_suffix(".json")), *rest], prog="bench/compat.py")


if __name__ == "__main__":
    sys.exit(main())
