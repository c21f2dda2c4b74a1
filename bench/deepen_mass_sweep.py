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
ref = bd.dense_reference(members, cfg, steps, slice_top=128)
dense, restricted_steps = ref["picks"], ref["restricted"]
own = sum(int((lg[cfg.main].argmax(-1) == d).sum()) for (lg, _), d in zip(steps, dense))
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
