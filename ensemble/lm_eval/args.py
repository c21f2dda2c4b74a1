"""The ``ensemble-fuse`` lm-eval model's ``model_args``, parsed into a frozen, validated
:class:`ModelSpec` (no torch, no lm_eval: the tests check the errors without loading either).

lm-eval splits ``--model_args`` on commas and converts each value (``true``/``false`` to bools,
numbers to ints or floats), so lists are pipe-separated: ``members=a|b|c``, ``weights=0.5|0.3|0.2``.
Through ``lm_eval.simple_evaluate(model_args={...})`` lists may also be Python lists.

Keys (docs/lm_eval.md): ``method``, ``members``, ``profile``, the fuser settings of the method's config
(``ensemble.config``: ``main``, ``weights`` and every other field of ``DeePEnConfig`` or
``SpecFuseConfig``, resolved by ``ensemble.config.fuser_config``, the one source of truth), ``dtype``,
``max_batch_tokens``, ``greedy_check``, ``seed``, and what lm-eval passes every model: ``device``,
``batch_size`` (contexts per fuser call; ``auto``: all of a call's contexts at once, the fusers bound
their memory by ``max_batch_tokens`` anyway) and ``max_batch_size`` (accepted and unused). Any other
key is refused with an error naming it.

``profile=PROFILE.json`` (``python -m jobs.calibrate``) applies the profile's method, members, main
member, weights and SpecFuse pool through ``jobs.profiles.apply_profile``, the job's own rule (a
``model_args`` value that contradicts the profile is refused, naming both). The profile's choice
normalisation, neutral context, temperature and gate are labeling decisions and are not applied:
lm-eval's metrics normalise the log-likelihoods themselves (``acc``: the sum, ``acc_norm``: per
character).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ensemble.config import FUSERS, MAX_BATCH_TOKENS, MAX_SEED, check_batch_tokens, fuser_config, method_spec

log = logging.getLogger(__name__)

OWN_KEYS = ("method", "members", "profile", "dtype", "max_batch_tokens", "greedy_check", "seed")
"""model_args of the ensemble-fuse model itself (the fuser settings come from the method's config)."""
LM_EVAL_KEYS = ("device", "batch_size", "max_batch_size")
"""What lm-eval passes every model."""
LIST_KEYS = ("members", "weights")
"""Keys whose value is a list: pipe-separated in a model_args string."""


@dataclass(frozen=True)
class ModelSpec:
    """What the model builds and how it runs (validated; errors name the key and the value)."""

    method: str
    members: tuple[str, ...]
    fuser: Any
    """The method's resolved config (``ensemble.config.fuser_config``); None for single."""
    device: str | None = None
    dtype: str | None = None
    max_batch_tokens: int = MAX_BATCH_TOKENS
    batch_size: int | None = None
    """Contexts per fuser call; None: every context of an lm-eval call in one (``batch_size=auto``)."""
    greedy_check: bool = False
    """loglikelihood's is_greedy computed by a greedy generation per request (docs/lm_eval.md); False:
    is_greedy is returned as False."""
    seed: int = 0
    """Seed of every sampled generate_until request (do_sample=true)."""

    def __post_init__(self) -> None:
        method_spec(self.method)
        if not self.members or any(not isinstance(m, str) or not m.strip() for m in self.members):
            raise ValueError(f"model_args members must be one or more member specs (a|b|c), got {self.members!r}")
        if self.method == "single" and len(self.members) != 1:
            raise ValueError(f"model_args members must be exactly one member for method single, got {list(self.members)!r}")
        check_batch_tokens(self.max_batch_tokens)
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"model_args batch_size must be 'auto' or an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.greedy_check, bool):
            raise ValueError(f"model_args greedy_check must be true or false, got {self.greedy_check!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"model_args seed must be an integer in [0, 2**63-1], got {self.seed!r}")


def _as_list(key: str, value: Any) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split("|")]
    if isinstance(value, (list, tuple)):
        return list(value)
    if key == "weights" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]  # one member's weight: lm-eval made the string a number
    raise ValueError(f"model_args {key} must be a pipe-separated list (a|b|c), got {value!r}")


def _number(text: Any) -> Any:
    """A weight given as text (``0.5|0.5`` is not converted by lm-eval): as a float when it reads as one."""
    if isinstance(text, str):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"model_args weights must be numbers, got {text!r}") from None
    return text


def _batch_size(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value  # validated by ModelSpec


def fuser_keys() -> set[str]:
    """Every fuser setting of any method (fields of the methods' config classes)."""
    return {f.name for m in FUSERS.values() if m.config for f in fields(m.config)}


def parse_model_args(args: Mapping[str, Any]) -> ModelSpec:
    """``model_args`` (as lm-eval passes them to the model's constructor) -> :class:`ModelSpec`."""
    args = dict(args)
    allowed = set(OWN_KEYS) | set(LM_EVAL_KEYS) | fuser_keys()
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"unknown model_args key {unknown[0]!r} (value {args[unknown[0]]!r}) for the ensemble-fuse "
                         f"model: expected one of {sorted(OWN_KEYS + LM_EVAL_KEYS)} or a fuser setting "
                         f"({sorted(fuser_keys())}); docs/lm_eval.md")
    for key in LIST_KEYS:
        if key in args and args[key] is not None:
            args[key] = _as_list(key, args[key])
    if "weights" in args and args["weights"] is not None:
        args["weights"] = [_number(w) for w in args["weights"]]
    settings: dict[str, Any] = {k: args.pop(k) for k in ("method", "members") if args.get(k) is not None}
    settings["fuser"] = {k: args.pop(k) for k in sorted(fuser_keys() & set(args))}
    profile = args.pop("profile", None)
    if profile is not None:
        from jobs.profiles import apply_profile  # the job's rule for applying a profile

        settings = apply_profile(settings, str(profile))
        label = settings.pop("label", {})
        log.info("profile %s: applied method %s, members %s and %s; its labeling settings %s are not applied "
                 "(lm-eval's metrics normalise the log-likelihoods themselves)", profile, settings["method"],
                 settings["members"], settings.get("fuser"), label)
    method = settings.get("method", "single")
    if "members" not in settings:
        raise ValueError("model_args must name the members (members=a|b|c) or a profile (profile=PROFILE.json)")
    config = fuser_config(method, settings.get("fuser") or None)
    args.pop("max_batch_size", None)  # lm-eval's cap of its automatic batch size: the fusers use max_batch_tokens
    return ModelSpec(method=method, members=tuple(settings["members"]), fuser=config, device=args.get("device"),
                     dtype=args.get("dtype"), max_batch_tokens=args.get("max_batch_tokens", MAX_BATCH_TOKENS),
                     batch_size=_batch_size(args.get("batch_size")), greedy_check=args.get("greedy_check", False),
                     seed=args.get("seed", 0))
