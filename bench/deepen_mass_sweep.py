"""DeePEn sparse vs exact dense agreement for several candidate cuts (top-k, cumulative mass for the
other members and for the main member, refinement of close rows without cuts) on the same recorded
steps: the default fused run of bench_deepen.py (8 prompts x 64 tokens) is recorded once, the exact
dense picks on each member's vocabulary slice are computed once, then each sparse config is replayed
against them (same greedy token, and its row-cache misses as the cost; every config starts with empty
row caches).

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
# (top_mass of the others, main_top_mass, refine_margin); top-64, float16 rows, 2048 cached rows per member
VARIANTS = [(0.9, 0.99, 0.3), (0.9, 0.99, 0.0), (0.95, 0.995, 0.0), (0.95, 0.995, 0.3), (None, None, 0.0),
            (0.9, 0.95, 0.3), (0.8, 0.99, 0.3), (0.9, 0.99, 0.5)]
for mass, main_mass, refine in VARIANTS:
    c = dataclasses.replace(cfg, top_mass=mass, main_top_mass=main_mass, refine_margin=refine)
    eng = bd.build_engine(members, c)
    same = sum(int((eng.fuse(r).greedy() == d).sum()) for r, d in zip(restricted_steps, dense))
    print(f"mass {mass} main {main_mass} refine {refine}: sparse==dense {same / total:.4f} ({same} of {total}) "
          f"rows refined {eng.refined} misses {[s.misses for s in eng.sources]} = {sum(s.misses for s in eng.sources)}",
          flush=True)
