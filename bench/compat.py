"""Compatibility check before a big ensemble job: on a labeled dev set, each member's accuracy, how
often each pair of members picks the same label, and DeePEn-Adapt weights derived from dev accuracy.

    python bench/compat.py --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m \
        (--task arc_challenge [--n-dev 100] | --dev my_dev.jsonl) [--out bench/results/compat]

A dev file is JSON lines with ``prompt``, ``choices`` and ``gold`` (the correct choice's text); a
benchkit task uses its dev subset (``bench/tasks.py``: disjoint from the reported test subset).

DeePEn-Adapt weights: ``w_i = acc_i / sum_j acc_j`` (members weighted by dev accuracy, as in the
DeePEn paper's DeePEn-Adapt; uniform if every accuracy is 0). Pairwise agreement is the fraction of
items where two members choose the same label: members that always agree add little to an ensemble,
a member far below the others mostly adds noise. The printed ``--weights`` flag goes straight to the
job (``python -m jobs.fuse --method deepen --members ... --weights ...``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

log = logging.getLogger("bench.compat")


def adapt_weights(accuracies: list[float]) -> list[float]:
    """Weights proportional to dev accuracy, summing to 1 (uniform when all are 0)."""
    if any(a < 0 or a > 1 for a in accuracies):
        raise ValueError(f"accuracies must lie in [0, 1], got {accuracies}")
    total = sum(accuracies)
    if total == 0:
        return [1 / len(accuracies)] * len(accuracies)
    w = [a / total for a in accuracies]
    w[-1] = 1.0 - sum(w[:-1])  # exact sum for the job's validation
    return w


def pairwise_agreement(picks: dict[str, list[str]]) -> dict[str, float]:
    """``"a|b" -> fraction of items where a and b chose the same label``."""
    out = {}
    for a, b in itertools.combinations(picks, 2):
        same = sum(x == y for x, y in zip(picks[a], picks[b]))
        out[f"{a}|{b}"] = same / len(picks[a]) if picks[a] else 0.0
    return out


def check(members, rows: list[dict], batch: int = 8) -> dict:
    """Label ``rows`` with each member alone (``Single``); accuracy, agreement, adapt weights."""
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
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="benchkit labeling task (arc_challenge, piqa, boolq)")
    src.add_argument("--dev", help="JSON lines with prompt, choices, gold")
    ap.add_argument("--n-test", type=int, default=200, help="size of the test subset the dev split follows")
    ap.add_argument("--n-dev", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compat")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import tasks
    from ensemble import load_member

    if args.task:
        if args.task not in tasks.LABEL_TASKS:
            ap.error(f"--task must be one of {tasks.LABEL_TASKS}, got {args.task!r}")
        rows = tasks.load(args.task, args.n_test, split="dev", n_dev=args.n_dev)
    else:
        rows = read_dev(args.dev)
    res = check([load_member(s) for s in args.members], rows, args.batch)
    res["source"] = args.task or args.dev
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
