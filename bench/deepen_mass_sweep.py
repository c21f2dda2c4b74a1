"""DeePEn sparse vs exact dense agreement for several candidate cuts (top-k, cumulative mass for the
other members and for the main member, row precision) on the same recorded steps: the default fused run
of bench_deepen.py (8 prompts x 64 tokens) is recorded once, the exact dense picks on each member's
vocabulary slice are computed once, then each sparse config is replayed against them (same greedy
token, and its row-cache misses as the cost).

    python bench/deepen_mass_sweep.py   (output: bench/results/deepen_mass_sweep.log)
"""
import dataclasses
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import torch
from ensemble import load_member
from ensemble.fusers.deepen import DeePEn, DeePEnConfig
import bench_deepen as bd
logging.basicConfig(level=logging.INFO)
members = [load_member(n, device="cpu") for n in bd.TRIO]
cfg = DeePEnConfig()
fuser = DeePEn.from_config(members, cfg)
outs, wall, inner, steps = bd.fused_run(fuser, bd.PROMPTS, 64, record=True)
del fuser
engine = bd.build_engine(members, cfg)
slices = [torch.unique(torch.cat([lg[i].topk(128, dim=-1).indices.flatten() for lg, _ in steps])) for i in range(3)]
qs = [[] for _ in steps]; main_rows = None
for i in (1, 2, 0):
    rows = engine.sources[i].compute(slices[i])
    for s, (logits, _) in enumerate(steps):
        qs[s].append((i, bd.mix(torch.softmax(logits[i][:, slices[i]], -1), rows)))
    if i == 0: main_rows = rows
    else: del rows
dense = []
restricted_steps = []
for s, (logits, picked) in enumerate(steps):
    q = bd.aggregate([q for _, q in sorted(qs[s], key=lambda x: x[0])], engine.weights, 0)
    z0 = logits[0][:, slices[0]]
    z = bd.inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), main_rows, q, engine.search)
    dense.append(slices[0][z.argmax(-1)])
    r_all = []
    for i, lg in enumerate(logits):
        r = torch.full_like(lg, float("-inf")); r[:, slices[i]] = lg[:, slices[i]]; r_all.append(r)
    restricted_steps.append(r_all)
del main_rows, qs
own = sum(int((lg[0].argmax(-1) == d).sum()) for (lg, _), d in zip(steps, dense))
total = sum(int(d.numel()) for d in dense)
print("main member's own argmax == dense fused:", own / total, flush=True)
# (topk, top_mass of the others, main_top_mass, row store, cache rows per member)
VARIANTS = [(64, 0.95, 0.995, "float16", 2048), (64, 0.95, 0.995, "float32", 2048), (64, 0.99, 0.995, "float16", 2048),
            (64, 0.95, None, "float16", 2048), (64, None, None, "float16", 2048)]
for topk, mass, main_mass, store, cache in VARIANTS:
    c = dataclasses.replace(cfg, topk=topk, top_mass=mass, main_top_mass=main_mass, row_store=store, row_cache_size=cache)
    eng = bd.build_engine(members, c)
    same = sum(int((eng.fuse(r).greedy() == d).sum()) for r, d in zip(restricted_steps, dense))
    print(f"topk {topk} mass {mass} main {main_mass} store {store} cache {cache}: sparse==dense {same / total:.4f} "
          f"misses {[s.misses for s in eng.sources]}", flush=True)
