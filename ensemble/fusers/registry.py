"""Build a fuser from what the job passes: the method's name, member specs and the method's config.
The fuser classes come from the one table of methods, ``ensemble.config.FUSERS``."""
from __future__ import annotations

import importlib
from typing import Any, Sequence

from ensemble.config import MAX_BATCH_TOKENS, DeePEnConfig, SpecFuseConfig, fuser_config, method_spec
from ensemble.models import load_member


def fuser_class(method: str) -> type:
    """The fuser class of ``method`` (imported from its ``module:Class`` path)."""
    module, _, name = method_spec(method).fuser.partition(":")
    return getattr(importlib.import_module(module), name)


def make_fuser(method: str, members: Sequence[str], config: DeePEnConfig | SpecFuseConfig | None = None, *,
               dtype: str | None = None, device: str | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS) -> Any:
    """Load ``members`` (specs) on ``device`` in ``dtype`` and build ``method``'s fuser with ``config``
    (None: the method's defaults; Single takes none and exactly one member) and the memory bound
    ``max_batch_tokens``."""
    config = fuser_config(method, config)
    cls = fuser_class(method)
    loaded = [load_member(spec, device=device, dtype=dtype) for spec in members]
    if config is None:
        if len(loaded) != 1:
            raise ValueError(f"members must be exactly one member for method {method}, got {list(members)!r}")
        return cls(loaded[0], max_batch_tokens=max_batch_tokens)
    return cls.from_config(loaded, config, max_batch_tokens=max_batch_tokens)
