"""SpecFuse KV reuse and compaction (issue 17, point 3; docs/algorithms.md) on the packaged trio
(SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct, Gemma-3-270M), CPU, greedy, one batch.

The same prompts (the first N GSM8K test prompts of bench/bench_specfuse.py) run with the old rounds
(kv_reuse and kv_compact off: per-candidate cache copies to verify, the winner re-fed, dead slots
kept) and the new ones (both on), alternately in one process, ``--repeats`` times each (and, with
``--ablate``, each change alone once). Per run: forward passes per member-round (model pre-hooks
over propose calls), member calls per round (from the per-row statistics), tokens fed per round,
key columns attended per forward (the cache width a forward sees), time per round (wall time of
each loop iteration over the batch); medians over the repeats and the ratios new / old. Texts must
be identical (greedy).

    python bench/bench_specfuse_cache.py [--prompts 8] [--max-new-tokens 64] [--repeats 2] [--ablate]
                                         [--no-exit]

Writes bench/results/specfuse_cache.json and .md. Times are wall-clock on a shared machine: compare
ratios inside one run only.
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

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from bench_specfuse import RESULTS, STOP, TRIO, gsm8k  # noqa: E402
from ensemble import DecodeParams, load_member  # noqa: E402
from ensemble.fusers.specfuse import SpecFuse  # noqa: E402

log = logging.getLogger("bench.specfuse_cache")
OLD = {"kv_reuse": False, "kv_compact": False}
NEW = {"kv_reuse": True, "kv_compact": True}
METRICS = [("forwards_per_member_round", "forward passes per member-round"),
           ("member_calls_per_round", "member calls per round"),
           ("tokens_in_per_round", "tokens fed per round (all members)"),
           ("columns_per_forward", "key columns attended per forward"),
           ("round_s", "time per round (s, median iteration)"),
           ("wall_s", "wall time (s)")]


def _width(kwargs: dict) -> int:
    """Key columns a forward attends over, from its attention mask (2-D, 4-D, or a dict of 4-D)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):
        mask = next(iter(mask.values()))
    return 0 if mask is None else int(mask.shape[-1])


class Probe:
    """Counts one fuser's forwards (and their key widths) per member, propose calls per member, and
    times each iteration of its round loop (an iteration starts at the first propose call of a round)."""

    def __init__(self, fuser: SpecFuse):
        n = len(fuser.members)
        self.forwards, self.columns, self.member_rounds = [0] * n, [0] * n, [0] * n
        self.starts: list[float] = []
        self._last = n
        propose = fuser._propose

        def counted(i, state, rows):
            if i <= self._last:
                self.starts.append(time.perf_counter())
            self._last = i
            self.member_rounds[i] += 1
            return propose(i, state, rows)

        fuser._propose = counted
        self.hooks = [m.model.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                      for i, m in enumerate(fuser.members)]

    def _hook(self, i: int):
        def count(module, args, kwargs):
            self.forwards[i] += 1
            self.columns[i] += _width(kwargs)
        return count

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def run(members, prompts: list[str], params: DecodeParams, settings: dict, exit_on: bool) -> dict:
    fuser = SpecFuse(members, exit=exit_on, **settings)
    probe = Probe(fuser)
    t0 = time.perf_counter()
    try:
        outs = fuser.generate(prompts, params)
    finally:
        probe.close()
    wall = time.perf_counter() - t0
    rounds = sum(max(s.rounds_active for s in o.member_stats) for o in outs)
    laps = [b - a for a, b in zip(probe.starts, probe.starts[1:] + [t0 + wall])]
    res = {
        "settings": settings, "wall_s": wall, "iterations": len(probe.starts), "rounds": rounds,
        "member_rounds": probe.member_rounds, "forwards": probe.forwards,
        "forwards_per_member_round": sum(probe.forwards) / sum(probe.member_rounds),
        "forwards_per_member_round_by_member": {m.name: f / r for m, f, r in zip(members, probe.forwards, probe.member_rounds)},
        "member_calls_per_round": sum(s.calls for o in outs for s in o.member_stats) / rounds,
        "tokens_in_per_round": sum(s.tokens_in for o in outs for s in o.member_stats) / rounds,
        "columns_per_forward": sum(probe.columns) / sum(probe.forwards),
        "round_s": statistics.median(laps),
        "texts": [o.text for o in outs], "token_counts": [o.token_count for o in outs],
    }
    log.info("%s: %.0f s, %d iterations, %.2f forwards per member-round, %.2f s per round", settings, wall,
             len(laps), res["forwards_per_member_round"], res["round_s"])
    return res


def summary(runs: list[dict]) -> dict:
    keys = [k for k, _ in METRICS]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def markdown(res: dict) -> str:
    old, new = res["old"], res["new"]
    lines = ["# SpecFuse: KV reuse and compaction", "",
             f"Members: {', '.join(res['members'])}. {res['prompts']} GSM8K test prompts in one batch, "
             f"max_new_tokens={res['max_new_tokens']}, greedy, segment_tokens=10, exit {'on (defaults)' if res['exit'] else 'off'}, "
             f"CPU fp32, torch threads={res['threads']}. Old: kv_reuse and kv_compact off; new: both on; "
             f"alternately in one process, {res['repeats']} runs each, medians. {res['note']}", "",
             "| | old | new | new / old |", "|---|---|---|---|"]
    for key, label in METRICS:
        lines.append(f"| {label} | {old[key]:.3f} | {new[key]:.3f} | {new[key] / old[key]:.2f}x |")
    lines += ["", "Forward passes per member-round, by member (first runs):", "",
              "| member | old | new |", "|---|---|---|"]
    for name in res["members"]:
        lines.append(f"| {name} | {res['runs']['old'][0]['forwards_per_member_round_by_member'][name]:.2f} | "
                     f"{res['runs']['new'][0]['forwards_per_member_round_by_member'][name]:.2f} |")
    lines += ["", f"Identical texts (every run against the first old run): {res['same_text']:.0%} of rows."]
    if res.get("ablation"):
        lines += ["", "Each change alone (one run each):", "", "| | " + " | ".join(k for k, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for name, r in res["ablation"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ablate", action="store_true", help="also run each change alone once")
    ap.add_argument("--no-exit", dest="exit", action="store_false", help="model exit off (default: on, the library's defaults)")
    ap.add_argument("--out", type=Path, default=RESULTS / "specfuse_cache")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    members = [load_member(n) for n in TRIO]
    prompts = [r["prompt"] for r in gsm8k(args.prompts)]
    params = DecodeParams(max_new_tokens=args.max_new_tokens, stop=STOP)
    for settings in (OLD, NEW):  # warm-up: tokenizer tables, first-call allocations
        SpecFuse(members, **settings).generate(prompts[:2], DecodeParams(max_new_tokens=8))
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        runs["old"].append(run(members, prompts, params, OLD, args.exit))
        runs["new"].append(run(members, prompts, params, NEW, args.exit))
    ablation = {}
    if args.ablate:
        for name, settings in (("reuse only", {"kv_reuse": True, "kv_compact": False}),
                               ("compaction only", {"kv_reuse": False, "kv_compact": True})):
            r = run(members, prompts, params, settings, args.exit)
            runs.setdefault(name, []).append(r)
            ablation[name] = summary([r])
    ref = runs["old"][0]["texts"]
    rows = [r["texts"] for rs in runs.values() for r in rs]
    res = {"members": TRIO, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "exit": args.exit,
           "repeats": args.repeats, "threads": torch.get_num_threads(),
           "note": "Shared 2-core machine: absolute times are noisy, ratios come from one run.",
           "old": summary(runs["old"]), "new": summary(runs["new"]), "ablation": ablation,
           "same_text": sum(t == a for texts in rows for t, a in zip(texts, ref)) / (len(rows) * len(ref)),
           "runs": runs}
    res["ratios"] = {k: res["new"][k] / res["old"][k] for k, _ in METRICS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", markdown(res))):
        args.out.with_suffix(suffix).write_text(text)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
