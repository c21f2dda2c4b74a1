"""DeePEn benchmark on the packaged trio (SmolLM2-135M-Instruct main, Qwen2.5-Coder-0.5B-Instruct,
Gemma-3-270M), CPU, greedy, 8 prompts x 64 new tokens, all in one run:

1. speed: fused decoding time / the sum of the members' own decoding time for the same tokens (each
   member alone, batched and KV-cached, feeding its own tokenisation of the fused responses one token
   per step); pairs interleaved, median over --repeats, each repeat with a fresh fuser (empty row
   cache), after an untimed warm-up of both sides (4 tokens);
2. structure: batched DeePEn vs the reference code's structure (batch 1, main member KV-cached, every
   other member re-encodes its whole sequence each step), measured on --ref-prompts of the prompts and
   scaled to all of them (a batch-1 loop's time is the sum of its prompts' times);
3. memory: peak RSS growth while the relative-space machinery (anchors, row sources, row caches, step
   working sets) is built and replays every recorded step of the fused run;
4. sparse vs dense: on the recorded steps, the sparse step (config as run) against the exact dense
   computation on a vocabulary slice (per member, the union of every step's top --slice-top tokens,
   holding nearly all the mass): same greedy token in what fraction of row-steps;
5. anchor subset: the recorded steps replayed with every shared anchor, same greedy token as the run.

    python bench/bench_deepen.py [--prompts 8] [--max-new-tokens 64] [--repeats 1] [--ref-prompts 2]
                                 [--slice-top 128] [--topk 64] [--top-mass 0.9|none] [--main-top-mass 0.99|none] [--refine-margin 0.3] [--anchor-subset N]

Writes bench/results/deepen.json and deepen.md and prints the table. Times are wall-clock on a
shared machine: compare ratios inside one run, never absolute times.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ensemble import DecodeParams, load_member  # noqa: E402
from ensemble.fusers.deepen import DeePEn  # noqa: E402
from jobs.cli import optional_arg as optional  # noqa: E402
from ensemble.relative import (  # noqa: E402
    RelativeEnsemble, RowSource, aggregate, find_anchors, inverse_search, masked_softmax, mix)

log = logging.getLogger("bench.deepen")
TRIO = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"]
RESULTS = REPO / "bench" / "results"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "Why is the sky blue? Explain it to a curious ten-year-old.",
    "Describe the city of Paris to someone who has never been there.",
    "Give me a recipe for pancakes with a list of ingredients and the steps.",
    "What are the main differences between Python and C?",
    "Write a poem about the sea and the wind.",
    "Tell me about the history of the printing press.",
]


# ---- 1. fused run (recorded) and the members' own decoding of the same text ----------------------
def fused_run(fuser: DeePEn, prompts, max_new: int, record: bool):
    """Generate; return outputs, wall time, time inside the relative step, recorded step inputs."""
    steps, inner = [], [0.0]
    orig = fuser.engine.fuse

    def hooked(logits, extra=None, **kw):
        t = time.perf_counter()
        res = orig(logits, extra, **kw)
        inner[0] += time.perf_counter() - t
        if record:
            steps.append(([lg.detach().float().clone() for lg in logits], res.greedy().clone()))
        return res

    fuser.engine.fuse = hooked
    try:
        t0 = time.perf_counter()
        outs = fuser.generate(prompts, DecodeParams(max_new_tokens=max_new))
        wall = time.perf_counter() - t0
    finally:
        del fuser.engine.fuse
    return outs, wall, inner[0], steps


def own_decode_time(member, prompts, texts) -> float:
    """One member decoding ``texts`` alone: batched prefill, then one token per step (its own
    tokenisation), finished rows dropped, as Single does."""
    t0 = time.perf_counter()
    state = member.start(list(prompts))
    seqs = [member.encode_text(t) for t in texts]
    live = [r for r in range(len(seqs)) if seqs[r]]
    if len(live) < len(seqs):
        state = member.select(state, live)
    j = 0
    while live:
        keep = [i for i, r in enumerate(live) if j < len(seqs[r])]
        if len(keep) < len(live):
            state, live = member.select(state, keep), [live[i] for i in keep]
            if not live:
                break
        member.feed(state, [[seqs[r][j]] for r in live])
        state.logits.argmax(dim=-1)  # the choice a decoder makes each step
        j += 1
    return time.perf_counter() - t0


# ---- 3. memory --------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS every 2 ms in a thread; ``peak - base`` is the growth."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def build_engine(members, cfg) -> RelativeEnsemble:
    _, ids = find_anchors([m.tokenizer for m in members], [m.name for m in members],
                          min_anchors=cfg.min_anchors, subset=cfg.anchor_subset)
    sources = [RowSource(m.input_embeddings(), i, tau=cfg.tau, cache_rows=cfg.row_cache_size,
                         store=cfg.row_store)
               for m, i in zip(members, ids)]
    return RelativeEnsemble(sources, cfg.weights or [1 / len(members)] * len(members), cfg.main,
                            topk=cfg.topk, top_mass=cfg.top_mass, main_top_mass=cfg.main_top_mass,
                            search=cfg.search_params(), refine_margin=cfg.refine_margin)


def memory_replay(members, cfg, steps) -> dict:
    with PeakRSS() as mem:
        engine = build_engine(members, cfg)
        built = _rss() - mem.base
        for logits, _ in steps:
            engine.fuse(logits)
    return {"rss_growth_mib": mem.growth / 2**20, "rss_after_build_mib": built / 2**20,
            "held_mib": engine.nbytes / 2**20, "peak_step_mib": engine.peak_step_bytes / 2**20}


# ---- 4. sparse vs dense on a vocabulary slice ---------------------------------------------------------
@torch.no_grad()
def dense_reference(members, cfg, steps, slice_top: int) -> dict:
    """Exact dense DeePEn restricted to each member's slice (union of every step's top tokens): the
    slices, the mass they hold per row-step, the dense picks per step and each step's logits restricted
    to the slices (what a sparse config is replayed on)."""
    engine = build_engine(members, cfg)
    slices = [torch.unique(torch.cat([lg[i].topk(slice_top, dim=-1).indices.flatten() for lg, _ in steps]))
              for i in range(len(members))]
    mass = [torch.cat([torch.softmax(lg[i], -1)[:, s].sum(-1) for lg, _ in steps]) for i, s in enumerate(slices)]
    qs: list[list[torch.Tensor]] = [[] for _ in steps]
    order = [i for i in range(len(members)) if i != cfg.main] + [cfg.main]
    main_rows = None
    for i in order:  # one dense slice matrix at a time (the main member's last, kept for the search)
        rows = engine.sources[i].compute(slices[i])  # (n_i, A)
        for s, (logits, _) in enumerate(steps):
            qs[s].append((i, mix(torch.softmax(logits[i][:, slices[i]], -1), rows)))  # (B, A)
        if i == cfg.main:
            main_rows = rows
        else:
            del rows
        log.info("dense slice of %s: %d tokens", members[i].name, slices[i].numel())
    picks, restricted = [], []
    for s, (logits, _) in enumerate(steps):
        q = aggregate([q for _, q in sorted(qs[s], key=lambda x: x[0])], engine.weights, cfg.main)
        z0 = logits[cfg.main][:, slices[cfg.main]]  # (B, n_m)
        z = inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), main_rows, q, engine.search)
        picks.append(slices[cfg.main][z.argmax(-1)])  # (B,)
        step = []
        for i, lg in enumerate(logits):
            r = torch.full_like(lg, float("-inf"))
            r[:, slices[i]] = lg[:, slices[i]]
            step.append(r)
        restricted.append(step)
    return {"slices": slices, "mass": mass, "picks": picks, "restricted": restricted}


@torch.no_grad()
def dense_slice_agreement(members, cfg, steps, slice_top: int) -> dict:
    """The sparse step (config as run) on the slice-restricted logits against the exact dense picks."""
    ref = dense_reference(members, cfg, steps, slice_top)
    engine = build_engine(members, cfg)
    same = same_full = total = 0
    for restricted, dense_pick, (_, picked) in zip(ref["restricted"], ref["picks"], steps):
        sparse_pick = engine.fuse(restricted).greedy()
        same += int((sparse_pick == dense_pick).sum())
        same_full += int((sparse_pick == picked).sum())
        total += int(picked.numel())
    slices, mass = ref["slices"], ref["mass"]
    return {"row_steps": total, "agreement": same / total, "slice_sizes": [int(s.numel()) for s in slices],
            "slice_mass_min": [float(m.min()) for m in mass], "slice_mass_median": [float(m.median()) for m in mass],
            "sparse_slice_vs_full_logits": same_full / total}


@torch.no_grad()
def anchors_agreement(members, cfg, steps) -> dict:
    """The recorded steps replayed with every shared anchor: same greedy token as the run's config."""
    full = build_engine(members, dataclasses.replace(cfg, anchor_subset=None))
    same = total = 0
    for logits, picked in steps:
        same += int((full.fuse(logits).greedy() == picked).sum())
        total += int(picked.numel())
    return {"row_steps": total, "agreement": same / total, "anchors_all": full.sources[0].n_anchors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ref-prompts", type=int, default=2)
    ap.add_argument("--slice-top", type=int, default=128)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--top-mass", type=optional(float), default=0.9, help="'none': keep all top-k")
    ap.add_argument("--main-top-mass", type=optional(float), default=0.99, help="the main member's cut")
    ap.add_argument("--refine-margin", type=float, default=0.3, help="re-fuse closer rows without cuts (0: off)")
    ap.add_argument("--anchor-subset", type=optional(int), default=None, help="default: all shared anchors")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    members = [load_member(a) for a in TRIO]
    prompts = PROMPTS[: args.prompts]
    def new_fuser() -> DeePEn:
        return DeePEn(members, topk=args.topk, top_mass=args.top_mass, main_top_mass=args.main_top_mass,
                      refine_margin=args.refine_margin, anchor_subset=args.anchor_subset)

    fuser = new_fuser()
    cfg = fuser.config
    res: dict = {"members": TRIO, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                 "config": {k: (v.value if hasattr(v, "value") else v) for k, v in vars(cfg).items()},
                 "anchors": len(fuser.anchor_strings), "torch_threads": torch.get_num_threads()}

    # 1. speed, interleaved pairs
    # warm-up, not timed: a process's first forwards pay one-off costs (allocator growth, oneDNN kernel
    # generation) that neither side of the ratio should carry; its fuser (and row cache) is thrown away
    warm, _, _, _ = fused_run(fuser, prompts, 4, record=False)
    for m in members:
        own_decode_time(m, prompts, [o.text for o in warm])
    ratios, runs, steps, outs = [], [], [], None
    for rep in range(args.repeats):
        fuser = new_fuser()  # every repeat starts with an empty row cache, as a fresh job would
        outs, wall, inner, rec = fused_run(fuser, prompts, args.max_new_tokens, record=rep == 0)
        steps = rec or steps
        texts = [o.text for o in outs]
        own = {m.name: own_decode_time(m, prompts, texts) for m in members}
        ratios.append(wall / sum(own.values()))
        runs.append({"fused_s": wall, "relative_step_s": inner, "own_s": own, "ratio": ratios[-1]})
        log.info("repeat %d: fused %.1f s (relative step %.1f s), own %s -> ratio %.3f", rep, wall, inner,
                 {k: round(v, 1) for k, v in own.items()}, ratios[-1])
    res["speed"] = {"runs": runs, "ratio_median": statistics.median(ratios),
                    "tokens": [o.token_count for o in outs], "texts": [o.text for o in outs],
                    "row_cache_last_repeat": [{"hits": s.hits, "misses": s.misses} for s in fuser.engine.sources],
                    "rows_refined": fuser.engine.refined, "rows_search_skipped": fuser.engine.decided,
                    "agreement": [statistics.mean(o.member_stats[i].agreement for o in outs) for i in range(3)],
                    "mean_kl": [statistics.mean(o.member_stats[i].mean_kl for o in outs) for i in range(3)]}
    fused_wall = statistics.median(r["fused_s"] for r in runs)

    # 2. reference structure (batch 1, others re-encoded every step)
    t0 = time.perf_counter()
    ref_out = [fuser.greedy_uncached(p, args.max_new_tokens, cache_main=True) for p in prompts[: args.ref_prompts]]
    ref_wall = time.perf_counter() - t0
    scaled = ref_wall * len(prompts) / max(args.ref_prompts, 1)
    same_text = sum(fuser.main.decode(r) == o.text for r, o in zip(ref_out, outs))
    res["reference"] = {"prompts_run": args.ref_prompts, "wall_s": ref_wall, "scaled_to_all_s": scaled,
                        "speedup": scaled / fused_wall, "same_text": f"{same_text}/{len(ref_out)}"}
    log.info("reference structure: %.1f s for %d prompts -> %.2fx", ref_wall, args.ref_prompts, scaled / fused_wall)

    # 3. memory of the relative machinery, replaying the recorded steps in a fresh engine
    res["memory"] = memory_replay(members, cfg, steps)
    log.info("memory: %s", res["memory"])

    # 4. sparse vs dense on a vocabulary slice
    res["sparse_vs_dense"] = dense_slice_agreement(members, cfg, steps, args.slice_top)
    log.info("sparse vs dense: %s", res["sparse_vs_dense"])

    # 5. the anchor subset against all shared anchors (when a subset is configured)
    if cfg.anchor_subset is not None:
        res["subset_vs_all_anchors"] = anchors_agreement(members, cfg, steps)
        log.info("anchor subset vs all anchors: %s", res["subset_vs_all_anchors"])
    write(res, Path(args.out))


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sd, mem, ref = res["sparse_vs_dense"], res["memory"], res["reference"]
    rows = [
        ("fused / members' own decoding time", f"{res['speed']['ratio_median']:.3f}", "<= 1.3"),
        ("batched DeePEn vs batch-1 re-encoding loop", f"{ref['speedup']:.1f}x", ">= 5x"),
        ("relative machinery peak RSS growth", f"{mem['rss_growth_mib']:.0f} MiB", "<= 1024 MiB"),
        ("sparse vs dense (vocabulary slice) same token", f"{sd['agreement']:.2%} of {sd['row_steps']}", ">= 99%"),
    ]
    if "subset_vs_all_anchors" in res:
        sa = res["subset_vs_all_anchors"]
        rows.append((f"{res['anchors']} anchors vs all {sa['anchors_all']}: same token",
                     f"{sa['agreement']:.2%} of {sa['row_steps']}", "(reported)"))
    table = ["| measure | value | target |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    md = [f"# DeePEn benchmark: {', '.join(res['members'])}", "",
          f"{res['prompts']} prompts, {res['max_new_tokens']} new tokens, greedy, CPU "
          f"({res['torch_threads']} torch threads), {res['anchors']} anchors, config {res['config']}.", "",
          *table, "", "```json", json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1), "```", ""]
    (out / "deepen.json").write_text(json.dumps(res, indent=1))
    (out / "deepen.md").write_text("\n".join(md))
    print("\n".join(table))


if __name__ == "__main__":
    main()
