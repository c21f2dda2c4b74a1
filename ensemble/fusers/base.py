"""The fuser interface and its outputs (engine, params and outputs are separate objects, as in vLLM).

Every fuser (Single, DeePEn, SpecFuse) offers:
- ``generate(prompts, params) -> list[FusedOutput]``: ``params`` is one :class:`DecodeParams` or one
  per prompt (per-row seeds and budgets);
- ``label(prompts, choices, systems=None, params=None) -> list[LabelOutput]``: pick one of each row's
  choices, with probabilities; ``params`` is an ``ensemble.labeling.LabelParams`` (None: its defaults),
  every member's choices scored by the one scorer of ``ensemble/scoring.py``;
- ``fit_prompts(prompts, systems, max_new_tokens, max_prompt_tokens, policy)``: each prompt checked
  against the token limits of every member (and cut to fit them when asked), before a call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, Sequence

from ensemble.batching import pack
from ensemble.config import MAX_BATCH_TOKENS, DecodeParams
from ensemble.labeling import LabelParams, best


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
    fused_share: float | None = None  # generate: share of the row's steps that were fused (DeePEnConfig.fuse_below)
    # SpecFuse
    proposed: int | None = None
    accepted: int | None = None
    mean_score: float | None = None
    rounds_active: int | None = None
    exit_round: int | None = None
    # label mode (every method): this member's own scores of the row's choices, in its tokenisation
    choice_probs: list[float] | None = None  # its posterior under LabelParams.norm
    choice_logprobs: list[float] | None = None  # summed continuation log-probs
    choice_tokens: list[int] | None = None  # continuation token counts
    choice_neutral: list[float] | None = None  # summed log-probs after the neutral context (norm 'pmi')


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
    gated: bool = False  # the gate kept the main member's label and posterior (LabelParams.gate)

    @property
    def index(self) -> int:
        return max(range(len(self.probs)), key=lambda i: (self.probs[i], -i))


class Fuser(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], params: DecodeParams | Sequence[DecodeParams]) -> list[FusedOutput]: ...

    def label(
        self, prompts: Sequence[str], choices: Sequence[Sequence[str]], systems: Sequence[str | None] | None = None,
        params: LabelParams | None = None,
    ) -> list[LabelOutput]: ...

    @property
    def members(self) -> list: ...

    def fit_prompts(self, prompts: Sequence[str], systems: Sequence[str | None], max_new_tokens: Sequence[int],
                    max_prompt_tokens: int, policy: str = "error") -> list[str | PromptTooLong]: ...


def encode_prompts(members: Sequence, prompts: Sequence[str], systems: Sequence[str | None]) -> list[list[list[int]]]:
    """Every member's prompt ids, ``[member][row]``."""
    return [[m.encode_prompt(p, s) for p, s in zip(prompts, systems)] for m in members]


def in_groups(lengths: Sequence[int], max_batch_tokens: int, run, *, widths: Sequence[int] | None = None) -> list:
    """One output per row: ``run(group)`` (row indices -> their outputs, in order) on each group that
    ``ensemble.batching.pack`` makes of rows of these padded ``lengths`` and ``widths`` (state rows each)
    within ``max_batch_tokens``; how fusers bound their memory."""
    out: list = [None] * len(lengths)
    for group in pack(lengths, max_batch_tokens, widths=widths):
        for r, o in zip(group, run(group)):
            out[r] = o
    return out


def label_output(choices: Sequence[str], probs: Sequence[float], stats: list[MemberStats],
                 gated: bool = False) -> LabelOutput:
    """A row's label: the most probable choice (ties to the lower index) with its probabilities."""
    probs = list(probs)
    return LabelOutput(label=choices[best(probs)], probs=probs, member_stats=stats, gated=gated)


def check_choices(choices: Sequence[Sequence[str]], n: int) -> None:
    if len(choices) != n:
        raise ValueError(f"choices must have one list per prompt ({n}), got {len(choices)}")
    for i, cs in enumerate(choices):
        if isinstance(cs, str) or len(cs) == 0:
            raise ValueError(f"choices of row {i} must be a non-empty list of strings, got {cs!r}")
        bad = [c for c in cs if not isinstance(c, str) or not c.strip()]
        if bad:
            raise ValueError(f"choices of row {i} must be non-empty strings, got {bad!r}")


LONG_PROMPT_POLICIES = ("error", "truncate")


class PromptTooLong(ValueError):
    """A prompt over a member's token limit; the message names the member, the count and the limit."""


def fit_prompts(fuser, prompts: Sequence[str], systems: Sequence[str | None], max_new_tokens: Sequence[int],
                max_prompt_tokens: int, policy: str = "error") -> list[str | PromptTooLong]:
    """Each prompt as it fits every member of ``fuser``, or the :class:`PromptTooLong` saying why not.

    A member's limit is ``max_prompt_tokens``, and at most its context window less the row's
    ``max_new_tokens``, counted in its own prompt tokens (chat template and system message included).
    ``policy`` "error" refuses a prompt over a limit; "truncate" cuts the prompt's text (a few rounds,
    each to the share of characters that the worst member's count allows, less 5%) until every member
    fits. Fusers expose this as their ``fit_prompts`` method."""
    if policy not in LONG_PROMPT_POLICIES:
        raise ValueError(f"policy must be one of {LONG_PROMPT_POLICIES}, got {policy!r}")
    if not len(prompts) == len(systems) == len(max_new_tokens):
        raise ValueError(f"prompts, systems and max_new_tokens must have one entry per row, "
                         f"got {len(prompts)}, {len(systems)} and {len(max_new_tokens)}")
    return [_fit_one(fuser.members, p, s, n, max_prompt_tokens, policy)
            for p, s, n in zip(prompts, systems, max_new_tokens)]


def _fit_one(members, prompt: str, system: str | None, max_new_tokens: int, max_prompt_tokens: int,
             policy: str) -> str | PromptTooLong:
    for _ in range(8):
        worst = 0.0
        for m in members:
            n = len(m.encode_prompt(prompt, system))
            limit = max_prompt_tokens
            if m.context_window:
                limit = min(limit, m.context_window - max_new_tokens)
            worst = max(worst, n / max(limit, 1))
            if n > limit and policy == "error":
                return PromptTooLong(
                    f"prompt has {n} tokens for member {m.name}, over the limit of {limit} "
                    f"(max_prompt_tokens={max_prompt_tokens}, context window {m.context_window})"
                )
        if worst <= 1:
            return prompt
        prompt = prompt[:int(len(prompt) / worst * 0.95)]
    return PromptTooLong(f"prompt could not be truncated under {max_prompt_tokens} tokens")


class ConfiguredFuser:
    """The two constructors of a fuser whose settings are a config dataclass (``config_class``):
    ``Fuser(members, **options)`` with the config's fields as keywords (those left out keep its
    defaults) and ``Fuser.from_config(members, config)``; both take ``max_batch_tokens``, the memory
    bound (``ensemble.config.MAX_BATCH_TOKENS``). Subclasses implement ``_setup``."""

    config_class: type

    def __init__(self, members: Sequence[Any], *, max_batch_tokens: int = MAX_BATCH_TOKENS, **options: Any):
        self._setup(list(members), self.config_class(**options), max_batch_tokens)

    @classmethod
    def from_config(cls, members: Sequence[Any], config: Any, *, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self = cls.__new__(cls)
        self._setup(list(members), config, max_batch_tokens)
        return self

    def _setup(self, members: list, config: Any, max_batch_tokens: int) -> None:
        raise NotImplementedError
