"""Continuation log-likelihoods under a fuser, for lm-eval's ``loglikelihood`` (docs/lm_eval.md).

Each row is a context (a prompt, with its system message) and the distinct continuations lm-eval asks
about after it; every continuation is scored by the project's one choice scorer
(``ensemble/scoring.py``) with normalisation ``sum`` and no gate, so the value is a summed
log-probability, not a posterior over the row's continuations:

- ``single``: the member's summed continuation log-probability (``MemberStats.choice_logprobs`` of
  ``Single.label``);
- ``deepen``: the summed log-probability of the continuation's tokens, teacher-forced in the main
  member's tokenisation, under the fused distribution (DeePEn's label path, docs/algorithms.md);
- ``specfuse``: the members' continuation probabilities (each in its own tokenisation, from
  ``SpecFuse.label``'s statistics) pooled with the member weights as its ``label_pool`` says:
  ``loglinear`` the weighted sum of the members' log-probabilities (its softmax over a document's
  choices is exactly SpecFuse's log-linear label posterior under norm ``sum``); ``linear`` the log of
  the weighted mean of their probabilities (a mixture of the members' sequence distributions; SpecFuse's
  linear label pools the members' posteriors, each normalised over the row's choices first, so its
  label can differ from this value's argmax).

The continuation is scored as lm-eval gives it when the context is raw text (``target_delimiter`` ""):
lm-eval has already put its target delimiter in front. In the chat path lm-eval drops the delimiter;
chat members score the continuation as the assistant's reply, and completion-style members put
``LabelParams``'s target delimiter in front, as the job's scorer does (``ensemble.scoring``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from ensemble.fusers.base import encode_prompts, in_groups
from ensemble.labeling import LabelParams
from ensemble.scoring import choice_ids

RAW = LabelParams(norm="sum", target_delimiter="")
"""Scorer settings for a raw-text context: lm-eval's continuation already holds its delimiter."""
CHAT = LabelParams(norm="sum")
"""Scorer settings in the chat path: the job's (completion-style members get the target delimiter)."""


@contextmanager
def as_text(fuser: Any, raw: bool) -> Iterator[None]:
    """Inside the block (when ``raw``), every member of ``fuser`` encodes prompts as plain text with its
    tokenizer's special tokens, like a member without a chat template, as lm-eval's ``hf`` model does
    for a context given without ``--apply_chat_template``. Members keep no state between calls
    (``ensemble/members.py``) and lm-eval calls the model from one thread, so the flag is set and
    restored around the call."""
    members = list(fuser.members) if raw else []
    before = [m.has_chat_template for m in members]
    try:
        for m in members:
            m.has_chat_template = False
        yield
    finally:
        for m, b in zip(members, before):
            m.has_chat_template = b


def _pooled(logprobs: Sequence[float], weights: Sequence[float], kind: str) -> float:
    """One continuation's members' log-probabilities pooled (see the module docstring)."""
    total = float(sum(weights))
    pairs = [(w / total, lp) for w, lp in zip(weights, logprobs) if w > 0]
    if kind == "loglinear":
        return sum(w * lp for w, lp in pairs)
    top = max(lp for _, lp in pairs)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(w * math.exp(lp - top) for w, lp in pairs))


def deepen_sums(fuser: Any, prompts: Sequence[str], systems: Sequence[str | None], conts: Sequence[Sequence[str]],
                params: LabelParams) -> list[list[float]]:
    """DeePEn's fused teacher-forced sums of each row's continuations, as its label path computes them
    (every choice of a row forced after the members' prefilled prompts), without its gate, its members'
    own scores or a posterior: ``DeePEn.label`` returns posteriors only, and a log-likelihood is not
    normalised over a row's continuations."""
    members = fuser.members
    ids = [choice_ids(m, conts, params) for m in members]  # [member][row][continuation]
    encoded = encode_prompts(members, prompts, list(systems))
    forced = ids[fuser.config.main]
    lengths = [max(len(e[b]) + max(map(len, c[b])) for e, c in zip(encoded, ids)) for b in range(len(prompts))]

    def run(group: list[int]) -> list[list[float]]:
        states = [m.start_ids([e[b] for b in group]) for m, e in zip(members, encoded)]
        return fuser.forced_sums(states, list(range(len(group))), [forced[b] for b in group])[0]

    return in_groups(lengths, fuser.max_batch_tokens, run, widths=[len(f) for f in forced])


def loglikelihoods(fuser: Any, method: str, prompts: Sequence[str], systems: Sequence[str | None],
                   conts: Sequence[Sequence[str]], raw: bool) -> list[list[float]]:
    """``out[row][k]``: the log-likelihood of continuation ``conts[row][k]`` after the row's context
    under ``fuser`` (see the module docstring); ``raw``: the contexts are raw text."""
    params = RAW if raw else CHAT
    with as_text(fuser, raw):
        if method == "deepen":
            return deepen_sums(fuser, prompts, systems, conts, params)
        outs = fuser.label(list(prompts), [list(c) for c in conts], list(systems), params)
    if method == "single":
        return [list(o.member_stats[0].choice_logprobs) for o in outs]
    kind = fuser.config.label_pool
    return [[_pooled([s.choice_logprobs[k] for s in o.member_stats], [s.weight for s in o.member_stats], kind)
             for k in range(len(cs))] for o, cs in zip(outs, conts)]


__all__ = ["CHAT", "RAW", "as_text", "deepen_sums", "loglikelihoods"]
