"""Gated DeePEn benchmark (issue 17, points 1 and 5) on the packaged trio (SmolLM2-135M-Instruct,
Qwen2.5-Coder-0.5B-Instruct, Gemma-3-270M; ``--main`` picks the main member, default SmolLM2), CPU,
greedy, 8 prompts x 64 new tokens in one batch (``--batch-size`` smaller batches, run one after
another), all in one run.

For the main member alone (Single), ungated DeePEn (``fuse_below=1``) and each gate asked for
(``--top1`` thresholds, ``--margin`` thresholds): decoding time as a ratio to the main member alone
(target <= 1.5 at the default gate), the share of fused steps (mean over rows), the other members'
calls past the prefill per generated token (summed over them), and how close the text is to ungated DeePEn and to the main member
alone (rows with the same text; mean share of the main member's tokens of the longer output that
are a common prefix). Systems are interleaved within a repeat and the median over ``--repeats`` is
reported; each fuser is built once (anchors) and warmed up untimed on 4 tokens.

    python bench/bench_deepen_gate.py [--prompts 8] [--max-new-tokens 64] [--repeats 1] [--batch-size 8]
                                      [--top1 0.9 0.7 0.5] [--margin 0.5 0.2] [--main MEMBER] [--breakdown]

``--breakdown`` also splits each system's time (the last repeat) into the main member's forwards,
the other members' forwards (prefill and catch-up), DeePEn's fusion (the relative-space step and
search) and the rest (Python around them), each as a ratio to the main member alone; and measures,
per member, what a lazy catch-up forward costs: one forward of k tokens against k one-token
forwards after a 200-token prefill (``Member.feed``, median of 5, k = 1, 2, 4, 8).

Writes bench/results/deepen_gate.json and deepen_gate.md (``--out`` another path) and prints the table. Times are wall-clock
on a shared machine: compare ratios inside one run, never absolute times.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_deepen import PROMPTS, TRIO  # noqa: E402
from ensemble import DecodeParams, Single, load_member  # noqa: E402
from ensemble.fusers.deepen import DeePEn  # noqa: E402

log = logging.getLogger("bench.deepen_gate")
RESULTS = REPO / "bench" / "results"


def timed(fuser, prompts, params, batch_size):
    """Every prompt through ``fuser.generate`` in consecutive batches of ``batch_size``; outputs and
    the total wall time."""
    t0 = time.perf_counter()
    outs = [o for i in range(0, len(prompts), batch_size) for o in fuser.generate(prompts[i:i + batch_size], params)]
    return outs, time.perf_counter() - t0


class Clock:
    """Seconds spent in wrapped methods, per key, while :attr:`on` (instrumentation for --breakdown)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = collections.defaultdict(float)
        self.on = False

    def wrap(self, obj, attr: str, key: str) -> None:
        """Replace ``obj.attr`` (a bound method) by a timed call of it, counted under ``key``."""
        fn = getattr(obj, attr)

        def timed_call(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[key] += time.perf_counter() - t0

        setattr(obj, attr, timed_call)


def catch_up_costs(member, k_values=(1, 2, 4, 8), prefix: int = 200, repeats: int = 5) -> list[dict]:
    """Per k: the median time of one ``feed`` of k tokens and of k one-token feeds after a ``prefix``-token
    prefill (fresh state each time), and their ratio."""
    g = torch.Generator().manual_seed(0)
    hi = min(1000, member.vocab_size)  # ordinary ids, clear of the specials at the start of most vocabularies
    prompt = torch.randint(hi // 10, hi, (prefix,), generator=g).tolist()
    new = torch.randint(hi // 10, hi, (max(k_values),), generator=g).tolist()
    out = []
    for k in k_values:
        one, many = [], []
        for _ in range(repeats):
            st = member.start_ids([prompt])
            t0 = time.perf_counter()
            member.feed(st, [new[:k]])
            one.append(time.perf_counter() - t0)
            st = member.start_ids([prompt])
            t0 = time.perf_counter()
            for tok in new[:k]:
                member.feed(st, [[tok]])
            many.append(time.perf_counter() - t0)
        a, b = statistics.median(one), statistics.median(many)
        out.append({"member": member.name, "k": k, "one_forward_ms": 1000 * a, "k_forwards_ms": 1000 * b, "ratio": a / b})
    return out


def prefix_share(a: list[int], b: list[int]) -> float:
    """Common-prefix length over the longer of two token lists (1 for two empty lists)."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


def summarise(name, outs, times, alone_s, main, ref_ungated, ref_alone):
    """One system's row of the table."""
    toks = [main.encode_text(o.text) for o in outs]
    generated = sum(o.token_count for o in outs)
    others = [sum(s.calls - 1 for s in o.member_stats if s.role != "main") for o in outs]  # past the prefill
    shares = [o.member_stats[0].fused_share for o in outs]  # None for the main member alone
    s = statistics.median(times)
    return {
        "system": name, "time_s": s, "ratio_to_main": s / alone_s,
        "fused_share": None if None in shares else statistics.mean(shares),
        "other_forwards_per_token": sum(others) / max(generated, 1),
        "tokens": generated,
        "same_text_as_ungated": sum(o.text == r.text for o, r in zip(outs, ref_ungated[0])),
        "prefix_share_ungated": statistics.mean(prefix_share(t, r) for t, r in zip(toks, ref_ungated[1])),
        "same_text_as_main": sum(o.text == r.text for o, r in zip(outs, ref_alone[0])),
        "prefix_share_main": statistics.mean(prefix_share(t, r) for t, r in zip(toks, ref_alone[1])),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default: all)")
    ap.add_argument("--top1", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    ap.add_argument("--margin", type=float, nargs="*", default=[0.5, 0.2])
    ap.add_argument("--main", choices=TRIO, default=TRIO[0], help="DeePEn's main member (and the baseline alone)")
    ap.add_argument("--breakdown", action="store_true", help="split the time by component; catch-up forward costs")
    ap.add_argument("--out", default=str(RESULTS / "deepen_gate"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[:args.prompts]
    batch_size = len(prompts) if args.batch_size is None else args.batch_size
    if batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {batch_size}")
    members = [load_member(n) for n in TRIO]
    params = DecodeParams(max_new_tokens=args.max_new_tokens)
    k = TRIO.index(args.main)
    systems = {"main alone": Single(members[k]), "DeePEn ungated": DeePEn(members, main=k)}
    systems |= {f"gated top1 {g}": DeePEn(members, main=k, fuse_below=g) for g in args.top1}
    systems |= {f"gated margin {g}": DeePEn(members, main=k, fuse_below=g, gate_on="margin") for g in args.margin}
    for f in systems.values():  # warm-up, untimed
        f.generate(prompts[:2], DecodeParams(max_new_tokens=4))
    clock = Clock()
    if args.breakdown:
        for i, m in enumerate(members):
            clock.wrap(m, "feed", "main forwards" if i == k else "other forwards")
        for f in systems.values():
            if isinstance(f, DeePEn):
                clock.wrap(f.engine, "fuse", "fusion")
    times: dict[str, list[float]] = {k: [] for k in systems}
    parts: dict[str, dict[str, float]] = {}
    outs: dict[str, list] = {}
    for rep in range(args.repeats):
        for name, f in systems.items():
            clock.acc.clear()
            clock.on = args.breakdown
            outs[name], t = timed(f, prompts, params, batch_size)
            clock.on = False
            times[name].append(t)
            parts[name] = {**clock.acc, "total": t}
            log.info("repeat %d: %s %.1f s", rep, name, t)
    alone_s = statistics.median(times["main alone"])
    main = members[k]

    def ref(name):
        return outs[name], [main.encode_text(o.text) for o in outs[name]]

    rows = [summarise(n, outs[n], times[n], alone_s, main, ref("DeePEn ungated"), ref("main alone")) for n in systems]
    result = {"members": TRIO, "main": args.main, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "batch_size": batch_size, "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "systems": rows}
    if args.breakdown:
        base = parts["main alone"]["total"]
        result["breakdown"] = {n: {key: v / base for key, v in p.items()} | {
            "rest": (p["total"] - sum(v for key, v in p.items() if key != "total")) / base} for n, p in parts.items()}
        result["catch_up_costs"] = [c for m in members for c in catch_up_costs(m)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = [f"# Gated DeePEn: {', '.join(TRIO)} (main: {args.main})", "",
          f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, batches of {batch_size}, greedy, CPU ({torch.get_num_threads()} torch "
          f"threads), median of {args.repeats} repeat(s). Ratio: time / the main member alone; other forwards: the "
          f"other members' calls past the prefill, summed over them, per generated token (row by row); same "
          f"text: rows of {len(prompts)}.", "",
          "| system | time s | ratio to main | fused share | other forwards / token | same text as ungated "
          "| prefix share ungated | same text as main | prefix share main |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "-" if r["fused_share"] is None else f"{r['fused_share']:.3f}"
        md.append(f"| {r['system']} | {r['time_s']:.1f} | {r['ratio_to_main']:.2f} | {share} | "
                  f"{r['other_forwards_per_token']:.2f} | {r['same_text_as_ungated']} | {r['prefix_share_ungated']:.2f} | "
                  f"{r['same_text_as_main']} | {r['prefix_share_main']:.2f} |")
    if args.breakdown:
        keys = ("main forwards", "other forwards", "fusion", "rest", "total")
        md += ["", "Time by component (last repeat), as a ratio to the main member alone's total:", "",
               "| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        md += [f"| {n} | " + " | ".join(f"{b.get(key, 0.0):.2f}" for key in keys) + " |"
               for n, b in result["breakdown"].items()]
        md += ["", "A lazy catch-up forward: one forward of k tokens vs k one-token forwards (median of 5, "
               "after a 200-token prefill):", "", "| member | k | one forward ms | k forwards ms | ratio |",
               "|---|---|---|---|---|"]
        md += [f"| {c['member']} | {c['k']} | {c['one_forward_ms']:.1f} | {c['k_forwards_ms']:.1f} | {c['ratio']:.2f} |"
               for c in result["catch_up_costs"]]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
