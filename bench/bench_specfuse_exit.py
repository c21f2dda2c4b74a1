"""SpecFuse model exit at the defaults (rule 'rank', docs/algorithms.md) vs exit off, on the packaged
trio (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct, Gemma-3-270M), CPU, greedy, one batch.

Measures, on the first N GSM8K test prompts (the prompts of bench/bench_specfuse.py): the share of
rows where some member exits (and each member's exit rate, mean exit round, win share), member calls
per round with exit on and off and their ratio (issue 17 target <= 0.6), members active per round,
whether the texts differ, and the wall-time ratio. GSM8K exact match is reported but carries no
signal here (every member scores ~0 on it); quality needs the evaluation of docs/results.md.

    python bench/bench_specfuse_exit.py [--prompts 8] [--max-new-tokens 96] [--exit-rule rank]
                                        [--no-self-score]

Writes bench/results/specfuse_exit.json and .md. Times are wall-clock on a shared machine: compare
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_specfuse import STOP, TRIO, exact_match, gsm8k  # noqa: E402
from ensemble import DecodeParams, load_member  # noqa: E402
from ensemble.config import EXIT_RULES  # noqa: E402
from ensemble.fusers.specfuse import SpecFuse  # noqa: E402

log = logging.getLogger("bench.specfuse_exit")
RESULTS = REPO / "bench" / "results"


def run(members, rows: list[dict], max_new: int, **config) -> dict:
    """One SpecFuse pass over ``rows`` as one batch; counts from the per-row member statistics."""
    fuser = SpecFuse(members, **config)
    t0 = time.perf_counter()
    outs = fuser.generate([r["prompt"] for r in rows], DecodeParams(max_new_tokens=max_new, stop=STOP))
    wall = time.perf_counter() - t0
    log.info("%s: %d rows, %.0f s", config, len(outs), wall)
    rounds = sum(max(s.rounds_active for s in o.member_stats) for o in outs)
    per_member = {}
    for k, m in enumerate(members):
        st = [o.member_stats[k] for o in outs]
        exits = [s.exit_round for s in st if s.exit_round is not None]
        per_member[m.name] = {
            "exit_rate": len(exits) / len(st), "mean_exit_round": statistics.mean(exits) if exits else None,
            "win_share": sum(s.accepted for s in st) / rounds, "calls": sum(s.calls for s in st),
        }
    return {
        "config": config, "rows": len(outs), "rounds": rounds, "wall_s": wall,
        "rows_with_exit": sum(any(s.exit_round is not None for s in o.member_stats) for o in outs) / len(outs),
        "members_per_round": sum(s.rounds_active for o in outs for s in o.member_stats) / rounds,
        "member_calls_per_round": sum(s.calls for o in outs for s in o.member_stats) / rounds,
        "tokens_out": sum(o.token_count for o in outs),
        "exact_match": sum(exact_match(o.text, r["answer"]) for o, r in zip(outs, rows)) / len(rows),
        "per_member": per_member, "texts": [o.text for o in outs],
        "exit_rounds": [[s.exit_round for s in o.member_stats] for o in outs],
    }


def markdown(res: dict) -> str:
    on, off = res["on"], res["off"]
    lines = [f"# SpecFuse model exit, rule '{on['config']['exit_rule']}' (defaults) vs off",
             "", f"Command: `{res['command']}`. {res['prompts']} GSM8K test prompts, {res['max_new_tokens']} new "
             f"tokens, one batch, greedy, members {', '.join(res['members'])}, {res['threads']} threads. {res['note']}",
             "", "| | exit off | exit on |", "|---|---|---|"]
    for key, fmt in (("rounds", "{}"), ("rows_with_exit", "{:.2f}"), ("members_per_round", "{:.2f}"),
                     ("member_calls_per_round", "{:.2f}"), ("tokens_out", "{}"), ("exact_match", "{:.3f}"),
                     ("wall_s", "{:.0f}")):
        lines.append(f"| {key} | {fmt.format(off[key])} | {fmt.format(on[key])} |")
    lines += ["", f"- member calls per round, exit on / exit off: **{res['calls_ratio']:.3f}** (target <= 0.6)",
              f"- rows where a member exits: **{on['rows_with_exit']:.2f}** (target >= 0.5)",
              f"- same text as exit off: {res['same_text']:.2f} of rows; wall on / off {res['wall_ratio']:.3f}",
              "", "| member | exit rate | mean exit round | win share (on) | win share (off) |", "|---|---|---|---|---|"]
    for name, s in on["per_member"].items():
        mer = f"{s['mean_exit_round']:.2f}" if s["mean_exit_round"] is not None else "-"
        lines.append(f"| {name} | {s['exit_rate']:.2f} | {mer} | {s['win_share']:.2f} | "
                     f"{off['per_member'][name]['win_share']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--exit-rule", choices=EXIT_RULES, default="rank")
    ap.add_argument("--self-score", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=RESULTS / "specfuse_exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    members = [load_member(n) for n in TRIO]
    tables = [(m.codec, m.vocab_fingerprint) for m in members]  # built before anything is timed
    log.info("loaded %d members (%d tokenizer tables)", len(members), len(tables))
    rows = gsm8k(args.prompts)
    common = {"segment_tokens": 10, "self_score": args.self_score}
    off = run(members, rows, args.max_new_tokens, exit=False, **common)
    on = run(members, rows, args.max_new_tokens, exit=True, exit_rule=args.exit_rule, **common)
    res = {"command": "python bench/bench_specfuse_exit.py " + " ".join(sys.argv[1:]), "members": TRIO,
           "prompts": len(rows), "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
           "note": "Shared 2-core machine: absolute times are noisy, ratios come from one run.",
           "off": off, "on": on, "calls_ratio": on["member_calls_per_round"] / off["member_calls_per_round"],
           "same_text": sum(a == b for a, b in zip(off["texts"], on["texts"])) / len(rows),
           "wall_ratio": on["wall_s"] / off["wall_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", markdown(res))):
        args.out.with_suffix(suffix).write_text(text)
    print(res["calls_ratio"], res["on"]["rows_with_exit"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
