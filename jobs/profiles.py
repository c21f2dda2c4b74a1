"""A calibration profile (docs/jobs.md, "Calibration"): what ``jobs.calibrate`` chose on a dev set
and ``python -m jobs.fuse --profile PROFILE.json`` applies.

The file is JSON, versioned (:data:`PROFILE_VERSION`). The job applies its method, members (in
order), main member, weights, choice normalisation and scorer texts, SpecFuse's pool, the posterior
temperature (``--label-temperature``; 1 in a profile written before it existed), SpecFuse's member
temperatures (``--member-temperatures``; none in a profile written before they existed), the gate and the
prior correction (``--choice-priors``; none in a profile written before it existed);
everything else in it (the dev file's sha256 and size, each member's dev accuracy with its interval,
the members' agreement, the dropped members and why, the accuracies the choices were made on) is the
record of why. A flag or config-file setting that contradicts an applied one is refused, naming both
values; the applied settings are ordinary job settings, so ``config_hash`` covers them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ensemble.config import METHODS, POOLS, WEIGHT_TOL, DeePEnConfig, SpecFuseConfig, flag_of
from ensemble.labeling import CHOICE_NORMS, LabelParams
from ensemble.priors import ChoicePriors, from_json_object, read_json

PROFILE_VERSION = 1


@dataclass(frozen=True)
class Profile:
    method: str
    """single, deepen or specfuse (single when fewer than two members survive the drop rule)."""
    members: tuple[str, ...]
    """Member specs in the order the job takes them."""
    main: int
    """Index of the main member (the best on dev); 0 for SpecFuse and single."""
    weights: tuple[float, ...] | None
    """DeePEn-Adapt weights, one per member (None for single)."""
    choice_norm: str
    neutral_context: str
    target_delimiter: str
    gate: float | None
    label_pool: str | None = None
    """SpecFuse's pool of the members' posteriors (None for the other methods)."""
    temperature: float = 1.0
    """Posterior temperature fitted on dev (``LabelParams.temperature``); its record, with the dev NLL
    and expected calibration error before and after, is ``chosen_on["temperature"]``."""
    member_temperatures: tuple[float, ...] | None = None
    """SpecFuse: each member's own posterior temperature fitted on dev, a factor on ``temperature``
    (``LabelParams.member_temperatures``); None: every member at ``temperature`` (or a profile written
    before they existed). Their records are ``chosen_on["member_temperatures"]``."""
    priors: ChoicePriors | None = None
    """Per-member prior correction estimated on dev (``LabelParams.priors``, ensemble/priors.py), or None
    when calibration left it off (or the profile predates it); the decision and its cross-fitted dev
    accuracies are ``chosen_on["priors"]``."""
    requested_method: str = ""
    """The method calibrate was asked for."""
    dropped: dict[str, str] = field(default_factory=dict)
    """{member: why it was dropped}."""
    dev: dict[str, Any] = field(default_factory=dict)
    """{path, sha256, n, chance}."""
    member_accuracy: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """{member: {norm: {accuracy, low, high}}}: dev accuracy with its 95% Wilson interval."""
    agreement: dict[str, float] = field(default_factory=dict)
    """{"a|b": share of dev rows where a and b choose the same label} under choice_norm."""
    chosen_on: dict[str, Any] = field(default_factory=dict)
    """The dev figures each choice was made on (pool, gate, the ensemble's accuracy; the temperature's
    NLL and expected calibration error)."""
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"profile: {name} must be {rule}, got {getattr(self, name)!r}")

        if self.version != PROFILE_VERSION:
            raise bad("version", f"{PROFILE_VERSION} (written by another version of jobs.calibrate: calibrate again)")
        if self.method not in METHODS:
            raise bad("method", f"one of {METHODS}")
        object.__setattr__(self, "members", tuple(self.members))
        if not self.members or any(not isinstance(m, str) or not m for m in self.members):
            raise bad("members", "a non-empty list of member specs")
        if (self.method == "single") != (len(self.members) == 1):
            raise bad("members", f"{'exactly one member' if self.method == 'single' else 'two or more'} for {self.method}")
        if not isinstance(self.main, int) or not 0 <= self.main < len(self.members):
            raise bad("main", f"an index into members (0..{len(self.members) - 1})")
        if self.method != "deepen" and self.main != 0:
            raise bad("main", f"0 for {self.method}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.members) or abs(sum(self.weights) - 1) > WEIGHT_TOL:
                raise bad("weights", "one per member, summing to 1")
        if self.method == "single" and self.weights is not None:
            raise bad("weights", "None for single")
        if self.choice_norm not in CHOICE_NORMS:
            raise bad("choice_norm", f"one of {CHOICE_NORMS}")
        if (self.method == "specfuse") != (self.label_pool is not None):
            raise bad("label_pool", f"one of {POOLS} for specfuse and None otherwise")
        if self.label_pool is not None and self.label_pool not in POOLS:
            raise bad("label_pool", f"one of {POOLS}")
        if isinstance(self.member_temperatures, (list, tuple)):
            object.__setattr__(self, "member_temperatures", tuple(self.member_temperatures))
        if self.member_temperatures is not None and self.method != "specfuse":
            raise bad("member_temperatures", "None for a method other than specfuse")
        if self.member_temperatures is not None and len(self.member_temperatures) != len(self.members):
            raise bad("member_temperatures", "one per member")
        if isinstance(self.priors, dict):
            object.__setattr__(self, "priors", ChoicePriors.from_mapping(self.priors))
        elif self.priors is not None and not isinstance(self.priors, ChoicePriors):
            raise bad("priors", "None or an object of priors (ensemble/priors.py)")
        if self.priors is not None and self.priors.members != self.members:
            raise bad("priors", f"estimated for the profile's members {list(self.members)}")
        self.label_params()  # the scorer's and the gate's own checks

    def label_params(self) -> LabelParams:
        return LabelParams(norm=self.choice_norm, neutral_context=self.neutral_context,
                           target_delimiter=self.target_delimiter, gate=self.gate, temperature=self.temperature,
                           member_temperatures=self.member_temperatures, priors=self.priors)

    def job_settings(self) -> dict[str, Any]:
        """The JobConfig settings this profile applies (``fuser`` and ``label`` nested, as a config file's)."""
        out: dict[str, Any] = {"method": self.method, "members": list(self.members),
                               "label": {f.name: getattr(self.label_params(), f.name) for f in fields(LabelParams)}}
        if self.method == "deepen":
            out["fuser"] = {"main": self.main, "weights": list(self.weights)}
        elif self.method == "specfuse":
            out["fuser"] = {"weights": list(self.weights), "label_pool": self.label_pool}
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, sort_keys=False) + "\n")


def load_profile(path: str | Path) -> Profile:
    return from_json_object(Profile, read_json(path, "profile"), f"profile {str(path)!r}")


_FLAG = {"method": "--method", "members": "--members"}
_NESTED_FLAG = {"fuser": lambda name: flag_of(DeePEnConfig if name == "main" else SpecFuseConfig, name),
                "label": lambda name: flag_of(LabelParams, name)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, ChoicePriors) or isinstance(b, ChoicePriors):  # priors: compared in their JSON form
        a, b = (ChoicePriors.from_mapping(x).to_dict() if isinstance(x, dict) else x for x in (a, b))
        a, b = (x.to_dict() if isinstance(x, ChoicePriors) else x for x in (a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
                and math.isclose(a, b, abs_tol=1e-6))
    return a == b


def apply_profile(settings: dict[str, Any], path: str) -> dict[str, Any]:
    """``settings`` (JobConfig fields; ``fuser``/``label`` as mappings) with the profile's applied.
    A setting given both ways with different values is refused naming its flag and both values."""
    prof = load_profile(path)
    out = dict(settings)
    for key, value in prof.job_settings().items():
        if key in ("fuser", "label"):
            given = dict(out.get(key) or {})
            for name, v in value.items():
                if name in given and not _same(given[name], v):
                    raise ValueError(f"{_NESTED_FLAG[key](name)} is {given[name]!r} but the profile {path!r} "
                                     f"sets {name} to {v!r}: leave it out or calibrate again")
                given[name] = v
            out[key] = given
            continue
        if key in out and not _same(out[key], value):
            raise ValueError(f"{_FLAG[key]} is {out[key]!r} but the profile {path!r} sets {key} to {value!r}: "
                             f"leave it out or calibrate again")
        out[key] = value
    return out
