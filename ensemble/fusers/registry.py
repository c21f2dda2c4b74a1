"""Build a fuser from plain settings (what the job passes): method name, member specs, method knobs.
The only place that maps method names to fuser classes."""
from __future__ import annotations

from typing import Any

from ensemble.models import load_member


def make_fuser(settings: dict[str, Any], *, device: str | None = None):
    method = settings["method"]
    members = [load_member(spec, device=device, dtype=settings.get("dtype")) for spec in settings["members"]]
    if method == "single":
        from ensemble.fusers.single import Single

        return Single(members[0])
    if method == "deepen":
        from ensemble.fusers.deepen import DeePEn

        # settings the caller left out keep DeePEnConfig's defaults (None is a value here: "no cut")
        names = {"main": "main", "weights": "weights", "deepen_lr": "lr", "deepen_steps": "steps", "topk": "topk",
                 "top_mass": "top_mass", "main_top_mass": "main_top_mass", "anchor_subset": "anchor_subset",
                 "refine_margin": "refine_margin",
                 "label_norm": "label_norm"}
        return DeePEn(members, **{name: settings[key] for key, name in names.items() if key in settings})
    if method == "specfuse":
        from ensemble.fusers.specfuse import SpecFuse

        return SpecFuse(members, segment_tokens=settings.get("segment_tokens", 10), exit=settings.get("exit", True),
                        exit_delta=settings.get("exit_delta", 0.5), exit_min_rounds=settings.get("exit_min_rounds", 2),
                        weights=settings.get("weights"))
    raise ValueError(f"method must be one of ('single', 'deepen', 'specfuse'), got {method!r}")
