"""Offline experiment (issue 16): does pooling each member's *own* calibrated posterior, with weights
fitted on dev, beat the best calibrated member on test?

``jobs.calibrate`` gives an ensemble profile one normalisation for every member and weights from dev
accuracy (DeePEn-Adapt). Here each member keeps the normalisation and temperature of its own single
profile (``label_offline.py calibrate``'s ``single-<member>.json``, its prior correction too), and
the pool (linear or log-linear) and the weights (a grid over the simplex in steps of 1/``--steps``, at
least two members with weight) are chosen by dev accuracy (ties: more weight on the best calibrated
member on dev, then the grid's order). The choice is applied to the test split (``--test-split
holdout|holdout2``: bench/tasks.py's further test splits) and compared with the
best calibrated member on dev (``label_offline.py baseline``'s: ``calibrated_dev_accuracy`` of its
single profile), on the same items, with the paired bootstrap of ``bench/eval_label.py``; the dev
accuracies reported are in-sample, with every correction. No model call: the members' scores are their runs' ``member_stats`` (``--choice-norm pmi`` runs hold every
normalisation's inputs).

    python bench/label_stack.py --profiles output/label_eval/profiles/specfuse-trio \\
        --members smollm2 qwen gemma --tasks arc_challenge piqa --out bench/results/label_stack_trio
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import eval_label  # noqa: E402
import label_offline  # noqa: E402

from ensemble.config import POOLS  # noqa: E402
from ensemble.labeling import LabelParams, best, label_posterior  # noqa: E402
from jobs.calibration import accuracy, adapt_weights, choose_gate, choose_pool, gated_picks, pooled  # noqa: E402

log = logging.getLogger("bench.label_stack")

TINY = 1e-300
"""Floor of a posterior before its log (a probability that underflowed to 0)."""


def weight_grid(n: int, steps: int) -> list[tuple[float, ...]]:
    """Weights of ``n`` members on the simplex in steps of ``1 / steps``, at least two members weighted."""
    return [tuple(x / steps for x in w) for w in itertools.product(range(steps + 1), repeat=n)
            if sum(w) == steps and sum(x > 0 for x in w) >= 2]


def choose(posts: Sequence[Sequence[Sequence[float]]], golds: Sequence[int], base: int,
           steps: int) -> tuple[str, tuple[float, ...], float]:
    """(pool, weights, dev accuracy) with the highest accuracy of ``pool(posts[m][row], weights)``'s
    pick on ``golds`` (``posts[member][row]``); ties: more weight on member ``base``, then the earlier
    pool of :data:`POOLS` and the earlier grid point."""
    best_key, chosen = None, None
    for kind in POOLS:
        for w in weight_grid(len(posts), steps):
            acc = accuracy([best(p) for p in pooled(posts, w, kind)], golds)
            key = (acc, w[base])
            if best_key is None or key > best_key:
                best_key, chosen = key, (kind, w, acc)
    return chosen


def member_posts(rows: list[dict], split_dir: Path, system, params: LabelParams) -> list:
    """The posterior under ``params`` of each of ``rows`` from ``system``'s run in ``split_dir``."""
    member, split = system.name, split_dir.name
    got = eval_label.read_outcomes(eval_label.output_dirs(system, [rows[0]["task"]], split_dir), rows)
    if got is None:
        raise ValueError(f"{member} has no complete {split} run on {task}: run bench/eval_label.py first")
    posts = []
    for r in rows:
        o = got[r["id"]]
        s = label_offline.choice_scores((o["stats"] or [{}])[0], r["choices"]) if o["error"] is None else None
        if s is None:
            raise ValueError(f"{member} has no scores for {r['id']} ({split}): the experiment needs every row")
        posts.append(label_posterior(s, params, params.prior(r["choices"], 0)))
    return posts


def adapt_pool(posts: Sequence[Sequence[Sequence[float]]], golds: Sequence[int],
               accuracies: Sequence[float]) -> tuple[str, tuple[float, ...], float]:
    """(pool, weights, dev accuracy) with ``jobs.calibrate``'s weights (DeePEn-Adapt, from each member's
    calibrated dev accuracy) and the pool with the higher dev accuracy (ties: POOLS order): the same
    members' own calibrations without fitting the weights. This is ``jobs.calibration.choose_pool`` at
    temperature 1 only (the posteriors are already each member's calibrated ones; tempering their logs
    at 1 gives them back)."""
    w = tuple(adapt_weights(accuracies))
    logs = [[[math.log(max(q, TINY)) for q in p] for p in member] for member in posts]
    kind, accs, _ = choose_pool(logs, w, golds, grid=(1.0,))
    return kind, w, accs[kind]


def run(task_names: Sequence[str], members: Sequence[str], profiles: Path, work: Path, steps: int,
        test_split: str = "test") -> dict:
    from jobs.profiles import load_profile

    systems = {split: eval_label.registry(work / split, {}) for split in ("dev", test_split)}
    out = {}
    for t in task_names:
        prof = {m: load_profile(profiles / t / f"single-{m}.json") for m in members}
        params = {m: LabelParams(norm=p.choice_norm, temperature=p.temperature, priors=p.priors)
                  for m, p in prof.items()}
        dev_acc = {m: label_offline.calibrated_dev_accuracy(p) for m, p in prof.items()}
        base = max(range(len(members)), key=lambda i: (dev_acc[members[i]], -i))
        split_posts = {}
        for split in ("dev", test_split):
            rows = eval_label.build_rows([t], split, None)
            posts = [member_posts(rows, work / split, systems[split][m], params[m]) for m in members]
            split_posts[split] = (posts, [r["choices"].index(r["gold"]) for r in rows])
        kind, w, acc_dev = choose(*split_posts["dev"], base, steps)
        dev_posts, dev_golds = split_posts["dev"]
        base_dev = accuracy([best(p) for p in dev_posts[base]], dev_golds)
        posts, golds = split_posts[test_split]
        ens = [best(p) == g for p, g in zip(pooled(posts, w, kind), golds)]
        alone = [best(p) == g for p, g in zip(posts[base], golds)]
        d, lo, hi = eval_label.paired_bootstrap(ens, alone)
        a_kind, a_w, a_dev = adapt_pool(dev_posts, dev_golds, [dev_acc[m] for m in members])
        a_ens = [best(p) == g for p, g in zip(pooled(posts, a_w, a_kind), golds)]
        a_d, a_lo, a_hi = eval_label.paired_bootstrap(a_ens, alone)
        # the adapt pool with jobs.calibrate's gate on the best calibrated member, chosen on dev
        g, _, _ = choose_gate(dev_posts[base], [best(p) for p in pooled(dev_posts, a_w, a_kind)], dev_golds)
        g_ens = [x == y for x, y in zip(gated_picks(posts[base], [best(p) for p in pooled(posts, a_w, a_kind)], g),
                                        golds)]
        g_d, g_lo, g_hi = eval_label.paired_bootstrap(g_ens, alone)
        out[t] = {"test_split": test_split, "baseline": f"{members[base]}-cal", "baseline_dev": base_dev, "pool": kind,
                  "weights": dict(zip(members, w)), "dev_accuracy": acc_dev, "test_items": len(golds),
                  "baseline_test": sum(alone) / len(golds), "accuracy": sum(ens) / len(golds),
                  "delta": d, "delta_lo": lo, "delta_hi": hi,
                  "adapt": {"pool": a_kind, "weights": dict(zip(members, a_w)), "dev_accuracy": a_dev,
                            "accuracy": sum(a_ens) / len(golds), "delta": a_d, "delta_lo": a_lo, "delta_hi": a_hi},
                  "adapt_gated": {"gate": g, "accuracy": sum(g_ens) / len(golds), "delta": g_d, "delta_lo": g_lo,
                                  "delta_hi": g_hi},
                  "norms": {m: params[m].norm for m in members},
                  "temperatures": {m: params[m].temperature for m in members},
                  "priors": {m: params[m].priors is not None for m in members}}
        log.info("%s: %s", t, json.dumps(out[t]))
    return out


def markdown(res: dict, members: Sequence[str]) -> str:
    split = next(iter(res.values()), {}).get("test_split", "test")

    def diff(r: dict) -> str:
        return f"{100 * r['delta']:+.1f} [{100 * r['delta_lo']:+.1f}, {100 * r['delta_hi']:+.1f}]"

    lines = [f"| task | best calibrated member (dev) | its {split} % | stacked pool, weights (" + ", ".join(members)
             + f") | dev % (member / stacked) | stacked {split} % | difference [95% CI] | adapt-weight pool, "
             f"weights | dev % | {split} % | difference [95% CI] | with the dev gate: gate, {split} %, difference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, r in res.items():
        w = ", ".join(f"{r['weights'][m]:.1f}" for m in members)
        a = r["adapt"]
        aw = ", ".join(f"{a['weights'][m]:.2f}" for m in members)
        lines.append(f"| {t} | {r['baseline']} | {100 * r['baseline_test']:.1f} | {r['pool']}, {w} | "
                     f"{100 * r['baseline_dev']:.1f} / {100 * r['dev_accuracy']:.1f} | {100 * r['accuracy']:.1f} | "
                     f"{diff(r)} | {a['pool']}, {aw} | {100 * a['dev_accuracy']:.1f} | {100 * a['accuracy']:.1f} | "
                     f"{diff(a)} | {r['adapt_gated']['gate']}, {100 * r['adapt_gated']['accuracy']:.1f}, "
                     f"{diff(r['adapt_gated'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tasks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=Path, required=True, help="label_offline.py calibrate's --out")
    ap.add_argument("--members", nargs="+", required=True, choices=list(label_offline.MEMBER_SPECS))
    ap.add_argument("--tasks", nargs="+", required=True, choices=tasks.LABEL_TASKS)
    ap.add_argument("--work", type=Path, default=REPO / "output" / "label_eval")
    ap.add_argument("--test-split", choices=("test", *tasks.HOLDOUTS), default="test",
                    help="the split the dev choice is applied to (holdout: bench/tasks.py)")
    ap.add_argument("--steps", type=int, default=10, help="weight grid resolution (default 10: steps of 0.1)")
    ap.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(args.tasks, args.members, args.profiles, args.work, args.steps, args.test_split)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(markdown(res, args.members))
    sys.stdout.write(markdown(res, args.members))
    return 0


if __name__ == "__main__":
    sys.exit(main())
