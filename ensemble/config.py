"""Frozen, validated configuration objects shared by members and fusers.

Every field has a docstring; ``__post_init__`` rejects bad values with a message that names the
field and the value (``top_p must be in (0, 1], got 1.5``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class DecodeParams:
    """How to decode one request (like vLLM's ``SamplingParams``)."""

    max_new_tokens: int = 64
    """Budget of new tokens, counted in the main member's tokens."""
    temperature: float = 0.0
    """0 means greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int | None = None
    """Keep only the k most likely tokens before sampling (None: no limit)."""
    seed: int = 0
    """Seed of this row's random generator; outputs depend on it and not on batch composition."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text is cut before the first occurrence and finish_reason is 'stop'."""
    system: str | None = None
    """Optional system message, for members whose chat template accepts one."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not isinstance(self.seed, int) or not (0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**63-1], got {self.seed!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes) -> "DecodeParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def per_row(params: "DecodeParams | list[DecodeParams]", n: int) -> list[DecodeParams]:
    """Broadcast one ``DecodeParams`` to ``n`` rows, or check a list has one entry per row."""
    if isinstance(params, DecodeParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params must be one DecodeParams or one per prompt ({n}), got {len(params)}")
    return params


WEIGHT_TOL = 1e-4
"""How far from 1 member weights may sum (weights printed with 6 decimals, as bench/compat.py does,
miss 1 by up to ~1.5e-6); within it they are rescaled to sum to 1 exactly."""


def normalise_weights(weights: "list[float] | tuple[float, ...] | None", n: int,
                      tol: float = WEIGHT_TOL) -> tuple[float, ...]:
    """Member weights: None -> uniform; otherwise non-negative, one per member, summing to 1 within
    tol (then rescaled to sum to 1)."""
    if weights is None:
        return tuple([1.0 / n] * n)
    w = tuple(float(x) for x in weights)
    if len(w) != n:
        raise ValueError(f"weights must have one entry per member ({n}), got {list(weights)!r}")
    if any(x < 0 or x != x for x in w):
        raise ValueError(f"weights must be non-negative, got {list(weights)!r}")
    if abs(sum(w) - 1.0) > tol:
        raise ValueError(f"weights must sum to 1 (within {tol}), got {list(weights)!r} (sum {sum(w)})")
    total = sum(w)
    return tuple(x / total for x in w)


__all__ = ["DecodeParams", "per_row", "normalise_weights", "WEIGHT_TOL", "MAX_SEED", "field"]
