"""The job's configuration: one frozen, validated dataclass built from flags and/or a YAML/JSON file,
checked before any Spark work starts (see docs/jobs.md).

The chosen method's settings are nested in ``fuser`` (``ensemble.config.DeePEnConfig`` or
``SpecFuseConfig``, resolved with the library's defaults; None for ``single``), how choices are
scored and labels decided in ``label`` (``ensemble.labeling.LabelParams``). Every field has a
docstring, which is its flag's help text (jobs/cli.py generates the flags), and metadata naming
its help group and whether it changes outputs. ``config_hash`` covers every field that changes
outputs, the whole resolved fuser config, every LabelParams field (the priors and the member temperatures only when set, so
that a run without them keeps the hash it had before they existed), and the versions of the output schema and
of the code (``ensemble.config.OUTPUTS_VERSION``). No torch imports here: the driver and the CLI import this.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ensemble.config import (FUSERS, MAX_BATCH_TOKENS, METHODS, OUTPUTS_VERSION, DecodeParams, DeePEnConfig, SpecFuseConfig,
                             check_choice, flag_of, fuser_config, hashed_fields, knob, normalise_weights)
from ensemble.labeling import LABEL_GROUP, LabelParams
from schemas import SCHEMA_VERSION

MODES = ("auto", "generate", "label")
LONG_PROMPT = ("error", "truncate")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MEMBERS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m")
# help groups of the job's flags, in --help order (the fuser configs' own groups come after ensemble)
IO, DECODING, ENSEMBLE, EXECUTION = "input/output", "decoding", "ensemble", "execution"
GROUPS = (IO, DECODING, ENSEMBLE, LABEL_GROUP, *(m.title for m in FUSERS.values() if m.config), EXECUTION)
NESTED = ("fuser", "label")
"""JobConfig fields holding a config object, whose own fields are the flags (jobs/cli.py)."""


@dataclass(frozen=True)
class JobConfig:
    input: str = knob(group=IO, hashed=False)
    """Input dataset: a Parquet file or directory, or JSON lines (.jsonl/.json, optionally .gz)."""
    output: str = knob(group=IO, hashed=False)
    """Output directory of this run: data/, summary.parquet, report.md, _run.json, _SUCCESS."""
    run_id: str | None = knob(None, group=IO, hashed=False)
    """Name of the run; default: the first 12 hex digits of config_hash."""
    report: bool = knob(True, group=IO, hashed=False)
    """Write summary.parquet and report.md (with plots) after the run."""
    mode: str = knob("auto", group=DECODING, choices=MODES)
    """auto: rows with choices are labeled, the others generated; generate; label."""
    max_new_tokens: int = knob(DecodeParams.max_new_tokens, group=DECODING)
    """Job budget of new tokens; a row's own max_new_tokens is capped by it."""
    temperature: float = knob(DecodeParams.temperature, group=DECODING)
    """Sampling temperature; 0 is greedy."""
    top_p: float = knob(DecodeParams.top_p, group=DECODING)
    """Nucleus sampling mass in (0, 1]."""
    top_k: int | None = knob(DecodeParams.top_k, group=DECODING)
    """Sample only from the k most likely tokens (None: no limit)."""
    seed: int = knob(DecodeParams.seed, group=DECODING)
    """Run seed; a row without its own seed gets one derived from (run seed, id)."""
    n_samples: int = knob(1, group=DECODING)
    """Generated samples per prompt (rows keyed by (id, sample))."""
    stop: tuple[str, ...] = knob(DecodeParams.stop, group=DECODING)
    """Stop strings: a response is cut before the first one."""
    max_prompt_tokens: int = knob(2048, group=DECODING)
    """Most prompt tokens, in any member's tokenisation."""
    long_prompt: str = knob("error", group=DECODING, choices=LONG_PROMPT)
    """What to do with a prompt over max_prompt_tokens: error (an error row) or truncate."""
    method: str = knob("single", group=ENSEMBLE, choices=METHODS)
    """single (one member), deepen (token-level) or specfuse (segment-level)."""
    members: tuple[str, ...] = knob((DEFAULT_MEMBERS[0],), group=ENSEMBLE)
    """Member specs: packaged aliases, HF model directories or .gguf files."""
    fuser: DeePEnConfig | SpecFuseConfig | None = knob(None, group=ENSEMBLE)
    """The method's settings (a config object, or a mapping of its fields); the library's defaults
    fill what is left out. None for single."""
    label: LabelParams = knob(LabelParams(), group=LABEL_GROUP)
    """How choices are scored and labels decided (a LabelParams, or a mapping of its fields)."""
    profile: str | None = knob(None, group=ENSEMBLE, hashed=False)
    """A calibration profile (PROFILE.json of jobs.calibrate): its method, members, main member, weights,
    choice normalisation, pool and gate are applied; a flag or config-file setting that contradicts it
    is refused (the applied settings enter config_hash)."""
    partitions: int = knob(2, group=EXECUTION, hashed=False)
    """Spark partitions of the input (tasks)."""
    batch_size: int = knob(8, group=EXECUTION, hashed=False)
    """Rows per fuser call (micro-batch): bounds memory."""
    max_batch_tokens: int = knob(MAX_BATCH_TOKENS, group=EXECUTION, hashed=False)
    """The library's memory bound inside a fuser call: token slots per member per forward (rows times
    padded length); a micro-batch over it is run in groups that fit (ensemble.config.MAX_BATCH_TOKENS)."""
    commit_rows: int = knob(64, group=EXECUTION, hashed=False)
    """Rows per committed output file (a task's progress is durable at this granularity)."""
    master: str | None = knob(None, group=EXECUTION, hashed=False)
    """Spark master URL; default: local[*] unless spark-submit set one."""
    device: str = knob("auto", group=EXECUTION, hashed=False, choices=DEVICES)
    """auto (the GPU Spark assigned to the task, else CPU), cpu or cuda."""
    dtype: str | None = knob(None, group=EXECUTION)
    """torch dtype name; default float32 on CPU, bfloat16 on CUDA."""
    max_fuser_error_rate: float = knob(0.01, group=EXECUTION, hashed=False)
    """Error budget: the most fuser errors (a row whose micro-batch and own retry raised) allowed, as a
    share of the rows the fuser attempted (ok and fuser-error rows, one per prompt; input errors never
    count), over every row committed in the output directory. Above it the run writes no _SUCCESS and
    exits 3; 0: any fuser error fails the run."""
    fail_after_rows: int | None = knob(None, group=EXECUTION, hashed=False)
    """Fault injection for tests: a task dies after committing this many rows."""

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("input", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a non-empty path")
        for name in ("mode", "method", "long_prompt", "device"):
            check_choice(self, name)
        if isinstance(self.members, str):
            raise bad("members", "a list of member specs")
        object.__setattr__(self, "members", tuple(self.members))
        if not self.members or any(not isinstance(m, str) or not m for m in self.members):
            raise bad("members", "a non-empty list of member specs")
        if self.method == "single" and len(self.members) != 1:
            raise bad("members", "exactly one member for method single")
        if self.method != "single" and len(self.members) < 2:
            raise bad("members", f"at least two members for method {self.method}")
        # decoding fields: DecodeParams' rules (its messages name the field and the value)
        DecodeParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                     top_k=self.top_k, seed=self.seed, stop=self.stop)
        object.__setattr__(self, "stop", tuple(self.stop))
        for name, lo in (("n_samples", 1), ("max_prompt_tokens", 1), ("batch_size", 1), ("commit_rows", 1),
                         ("partitions", 1), ("max_batch_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise bad(name, f"an integer >= {lo}")
        rate = self.max_fuser_error_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise bad("max_fuser_error_rate", "a number in [0, 1]")
        object.__setattr__(self, "max_fuser_error_rate", float(rate))
        if self.fail_after_rows is not None and (not isinstance(self.fail_after_rows, int) or self.fail_after_rows < 0):
            raise bad("fail_after_rows", "None or an integer >= 0")
        if self.run_id is not None and (not isinstance(self.run_id, str) or not self.run_id.strip()
                                        or "/" in self.run_id):
            raise bad("run_id", "a non-empty name without '/'")
        self._resolve_fuser()
        if isinstance(self.label, dict):
            object.__setattr__(self, "label", LabelParams(**self.label))
        elif not isinstance(self.label, LabelParams):
            raise bad("label", "a LabelParams or a mapping of its fields")
        if self.profile is not None and (not isinstance(self.profile, str) or not self.profile):
            raise bad("profile", "None or a path")
        self.label.check_member_temperatures(len(self.members), self.method)
        priors = self.label.priors
        if priors is not None and priors.members != self.members:
            raise ValueError(f"label priors were estimated for members {list(priors.members)}, "
                             f"but the job runs {list(self.members)} (calibrate again)")
        if priors is not None and priors.fused is not None and self.method != "deepen":
            raise ValueError(f"label priors hold a fused table (DeePEn's), but the method is {self.method!r}")
        if priors is not None and priors.fused is None and self.method == "deepen":  # no silent half-correction
            raise ValueError("label priors for DeePEn need a fused table (its own dev labels' prior, written by "
                             "`jobs.calibrate --method deepen`); these hold member tables only")

    def _resolve_fuser(self) -> None:
        """``fuser`` -> the method's config with every default filled in, checked against members."""
        cfg = fuser_config(self.method, self.fuser)
        object.__setattr__(self, "fuser", cfg)
        if cfg is None:
            return
        n = len(self.members)
        if getattr(cfg, "main", 0) >= n:
            raise ValueError(f"main must be an index into members (0..{n - 1}), got {cfg.main!r}")
        if cfg.weights is not None:
            normalise_weights(cfg.weights, n)  # one per member, summing to 1 (the fuser's own check)

    # ---- identity -------------------------------------------------------------------------------
    def output_affecting(self) -> dict[str, Any]:
        """Every field that changes outputs (and nothing that only changes speed or placement): the
        job's, the resolved fuser config's (library defaults included) and the code's versions."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                             if f.metadata.get("hashed", True) and f.name not in NESTED}
        d["fuser"] = None if self.fuser is None else hashed_fields(self.fuser)
        d["label"] = hashed_fields(self.label)
        if self.label.priors is not None:  # only when set: a run without priors keeps its hash
            d["label"]["priors"] = self.label.priors.to_dict()
        if self.label.member_temperatures is not None:  # the same: a run without them keeps its hash
            d["label"]["member_temperatures"] = list(self.label.member_temperatures)
        d["schema_version"] = SCHEMA_VERSION
        d["outputs_version"] = OUTPUTS_VERSION
        return d

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.output_affecting(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def effective_run_id(self) -> str:
        return self.run_id or self.config_hash[:12]

    def to_json(self) -> str:
        """The whole configuration (fuser settings nested); ``JobConfig(**json.loads(...))`` rebuilds it."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=list, indent=1)


def _unknown_key_hint(key: str) -> str:
    """Where a key that is not a JobConfig field belongs, when it is a fuser or labeling setting."""
    renamed = {"deepen_lr": "lr", "deepen_steps": "steps", "label_norm": "norm", "choice_norm": "norm"}
    name = renamed.get(key, key)  # the job's earlier flat names, and DeePEn's removed label_norm
    if name in {f.name for f in fields(LabelParams)}:
        return f"{key!r} is a labeling setting: write it as label: {{{name}: ...}} (flag {flag_of(LabelParams, name)})"
    for spec in FUSERS.values():
        if spec.config and name in {f.name for f in fields(spec.config)}:
            return f"{key!r} is a {spec.title} setting: write it as fuser: {{{name}: ...}} (flag {flag_of(spec.config, name)})"
    return ""


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of JobConfig fields; the method's settings are the
    mapping ``fuser`` (e.g. ``fuser: {topk: 32, top_mass: null}``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file must end in .yaml, .yml or .json, got {path!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(JobConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        hints = "; ".join(h for h in map(_unknown_key_hint, unknown) if h)
        raise ValueError(f"config file {path!r} has unknown keys {unknown}" + (f" ({hints})" if hints else ""))
    if data.get("fuser") is not None and not isinstance(data["fuser"], dict):
        raise ValueError(f"config file {path!r}: fuser must be a mapping of the method's settings, "
                         f"got {data['fuser']!r}")
    if data.get("label") is not None and not isinstance(data["label"], dict):
        raise ValueError(f"config file {path!r}: label must be a mapping of the labeling settings, "
                         f"got {data['label']!r}")
    if "label_norm" in (data.get("fuser") or {}):
        raise ValueError(f"config file {path!r}: fuser: {{label_norm: ...}} was removed: every method's choice "
                         f"normalisation is label: {{norm: ...}} (flag --choice-norm)")
    return data
