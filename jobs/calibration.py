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
- the posterior temperature (:func:`fit_temperature`): from :data:`TEMPERATURE_GRID`, the one with the
  lowest mean dev negative log-likelihood of the gold choice (:func:`nll`) under the chosen system's
  label probabilities without the gate (ties: the closest to 1, then the smaller); a temperature
  rescales the probabilities without reordering them, so it fixes their calibration (:func:`ece`) and
  not the labels, except SpecFuse's linear pool of tempered posteriors;
- SpecFuse's pool (:func:`choose_pool`): linear or log-linear, each at its own fitted temperature, the
  higher pooled dev accuracy (ties: linear, the first of ``POOLS``);
- the gate (:func:`choose_gate`): theta from :data:`GATE_GRID` (None: never keep the main member's
  answer, 0.0: always), the highest gated dev accuracy; ties go to the theta that keeps the main
  member's answer on more dev rows (cheaper: DeePEn skips the fused pass on those rows), then to the
  smaller theta. A gate that saves model calls (every gate for DeePEn; 0 for SpecFuse, whose profile
  is then the main member alone) competes when its dev accuracy is at least never's; one that saves
  none (SpecFuse's 0 < theta: every member is scored on every row anyway) only changes labels, so it
  competes only when its gain over never is significant on dev: a one-sided exact sign test
  (:func:`sign_test`) of the rows it makes right against those it makes wrong, p < :data:`GATE_ALPHA`
  (200 dev rows cannot tell a 3-row gain from noise, and such gates lost on test: docs/results.md).
  The margins are read from the tempered posteriors, as the job reads them;
- the prior correction (:func:`decide_priors`, ensemble/priors.py): on only when its 2-fold
  cross-fitted dev accuracy beats the accuracy without it: the dev rows at even positions and those at
  odd positions are the two halves, the priors are estimated on one half and the other half labeled
  with them, both ways (a held-out row a half's priors do not cover counts as wrong); the labels are
  the ungated system's (the member's, SpecFuse's pool at its chosen kind and temperature, DeePEn's
  fused ones), everything else fixed as chosen without priors. When on, the priors are estimated on
  every dev row and the pool, temperature and gate are chosen again on the corrected posteriors;
- SpecFuse's member temperatures (:func:`member_temperatures`): each member's own temperature fitted
  on its own dev posteriors (the rule above), the pool and the shared temperature then chosen on the
  members' tempered posteriors; kept only when their 2-fold cross-fitted dev accuracy (the halves as
  for the priors, :func:`cross_fit_member_temperatures`) beats one shared temperature's, strictly,
  on the ungated pool.

Expected calibration error (:func:`ece`) is the one ``bench/eval_label.py`` reports: confidence = the
top label probability, :data:`ECE_BINS` equal-width bins.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Sequence

from ensemble.labeling import CHOICE_NORMS, POOLS, ChoiceScores, best, gate, pool, posterior, temper
from ensemble.priors import ChoicePriors, UncoveredChoice, correct_log, estimate, keying, row_prior

NORM_PREFERENCE = ("token", "char", "sum", "pmi")
"""Tie order of the normalisations: pmi last (it costs a second pass after the neutral context)."""
GATE_GRID: tuple[float | None, ...] = (None, 0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Candidate gates: None (never), 0.0 (always the main member), and margins in between."""
GATE_ALPHA = 0.05
"""Level of the sign test a gate that saves no model call must pass on dev (:func:`choose_gate`)."""
DROP_GAP = 0.10
"""Default of ``gap`` in :func:`select_members`: 10 accuracy points below the main member."""
Z95 = 1.959963984540054
TEMPERATURE_GRID: tuple[float, ...] = tuple(2.0 ** (k / 4) for k in range(-8, 17))
"""Candidate posterior temperatures: 0.25 to 16, log-spaced (4 per doubling), 1.0 included."""
ECE_BINS = 10
"""Equal-width bins of the top probability over [0, 1] in :func:`ece`."""
_NLL_CAP = -math.log(5e-324)
"""The negative log-likelihood of a gold choice whose probability underflowed to 0."""


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


def tempered(logs: Sequence[Sequence[float]], t: float) -> list[list[float]]:
    """Each row's posterior at temperature ``t`` from its log-domain scores (or log-probabilities)."""
    return [temper(x, t) for x in logs]


def scaled(logs: Sequence[Sequence[float]], t: float) -> list[list[float]]:
    """Each row's log-domain scores divided by ``t``: tempering them at T is tempering ``logs`` at t*T
    (how a member temperature composes with the shared one, ``LabelParams.temperature_of``)."""
    return [[v / t for v in x] for x in logs]


def member_temperatures(logs: Sequence[Sequence[Sequence[float]]], names: Sequence[str], golds: Sequence[int],
                        grid: Sequence[float] = TEMPERATURE_GRID) -> tuple[list[float], dict[str, dict]]:
    """Each member's own temperature: :func:`temperature_record` on its posteriors alone (``logs[member]
    [row]``); (the temperatures in member order, {member: record})."""
    temps, records = [], {}
    for m, x in zip(names, logs):
        t, records[m] = temperature_record(lambda t, x=x: tempered(x, t), golds, grid, f"{m}'s posteriors")
        temps.append(t)
    return temps, records


def two_folds(n: int) -> list[tuple[str, list[int], list[int]]]:
    """The 2-fold cross-fit of ``n`` dev rows: (fit half's name, its rows, the held-out rows), the rows at
    even positions and those at odd positions, both ways."""
    halves = {"even": list(range(0, n, 2)), "odd": list(range(1, n, 2))}
    return [(fit, halves[fit], halves[held]) for fit, held in (("even", "odd"), ("odd", "even"))]


def cross_fit_member_temperatures(logs: Sequence[Sequence[Sequence[float]]], names: Sequence[str],
                                  weights: Sequence[float], golds: Sequence[int],
                                  grid: Sequence[float] = TEMPERATURE_GRID) -> dict[str, Any]:
    """The 2-fold cross-fitted dev accuracy of SpecFuse's ungated pool with each member's own
    temperature ("on") and with one shared temperature ("off"): on each half of the dev rows (even and
    odd positions) the member temperatures (:func:`member_temperatures`), then the pool and the shared
    temperature (:func:`choose_pool`) are chosen, and the other half is labeled with them, both ways.
    {on, off, folds: [{fit, rows, on, off, temperatures}]}."""
    n = len(golds)
    right = {"on": 0, "off": 0}
    folds = []
    for fit, f_rows, h_rows in two_folds(n):
        f_logs = [[x[i] for i in f_rows] for x in logs]
        h_logs = [[x[i] for i in h_rows] for x in logs]
        f_golds, h_golds = [golds[i] for i in f_rows], [golds[i] for i in h_rows]
        temps, _ = member_temperatures(f_logs, names, f_golds, grid)
        fold = {"fit": fit, "rows": len(h_rows), "temperatures": temps}
        for key, ts in (("on", temps), ("off", [1.0] * len(temps))):
            kind, _, records = choose_pool([scaled(x, t) for x, t in zip(f_logs, ts)], weights, f_golds, grid)
            shared = records[kind]["temperature"]
            picks = [best(p) for p in pooled([tempered(scaled(x, t), shared) for x, t in zip(h_logs, ts)],
                                             weights, kind)]
            hits = sum(p == g for p, g in zip(picks, h_golds))
            right[key] += hits
            fold[key] = hits / len(h_rows)
        folds.append(fold)
    return {"on": right["on"] / n, "off": right["off"] / n, "folds": folds}


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``bins`` equal-width bins of ``confidence`` over [0, 1] (the last
    one includes 1.0); the sum over bins of (rows in bin / rows) * |accuracy - mean confidence|."""
    conf, ok = [float(c) for c in confidence], [bool(x) for x in correct]
    if len(conf) != len(ok) or not conf:
        raise ValueError(f"ece needs equally long non-empty confidences and outcomes, got {len(conf)} and {len(ok)}")
    if any(not 0.0 <= c <= 1.0 for c in conf):
        raise ValueError(f"confidences must lie in [0, 1], got min {min(conf)} max {max(conf)}")
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        groups.setdefault(min(int(c * bins), bins - 1), []).append(i)
    return sum(len(g) / len(conf) * abs(sum(ok[i] for i in g) / len(g) - sum(conf[i] for i in g) / len(g))
               for g in groups.values())


def label_ece(probs: Sequence[Sequence[float]], golds: Sequence[int]) -> float:
    """:func:`ece` of label probabilities: each row's top probability against whether its label is right."""
    return ece([max(p) for p in probs], [best(p) == g for p, g in zip(probs, golds)])


def nll(probs: Sequence[Sequence[float]], golds: Sequence[int]) -> float:
    """Mean negative log-likelihood of the gold choice (a probability of 0 counts as the smallest double)."""
    if len(probs) != len(golds) or not golds:
        raise ValueError(f"probs and golds must be equally long and non-empty, got {len(probs)} and {len(golds)}")
    return sum(-math.log(p[g]) if p[g] > 0 else _NLL_CAP for p, g in zip(probs, golds)) / len(golds)


def fit_temperature(probs_at: Callable[[float], Sequence[Sequence[float]]], golds: Sequence[int],
                    grid: Sequence[float] = TEMPERATURE_GRID) -> tuple[float, dict[str, float]]:
    """(temperature, {str(t): dev NLL}): the grid's temperature whose label probabilities
    ``probs_at(t)`` give the gold choices the lowest mean NLL (ties: the closest to 1, then the smaller)."""
    nlls = {t: nll(probs_at(t), golds) for t in grid}
    chosen = min(grid, key=lambda t: (nlls[t], abs(math.log(t)), t))
    return chosen, {str(t): v for t, v in nlls.items()}


def temperature_record(probs_at: Callable[[float], Sequence[Sequence[float]]], golds: Sequence[int],
                       grid: Sequence[float], fitted_on: str) -> tuple[float, dict]:
    """(the fitted temperature, the profile's record of it: the grid's NLLs and the dev NLL and ECE of
    the label probabilities at temperature 1 ("before") and at the fitted one ("after"))."""
    t, nlls = fit_temperature(probs_at, golds, grid)
    before, after = probs_at(1.0), probs_at(t)
    return t, {"temperature": t, "fitted_on": fitted_on, "rows": len(golds), "nll": nlls,
               "nll_before": nll(before, golds), "nll_after": nll(after, golds),
               "ece_before": label_ece(before, golds), "ece_after": label_ece(after, golds)}


def choose_pool(logs: Sequence[Sequence[Sequence[float]]], weights: Sequence[float], golds: Sequence[int],
                grid: Sequence[float] = TEMPERATURE_GRID) -> tuple[str, dict[str, float], dict[str, dict]]:
    """SpecFuse's pool from the members' log-domain scores ``logs[member][row]``: each kind at its own
    fitted temperature (:func:`temperature_record`; the members' posteriors are tempered, then pooled);
    (the kind with the best pooled dev accuracy (ties: POOLS order), {kind: accuracy}, {kind: record})."""
    records, accs = {}, {}
    for kind in POOLS:
        def probs_at(t: float, kind: str = kind) -> list[list[float]]:
            return pooled([tempered(m, t) for m in logs], weights, kind)

        t, records[kind] = temperature_record(probs_at, golds, grid, f"the {kind} pool of the members' posteriors")
        accs[kind] = accuracy([best(p) for p in probs_at(t)], golds)
    kind = max(POOLS, key=lambda k: (accs[k], -POOLS.index(k)))
    return kind, accs, records


def gated_picks(main_posts: Sequence[Sequence[float]], ensemble_picks: Sequence[int],
                gate_at: float | None) -> list[int]:
    """The labels with the gate: the main member's where its margin is >= gate_at, else the ensemble's."""
    return [best(m) if gate(m, gate_at) else e for m, e in zip(main_posts, ensemble_picks)]


def sign_test(better: int, worse: int) -> float:
    """One-sided exact sign test: P(X >= better) for X ~ Binomial(better + worse, 1/2) (1.0 when no row
    changed)."""
    n = better + worse
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2 ** n if n else 1.0


def _changes(picks: Sequence[int], ensemble_picks: Sequence[int], golds: Sequence[int]) -> dict[str, float]:
    better = sum(p == y != e for p, e, y in zip(picks, ensemble_picks, golds))
    worse = sum(e == y != p for p, e, y in zip(picks, ensemble_picks, golds))
    return {"better": better, "worse": worse, "p": sign_test(better, worse)}


def choose_gate(main_posts: Sequence[Sequence[float]], ensemble_picks: Sequence[int], golds: Sequence[int],
                grid: Sequence[float | None] = GATE_GRID, saves: Callable[[float], bool] = lambda g: True
                ) -> tuple[float | None, dict[str, float], dict[str, dict[str, float]]]:
    """(theta, {str(theta): gated dev accuracy}, {str(theta): {better, worse, p}}) by the rule above;
    ``saves(theta)``: whether the gate saves model calls (every gate for DeePEn, only 0 for SpecFuse),
    else it must pass :func:`sign_test`. The third map holds, per gate, the dev rows it makes right /
    wrong that the ungated ensemble got wrong / right, and the sign test's p of ``better`` against
    ``worse`` (the profile's ``chosen_on["gate_changes"]``). ``grid`` must hold None (never), the
    baseline the other gates are measured against."""
    if None not in grid:
        raise ValueError(f"the gate grid must include None (never), got {list(grid)!r}")

    def kept(g: float | None) -> int:
        return sum(gate(m, g) for m in main_posts)

    picks = {g: gated_picks(main_posts, ensemble_picks, g) for g in grid}
    accs = {g: accuracy(p, golds) for g, p in picks.items()}
    changes = {g: _changes(p, ensemble_picks, golds) for g, p in picks.items()}
    eligible = [g for g in grid if g is None or (saves(g) and accs[g] >= accs[None]) or changes[g]["p"] < GATE_ALPHA]
    chosen = max(eligible, key=lambda g: (accs[g], kept(g), -(math.inf if g is None else g)))
    return chosen, {str(g): a for g, a in accs.items()}, {str(g): c for g, c in changes.items()}


# ---- prior correction -------------------------------------------------------------------------------
def prior_table(logs: Sequence[Sequence[float]], choice_sets: Sequence[Sequence[str]],
                keys: Sequence[str] | None) -> tuple[float, ...]:
    """A prior table (``ensemble.priors.estimate``) from log-domain scores: their posteriors at temperature 1."""
    return estimate([temper(x, 1.0) for x in logs], choice_sets, keys)


def corrected_logs(logs: Sequence[Sequence[float]], choice_sets: Sequence[Sequence[str]], table: Sequence[float],
                   keys: Sequence[str] | None) -> list[list[float]]:
    """Each row's scores with ``table``'s prior divided out (``ensemble.priors.correct_log``)."""
    return [correct_log(x, row_prior(table, keys, cs)) for x, cs in zip(logs, choice_sets)]


def cross_fit_priors(sources: Sequence[Sequence[Sequence[float]]], choice_sets: Sequence[Sequence[str]],
                     golds: Sequence[int], picks_of: Callable[[list[list[list[float]]]], list[int]]) -> dict[str, Any]:
    """The 2-fold cross-fitted dev accuracy of prior correction (the module docstring): ``sources[s][row]``
    are log-domain scores (one source per member, or DeePEn's fused scores), ``picks_of(logs[s][row])``
    the system's labels from them. {off, on, keyed_by, keys, folds: [{fit, rows, off, on}], uncovered}."""
    keyed_by, keys = keying(choice_sets)
    n = len(golds)
    off_picks = picks_of([list(src) for src in sources])
    folds, right, uncovered = [], 0, 0
    for fit, fit_rows, held_rows in two_folds(n):
        tables = [prior_table([src[i] for i in fit_rows], [choice_sets[i] for i in fit_rows], keys) for src in sources]
        ok = []
        for i in held_rows:
            try:
                [row_prior(t, keys, choice_sets[i]) for t in tables]
            except UncoveredChoice:
                uncovered += 1
                continue
            ok.append(i)
        picks = picks_of([corrected_logs([src[i] for i in ok], [choice_sets[i] for i in ok], t, keys)
                          for src, t in zip(sources, tables)]) if ok else []
        on = sum(p == golds[i] for p, i in zip(picks, ok))
        right += on
        folds.append({"fit": fit, "rows": len(held_rows), "on": on / len(held_rows),
                      "off": sum(off_picks[i] == golds[i] for i in held_rows) / len(held_rows)})
    return {"off": accuracy(off_picks, golds), "on": right / n, "keyed_by": keyed_by,
            "keys": None if keys is None else len(keys), "folds": folds, "uncovered": uncovered}


def decide_priors(sources: Sequence[Sequence[Sequence[float]]], choice_sets: Sequence[Sequence[str]],
                  golds: Sequence[int], picks_of: Callable[[list[list[list[float]]]], list[int]]) -> tuple[bool, dict]:
    """(on, record): :func:`cross_fit_priors`, on when its cross-fitted accuracy beats off (strictly);
    off with fewer than 2 dev rows (no halves to cross-fit)."""
    if len(golds) < 2:
        return False, {"applied": False, "why": f"{len(golds)} dev row(s): too few to cross-fit"}
    rec = cross_fit_priors(sources, choice_sets, golds, picks_of)
    rec["applied"] = rec["on"] > rec["off"]
    return rec["applied"], rec


def fit_priors(member_logs: Sequence[Sequence[Sequence[float]]], choice_sets: Sequence[Sequence[str]], norm: str,
               members: Sequence[str], fused: tuple[Sequence[Sequence[float]], Sequence[Sequence[str]]] | None = None
               ) -> ChoicePriors:
    """The priors on every dev row: one table per member (``member_logs[m][row]``, job order), keyed by
    the dev rows' choices (``ensemble.priors.keying``); ``fused``: DeePEn's (fused logs, their rows'
    choices) for its fused table."""
    keyed_by, keys = keying(choice_sets)
    return ChoicePriors(keyed_by=keyed_by, norm=norm, members=tuple(members), keys=keys,
                        tables=tuple(prior_table(x, choice_sets, keys) for x in member_logs),
                        fused=None if fused is None else prior_table(fused[0], fused[1], keys), rows=len(choice_sets))
