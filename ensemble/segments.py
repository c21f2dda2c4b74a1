"""SpecFuse math as pure functions: trimming drafts to whole words, scoring, ranking, model exit.

Nothing here touches a model; the fuser (ensemble/fusers/specfuse.py) feeds these functions with
token bytes, log-probabilities and score matrices. Indices are positions in the list of *active*
members of one row, in member order, so "ties go to the lower index" means the lower member index.

Contracts:

- :func:`trim_to_word` ``(pieces, ended) -> k``: how many draft tokens to keep. A draft that ended
  (EOS, or it used up the row's remaining token budget) is kept whole. Otherwise, when its text ends
  inside a word (the last character is alphanumeric, or the bytes end inside a UTF-8 character) or
  with whitespace, it is cut before its last token that starts with whitespace; if that would leave
  nothing, it is kept whole. The cut is on a token boundary, so the kept tokens are a prefix of the
  draft (a member re-drafting from there reproduces its own greedy output token for token).
- :func:`segment_score` ``(logprobs) -> float``: mean token probability ``mean(exp(logprobs))``;
  0.0 for an empty segment.
- :func:`rank` ``(scores, weights) -> (final, winner)``: ``scores[j][c]`` is verifier j's score of
  candidate c (in a round the matrix is square and its diagonal holds the self-scores). Each
  verifier row is normalised to sum to 1 over the candidates (a row of zeros becomes uniform);
  ``final[c] = sum_j w_j * normalised[j][c]`` with the weights renormalised over the active
  members (all zero: uniform). ``final`` sums to 1. The winner is the argmax; exact ties go to the
  lower index.
- :func:`exit_mask` ``(quality, delta, min_temperature) -> exits``: the model-exit rule below.

Model exit (per row, evaluated after the ranking of every round t >= max(1, R_min)):
``Q_i`` is member i's cumulative quality, the sum over rounds of its candidate's final score. Over
the n >= 2 active members (all of which have been active in every round so far, so their Q are
comparable), let ``s = Q / sum(Q)`` (uniform if sum(Q) == 0) and ``H(s) = -sum_i s_i ln s_i`` its
entropy in nats (0 .. ln n). The temperature is ``T = max(T_min, H(s))`` and
``p = softmax(Q / T)``; member i exits when ``p_i < delta / n``. An even quality distribution has a
high entropy, hence a high temperature and a flat p: nobody exits. When a few members collect most
of the quality the entropy falls, T falls with it and p sharpens, so persistent losers drop below
``delta / n``. Because Q grows with every round, a member that keeps trailing by the same margin
eventually exits. With ``delta <= 1`` the member with the largest p never exits (``max p >= 1/n``);
the function also guarantees it explicitly, so the last active member never exits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ensemble.utf8 import ends_inside_char

_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


def ends_inside_word(data: bytes) -> bool:
    """True when the text ends in the middle of a word (alphanumeric last character, or inside a
    UTF-8 character); False for empty text, punctuation and whitespace."""
    if not data:
        return False
    if ends_inside_char(data):
        return True
    last = data[-4:].decode("utf-8", errors="ignore")[-1:]
    return last.isalnum() or last == "_"


def trim_to_word(pieces: Sequence[bytes], ended: bool) -> int:
    """Number of draft tokens to keep (see the module docstring). ``pieces[i]`` are the bytes of
    draft token i (empty for special tokens); ``ended`` is True when the draft ended by EOS or by
    the row's token budget."""
    k = len(pieces)
    if ended or k <= 1:
        return k
    text = b"".join(pieces)
    if not (ends_inside_word(text) or text[-1] in _WHITESPACE):
        return k
    for j in range(k - 1, 0, -1):
        if pieces[j] and pieces[j][0] in _WHITESPACE:
            return j
    return k


def segment_score(logprobs: torch.Tensor) -> float:
    """Mean token probability of a segment from its per-token log-probs ``(n,)``; 0.0 when empty."""
    if logprobs.numel() == 0:
        return 0.0
    return float(logprobs.double().exp().mean())


def _normalised(values: Sequence[float]) -> list[float]:
    total = math.fsum(values)
    if not total > 0:
        return [1.0 / len(values)] * len(values)
    return [v / total for v in values]


def rank(scores: Sequence[Sequence[float]], weights: Sequence[float]) -> tuple[list[float], int]:
    """Final scores of the candidates from a verifier-by-candidate score matrix, and the winner.

    ``scores[j][c]``: verifier j's mean token probability of candidate c (in a propose/verify round
    the matrix is square and ``scores[c][c]`` is c's self-score; for labeling the candidates are the
    choices); ``weights[j]``: the verifiers' member weights (renormalised here).
    """
    n_cand = len(scores[0]) if len(scores) else 0
    if n_cand == 0 or any(len(row) != n_cand for row in scores):
        raise ValueError(f"scores must be a non-empty verifier x candidate matrix, got row lengths {[len(r) for r in scores]}")
    if len(weights) != len(scores):
        raise ValueError(f"weights must have one entry per verifier ({len(scores)}), got {len(weights)}")
    w = _normalised([float(x) for x in weights])  # (n_verifiers,)
    rows = [_normalised([float(v) for v in row]) for row in scores]  # (n_verifiers, n_cand), rows sum to 1
    final = [math.fsum(w[j] * rows[j][c] for j in range(len(rows))) for c in range(n_cand)]  # (n_cand,)
    winner = max(range(n_cand), key=lambda c: (final[c], -c))
    return final, winner


def exit_temperature(quality: Sequence[float], min_temperature: float) -> float:
    """``T = max(T_min, H(Q / sum(Q)))`` with H the entropy in nats."""
    s = _normalised([max(float(q), 0.0) for q in quality])
    entropy = -math.fsum(p * math.log(p) for p in s if p > 0)
    return max(min_temperature, entropy)


def exit_probabilities(quality: Sequence[float], temperature: float) -> list[float]:
    """``softmax(Q / T)`` over the active members."""
    z = [float(q) / temperature for q in quality]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    total = math.fsum(e)
    return [v / total for v in e]


def exit_mask(quality: Sequence[float], delta: float, min_temperature: float) -> list[bool]:
    """Which of the active members exit now (True = exits). Fewer than two members: nobody."""
    n = len(quality)
    if n < 2:
        return [False] * n
    p = exit_probabilities(quality, exit_temperature(quality, min_temperature))
    exits = [pi < delta / n for pi in p]
    if all(exits):  # only reachable with delta > 1: keep the best member (lower index on ties)
        exits[max(range(n), key=lambda i: (p[i], -i))] = False
    return exits
