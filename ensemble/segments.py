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
- :func:`rank` ``(scores, weights, self_score=True) -> (final, winner)``: ``scores[j][c]`` is
  verifier j's score of candidate c (in a round the matrix is square and its diagonal holds the
  self-scores). Each verifier row is normalised to sum to 1 over the candidates (a row of zeros
  becomes uniform); ``final[c] = sum_j w_j * normalised[j][c]`` with the weights renormalised over
  the active members (all zero: uniform). With ``self_score=False`` (square matrices only) a
  candidate's own member does not vote for it: ``final[c]`` is the weighted mean over the verifiers
  j != c (weights renormalised over them), each verifier's row still normalised over all candidates,
  its own included, so its vote for c is relative to its own draft; ``final`` is then renormalised.
  ``final`` sums to 1. The winner is the argmax; exact ties go to the lower index.
- :func:`round_outcomes` ``(final, winner) -> [Outcome]``: each candidate's place in one round (won,
  ranked last, beaten by the winner, number of candidates), the record the window exit rules test.
- :func:`rank_exit_mask` / :func:`lead_exit_mask` ``(histories, window, alpha) -> exits``: the
  model-exit rules 'rank' and 'lead' (below); :func:`exit_mask` ``(quality, delta, min_temperature)
  -> exits``: the legacy rule ('softmax', below).

Model exit, rule 'rank' (per row, after the ranking of every round t >= max(1, R_min)):
a sequential test of "this member's candidate ranks last no more often than chance". In a round with
n active members, a member *ranks last* when its final score is below every other candidate's by more
than :data:`LAST_MARGIN` (exact and near ties are nobody's last place, so identical members never rank
last). Over the member's last ``m = min(window, rounds it was active)`` rounds, let ``k`` be how often
it ranked last. Under the null hypothesis that it is as good as the others, each round it ranks last
with probability ``1/n_t`` (n_t: the members active in that round), independently, so the p-value of
its record is ``P(K >= k)`` for K a sum of Bernoulli(1/n_t) (binomial when n did not change;
:func:`last_place_pvalue`). The member exits when it won none of those m rounds, ranked last at least
once, and the p-value is <= ``alpha``. The rule looks only at a fixed window of recent rounds, so
the evidence it needs is the same in a 5-round and a 50-round answer; ``alpha`` bounds the chance
that one check removes a member no worse than the others (the no-win guard makes it stricter still).
A member never exits in a round its candidate won (that round is in the window), and the winner of
every round stays, so the last active member never exits (the function also guarantees it
explicitly). With three members, window 4 and alpha 0.1: three last places in its first three rounds
(p = 1/27), or four in four, remove a member; with two, four straight losses (p = 1/16).

Model exit, rule 'lead' (evaluated at the same rounds): a member is *beaten* in a round when the
winner's final score is above its own by more than :data:`LAST_MARGIN` (a tie with the winner, as
between identical members, is no defeat). Over the member's last ``m = min(window, rounds it was
active)`` rounds, let ``h`` be the most rounds in which one other active member won and beat it.
Under the null hypothesis that every round's winner is uniform over the n_t active members,
independently, the p-value is ``(n - 1) * P(it wins none and a given other member wins >= h)``
(:func:`lead_pvalue`; the factor n - 1 bounds the choice of that other member). The member exits
when it won none of the m rounds, h >= 1, and the p-value is <= ``alpha``. The guarantees are the
rank rule's: a fixed window, a member never exits in a round it won, the last active member never
exits. With three members at alpha 0.3 (its level in ``ensemble.config.EXIT_ALPHA``), one other
member winning 2 of its first 2 rounds (p = 2/9), 2 of 3 (p = 8/27) or 2 of 4 (p = 22/81) removes it;
with two members, two straight defeats (p = 1/4). In plain words, at the defaults (window 4, alpha
0.3, exit_min_rounds 2) with three members and no round tied with the winner: at round 2 a member
exits when it lost both rounds to the same member, and from round 3 on exactly when it won none of
its last 3 or 4 rounds (another member then won >= 2 of them: p <= 8/27). At that level this is a
pruning rule, not a significance claim: members no worse than the others meet it often
(docs/algorithms.md).

Model exit, rule 'softmax' (the legacy rule, selectable; evaluated at the same rounds):
``Q_i`` is member i's cumulative quality, the sum over rounds of its candidate's final score. Over
the n >= 2 active members (all of which have been active in every round so far, so their Q are
comparable), let ``s = Q / sum(Q)`` (uniform if sum(Q) == 0) and ``H(s) = -sum_i s_i ln s_i`` its
entropy in nats (0 .. ln n). The temperature is ``T = max(T_min, H(s))`` and
``p = softmax(Q / T)``; member i exits when ``p_i < delta / n``. An even quality distribution has a
high entropy, hence a high temperature and a flat p: nobody exits. When a few members collect most
of the quality the entropy falls, T falls with it and p sharpens, so persistent losers drop below
``delta / n``. Because Q grows with every round, a member that keeps trailing by the same margin
eventually exits. With ``delta <= 1`` the member with the largest p never exits (``max p >= 1/n``);
the function also guarantees it explicitly, so the last active member never exits. This rule
practically never fires: with shares near 1/n the entropy stays near ln n, so T does too, and a
member trailing by a typical margin needs far more rounds than an answer has (docs/algorithms.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


def rank(scores: Sequence[Sequence[float]], weights: Sequence[float],
         self_score: bool = True) -> tuple[list[float], int]:
    """Final scores of the candidates from a verifier-by-candidate score matrix, and the winner.

    ``scores[j][c]``: verifier j's mean token probability of candidate c (in a propose/verify round
    the matrix is square and ``scores[c][c]`` is c's self-score; for labeling the candidates are the
    choices); ``weights[j]``: the verifiers' member weights (renormalised here); ``self_score``: False
    leaves each candidate's own member out of its final score (square matrices only; see the module
    docstring).
    """
    n_cand = len(scores[0]) if len(scores) else 0
    if n_cand == 0 or any(len(row) != n_cand for row in scores):
        raise ValueError(f"scores must be a non-empty verifier x candidate matrix, got row lengths {[len(r) for r in scores]}")
    if len(weights) != len(scores):
        raise ValueError(f"weights must have one entry per verifier ({len(scores)}), got {len(weights)}")
    if not self_score and len(scores) != n_cand:
        raise ValueError(f"self_score=False needs a square matrix (one verifier per candidate), got "
                         f"{len(scores)} verifiers x {n_cand} candidates")
    rows = [_normalised([float(v) for v in row]) for row in scores]  # (n_verifiers, n_cand), rows sum to 1
    if self_score or n_cand == 1:
        w = _normalised([float(x) for x in weights])  # (n_verifiers,)
        final = [math.fsum(w[j] * rows[j][c] for j in range(len(rows))) for c in range(n_cand)]  # (n_cand,)
    else:
        votes = []
        for c in range(n_cand):
            others = [j for j in range(n_cand) if j != c]
            w = _normalised([float(weights[j]) for j in others])  # (n_cand - 1,)
            votes.append(math.fsum(wj * rows[j][c] for wj, j in zip(w, others)))
        final = _normalised(votes)
    winner = max(range(n_cand), key=lambda c: (final[c], -c))
    return final, winner


# ---- model exit, rule 'rank' -------------------------------------------------------------------
LAST_MARGIN = 1e-4
"""How far (in final score, a share of 1) a candidate must trail every other one to rank last: near
ties from float noise (a member's self-score and another's score of the same tokens) are no one's
last place."""


@dataclass(frozen=True)
class Outcome:
    """One member's place in one round: ``n`` candidates, ``won``, ``last`` (see the module docstring)."""

    n: int
    won: bool
    last: bool
    beaten: bool = False
    """The winner's final score is above this candidate's by more than the margin (rule 'lead')."""


def round_outcomes(final: Sequence[float], winner: int, margin: float = LAST_MARGIN) -> list[Outcome]:
    """Each candidate's :class:`Outcome` of one round from its final scores and the winner's index."""
    n = len(final)
    out = []
    for c in range(n):
        rest = [final[d] for d in range(n) if d != c]
        last = bool(rest) and final[c] < min(rest) - margin
        out.append(Outcome(n=n, won=c == winner, last=last, beaten=final[c] < final[winner] - margin))
    return out


def last_place_pvalue(ns: Sequence[int], k: int) -> float:
    """``P(K >= k)`` for K the number of last places in rounds with ``ns[t]`` candidates, each round
    last with probability ``1 / ns[t]`` independently (the rank rule's null hypothesis)."""
    dist = [1.0]  # dist[x] = P(x last places so far)
    for n in ns:
        q = 1.0 / n
        nxt = [0.0] * (len(dist) + 1)
        for x, p in enumerate(dist):
            nxt[x] += p * (1.0 - q)
            nxt[x + 1] += p * q
        dist = nxt
    return min(1.0, math.fsum(dist[max(k, 0):]))


def rank_exit_pvalue(history: Sequence[Outcome], window: int) -> float | None:
    """The p-value of a member's last ``window`` rounds, or None when they hold a win or no last
    place (nothing to test)."""
    recent = [o for o in history[-window:] if o.n >= 2]
    k = sum(o.last for o in recent)
    if k == 0 or any(o.won for o in recent):
        return None
    return last_place_pvalue([o.n for o in recent], k)


def rank_exit_mask(histories: Sequence[Sequence[Outcome]], window: int, alpha: float) -> list[bool]:
    """Which of the active members exit now under rule 'rank' (True = exits); ``histories[i]`` is
    member i's outcomes in the rounds it was active, oldest first. Fewer than two members: nobody."""
    n = len(histories)
    if n < 2 or alpha <= 0:
        return [False] * n
    pvals = [rank_exit_pvalue(h, window) for h in histories]
    exits = [p is not None and p <= alpha for p in pvals]
    if all(exits):  # unreachable while every round has a winner; kept as the stated guarantee
        exits[max(range(n), key=lambda i: (pvals[i], -i))] = False
    return exits


# ---- model exit, rule 'lead' --------------------------------------------------------------------


def lead_pvalue(ns: Sequence[int], h: int) -> float:
    """``P(member i wins no round and one given other member wins >= h)`` over rounds with ``ns[t]``
    candidates, each round won by one of them uniformly at random (the lead rule's null hypothesis)."""
    dist = [1.0]  # dist[x] = P(i has won nothing and the other member x rounds so far)
    for n in ns:
        q = 1.0 / n
        nxt = [0.0] * (len(dist) + 1)
        for x, p in enumerate(dist):
            nxt[x] += p * (1.0 - 2.0 * q)  # a third member wins
            nxt[x + 1] += p * q  # the other member wins (i winning ends the event)
        dist = nxt
    return min(1.0, math.fsum(dist[max(h, 0):]))


def lead_exit_pvalue(histories: Sequence[Sequence[Outcome]], i: int, window: int) -> float | None:
    """Member i's lead-rule p-value among the active members' ``histories``, or None when its last
    ``window`` rounds hold a win or no other active member beat it in any of them."""
    m = min(window, len(histories[i]))
    recent = histories[i][len(histories[i]) - m:]
    if m == 0 or any(o.won for o in recent):
        return None
    # every active member was active in all of i's rounds (members only leave), so the ends align
    lead = max((sum(ok.won and oi.beaten for oi, ok in zip(recent, h[len(h) - m:]))
                for k, h in enumerate(histories) if k != i), default=0)
    if lead == 0:
        return None
    return min(1.0, (len(histories) - 1) * lead_pvalue([o.n for o in recent], lead))


def lead_exit_mask(histories: Sequence[Sequence[Outcome]], window: int, alpha: float) -> list[bool]:
    """Which of the active members exit now under rule 'lead' (True = exits); ``histories[i]`` is
    member i's outcomes in the rounds it was active, oldest first. Fewer than two members: nobody."""
    n = len(histories)
    if n < 2 or alpha <= 0:
        return [False] * n
    pvals = [lead_exit_pvalue(histories, i, window) for i in range(n)]
    exits = [p is not None and p <= alpha for p in pvals]
    if all(exits):  # unreachable while every round has a winner; kept as the stated guarantee
        exits[max(range(n), key=lambda i: (pvals[i], -i))] = False
    return exits


# ---- model exit, rule 'softmax' (legacy) ----------------------------------------------------------


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
