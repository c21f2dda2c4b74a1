"""Prior correction of the posteriors over a row's choices (docs/algorithms.md, "Prior correction"),
in the style of contextual and batch calibration (Zhao et al., 2021; Zhou et al., 2024): a member that
favours some choices whatever the prompt has that bias divided out before its posterior is pooled or
gated. No torch: the job's driver and command line import this module.

A member's *prior* is the mean of its posteriors (at temperature 1) over the rows of a labeled dev
set, per choice *key*: the choice's text when every dev row has the same choice set (a fixed label
set: yes/no, intent labels), its position otherwise (the mean over the dev rows that have that
position). The priors are estimated once, on dev, by ``jobs.calibrate`` and carried by the profile;
they are never estimated on the rows being labeled, so a row's label depends on that row alone
(not on its batch or partition).

At label time a row's scores under the normalisation become ``score - log(prior[key])`` over the
row's keys (:func:`correct_log`): at temperature 1 the posterior is the member's own divided by its
prior and renormalised; a temperature applies after the correction. A row with a choice the priors
do not cover (a text not in the dev label set, or more choices than any dev row) has no prior:
:meth:`ChoicePriors.row_prior` raises :class:`UncoveredChoice` naming the value.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

KEYED_BY = ("text", "position")
"""What a prior is keyed by: the choice's text (a fixed label set) or its position."""
_SMALLEST = 5e-324
"""A mean posterior that underflowed to 0 counts as the smallest double (a prior must be > 0)."""


class UncoveredChoice(ValueError):
    """A row's choice without a prior (a text outside the dev label set, a position dev never had)."""


def _table(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"priors: {name} must be a non-empty list of probabilities, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"priors: {name} must hold finite probabilities > 0, got {v!r}")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True, repr=False)
class ChoicePriors:
    """Per member of a job (in its order), a prior over choice keys; for DeePEn, also one of its fused
    posterior. Validated; errors name the field and the value. JSON form: :meth:`to_dict`."""

    keyed_by: str
    """'text' (``keys`` is the dev label set) or 'position' (``keys`` is None)."""
    norm: str
    """The normalisation the priors were estimated under (the job's ``--choice-norm`` must be it)."""
    members: tuple[str, ...]
    """Member specs, in the job's order: the job refuses priors estimated for other members."""
    tables: tuple[tuple[float, ...], ...]
    """One per member: a prior per key (text) or per position (the first choice first; a table covers
    the positions of the dev rows it was estimated on)."""
    keys: tuple[str, ...] | None = None
    """The dev label set, sorted (text), or None (position)."""
    fused: tuple[float, ...] | None = None
    """DeePEn only: the prior of its fused posterior over the same keys (None: not corrected)."""
    rows: int = 0
    """Dev rows the priors were estimated on (the record)."""

    def __post_init__(self) -> None:
        if self.keyed_by not in KEYED_BY:
            raise ValueError(f"priors: keyed_by must be one of {KEYED_BY}, got {self.keyed_by!r}")
        if not isinstance(self.norm, str) or not self.norm:
            raise ValueError(f"priors: norm must be a normalisation's name, got {self.norm!r}")
        if (isinstance(self.members, str) or not isinstance(self.members, Sequence) or not self.members
                or any(not isinstance(m, str) or not m for m in self.members)):
            raise ValueError(f"priors: members must be a non-empty list of member specs, got {self.members!r}")
        object.__setattr__(self, "members", tuple(self.members))
        if self.keyed_by == "text":
            keys = self.keys
            if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys or any(
                    not isinstance(k, str) or not k for k in keys) or len(set(keys)) != len(keys):
                raise ValueError(f"priors: keys must be the distinct choice texts of the dev label set, got {keys!r}")
            object.__setattr__(self, "keys", tuple(keys))
        elif self.keys is not None:
            raise ValueError(f"priors: keys must be None when keyed by position, got {self.keys!r}")
        if isinstance(self.tables, (str, bytes)) or not isinstance(self.tables, Sequence):
            raise ValueError(f"priors: tables must be one list per member, got {self.tables!r}")
        tables = tuple(_table(f"the table of member {m!r}", t) for m, t in zip(self.members, self.tables))
        if len(self.tables) != len(self.members):
            raise ValueError(f"priors: tables must be one per member ({len(self.members)}), got {len(self.tables)}")
        object.__setattr__(self, "tables", tables)
        if self.fused is not None:
            object.__setattr__(self, "fused", _table("fused", self.fused))
        if self.keys is not None:  # by position, a table covers the positions its dev rows had
            bad = {name: len(t) for name, t in [*zip(self.members, tables), ("fused", self.fused)]
                   if t is not None and len(t) != len(self.keys)}
            if bad:
                raise ValueError(f"priors: every table must have {len(self.keys)} entries (one per key), got {bad}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 0:
            raise ValueError(f"priors: rows must be an integer >= 0, got {self.rows!r}")

    def __repr__(self) -> str:  # short: error messages quote it
        width = len(self.keys) if self.keys is not None else max(map(len, self.tables))
        return (f"ChoicePriors(keyed_by={self.keyed_by!r}, norm={self.norm!r}, members={list(self.members)!r}, "
                f"{width} keys, fused={'yes' if self.fused is not None else 'no'}, rows={self.rows})")

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (lists, not tuples): a profile's ``priors``, the job's config_hash input."""
        return {"keyed_by": self.keyed_by, "norm": self.norm, "members": list(self.members),
                "tables": [list(t) for t in self.tables], "keys": None if self.keys is None else list(self.keys),
                "fused": None if self.fused is None else list(self.fused), "rows": self.rows}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "ChoicePriors":
        """From :meth:`to_dict`'s form; unknown or missing keys are refused, naming them."""
        return from_json_object(cls, data, "priors")

    @classmethod
    def from_arg(cls, path: str) -> "ChoicePriors":
        """The job's ``--choice-priors FILE``: a JSON file holding priors (:meth:`to_dict`) or a
        calibration profile (its ``priors``)."""
        data = read_json(path, "priors file")
        if isinstance(data, dict) and "tables" not in data and "priors" in data:  # a profile
            if data["priors"] is None:
                raise ValueError(f"the profile {path!r} has no priors (calibration left them off)")
            data = data["priors"]
        return cls.from_mapping(data)

    # ---- per row ---------------------------------------------------------------------------------
    def row_prior(self, table: Sequence[float], choices: Sequence[str]) -> list[float]:
        """``table``'s prior of each of a row's choices (:func:`row_prior`)."""
        return row_prior(table, self.keys, choices)

    def member_prior(self, member: int, choices: Sequence[str]) -> list[float]:
        """Member ``member``'s (job order) prior of a row's choices (:meth:`row_prior`)."""
        return self.row_prior(self.tables[member], choices)

    def uncovered(self, choices: Sequence[str]) -> str | None:
        """Why a row's choices have no prior (the :class:`UncoveredChoice` message), or None: for a job
        that turns such rows into input errors before calling the fuser."""
        try:
            self.check([choices], len(self.tables))
        except UncoveredChoice as exc:
            return str(exc).removeprefix("row 0: ")
        return None

    def check(self, choices: Sequence[Sequence[str]], n_members: int) -> None:
        """Refuse priors for another number of members, or a row whose choices are not all covered
        (naming the row and the value), before any model call."""
        if len(self.tables) != n_members:
            raise ValueError(f"the priors have {len(self.tables)} member tables for {n_members} members")
        narrowest = min((t for t in (*self.tables, self.fused) if t is not None), key=len)
        for i, cs in enumerate(choices):
            try:
                self.row_prior(narrowest, cs)
            except UncoveredChoice as exc:
                raise UncoveredChoice(f"row {i}: {exc}") from None


def row_prior(table: Sequence[float], keys: Sequence[str] | None, choices: Sequence[str]) -> list[float]:
    """A table's prior of each of a row's choices (by text when ``keys`` is the label set, else by
    position); :class:`UncoveredChoice` naming the value when one has none."""
    if keys is not None:
        at = {k: i for i, k in enumerate(keys)}
        missing = [c for c in choices if c not in at]
        if missing:
            raise UncoveredChoice(f"choice {missing[0]!r} has no prior: the priors cover the dev label set "
                                  f"{list(keys)[:8]}{' ...' if len(keys) > 8 else ''}")
        return [table[at[c]] for c in choices]
    if len(choices) > len(table):
        raise UncoveredChoice(f"a row of {len(choices)} choices has no prior for position {len(table) + 1}: "
                              f"the dev rows had at most {len(table)} choices")
    return list(table[:len(choices)])


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in the file ``path``; a missing file or bad JSON is a ValueError naming ``what``
    and the path (for the profile and the priors files)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exc.msg} at char {exc.pos}") from None


def from_json_object(cls: type, data: Any, what: str) -> Any:
    """``cls(**data)`` for a dataclass read from JSON: ``data`` must be an object with only ``cls``'s
    fields and every required one; errors name ``what`` and the keys (for the profile and the priors)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must hold a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}")
    try:
        return cls(**data)
    except TypeError as exc:  # a required key is missing
        raise ValueError(f"{what}: {exc}") from None


def correct_log(scores: Sequence[float], prior: Sequence[float]) -> list[float]:
    """A row's log-domain scores with the prior divided out: ``score - log(prior)`` per choice (the
    softmax of the result is the posterior divided by the prior, renormalised)."""
    if len(scores) != len(prior):
        raise ValueError(f"a prior per choice is needed: {len(scores)} scores, {len(prior)} priors")
    return [s - math.log(p) for s, p in zip(scores, prior)]


def keying(choice_sets: Sequence[Sequence[str]]) -> tuple[str, tuple[str, ...] | None]:
    """(keyed_by, keys) of a dev set's rows: 'text' and the sorted label set when every row has the
    same set of choices, else ('position', None)."""
    if not choice_sets:
        raise ValueError("priors need at least one dev row")
    first = frozenset(choice_sets[0])
    if all(len(cs) == len(first) and frozenset(cs) == first for cs in choice_sets):
        return "text", tuple(sorted(first))
    return "position", None


def estimate(posteriors: Sequence[Sequence[float]], choice_sets: Sequence[Sequence[str]],
             keys: Sequence[str] | None) -> tuple[float, ...]:
    """One table: the mean posterior per key (``keys``: the label set) or per position (None; the
    mean over the rows that have it) over the dev rows (a mean of 0 counts as the smallest double)."""
    if len(posteriors) != len(choice_sets) or not posteriors:
        raise ValueError(f"priors need one posterior per dev row, got {len(posteriors)} for {len(choice_sets)} rows")
    if keys is not None:
        at = {k: i for i, k in enumerate(keys)}
        sums = [0.0] * len(keys)
        for p, cs in zip(posteriors, choice_sets):
            for q, c in zip(p, cs):
                sums[at[c]] += q
        return tuple(max(s / len(posteriors), _SMALLEST) for s in sums)
    width = max(len(cs) for cs in choice_sets)
    sums, counts = [0.0] * width, [0] * width
    for p in posteriors:
        for j, q in enumerate(p):
            sums[j] += q
            counts[j] += 1
    return tuple(max(s / n, _SMALLEST) for s, n in zip(sums, counts))


__all__ = ["ChoicePriors", "KEYED_BY", "UncoveredChoice", "correct_log", "estimate", "from_json_object", "keying", "read_json",
           "row_prior"]
