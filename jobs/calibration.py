"""Calibration's offline decisions (docs/jobs.md, "Calibration"): from each member's cached choice
scores on a dev set, without calling a model, the accuracies with their intervals, the agreement of
the members, and the rules that choose the profile. Pure functions; ``jobs/calibrate.py`` runs them.

The rules (each documented where it is applied):

- accuracy intervals: Wilson score intervals at 95% (:func:`wilson`), which stay inside [0, 1] and
  behave at small n and at accuracies near 0 or 1, where the normal approximation does not;
- the normalisation (:func:`choose_norm`): the one of ``CHOICE_NORMS`` with the highest mean dev
  accuracy over the members; ties go to the earlier of :data:`NORM_PREFERENCE`;
- the main member: the best on dev under that normalisation (ties: the first given);
- dropped members (:func:`select_members`): a member "at chance" (its interval's lower bound is at or
  below the chance rate, the mean of 1/len(choices) over the rows) or "far below the best" (its accuracy
  more than ``gap`` below the main member's): ensembles help when their members are comparably good,
  as UniTE (Yao et al., 2024, choosing members within a fixed accuracy gap of the base model) and DFPE
  (filtering members whose dev score is far below the best) use; the main member is never dropped;
- weights (:func:`adapt_weights`): DeePEn-Adapt, w_i = acc_i / sum_j acc_j over the kept members;
- SpecFuse's pool (:func:`choose_pool`): linear or log-linear, the higher pooled dev accuracy (ties:
  linear, the first of ``POOLS``);
- the gate (:func:`choose_gate`): theta from :data:`GATE_GRID` (None: never keep the main member's
  answer, 0.0: always), the highest gated dev accuracy; ties go to the theta that keeps the main
  member's answer on more dev rows (cheaper: DeePEn skips the fused pass on those rows), then to the
  smaller theta.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

from ensemble.labeling import CHOICE_NORMS, POOLS, ChoiceScores, best, gate, pool, posterior

NORM_PREFERENCE = ("token", "char", "sum", "pmi")
"""Tie order of the normalisations: pmi last (it costs a second pass after the neutral context)."""
GATE_GRID: tuple[float | None, ...] = (None, 0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Candidate gates: None (never), 0.0 (always the main member), and margins in between."""
DROP_GAP = 0.10
"""Default of ``gap`` in :func:`select_members`: 10 accuracy points below the main member."""
Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (95% at the default z)."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(picks: Sequence[int], golds: Sequence[int]) -> float:
    if len(picks) != len(golds) or not golds:
        raise ValueError(f"picks and golds must be equally long and non-empty, got {len(picks)} and {len(golds)}")
    return sum(p == g for p, g in zip(picks, golds)) / len(golds)


def posteriors(scores: Sequence[ChoiceScores], norm: str) -> list[list[float]]:
    """A member's posterior over each row's choices under ``norm``."""
    return [posterior(s, norm) for s in scores]


def member_report(scores: Sequence[ChoiceScores], golds: Sequence[int]) -> dict[str, dict[str, float]]:
    """{norm: {accuracy, low, high}} of one member on the dev rows, for every normalisation."""
    out = {}
    for norm in CHOICE_NORMS:
        correct = sum(best(p) == g for p, g in zip(posteriors(scores, norm), golds))
        lo, hi = wilson(correct, len(golds))
        out[norm] = {"accuracy": correct / len(golds), "low": lo, "high": hi}
    return out


def choose_norm(reports: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The normalisation with the highest mean dev accuracy over the members (ties: NORM_PREFERENCE)."""
    def mean(norm: str) -> float:
        return sum(r[norm]["accuracy"] for r in reports.values()) / len(reports)

    return max(NORM_PREFERENCE, key=lambda n: (mean(n), -NORM_PREFERENCE.index(n)))


def pairwise_agreement(picks: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """``"a|b" -> fraction of rows where a and b chose the same label``."""
    out = {}
    for a, b in itertools.combinations(picks, 2):
        same = sum(x == y for x, y in zip(picks[a], picks[b]))
        out[f"{a}|{b}"] = same / len(picks[a]) if picks[a] else 0.0
    return out


def adapt_weights(accuracies: Sequence[float]) -> list[float]:
    """DeePEn-Adapt weights: proportional to dev accuracy, summing to 1 (uniform when all are 0)."""
    if any(a < 0 or a > 1 for a in accuracies):
        raise ValueError(f"accuracies must lie in [0, 1], got {list(accuracies)}")
    total = sum(accuracies)
    if total == 0:
        return [1 / len(accuracies)] * len(accuracies)
    w = [a / total for a in accuracies]
    w[-1] = 1.0 - sum(w[:-1])  # exact sum for the job's validation
    return w


def select_members(names: Sequence[str], reports: Mapping[str, Mapping[str, Mapping[str, float]]], norm: str,
                   chance: float, gap: float = DROP_GAP) -> tuple[str, list[str], dict[str, str]]:
    """(main, kept members in the given order, {dropped member: reason}) under ``norm`` (rules above)."""
    acc = {m: reports[m][norm]["accuracy"] for m in names}
    main = max(names, key=lambda m: (acc[m], -names.index(m)))
    dropped = {}
    for m in names:
        if m == main:
            continue
        low = reports[m][norm]["low"]
        if low <= chance:
            dropped[m] = (f"at chance: dev accuracy {acc[m]:.3f}, 95% interval lower bound {low:.3f} <= "
                          f"chance {chance:.3f}")
        elif acc[m] < acc[main] - gap:
            dropped[m] = (f"far below the best: dev accuracy {acc[m]:.3f} < {acc[main]:.3f} ({main}) "
                          f"- gap {gap:.2f}")
    return main, [m for m in names if m not in dropped], dropped


def pooled(posts: Sequence[Sequence[Sequence[float]]], weights: Sequence[float], kind: str) -> list[list[float]]:
    """Each row's pool of the members' posteriors (``posts[member][row]``)."""
    return [pool([p[r] for p in posts], weights, kind) for r in range(len(posts[0]))]


def choose_pool(posts: Sequence[Sequence[Sequence[float]]], weights: Sequence[float],
                golds: Sequence[int]) -> tuple[str, dict[str, float]]:
    """SpecFuse's pool: (the kind with the best pooled dev accuracy, {kind: accuracy}); ties: POOLS order."""
    accs = {kind: accuracy([best(p) for p in pooled(posts, weights, kind)], golds) for kind in POOLS}
    return max(POOLS, key=lambda k: (accs[k], -POOLS.index(k))), accs


def gated_picks(main_posts: Sequence[Sequence[float]], ensemble_picks: Sequence[int],
                gate_at: float | None) -> list[int]:
    """The labels with the gate: the main member's where its margin is >= gate_at, else the ensemble's."""
    return [best(m) if gate(m, gate_at) else e for m, e in zip(main_posts, ensemble_picks)]


def choose_gate(main_posts: Sequence[Sequence[float]], ensemble_picks: Sequence[int], golds: Sequence[int],
                grid: Sequence[float | None] = GATE_GRID) -> tuple[float | None, dict[str, float]]:
    """(theta, {str(theta): gated dev accuracy}) by the rule above."""
    def kept(g: float | None) -> int:
        return sum(gate(m, g) for m in main_posts)

    accs = {g: accuracy(gated_picks(main_posts, ensemble_picks, g), golds) for g in grid}
    chosen = max(grid, key=lambda g: (accs[g], kept(g), -(math.inf if g is None else g)))
    return chosen, {str(g): a for g, a in accs.items()}
