"""The one choice scorer: a member's :class:`~ensemble.labeling.ChoiceScores` for each row's choices
(docs/algorithms.md, Labeling). Single, SpecFuse and DeePEn all score their members through it.

A choice is scored as a continuation of the row's prompt, in the member's own tokenisation:

- a chat member (its tokenizer has a chat template) sees the prompt as a user turn followed by the
  generation prompt, and the choice is the assistant's reply: ``encode_text(choice)``;
- a completion-style member (no chat template) sees the prompt as plain text, and the choice follows
  the target delimiter: ``encode_text(params.target_delimiter + choice)``.

This is what lm-evaluation-harness 0.4 does for multiple-choice tasks (``construct_requests``: the
continuation is ``target_delimiter + choice``, with the delimiter dropped when a chat template is
applied). One difference: lm-eval encodes ``context + continuation`` in one piece and keeps the tokens
past the context's (moving the context's trailing whitespace into the continuation), whereas here the
prompt is encoded (and prefilled, once per row) on its own and the continuation separately, so a prompt
meant for completion members should not end with whitespace: the delimiter supplies it.

The log-probability of each continuation token comes from ``Member.score`` on the prompts' prefilled
state (reduced to the forced tokens forward by forward, in forwards bounded by ``max_batch_tokens``);
the prompts are taken in the fusers' groups (``ensemble.fusers.base.in_groups``). For the ``pmi``
normalisation the same continuations are also scored after ``params.neutral_context`` used as the
prompt (chat template and generation prompt included for chat members, no system message): one pass
per call over the distinct continuations, shared by the call's rows and not counted in their
per-row statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ensemble.config import MAX_BATCH_TOKENS, check_batch_tokens
from ensemble.labeling import ChoiceScores, LabelParams, posterior
from ensemble.members import Member, RowBatch


@dataclass(frozen=True)
class Scored:
    """A member's scores of one row's choices, with the row's counters on that member."""

    scores: ChoiceScores
    calls: int  # forward calls that included the row (prefill and scoring)
    tokens_in: int  # tokens fed for the row (prompt and continuations)


def continuation_ids(member: Member, choice: str, params: LabelParams) -> list[int]:
    """Token ids ``member`` scores for ``choice`` (see the module docstring); an error names the member
    and the choice when they are empty."""
    text = choice if member.has_chat_template else params.target_delimiter + choice
    ids = member.encode_text(text)
    if not ids:
        raise ValueError(f"choice {choice!r} encodes to no tokens for member {member.name}")
    return ids


def choice_ids(member: Member, choices: Sequence[Sequence[str]], params: LabelParams) -> list[list[list[int]]]:
    """``out[row][choice]``: :func:`continuation_ids` of every choice of every row."""
    return [[continuation_ids(member, c, params) for c in cs] for cs in choices]


def neutral_sums(member: Member, conts: Sequence[Sequence[Sequence[int]]], params: LabelParams, *,
                 max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[tuple[float, ...]] | None:
    """Per row, the summed log-probs of its continuations after the neutral context (None unless the
    norm is 'pmi'): one state row holding the neutral prompt scores each distinct continuation once."""
    if params.norm != "pmi":
        return None
    distinct = list(dict.fromkeys(tuple(c) for row in conts for c in row))
    if not distinct:
        return [() for _ in conts]
    state = member.start_ids([member.encode_prompt(params.neutral_context)])
    logps = member.score(state, [[list(c) for c in distinct]], max_batch_tokens=max_batch_tokens)[0]
    sums = {c: float(lp.double().sum()) for c, lp in zip(distinct, logps)}
    return [tuple(sums[tuple(c)] for c in row) for row in conts]


def score_prefilled(member: Member, state: RowBatch, conts: Sequence[Sequence[Sequence[int]]],
                    choices: Sequence[Sequence[str]], neutral: Sequence[tuple[float, ...]] | None, *,
                    max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[Scored]:
    """Scores of ``conts[b]`` (the ids of ``choices[b]``) after row b of ``state``, a prefilled state
    of the rows' prompts (not changed but for its counters); ``neutral[b]``: the row's neutral sums."""
    logps = member.score(state, [[list(c) for c in row] for row in conts], max_batch_tokens=max_batch_tokens)
    out = []
    for b, (row, cs) in enumerate(zip(logps, choices)):
        scores = ChoiceScores(logprob=tuple(float(lp.double().sum()) for lp in row),
                              tokens=tuple(len(c) for c in conts[b]), chars=tuple(len(c) for c in cs),
                              neutral=None if neutral is None else tuple(neutral[b]))
        out.append(Scored(scores, state.calls[b], state.tokens_in[b]))
    return out


def score_choices(member: Member, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  systems: Sequence[str | None] | None = None, params: LabelParams | None = None, *,
                  max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[Scored]:
    """``member``'s scores of each row's choices after its prompt (the module docstring), the prompts
    prefilled in groups within ``max_batch_tokens`` (prompt plus longest continuation per row)."""
    from ensemble.fusers.base import check_choices, in_groups  # the fusers import this module

    params = params or LabelParams()
    check_batch_tokens(max_batch_tokens)
    check_choices(choices, len(prompts))
    systems = list(systems) if systems else [None] * len(prompts)
    encoded = [member.encode_prompt(p, s) for p, s in zip(prompts, systems)]
    conts = choice_ids(member, choices, params)
    neutral = neutral_sums(member, conts, params, max_batch_tokens=max_batch_tokens)

    def run(group: list[int]) -> list[Scored]:
        state = member.start_ids([encoded[r] for r in group])
        return score_prefilled(member, state, [conts[r] for r in group], [choices[r] for r in group],
                               None if neutral is None else [neutral[r] for r in group],
                               max_batch_tokens=max_batch_tokens)

    return in_groups([len(e) + max(map(len, cs)) for e, cs in zip(encoded, conts)], max_batch_tokens, run)


def choice_stats(scores: ChoiceScores, params: LabelParams, member: int | None = None) -> dict:
    """The ``MemberStats`` label fields of a member's scores (its posterior under ``params.norm`` and
    the member's temperature, ``params.temperature_of(member)``)."""
    return {"choice_probs": posterior(scores, params.norm, params.temperature_of(member)), "choice_logprobs": list(scores.logprob),
            "choice_tokens": list(scores.tokens),
            "choice_neutral": None if scores.neutral is None else list(scores.neutral)}


__all__ = ["Scored", "choice_ids", "choice_stats", "continuation_ids", "neutral_sums", "score_choices",
           "score_prefilled"]
