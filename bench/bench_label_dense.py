"""DeePEn labeling, sparse against the exact dense computation on a vocabulary slice, on the packaged
members (SmolLM2-135M-Instruct main, Gemma-3-270M) and dev items of ARC-Challenge and PIQA
(``bench/tasks.py``, dev split only).

At every teacher-forced step of ``DeePEn.label`` the fuser's engine is replaced by a probe that, per
member, restricts the logits to a slice (the union over the step's rows of their top ``--slice-top``
tokens, plus the forced tokens for the main member) and fuses them twice: the sparse step (the
fuser's own engine on the restricted logits) and the exact dense step (full softmax over the slice,
dense float32 rows, inverse search over the main member's whole slice). Both forced-token
log-probabilities (``FuseResult.forced_logprobs``, normalised over the slice) are logged; the probe
returns one of the two results to the fuser, so a run with each gives the sparse and the dense labels
for the same teacher-forced inputs (the forced tokens, hence every member's inputs, do not depend on
the search). Reported: chosen-label agreement (target >= 99%), forced-token log-probability
differences, accuracy of each. With ``--ab``: the plain fuser (no slices) with the search's KL
reduced by its mean (the reference) and by its sum, accuracy on the same dev items.

    python bench/bench_label_dense.py [--per-task 50] [--slice-top 64] [--max-batch-tokens 8192] [--ab]

Writes bench/results/label_dense.json and label_dense.md. Heavy: run it under ``flock /tmp/heavy.lock``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.tasks import load_split  # noqa: E402
from ensemble import load_member  # noqa: E402
from ensemble.config import DeePEnConfig  # noqa: E402
from ensemble.fusers.deepen import DeePEn  # noqa: E402
from ensemble.relative import FuseResult, aggregate, inverse_search, mix  # noqa: E402

log = logging.getLogger("bench.label_dense")
MEMBERS = ["smollm2-135m-instruct", "gemma3-270m"]
TASKS = ("arc_challenge", "piqa")
RESULTS = REPO / "bench" / "results"


class SliceProbe:
    """Stands in for a fuser's ``RelativeEnsemble`` (only ``fuse`` with ``extra`` is used by label):
    sparse and exact dense on the same vocabulary slice, both forced log-probs logged, one returned."""

    def __init__(self, engine, slice_top: int, give: str):
        self.engine, self.slice_top, self.give = engine, slice_top, give
        self.records: list[dict] = []

    def __getattr__(self, name):  # counters and settings the fuser may read
        return getattr(self.engine, name)

    @torch.no_grad()
    def fuse(self, logits, extra=None, greedy_rows=None) -> FuseResult:
        if extra is None:
            raise ValueError("the probe serves label's teacher-forced steps only (extra is required)")
        eng, main = self.engine, self.engine.main
        logits = [lg.float() for lg in logits]
        slices, restricted = [], []
        for i, lg in enumerate(logits):
            parts = [lg.topk(min(self.slice_top, lg.shape[-1]), dim=-1).indices.flatten()]
            if i == main:
                parts.append(extra.to(lg.device))
            s = torch.unique(torch.cat(parts))  # (n_i,)
            r = torch.full_like(lg, float("-inf"))
            r[:, s] = lg[:, s]
            slices.append(s)
            restricted.append(r)
        sparse = eng.fuse(restricted, extra=extra)
        qs = [mix(torch.softmax(lg[:, s], -1), eng.sources[i].compute(s)) for i, (lg, s) in enumerate(zip(logits, slices))]
        q = aggregate(qs, eng.weights, main)
        z0 = logits[main][:, slices[main]]  # (B, n)
        z = inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), eng.sources[main].compute(slices[main]), q, eng.search)
        dense = FuseResult(cand=slices[main].expand(z.shape[0], -1), valid=torch.ones_like(z, dtype=torch.bool),
                           z=z, q_members=qs, q=q)
        k = sparse.cand.shape[1]
        at = ((sparse.cand == extra[:, None]) & sparse.valid[:, :k]).to(torch.int8).argmax(-1, keepdim=True)
        mass = [torch.softmax(lg, -1)[:, s].sum(-1) for lg, s in zip(logits, slices)]
        self.records.append({
            "sparse": sparse.forced_logprobs(extra).tolist(),
            "sparse_tail": sparse.logprobs().gather(1, at)[:, 0].tolist(),  # normalised with the searched tail
            "dense": dense.forced_logprobs(extra).tolist(),
            "own": torch.log_softmax(restricted[main], -1).gather(1, extra[:, None])[:, 0].tolist(),
            "slice_sizes": [int(s.numel()) for s in slices],
            "slice_mass_min": [float(m.min()) for m in mass]})
        return sparse if self.give == "sparse" else dense


def _label(members, cfg, items, max_batch_tokens, probe=None):
    fuser = DeePEn.from_config(members, cfg, max_batch_tokens=max_batch_tokens)
    if probe is not None:
        probe.engine = fuser.engine
        fuser.engine = probe
    t = time.perf_counter()
    outs = fuser.label([it["prompt"] for it in items], [it["choices"] for it in items])
    return outs, time.perf_counter() - t


def _accuracy(items, outs) -> float:
    return sum(o.label == it["gold"] for it, o in zip(items, outs)) / len(items)


def _diffs(records, a: str, b: str) -> dict:
    d = sorted(abs(x - y) for r in records for x, y in zip(r[a], r[b]))
    return {"n": len(d), "mean": statistics.fmean(d), "p99": d[int(0.99 * (len(d) - 1))], "max": d[-1],
            "within_0.01": sum(x <= 0.01 for x in d) / len(d), "within_0.1": sum(x <= 0.1 for x in d) / len(d)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-task", type=int, default=50)
    ap.add_argument("--slice-top", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--ab", action="store_true", help="also mean vs sum reduction, plain fuser, dev accuracy")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    items = [dict(it, task=task) for task in TASKS for it in load_split(task, "dev", args.per_task)]
    members = [load_member(m) for m in MEMBERS]
    cfg = DeePEnConfig()  # defaults: the reference's mean reduction
    res: dict = {"members": MEMBERS, "items": {t: sum(it["task"] == t for it in items) for t in TASKS},
                 "split": "dev", "slice_top": args.slice_top, "config": {k: str(v) for k, v in vars(cfg).items()}}
    runs = {}
    for give in ("sparse", "dense"):
        probe = SliceProbe(None, args.slice_top, give)
        outs, secs = _label(members, cfg, items, args.max_batch_tokens, probe)
        runs[give] = (outs, probe.records, secs)
        log.info("%s run: %.0f s, %d steps", give, secs, len(probe.records))
    (so, recs, _), (do, drecs, _) = runs["sparse"], runs["dense"]
    same = [a.index == b.index for a, b in zip(so, do)]
    res["label_agreement"] = sum(same) / len(same)
    res["label_disagreements"] = [{"task": it["task"], "id": it["id"], "sparse": a.probs, "dense": b.probs}
                                  for it, a, b, s in zip(items, so, do, same) if not s]
    res["prob_max_abs_diff"] = max(abs(x - y) for a, b in zip(so, do) for x, y in zip(a.probs, b.probs))
    res["forced_logprob_sparse_vs_dense"] = _diffs(recs, "sparse", "dense")
    res["forced_logprob_sparse_tail_vs_dense"] = _diffs(recs, "sparse_tail", "dense")
    res["forced_logprob_main_alone_vs_dense"] = _diffs(recs, "own", "dense")
    res["logged_steps_identical_across_runs"] = [r["dense"] for r in recs] == [r["dense"] for r in drecs]
    res["slice_size_median"] = [statistics.median(r["slice_sizes"][i] for r in recs) for i in range(len(MEMBERS))]
    res["slice_mass_min"] = [min(r["slice_mass_min"][i] for r in recs) for i in range(len(MEMBERS))]
    res["accuracy_slice"] = {"sparse": _accuracy(items, so), "dense": _accuracy(items, do)}
    res["seconds_slice_runs"] = {g: runs[g][2] for g in runs}
    if args.ab:
        res["ab"] = {}
        for red in ("mean", "sum"):
            outs, secs = _label(members, DeePEnConfig(kl_reduction=red), items, args.max_batch_tokens)
            res["ab"][red] = {"accuracy": _accuracy(items, outs), "seconds": secs,
                              **{t: _accuracy([i for i in items if i["task"] == t], [o for i, o in zip(items, outs) if i["task"] == t])
                                 for t in TASKS}}
            log.info("plain fuser, %s reduction: accuracy %.3f (%.0f s)", red, res["ab"][red]["accuracy"], secs)
    res["seconds_total"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "label_dense.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "label_dense.md").write_text(_table(res))
    print(_table(res))
    return 0


def _table(res: dict) -> str:
    f, t = res["forced_logprob_sparse_vs_dense"], res["forced_logprob_sparse_tail_vs_dense"]
    o = res["forced_logprob_main_alone_vs_dense"]
    n = sum(res["items"].values())
    lines = [
        "# DeePEn labeling: sparse vs exact dense on a vocabulary slice",
        "",
        f"Members {', '.join(res['members'])} (main first); {n} dev items ({res['items']}); per step each member's "
        f"slice is the union of its rows' top {res['slice_top']} tokens (+ the forced tokens for the main member), "
        f"median sizes {res['slice_size_median']}, least mass held {[round(m, 4) for m in res['slice_mass_min']]}. "
        "Config: DeePEnConfig defaults. `python bench/bench_label_dense.py" + (" --ab" if "ab" in res else "") + "`.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| chosen-label agreement, sparse vs dense | {res['label_agreement']:.1%} of {n} | >= 99% |",
        f"| largest choice-probability difference | {res['prob_max_abs_diff']:.4f} | |",
        f"| forced-token log-prob \\|sparse - dense\\|: mean / p99 / max ({f['n']} tokens) | "
        f"{f['mean']:.4f} / {f['p99']:.4f} / {f['max']:.4f} | |",
        f"| ... within 0.01 / 0.1 | {f['within_0.01']:.1%} / {f['within_0.1']:.1%} | |",
        f"| same, sparse normalised with the searched tail instead of `rest`: mean / p99 / max | "
        f"{t['mean']:.4f} / {t['p99']:.4f} / {t['max']:.4f} | |",
        f"| main member alone vs dense fused: mean / p99 / max (how far the search moves) | "
        f"{o['mean']:.4f} / {o['p99']:.4f} / {o['max']:.4f} | |",
        f"| accuracy on the slice, sparse / dense | {res['accuracy_slice']['sparse']:.3f} / {res['accuracy_slice']['dense']:.3f} | |",
    ]
    if "ab" in res:
        ab = res["ab"]
        lines += ["", "Search KL reduction A/B (plain fuser, full vocabularies, same dev items):", "",
                  "| reduction | accuracy | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
        for red in ("mean", "sum"):
            lines.append(f"| {red} | {ab[red]['accuracy']:.3f} | " + " | ".join(f"{ab[red][t]:.3f}" for t in TASKS) + " |")
    lines += ["", f"Total time {res['seconds_total']:.0f} s (shared CPU machine)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
