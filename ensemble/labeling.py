"""How a choice is scored and a label decided: the one scorer's arithmetic, shared by every fuser
(docs/algorithms.md, Labeling). No torch: the job's driver and command line import this module.

A member (or DeePEn's fused distribution) gives each choice of a row a :class:`ChoiceScores`: the
summed log-probability of the choice's continuation tokens after the prompt, their count in that
member's tokenisation, the choice's length in characters, and (for ``pmi``) the summed log-probability
of the same continuation after the neutral context. :func:`log_scores` turns them into one score per
choice under a normalisation (:data:`CHOICE_NORMS`):

- ``sum``: the summed log-probability (the sequence likelihood; favours short choices);
- ``token``: the sum divided by the member's token count (mean log-probability per token);
- ``char``: the sum divided by the choice's characters (comparable across tokenisations);
- ``pmi``: the sum minus the sum after the neutral context (pointwise mutual information with the
  prompt: how much the prompt raises the choice over its prior).

:func:`posterior` is the softmax of those scores, divided by ``LabelParams.temperature``, over the
row's choices (a temperature rescales the probabilities and never reorders them: the label of a member,
of ``Single`` and of DeePEn does not depend on it). An ensemble pools its members'
posteriors with :func:`pool` (``linear``: weighted mean; ``loglinear``: normalised weighted geometric
mean). The gate (:func:`gate`) keeps the main member's posterior for a row when its :func:`margin`
(top-1 minus top-2 probability) reaches ``LabelParams.gate``. SpecFuse pools the tempered member
posteriors, so with the ``linear`` pool (not ``loglinear``) its label can change with the temperature,
and the gate's margins are read after it. ``LabelParams.member_temperatures`` (SpecFuse only) gives
each member its own temperature, a factor on ``temperature`` (:meth:`LabelParams.temperature_of`).

With ``LabelParams.priors`` (a per-member prior correction estimated on a dev set,
``ensemble/priors.py``), the posterior a fuser pools, gates and labels with is :func:`label_posterior`:
the prior of the row's choices divided out of the scores before the temperature; a member's own
``choice_probs`` in its statistics stay :func:`posterior` (uncorrected). Without priors the two are
the same computation.

Continuation token ids themselves come from ``ensemble.scoring`` (it needs the members).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from ensemble.config import POOLS, check_choice, knob
from ensemble.priors import ChoicePriors, correct_log

CHOICE_NORMS = ("sum", "token", "char", "pmi")
"""Normalisations of a choice's summed log-probability (see the module docstring)."""

LABEL_GROUP = "labeling"
"""Help group of the labeling flags in the job's command line."""

_LOG_FLOOR = math.log(5e-324)
"""log of the smallest positive double: a posterior that underflowed to 0 enters a log-linear pool
with this log-probability (the most a float posterior can say), never as -inf."""


@dataclass(frozen=True)
class LabelParams:
    """How a choice is scored and a row's label decided (validated; errors name the field and value).

    The default normalisation, ``pmi``, was chosen on the dev splits of the labeling evaluation, where it
    is the most accurate for the members (docs/results.md); it costs one more scoring pass per member
    after the neutral context (for DeePEn, a second fused pass)."""

    norm: str = knob("pmi", flag="--choice-norm", choices=CHOICE_NORMS, group=LABEL_GROUP)
    """Normalisation of a choice's summed token log-probability: 'sum', 'token' (mean per token), 'char'
    (per character of the choice) or 'pmi' (minus its log-probability after the neutral context)."""
    neutral_context: str = knob("Answer:", flag="--neutral-context", group=LABEL_GROUP)
    """The prompt of pmi's unconditional term: each choice is scored after it as after a row's prompt."""
    target_delimiter: str = knob(" ", flag="--target-delimiter", group=LABEL_GROUP)
    """Text put before a choice for completion-style members (no chat template); chat members score the
    choice as the assistant's reply, with no delimiter."""
    gate: float | None = knob(None, flag="--label-gate", group=LABEL_GROUP)
    """Keep the main member's own label and posterior on a row when its posterior margin (top-1 minus
    top-2 probability) is at least this; None: never (always the ensemble), 0: always the main member."""
    temperature: float = knob(1.0, flag="--label-temperature", group=LABEL_GROUP)
    """Posterior temperature (> 0): every posterior is softmax(scores / temperature), the members' and
    the fused one, so SpecFuse pools tempered posteriors; > 1 flattens over-confident probabilities.
    ``jobs.calibrate`` fits it on a dev set (docs/jobs.md, "Calibration")."""
    member_temperatures: tuple[float, ...] | None = knob(None, flag="--member-temperatures", group=LABEL_GROUP,
                                                         hashed=False)
    """SpecFuse only: one temperature per member (job order, each > 0) that multiplies ``temperature``
    for that member's posterior (pooled, gated and in its ``choice_probs``): each member's own scale,
    so a sharp member does not outvote the others by confidence alone. ``jobs.calibrate`` fits each on
    the member's own dev posteriors (docs/jobs.md, "Calibration"); None: every member at
    ``temperature``."""
    priors: ChoicePriors | None = knob(None, flag="--choice-priors", group=LABEL_GROUP, hashed=False)
    """Prior correction (ensemble/priors.py): per member, its mean dev posterior per choice, divided out of
    its posterior (and DeePEn's fused one) before pooling and the gate; a JSON file of priors or a
    profile holding them (jobs.calibrate estimates them on dev); none: off. config_hash covers them
    when set (jobs/config.py)."""

    def __post_init__(self) -> None:
        check_choice(self, "norm")
        if not isinstance(self.neutral_context, str) or not self.neutral_context:
            raise ValueError(f"neutral_context must be a non-empty string, got {self.neutral_context!r}")
        if not isinstance(self.target_delimiter, str):
            raise ValueError(f"target_delimiter must be a string, got {self.target_delimiter!r}")
        g = self.gate
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
                raise ValueError(f"gate must be None or a number in [0, 1], got {g!r}")
            object.__setattr__(self, "gate", float(g))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if self.member_temperatures is not None:
            mt = self.member_temperatures
            if isinstance(mt, (str, bytes, Mapping)) or not isinstance(mt, Sequence) or not mt:
                raise ValueError(f"member_temperatures must be None or one temperature per member, got {mt!r}")
            try:
                object.__setattr__(self, "member_temperatures", tuple(check_temperature(t) for t in mt))
            except ValueError as exc:
                raise ValueError(f"member_temperatures: {exc} (in {list(mt)!r})") from None
        if isinstance(self.priors, Mapping):
            object.__setattr__(self, "priors", ChoicePriors.from_mapping(self.priors))
        elif self.priors is not None and not isinstance(self.priors, ChoicePriors):
            raise ValueError(f"priors must be None, a ChoicePriors or its mapping, got {self.priors!r}")
        if self.priors is not None and self.priors.norm != self.norm:
            raise ValueError(f"priors were estimated under norm {self.priors.norm!r}, but norm is {self.norm!r}")

    def prior(self, choices: Sequence[str], member: int | None) -> list[float] | None:
        """The prior of a row's choices: member ``member``'s (job order), or with None DeePEn's fused
        one; None without priors (or without a fused table). Uncovered choices raise
        ``ensemble.priors.UncoveredChoice``, naming the value."""
        if self.priors is None:
            return None
        if member is None:
            return None if self.priors.fused is None else self.priors.row_prior(self.priors.fused, choices)
        return self.priors.member_prior(member, choices)

    def temperature_of(self, member: int | None) -> float:
        """The temperature of member ``member``'s posterior (job order; None: a fused posterior's)."""
        if member is None or self.member_temperatures is None:
            return self.temperature
        return self.temperature * self.member_temperatures[member]

    def check_member_temperatures(self, n_members: int, method: str) -> None:
        """Refuse member temperatures for a method that does not pool members' posteriors, or for
        another member count (before any model call); nothing without them."""
        if self.member_temperatures is None:
            return
        if method != "specfuse":
            raise ValueError(f"member_temperatures are SpecFuse's (it pools the members' posteriors), not "
                             f"{method}'s: got {list(self.member_temperatures)!r}")
        if len(self.member_temperatures) != n_members:
            raise ValueError(f"member_temperatures must have one entry per member ({n_members}), got "
                             f"{list(self.member_temperatures)!r}")

    def check_priors(self, choices: Sequence[Sequence[str]], n_members: int) -> None:
        """With priors: refuse a member count they were not estimated for, or a row they do not cover
        (before any model call); nothing without priors."""
        if self.priors is not None:
            self.priors.check(choices, n_members)

    def with_(self, **changes) -> "LabelParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class ChoiceScores:
    """One member (or the fused distribution) on one row's choices, one entry per choice."""

    logprob: tuple[float, ...]
    """Sum of the continuation tokens' log-probabilities after the prompt."""
    tokens: tuple[int, ...]
    """Continuation token counts (in the tokenisation that was scored)."""
    chars: tuple[int, ...]
    """len(choice) in characters (the choice's text, without a delimiter)."""
    neutral: tuple[float, ...] | None = None
    """Sum of the same continuation's log-probabilities after the neutral context (pmi only)."""

    def __post_init__(self) -> None:
        n = len(self.logprob)
        lengths = {"tokens": len(self.tokens), "chars": len(self.chars)}
        if self.neutral is not None:
            lengths["neutral"] = len(self.neutral)
        bad = {k: v for k, v in lengths.items() if v != n}
        if n == 0 or bad:
            raise ValueError(f"ChoiceScores needs one entry per choice in every field ({n} log-probs), got {bad or 'none'}")
        if any(t < 1 for t in self.tokens) or any(c < 1 for c in self.chars):
            raise ValueError(f"token and character counts must be >= 1, got {self.tokens!r} and {self.chars!r}")


def log_scores(s: ChoiceScores, norm: str) -> list[float]:
    """One score per choice (log domain) under ``norm`` (see the module docstring)."""
    if norm == "sum":
        return list(s.logprob)
    if norm == "token":
        return [lp / n for lp, n in zip(s.logprob, s.tokens)]
    if norm == "char":
        return [lp / n for lp, n in zip(s.logprob, s.chars)]
    if norm == "pmi":
        if s.neutral is None:
            raise ValueError("norm 'pmi' needs the choices' neutral log-probabilities, got none")
        return [lp - u for lp, u in zip(s.logprob, s.neutral)]
    raise ValueError(f"norm must be one of {CHOICE_NORMS}, got {norm!r}")


def softmax(scores: Sequence[float]) -> list[float]:
    """softmax over log-domain scores, numerically stable."""
    m = max(scores)
    exps = [math.exp(x - m) for x in scores]
    total = sum(exps)
    return [e / total for e in exps]


def check_temperature(t: float) -> float:
    """``t`` as a float when it is a finite number > 0; ValueError naming it otherwise."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
    return float(t)


def posterior(s: ChoiceScores, norm: str, temperature: float = 1.0) -> list[float]:
    """The posterior over the choices: softmax of :func:`log_scores` divided by ``temperature``."""
    return temper(log_scores(s, norm), temperature)


def label_posterior(s: ChoiceScores, params: LabelParams, prior: Sequence[float] | None = None,
                    member: int | None = None) -> list[float]:
    """The posterior a label is decided on: :func:`posterior` under ``params``, or with ``prior`` (the
    row's, from :meth:`LabelParams.prior`) softmax((scores - log prior) / temperature); the temperature
    is member ``member``'s (:meth:`LabelParams.temperature_of`; None: ``params.temperature``)."""
    t = params.temperature_of(member)
    if prior is None:
        return posterior(s, params.norm, t)
    return temper(correct_log(log_scores(s, params.norm), prior), t)


def temper(scores: Sequence[float], temperature: float) -> list[float]:
    """softmax(scores / temperature) over log-domain scores (a posterior's logarithms give the same
    result as its scores: softmax ignores a shift). -inf (a probability of 0) counts as the log of the
    smallest double."""
    t = check_temperature(temperature)
    return softmax([(_LOG_FLOOR if x == -math.inf else x) / t for x in scores])


def pool(posteriors: Sequence[Sequence[float]], weights: Sequence[float], kind: str) -> list[float]:
    """Members' posteriors over one row's choices pooled with their weights (normalised to sum 1):
    ``linear`` the weighted mean; ``loglinear`` the weighted geometric mean, renormalised (members
    of weight 0 are left out; a probability that underflowed to 0 counts as the smallest double)."""
    if kind not in POOLS:
        raise ValueError(f"pool kind must be one of {POOLS}, got {kind!r}")
    if len(posteriors) != len(weights) or not posteriors:
        raise ValueError(f"pool needs one weight per posterior, got {len(weights)} weights for {len(posteriors)}")
    n = len(posteriors[0])
    if any(len(p) != n for p in posteriors):
        raise ValueError(f"posteriors must all have {n} choices, got {[len(p) for p in posteriors]}")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)!r}")
    w = [x / total for x in weights]
    if kind == "linear":
        return [sum(wi * p[c] for wi, p in zip(w, posteriors)) for c in range(n)]
    return softmax([sum(wi * (math.log(p[c]) if p[c] > 0 else _LOG_FLOOR) for wi, p in zip(w, posteriors) if wi > 0)
                    for c in range(n)])


def margin(probs: Sequence[float]) -> float:
    """Top-1 minus top-2 probability; 1.0 with one choice."""
    if len(probs) == 1:
        return 1.0
    a, b = sorted(probs, reverse=True)[:2]
    return a - b


def gate(main: Sequence[float], gate_at: float | None) -> bool:
    """Whether the gate keeps the main member's posterior ``main`` for the row: ``gate_at`` is
    ``LabelParams.gate`` (None: never; else when ``margin(main) >= gate_at``)."""
    return gate_at is not None and margin(main) >= gate_at


def gated_pool(posteriors: Sequence[Sequence[float]], weights: Sequence[float], kind: str,
               gate_at: float | None) -> tuple[list[float], bool]:
    """(probabilities, gated) of one row: the first (main) member's posterior when the gate keeps it
    (:func:`gate`), else the members' :func:`pool` (SpecFuse's label)."""
    if gate(posteriors[0], gate_at):
        return list(posteriors[0]), True
    return pool(posteriors, weights, kind), False


def best(probs: Sequence[float]) -> int:
    """Index of the chosen choice: the most probable, ties to the lower index."""
    return max(range(len(probs)), key=lambda i: (probs[i], -i))


__all__ = ["CHOICE_NORMS", "ChoiceScores", "LabelParams", "POOLS", "best", "check_temperature", "gate", "gated_pool",
           "label_posterior", "log_scores", "margin", "pool", "posterior", "softmax", "temper"]
