"""Training-free ensembles of heterogeneous LLMs: members, fusers (Single, DeePEn, SpecFuse).

The names below are imported on first use, so that ``ensemble.config`` (the configurations the job's
driver and command line read) can be imported without torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DecodeParams": "ensemble.config", "DeePEn": "ensemble.fusers", "FinishReason": "ensemble.fusers",
    "FusedOutput": "ensemble.fusers", "LabelOutput": "ensemble.fusers", "LabelParams": "ensemble.labeling",
    "Member": "ensemble.members",
    "MemberStats": "ensemble.fusers", "RowBatch": "ensemble.members", "Single": "ensemble.fusers",
    "SpecFuse": "ensemble.fusers", "load_member": "ensemble.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
