"""Frozen, validated configuration objects shared by members, fusers and the job (no torch imports:
the job's driver and command line import this module).

Every field has a docstring, which is also the help text of its flag in the job's command line
(``jobs/cli.py`` generates the flags from these dataclasses); ``__post_init__`` rejects bad values
with a message that names the field and the value (``top_p must be in (0, 1], got 1.5``).

Field metadata (set with :func:`knob`) read by the job:

- ``flag``: the job's flag for the field when it is not ``--`` + the kebab-case field name. DeePEn's
  own settings are all spelt ``--deepen-<name>`` (``topk`` is ``--deepen-topk``, never confused with
  sampling's ``--top-k``) except its generation gate, ``--fuse-below`` and ``--fuse-gate-on``;
  SpecFuse's keep their names (``segment_tokens``, ``exit_*`` exist only in SpecFuse) except
  ``max_rounds`` (``--specfuse-max-rounds``, not a job budget) and ``self_score``
  (``--specfuse-self-score``). ``main`` and ``weights`` are the ensemble's ``--main`` / ``--weights``,
  shared by the methods that take them.
- ``choices``: the allowed values of a string field.
- ``hashed``: False for a field that changes speed or memory and never outputs; every other field
  of the resolved fuser config enters the job's ``config_hash``.

:data:`FUSERS` is the one table of methods: name -> (config class, fuser class path);
``ensemble.fusers.registry.make_fuser`` builds fusers from it.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum
from typing import Any, Mapping, NamedTuple

MAX_SEED = 2**63 - 1
"""Largest seed (a run's or a row's): seeds are non-negative 64-bit integers."""

WEIGHT_TOL = 1e-4
"""How far from 1 member weights may sum (weights printed with 6 decimals, as bench/compat.py does,
miss 1 by up to ~1.5e-6); within it they are rescaled to sum to 1 exactly."""

OUTPUTS_VERSION = 2
"""Version of the code that computes outputs. Bump it in any change that alters what a fuser or the
job writes for the same configuration (another token, score or statistic for some row): it enters the
job's ``config_hash``, so that a resumed run never keeps rows computed by another version."""

ROW_STORES = ("float32", "float16")
KL_REDUCTIONS = ("mean", "sum")
"""How the inverse search reduces its KL over the anchors (``ensemble.relative.SearchParams``)."""
GATES = ("top1", "margin")
"""What gated DeePEn reads of the main member's own next-token distribution (``DeePEnConfig.gate_on``)."""
POOLS = ("linear", "loglinear")
"""How an ensemble pools its members' posteriors over a row's choices (``ensemble.labeling.pool``)."""

MAX_BATCH_TOKENS = 16384
"""Default of every fuser's ``max_batch_tokens``, the one setting that bounds the library's memory.

A fuser call holds at most this many token slots per member: rows times their padded length (prompt
plus the row's budget, ``max_new_tokens`` or its longest choice). ``generate`` and ``label`` take their
prompts in consecutive groups that fit (a single longer row runs alone), and ``Member.score`` runs its
candidates in as many forwards as needed, each over at most this many slots (cached prefix included).
Full-vocabulary logit vectors are held for at most ``max_batch_tokens // batching.LOGIT_SHARE`` (row, position)
pairs at once. Rolled-back tokens stay in the KV cache as dead slots (SpecFuse's rewound drafts,
DeePEn's re-tokenised tails), so those methods' caches can outgrow the estimate by about twice the
response. The default keeps a job micro-batch of 8 rows of up to ~1,900 prompt tokens in one group.
Grouping changes float rounding only (each row's tokens do not depend on its batch, docs/algorithms.md)
and no per-row statistic."""

def check_batch_tokens(value: Any) -> int:
    """``value`` as a ``max_batch_tokens`` setting, or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_batch_tokens must be an integer >= 1, got {value!r}")
    return value


def knob(default: Any = MISSING, *, flag: str | None = None, choices: tuple | None = None,
         hashed: bool = True, group: str | None = None, **kw: Any) -> Any:
    """A dataclass field with the metadata the job reads (see the module docstring)."""
    meta = {k: v for k, v in (("flag", flag), ("choices", choices), ("group", group)) if v is not None}
    if not hashed:
        meta["hashed"] = False
    return field(default=default, metadata=meta, **kw)


def check_choice(obj: Any, name: str, either: bool = False) -> None:
    """Raise ValueError naming the field and the value when a ``choices`` field holds another value
    (``either``: word two choices as "'a' or 'b'")."""
    allowed = next(f for f in fields(obj) if f.name == name).metadata["choices"]
    if getattr(obj, name) not in allowed:
        rule = " or ".join(map(repr, allowed)) if either else f"one of {allowed}"
        raise ValueError(f"{name} must be {rule}, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class DecodeParams:
    """How to decode one request (like vLLM's ``SamplingParams``)."""

    max_new_tokens: int = 64
    """Budget of new tokens, counted in the main member's tokens."""
    temperature: float = 0.0
    """0 means greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int | None = None
    """Keep only the k most likely tokens before sampling (None: no limit)."""
    seed: int = 0
    """Seed of this row's random generator; outputs depend on it and not on batch composition."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text is cut before the first occurrence and finish_reason is 'stop'."""
    system: str | None = None
    """Optional system message, for members whose chat template accepts one."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not isinstance(self.seed, int) or not (0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**63-1], got {self.seed!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes) -> "DecodeParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def per_row(params: "DecodeParams | list[DecodeParams]", n: int) -> list[DecodeParams]:
    """Broadcast one ``DecodeParams`` to ``n`` rows, or check a list has one entry per row."""
    if isinstance(params, DecodeParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params must be one DecodeParams or one per prompt ({n}), got {len(params)}")
    return params


def normalise_weights(weights: "list[float] | tuple[float, ...] | None", n: int,
                      tol: float = WEIGHT_TOL) -> tuple[float, ...]:
    """Member weights: None -> uniform; otherwise non-negative, one per member, summing to 1 within
    tol (then rescaled to sum to 1)."""
    if weights is None:
        return tuple([1.0 / n] * n)
    w = tuple(float(x) for x in weights)
    if len(w) != n:
        raise ValueError(f"weights must have one entry per member ({n}), got {list(weights)!r}")
    if any(x < 0 or x != x for x in w):
        raise ValueError(f"weights must be non-negative, got {list(weights)!r}")
    if abs(sum(w) - 1.0) > tol:
        raise ValueError(f"weights must sum to 1 (within {tol}), got {list(weights)!r} (sum {sum(w)})")
    total = sum(w)
    return tuple(x / total for x in w)


def _check_weights(weights: Any) -> tuple[float, ...] | None:
    """Member weights as a fuser config keeps them (the member count is checked by the fuser)."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)):
        raise ValueError(f"weights must be a list of non-negative numbers, got {weights!r}")
    w = tuple(weights)
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be non-negative finite numbers, got {list(w)!r}")
    return tuple(float(x) for x in w)


# ---- DeePEn ---------------------------------------------------------------------------------------
class EosPolicy(str, Enum):
    MAIN = "main"  # stop when the fused token is an EOS of the main member
    ANY = "any"  # ... or when any member's own top token is one of its EOS ids


def _int_at_least(obj: Any, name: str, lo: int, optional: bool = False) -> None:
    v = getattr(obj, name)
    if optional and v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an integer >= {lo}, got {v!r}")


def _number(obj: Any, name: str, rule: str, ok, optional: bool = False) -> None:
    v = getattr(obj, name)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{rule}, got {v!r}")


@dataclass(frozen=True)
class DeePEnConfig:
    """DeePEn settings; defaults follow the reference code except where docs/algorithms.md improves on it."""

    main: int = knob(0, flag="--main", group="ensemble")
    """Index of the main member: output tokens come from its vocabulary."""
    weights: tuple[float, ...] | None = knob(None, flag="--weights", group="ensemble")
    """Member weights (non-negative, one per member, summing to 1); None is uniform."""
    lr: float = knob(0.15, flag="--deepen-lr")
    """Search learning rate eta; 0 reproduces the main member."""
    steps: int = knob(5, flag="--deepen-steps")
    """Search steps T."""
    topk: int = knob(64, flag="--deepen-topk")
    """Tokens of each member's distribution that enter the relative space (and the search)."""
    top_mass: float | None = knob(0.9, flag="--deepen-top-mass")
    """Cumulative-probability cut inside the top-k of the other members; None keeps all k."""
    main_top_mass: float | None = knob(0.99, flag="--deepen-main-top-mass")
    """The same cut for the main member, whose candidates are the tokens the search can choose."""
    refine_margin: float = knob(0.3, flag="--deepen-refine-margin")
    """Rows whose two best searched candidates are closer than this (logits) are fused again with
    every member's full top-k (no mass cuts); 0 turns it off."""
    tau: float = knob(100.0, flag="--deepen-tau")
    """Softmax temperature of the relative rows."""
    weight_decay: float = knob(0.01, flag="--deepen-weight-decay")
    """AdamW weight decay of the search."""
    kl_reduction: str = knob("mean", flag="--deepen-kl-reduction", choices=KL_REDUCTIONS)
    """How the search reduces its KL over the anchors: 'mean' (the reference code's nn.KLDivLoss();
    with AdamW's eps, low-probability tokens stay nearly in place) or 'sum' (every candidate moves by
    about a full learning-rate step); docs/algorithms.md."""
    min_anchors: int = knob(100, flag="--deepen-min-anchors")
    """Fewer shared anchor tokens than this is an error."""
    anchor_subset: int | None = knob(None, flag="--deepen-anchor-subset")
    """Use only this many anchors (those with the smallest ids over the members); None: all. Cheaper
    rows, but it can change outputs badly (docs/algorithms.md)."""
    row_cache_size: int = knob(2048, flag="--deepen-row-cache-size", hashed=False)
    """Relative rows kept per member (LRU); each row holds |A| values of row_store."""
    row_store: str = knob("float16", flag="--deepen-row-store", choices=ROW_STORES)
    """Precision rows are kept and used in: 'float16' (scaled by |A|, relative error <= 2^-11; half the
    memory per cached row) or 'float32' (exact)."""
    eos_policy: EosPolicy = knob(EosPolicy.MAIN, flag="--deepen-eos-policy", choices=tuple(p.value for p in EosPolicy))
    """Which EOS stops a row: 'main' (the fused token is the main member's EOS) or 'any' (also when any
    member's own top token is its EOS)."""
    dense: bool = knob(False, flag="--deepen-dense")
    """Reference path: dense (V, A) matrices and a search over the whole main vocabulary (small vocabs)."""
    tail_window: int = knob(2, flag="--deepen-tail-window")
    """Tokens re-encoded at least, back from the end, when another member follows the response."""
    fuse_below: float = knob(1.0, flag="--fuse-below")
    """Generation gate, in [0, 1]: a step is fused only where the main member's confidence (gate_on)
    is below this; elsewhere the main member's own token is emitted and the other members are not run
    (they catch up later, docs/algorithms.md). 1 fuses every step (DeePEn as published), 0 none (the
    main member alone). Default 1, chosen on a dev split (docs/results.md: no gate beat fusing
    every step)."""
    gate_on: str = knob("top1", flag="--fuse-gate-on", choices=GATES)
    """The main member's confidence that fuse_below is compared with, from its own next-token
    distribution at temperature 1: 'top1' (the top-1 probability) or 'margin' (top-1 minus top-2)."""

    def __post_init__(self) -> None:
        _int_at_least(self, "main", 0)
        if self.weights is not None:  # their values are checked with the member count (normalise_weights)
            object.__setattr__(self, "weights", tuple(float(w) if isinstance(w, int) and not isinstance(w, bool) else w
                                                      for w in self.weights))
        _number(self, "lr", ">= 0", lambda v: v >= 0)
        _int_at_least(self, "steps", 0)
        _int_at_least(self, "topk", 1)
        for name in ("top_mass", "main_top_mass"):
            _number(self, name, "in (0, 1]", lambda v: 0.0 < v <= 1.0, optional=True)
        _number(self, "refine_margin", ">= 0", lambda v: v >= 0.0)
        _number(self, "tau", "> 0", lambda v: v > 0)
        _number(self, "weight_decay", ">= 0", lambda v: v >= 0)
        _int_at_least(self, "min_anchors", 1)
        _int_at_least(self, "anchor_subset", 1, optional=True)
        _int_at_least(self, "row_cache_size", 0)
        check_choice(self, "row_store")
        check_choice(self, "eos_policy", either=True)
        object.__setattr__(self, "eos_policy", EosPolicy(self.eos_policy))
        if not isinstance(self.dense, bool):
            raise ValueError(f"dense must be a bool, got {self.dense!r}")
        _int_at_least(self, "tail_window", 1)
        _number(self, "fuse_below", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        check_choice(self, "gate_on", either=True)
        check_choice(self, "kl_reduction", either=True)

    def search_params(self):
        """The inverse search's settings (``ensemble.relative.SearchParams``; imports torch)."""
        from ensemble.relative import SearchParams

        return SearchParams(lr=self.lr, steps=self.steps, weight_decay=self.weight_decay,
                            kl_reduction=self.kl_reduction)


# ---- SpecFuse -------------------------------------------------------------------------------------
EXIT_RULES = ("rank", "softmax", "lead")
"""SpecFuse's model-exit rules (``SpecFuseConfig.exit_rule``; ``ensemble.segments``)."""
EXIT_ALPHA = {"rank": 0.1, "lead": 0.3}
"""The test level each window rule uses when ``SpecFuseConfig.exit_alpha`` is None (docs/algorithms.md)."""
# config_hash sees exit_alpha as configured (None at the default), not these levels: changing a value
# here changes SpecFuse outputs under an unchanged config hash, so it needs an OUTPUTS_VERSION bump
# (tests/ensemble/test_specfuse_exit.py pins the values).


@dataclass(frozen=True)
class SpecFuseConfig:
    """Knobs of SpecFuse (validated; errors name the field and the value). SpecFuse has no main member:
    it ranks every member's segments; the first member's tokens count the budget."""

    segment_tokens: int = 10
    """L: the most tokens a member drafts per round (5-15 is the useful range)."""
    exit: bool = True
    """Model exit on or off."""
    exit_rule: str = knob("lead", choices=EXIT_RULES)
    """Model-exit rule (docs/algorithms.md): 'lead' (default) exits a member that won none of its last
    exit_window rounds while one other member beat it in enough of them (exit_alpha); 'rank' exits a
    member whose candidate ranked last significantly more often than 1/n in those rounds while winning
    none of them (exit_alpha); 'softmax' is the legacy rule (exit_delta, exit_min_temperature), which
    rarely fires."""
    exit_window: int = 4
    """Rules 'rank' and 'lead': the member's last rounds the test looks at (>= 1)."""
    exit_alpha: float | None = None
    """Rules 'rank' and 'lead': a member exits when its p-value is <= exit_alpha; in [0, 1] (0: never);
    None: the rule's own level, EXIT_ALPHA (rank 0.1, lead 0.3)."""
    exit_delta: float = 0.5
    """Rule 'softmax': a member exits when its exit probability is below exit_delta / n_active; in
    [0, 1] (0: never)."""
    exit_min_rounds: int = 2
    """R_min: exits are first considered after this many rounds (and never before round 1)."""
    weights: tuple[float, ...] | None = knob(None, flag="--weights", group="ensemble")
    """Member weights (non-negative, one per member, summing to 1); None is uniform."""
    exit_min_temperature: float = 0.05
    """Rule 'softmax': floor of the entropy-set exit temperature."""
    self_score: bool = knob(True, flag="--specfuse-self-score")
    """Whether a member's score of its own candidate counts in the ranking (as the public SpecEM code
    does); off: each candidate is ranked by the other members only."""
    max_rounds: int | None = knob(None, flag="--specfuse-max-rounds")
    """Most rounds per row; None: 2 * max_new_tokens of the row (a guard against rounds that add no
    main-member tokens)."""
    label_pool: str = knob("linear", flag="--specfuse-label-pool", choices=POOLS)
    """How labeling pools the members' posteriors over a row's choices: 'linear' (weighted mean) or
    'loglinear' (weighted geometric mean, renormalised); docs/algorithms.md."""
    kv_reuse: bool = knob(True, flag="--specfuse-kv-reuse")
    """Verification scores the candidates in each member's own cache (no per-candidate copies) and the
    winner's slots are kept: the proposer keeps its draft, a verifier the winner's scored tokens when
    they are its broadcast, instead of re-feeding them (docs/algorithms.md); off: the copy-and-re-feed
    rounds. Same texts either way (sliding-window members: while a row's cache fits the window); the
    members' tokens_in falls."""
    kv_compact: bool = knob(True, flag="--specfuse-kv-compact")
    """Dead KV-cache slots (rewound drafts, losing candidates, rolled-back tails) are removed after
    every round instead of staying masked in the cache (docs/algorithms.md). Same texts (sliding-window
    members: while a row's cache fits the window)."""

    @property
    def exit_level(self) -> float | None:
        """The test level of rules 'rank' and 'lead': exit_alpha, or the rule's own level in EXIT_ALPHA
        when it is None; None for rule 'softmax' (no level)."""
        if self.exit_rule == "softmax":
            return None
        if self.exit_alpha is not None:
            return self.exit_alpha
        if self.exit_rule not in EXIT_ALPHA:
            raise ValueError(f"exit_rule {self.exit_rule!r} has no level in EXIT_ALPHA {EXIT_ALPHA}")
        return EXIT_ALPHA[self.exit_rule]

    def __post_init__(self) -> None:
        if not isinstance(self.segment_tokens, int) or isinstance(self.segment_tokens, bool) or self.segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1, got {self.segment_tokens!r}")
        if not isinstance(self.exit, bool):
            raise ValueError(f"exit must be a bool, got {self.exit!r}")
        check_choice(self, "exit_rule")
        _int_at_least(self, "exit_window", 1)
        _number(self, "exit_alpha", "in [0, 1]", lambda v: 0.0 <= v <= 1.0, optional=True)
        _number(self, "exit_delta", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _int_at_least(self, "exit_min_rounds", 0)
        if not isinstance(self.self_score, bool):
            raise ValueError(f"self_score must be a bool, got {self.self_score!r}")
        object.__setattr__(self, "weights", _check_weights(self.weights))
        _number(self, "exit_min_temperature", "> 0", lambda v: v > 0)
        _int_at_least(self, "max_rounds", 1, optional=True)
        check_choice(self, "label_pool", either=True)
        for name in ("kv_reuse", "kv_compact"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


# ---- the table of methods -------------------------------------------------------------------------
class Method(NamedTuple):
    config: type | None
    """The method's config class; None: the method has no settings (Single)."""
    fuser: str
    """``module:Class`` of the fuser (imported only when a fuser is built: it needs torch)."""
    title: str
    """Name in help texts and errors."""


FUSERS: dict[str, Method] = {
    "single": Method(None, "ensemble.fusers.single:Single", "Single"),
    "deepen": Method(DeePEnConfig, "ensemble.fusers.deepen:DeePEn", "DeePEn"),
    "specfuse": Method(SpecFuseConfig, "ensemble.fusers.specfuse:SpecFuse", "SpecFuse"),
}
METHODS = tuple(FUSERS)


def method_spec(method: str) -> Method:
    if method not in FUSERS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return FUSERS[method]


def flag_of(config_class: type, name: str) -> str:
    """The job's flag of a fuser config field (see the module docstring)."""
    f = next(f for f in fields(config_class) if f.name == name)
    return f.metadata.get("flag", "--" + name.replace("_", "-"))


def fuser_config(method: str, settings: "Mapping[str, Any] | DeePEnConfig | SpecFuseConfig | None" = None):
    """The resolved config of ``method``'s fuser: its defaults overridden by ``settings`` (a mapping
    of its fields, or a config object of the method's class). Settings another method takes are
    refused with the field, its flag and the value; so is a main member other than 0 for SpecFuse,
    which has none."""
    spec = method_spec(method)
    if spec.config is not None and isinstance(settings, spec.config):
        return settings
    if settings is not None and not isinstance(settings, Mapping):
        want = spec.config.__name__ if spec.config else "no settings"
        raise ValueError(f"fuser must be a {want} or a mapping for method {method}, got {type(settings).__name__}")
    settings = dict(settings or {})
    if spec.config is SpecFuseConfig and settings.get("main", 0) == 0:
        settings.pop("main", None)  # the first member: what SpecFuse does anyway
    if spec.config is None and settings.get("main", 0) == 0:
        settings.pop("main", None)  # Single's only member
    own = {f.name for f in fields(spec.config)} if spec.config else set()
    for name in sorted(set(settings) - own):
        owners = [m.title for m in FUSERS.values() if m.config and name in {f.name for f in fields(m.config)}]
        if not owners:
            raise ValueError(f"fuser setting {name!r} is not a setting of any method (got {settings[name]!r})")
        flag = flag_of(next(m.config for m in FUSERS.values() if m.title == owners[0]), name)
        why = {"main": f": {spec.title} has no main member"}.get(name, "")
        raise ValueError(f"{name} ({flag}) is a setting of {' and '.join(owners)}, not of method {method}{why}; "
                         f"got {settings[name]!r}")
    return spec.config(**settings) if spec.config else None


def hashed_fields(config: Any) -> dict[str, Any]:
    """Every field of a (resolved) config that can change outputs, by name."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.metadata.get("hashed", True)}


__all__ = [
    "DecodeParams", "DeePEnConfig", "EXIT_ALPHA", "EXIT_RULES", "EosPolicy", "FUSERS", "MAX_BATCH_TOKENS",
    "GATES", "MAX_SEED", "METHODS", "Method", "OUTPUTS_VERSION", "POOLS", "ROW_STORES", "SpecFuseConfig", "WEIGHT_TOL",
    "check_batch_tokens", "flag_of", "fuser_config", "hashed_fields", "knob", "normalise_weights",
    "pack", "per_row",
]
