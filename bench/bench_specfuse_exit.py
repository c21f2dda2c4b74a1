"""SpecFuse model exit rules (docs/algorithms.md) vs exit off, on the packaged trio (SmolLM2-135M-Instruct,
Qwen2.5-Coder-0.5B-Instruct, Gemma-3-270M), CPU, greedy, one batch per prompt set.

Measures, on the first N GSM8K test prompts (the prompts of bench/bench_specfuse.py, 96 new tokens)
and optionally on the first M HaluEval-QA dev prompts (bench/tasks.py, passage in the prompt, 48 new
tokens), for exit off and each rule in ``--exit-rules`` at its defaults: the share of rows where some
member exits (and each member's exit rate, mean exit round, win share), member calls per round and
its ratio to exit off (issue 17 target <= 0.6), members active per round, the share of rows whose
text equals exit off's, and quality (GSM8K exact match, which carries little signal for these
members; QA exact match and token F1). ``--self-score-ablation`` adds exit off and the first rule
with ``self_score`` off (each candidate ranked by the other members only), compared with the same
settings with self-scores. ``--alone MEMBER`` runs that member alone (``Single``, the same rows as one
batch) before and after the SpecFuse runs and reports each SpecFuse run's time per generated token
and time per row as a ratio to it (the mean of its two runs; issue 17 point 5: target <= 3 per
token with exit on, at batch 8). Tokens are each system's own: SpecFuse counts its first member's
tokenisation of the response, a member alone its own.

    python bench/bench_specfuse_exit.py [--prompts 8] [--qa 16] [--exit-rules lead rank]
                                        [--self-score-ablation] [--alone qwen2.5-coder-0.5b-instruct]

Writes bench/results/specfuse_exit.json and .md, with the code version (``eval_label.git_head``) and
each exit run's settings (``exit_settings``: rule, window, the resolved level, first round).
Times are wall-clock on a shared machine: compare
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

import eval_label  # noqa: E402  (git_head: the code version a run was made with)
import tasks  # noqa: E402
from bench_specfuse import STOP, TRIO, exact_match, gsm8k  # noqa: E402
from ensemble import DecodeParams, load_member  # noqa: E402
from ensemble.config import EXIT_RULES, SpecFuseConfig  # noqa: E402
from ensemble.fusers.single import Single  # noqa: E402
from ensemble.fusers.specfuse import SpecFuse  # noqa: E402

log = logging.getLogger("bench.specfuse_exit")
RESULTS = REPO / "bench" / "results"


QA_STOP = ("\nPassage:", "\nQuestion:")


def prompt_sets(n_gsm8k: int, n_qa: int) -> dict[str, tuple[list[dict], DecodeParams]]:
    """The prompt sets: GSM8K test (``answer``) and HaluEval-QA dev (``gold``), with their decoding."""
    sets = {"gsm8k": (gsm8k(n_gsm8k), DecodeParams(max_new_tokens=96, stop=STOP))}
    if n_qa:
        sets["halueval_qa"] = (tasks.load_split("halueval_qa", "dev", n_qa), DecodeParams(max_new_tokens=48, stop=QA_STOP))
    return sets


def quality(text: str, row: dict) -> dict:
    """GSM8K: exact match of the final number; QA: SQuAD exact match and token F1 of the first line."""
    if "answer" in row:
        return {"exact_match": float(exact_match(text, row["answer"]))}
    em, f1 = tasks.qa_scores(text, row["gold"])
    return {"exact_match": em, "f1": f1}


def run(members, rows: list[dict], params: DecodeParams, **config) -> dict:
    """One SpecFuse pass over ``rows`` as one batch; counts from the per-row member statistics."""
    fuser = SpecFuse(members, **config)
    t0 = time.perf_counter()
    outs = fuser.generate([r["prompt"] for r in rows], params)
    wall = time.perf_counter() - t0
    log.info("%s: %d rows, %.0f s", config, len(outs), wall)
    rounds = sum(max(s.rounds_active for s in o.member_stats) for o in outs)
    scores = [quality(o.text, r) for o, r in zip(outs, rows)]
    per_member = {}
    for k, m in enumerate(members):
        st = [o.member_stats[k] for o in outs]
        exits = [s.exit_round for s in st if s.exit_round is not None]
        per_member[m.name] = {
            "exit_rate": len(exits) / len(st), "mean_exit_round": statistics.mean(exits) if exits else None,
            "win_share": sum(s.accepted for s in st) / rounds, "calls": sum(s.calls for s in st),
        }
    cfg = fuser.config
    settings = ({"exit_rule": cfg.exit_rule, "exit_window": cfg.exit_window, "exit_alpha": cfg.exit_level,
                 "exit_min_rounds": cfg.exit_min_rounds} if cfg.exit else None)  # exit_alpha resolved
    return {
        "config": config, "exit_settings": settings, "rows": len(outs), "rounds": rounds, "wall_s": wall,
        "rows_with_exit": sum(any(s.exit_round is not None for s in o.member_stats) for o in outs) / len(outs),
        "members_per_round": sum(s.rounds_active for o in outs for s in o.member_stats) / rounds,
        "member_calls_per_round": sum(s.calls for o in outs for s in o.member_stats) / rounds,
        "tokens_out": sum(o.token_count for o in outs),
        **{k: statistics.mean(q[k] for q in scores) for k in scores[0]},
        "per_member": per_member, "texts": [o.text for o in outs],
        "exit_rounds": [[s.exit_round for s in o.member_stats] for o in outs],
    }


def run_alone(member, rows: list[dict], params: DecodeParams) -> dict:
    """``member`` alone over ``rows`` as one batch (``Single``): wall time, tokens and quality."""
    t0 = time.perf_counter()
    outs = Single(member).generate([r["prompt"] for r in rows], params)
    wall = time.perf_counter() - t0
    log.info("%s alone: %d rows, %.0f s", member.name, len(outs), wall)
    scores = [quality(o.text, r) for o, r in zip(outs, rows)]
    return {"rows": len(outs), "wall_s": wall, "tokens_out": sum(o.token_count for o in outs),
            **{k: statistics.mean(q[k] for q in scores) for k in scores[0]}, "texts": [o.text for o in outs]}


def alone_ratios(run_: dict, alone: dict) -> dict:
    """A SpecFuse run's time per generated token and per row as ratios to a member alone's (its runs'
    mean wall time and tokens)."""
    per_token = (run_["wall_s"] / run_["tokens_out"]) / (alone["wall_s"] / alone["tokens_out"])
    return {"time_per_token_vs_alone": per_token, "time_vs_alone": run_["wall_s"] / alone["wall_s"]}


def mean_runs(runs: list[dict]) -> dict:
    """The mean wall time and tokens of repeated runs of one system (their texts are the first run's)."""
    return {**runs[0], "wall_s": statistics.mean(r["wall_s"] for r in runs),
            "tokens_out": statistics.mean(r["tokens_out"] for r in runs), "walls": [r["wall_s"] for r in runs]}


def compare(on: dict, off: dict) -> dict:
    """Exit on vs exit off on the same prompts: calls ratio, same-text share, wall ratio."""
    return {"calls_ratio": on["member_calls_per_round"] / off["member_calls_per_round"],
            "same_text": sum(a == b for a, b in zip(off["texts"], on["texts"])) / len(off["texts"]),
            "wall_ratio": on["wall_s"] / off["wall_s"]}


ROWS = (("rounds", "{}"), ("rows_with_exit", "{:.2f}"), ("members_per_round", "{:.2f}"),
        ("member_calls_per_round", "{:.2f}"), ("calls_ratio", "**{:.3f}**"), ("same_text", "{:.2f}"),
        ("exact_match", "{:.3f}"), ("f1", "{:.3f}"), ("tokens_out", "{:.0f}"), ("wall_s", "{:.0f}"),
        ("time_per_token_vs_alone", "**{:.2f}**"), ("time_vs_alone", "{:.2f}"))


def markdown(res: dict) -> str:
    lines = ["# SpecFuse model exit: rules at their defaults vs exit off", "",
             f"Command: `{res['command']}`. Code: {res.get('code', 'not recorded')}. Greedy, one batch per prompt set, members {', '.join(res['members'])}, "
             f"{res['threads']} threads. {res['note']} calls_ratio and same_text compare each run with the "
             "exit-off run of the same self-score setting.", ""]
    for name, part in res["sets"].items():
        runs = part["runs"]
        lines += [f"## {name}: {part['prompts']} prompts, {part['max_new_tokens']} new tokens", "",
                  "| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        for key, fmt in ROWS:
            cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for r in runs.values()]
            if any(c != "-" for c in cells):
                lines.append(f"| {key} | " + " | ".join(cells) + " |")
        for label, r in runs.items():
            if "per_member" not in r:
                continue
            lines.append(f"| {label}: exit rate / mean exit round / win share | " + "; ".join(
                f"{m} {s['exit_rate']:.2f} / {s['mean_exit_round'] or 0:.1f} / {s['win_share']:.2f}"
                for m, s in r["per_member"].items()) + " |" + " |" * (len(runs) - 1))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="GSM8K test prompts (96 new tokens)")
    ap.add_argument("--qa", type=int, default=0, help="HaluEval-QA dev prompts (48 new tokens); 0: none")
    ap.add_argument("--exit-rules", nargs="+", choices=EXIT_RULES, default=[SpecFuseConfig().exit_rule])
    ap.add_argument("--self-score-ablation", action="store_true")
    ap.add_argument("--alone", nargs="*", default=[], choices=TRIO,
                    help="members run alone on the same rows (before and after the SpecFuse runs) as the time baseline")
    ap.add_argument("--out", type=Path, default=RESULTS / "specfuse_exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    code = eval_label.git_head(REPO)  # before the runs: the code they run
    members = [load_member(n) for n in TRIO]
    tables = [(m.codec, m.vocab_fingerprint) for m in members]  # built before anything is timed
    log.info("loaded %d members (%d tokenizer tables)", len(members), len(tables))
    plan = [("off", True, {"exit": False})] + [(rule, True, {"exit_rule": rule}) for rule in args.exit_rules]
    if args.self_score_ablation:
        plan += [("off, no self-score", False, {"exit": False}),
                 (f"{args.exit_rules[0]}, no self-score", False, {"exit_rule": args.exit_rules[0]})]
    sets = {}
    for name, (rows, params) in prompt_sets(args.prompts, args.qa).items():
        runs, offs = {}, {}
        alone_first = {n: run_alone(members[TRIO.index(n)], rows, params) for n in args.alone}
        for label, self_score, config in plan:
            r = run(members, rows, params, segment_tokens=10, self_score=self_score, **config)
            if not config.get("exit", True):
                offs[self_score] = r
            runs[label] = {**r, **compare(r, offs[self_score])}
        for n in args.alone:
            alone = mean_runs([alone_first[n], run_alone(members[TRIO.index(n)], rows, params)])
            runs[f"{n} alone"] = alone
            if n == args.alone[0]:  # the ratios are to the first member named
                for label, _, _ in plan:
                    runs[label].update(alone_ratios(runs[label], alone))
        sets[name] = {"prompts": len(rows), "max_new_tokens": params.max_new_tokens, "runs": runs}
    res = {"command": "python bench/bench_specfuse_exit.py " + " ".join(sys.argv[1:]), "code": code, "members": TRIO,
           "threads": torch.get_num_threads(),
           "note": "Shared 2-core machine: absolute times are noisy, ratios come from one run.", "sets": sets}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", markdown(res))):
        args.out.with_suffix(suffix).write_text(text)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
