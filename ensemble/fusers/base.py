"""The fuser interface and its outputs (engine, params and outputs are separate objects, as in vLLM).

Every fuser (Single, DeePEn, SpecFuse) offers:
- ``generate(prompts, params) -> list[FusedOutput]``: ``params`` is one :class:`DecodeParams` or one
  per prompt (per-row seeds and budgets);
- ``label(prompts, choices) -> list[LabelOutput]``: pick one of each row's choices, with probabilities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, Sequence

from ensemble.config import DecodeParams


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens or another budget ran out
    ERROR = "error"  # the row could not be processed; see the job's error column


@dataclass
class MemberStats:
    """Per-row statistics of one member. Method-specific fields stay None for other methods."""

    name: str
    role: str = "member"  # "main" for the member whose vocabulary the output comes from
    weight: float = 1.0
    calls: int = 0  # forward passes that included this row
    tokens_in: int = 0  # tokens fed, prompt and re-tokenisation overhead included
    tokens_out: int = 0  # tokens this member produced (chosen, drafted)
    # DeePEn
    agreement: float | None = None
    mean_kl: float | None = None
    # SpecFuse
    proposed: int | None = None
    accepted: int | None = None
    mean_score: float | None = None
    rounds_active: int | None = None
    exit_round: int | None = None


@dataclass
class FusedOutput:
    text: str
    token_count: int  # new tokens, in the main member's tokens
    finish_reason: FinishReason
    member_stats: list[MemberStats] = field(default_factory=list)


@dataclass
class LabelOutput:
    label: str
    probs: list[float]  # one per choice, summing to 1
    member_stats: list[MemberStats] = field(default_factory=list)

    @property
    def index(self) -> int:
        return max(range(len(self.probs)), key=lambda i: (self.probs[i], -i))


class Fuser(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], params: DecodeParams | Sequence[DecodeParams]) -> list[FusedOutput]: ...

    def label(
        self, prompts: Sequence[str], choices: Sequence[Sequence[str]], systems: Sequence[str | None] | None = None
    ) -> list[LabelOutput]: ...

    @property
    def members(self) -> list: ...


def normalise_log_scores(scores: Sequence[float]) -> list[float]:
    """softmax over scores (log domain), numerically stable."""
    m = max(scores)
    exps = [math.exp(s - m) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def check_choices(choices: Sequence[Sequence[str]], n: int) -> None:
    if len(choices) != n:
        raise ValueError(f"choices must have one list per prompt ({n}), got {len(choices)}")
    for i, cs in enumerate(choices):
        if isinstance(cs, str) or len(cs) == 0:
            raise ValueError(f"choices of row {i} must be a non-empty list of strings, got {cs!r}")
        bad = [c for c in cs if not isinstance(c, str) or not c.strip()]
        if bad:
            raise ValueError(f"choices of row {i} must be non-empty strings, got {bad!r}")
