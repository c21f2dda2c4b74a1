"""The job's configuration: one frozen, validated dataclass built from flags and/or a YAML/JSON file,
checked before any Spark work starts. ``config_hash`` covers every field that changes outputs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import SCHEMA_VERSION

METHODS = ("single", "deepen", "specfuse")
MODES = ("auto", "generate", "label")
LONG_PROMPT = ("error", "truncate")
LABEL_NORMS = ("sum", "mean")
MAX_SEED = 2**63 - 1
WEIGHT_TOL = 1e-4  # ensemble.config.WEIGHT_TOL; this module stays free of torch imports
DEFAULT_MEMBERS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m")


@dataclass(frozen=True)
class JobConfig:
    input: str
    """Input dataset: Parquet file/dir, or JSONL (``.jsonl``/``.json``)."""
    output: str
    """Output directory of this run: data/, summary.parquet, report.md, _run.json."""
    method: str = "single"
    """single | deepen | specfuse."""
    members: tuple[str, ...] = (DEFAULT_MEMBERS[0],)
    """Member specs: packaged aliases, HF directories or .gguf files. The first is the main member."""
    mode: str = "auto"
    """auto (rows with choices are labeled, the rest generated) | generate | label."""
    run_id: str | None = None
    """Name of the run; default: the first 12 hex digits of config_hash."""
    max_new_tokens: int = 64
    """Job budget of new tokens; a row's own max_new_tokens is capped by it."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int = 0
    """Run seed; a row without its own seed gets one derived from (run seed, id)."""
    n_samples: int = 1
    """Generated samples per prompt (rows keyed by (id, sample))."""
    stop: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    main: int = 0
    """Index of the main member (DeePEn: output vocabulary)."""
    deepen_lr: float = 0.15
    deepen_steps: int = 5
    topk: int = 64
    top_mass: float | None = 0.9
    """DeePEn: cumulative-probability cut inside the other members' top-k (None: keep all k)."""
    main_top_mass: float | None = 0.99
    """DeePEn: the same cut for the main member, whose candidates the fused token is chosen from."""
    refine_margin: float = 0.3
    """DeePEn: rows whose two best fused candidates are closer than this are fused again without cuts."""
    anchor_subset: int | None = None
    """DeePEn: use only this many anchors, the most frequent pieces (None: all shared tokens)."""
    label_norm: str = "sum"
    """DeePEn labeling: 'sum' (algorithms.md) or 'mean' (length-normalised) fused log-probability of a choice."""
    segment_tokens: int = 10
    exit: bool = True
    exit_delta: float = 0.5
    exit_min_rounds: int = 2
    batch_size: int = 8
    """Rows per fuser call (micro-batch): bounds memory."""
    commit_rows: int = 64
    """Rows per committed output file (a task's progress is durable at this granularity)."""
    max_prompt_tokens: int = 2048
    long_prompt: str = "error"
    """error | truncate: what to do with a prompt over max_prompt_tokens in any member's tokens."""
    partitions: int = 2
    master: str | None = None
    """Spark master URL; default: local[*] unless spark-submit set one."""
    device: str = "auto"
    """auto (the GPU Spark assigned, else CPU) | cpu | cuda."""
    dtype: str | None = None
    """torch dtype name; default float32 on CPU, bfloat16 on CUDA."""
    fail_after_rows: int | None = None
    """Fault injection for tests: a task dies after committing this many rows."""
    report: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.input, str) or not self.input:
            raise bad("input", "a non-empty path")
        if not isinstance(self.output, str) or not self.output:
            raise bad("output", "a non-empty path")
        if self.method not in METHODS:
            raise bad("method", f"one of {METHODS}")
        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        object.__setattr__(self, "members", tuple(self.members))
        if not self.members or any(not isinstance(m, str) or not m for m in self.members):
            raise bad("members", "a non-empty list of member specs")
        if self.method == "single" and len(self.members) != 1:
            raise bad("members", "exactly one member for method single")
        if self.method != "single" and len(self.members) < 2:
            raise bad("members", f"at least two members for method {self.method}")
        if not isinstance(self.main, int) or not 0 <= self.main < len(self.members):
            raise bad("main", f"an index into members (0..{len(self.members) - 1})")
        for name, lo in (("max_new_tokens", 1), ("n_samples", 1), ("deepen_steps", 0), ("topk", 1),
                         ("segment_tokens", 1), ("exit_min_rounds", 0), ("batch_size", 1), ("commit_rows", 1),
                         ("max_prompt_tokens", 1), ("partitions", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise bad(name, f"an integer >= {lo}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise bad("temperature", ">= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise bad("top_p", "in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise bad("top_k", "None or an integer >= 1")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", "an integer in [0, 2**63-1]")
        if not (isinstance(self.deepen_lr, (int, float)) and self.deepen_lr >= 0):
            raise bad("deepen_lr", ">= 0")
        if self.label_norm not in LABEL_NORMS:
            raise bad("label_norm", "'sum' or 'mean'")
        if not (isinstance(self.refine_margin, (int, float)) and self.refine_margin >= 0):
            raise bad("refine_margin", ">= 0")
        for name in ("top_mass", "main_top_mass"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise bad(name, "None or in (0, 1]")
        if self.anchor_subset is not None and (not isinstance(self.anchor_subset, int) or self.anchor_subset < 1):
            raise bad("anchor_subset", "None or an integer >= 1")
        if not (isinstance(self.exit_delta, (int, float)) and 0 <= self.exit_delta <= 1):
            raise bad("exit_delta", "in [0, 1]")
        if self.long_prompt not in LONG_PROMPT:
            raise bad("long_prompt", f"one of {LONG_PROMPT}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "one of ('auto', 'cpu', 'cuda')")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.members):
                raise bad("weights", f"one weight per member ({len(self.members)})")
            if any(w < 0 for w in self.weights) or abs(sum(self.weights) - 1) > WEIGHT_TOL:
                raise bad("weights", "non-negative and summing to 1")
        if self.fail_after_rows is not None and (not isinstance(self.fail_after_rows, int) or self.fail_after_rows < 0):
            raise bad("fail_after_rows", "None or an integer >= 0")
        if self.run_id is not None and (not isinstance(self.run_id, str) or not self.run_id.strip()
                                        or "/" in self.run_id):
            raise bad("run_id", "a non-empty name without '/'")

    # ---- identity -------------------------------------------------------------------------------
    def output_affecting(self) -> dict[str, Any]:
        """Every field that changes outputs (and nothing that only changes speed or placement)."""
        keys = ["method", "members", "mode", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
                "n_samples", "stop", "max_prompt_tokens", "long_prompt", "dtype"]
        if self.method != "single":
            keys += ["weights", "main"]
        if self.method == "deepen":
            keys += ["deepen_lr", "deepen_steps", "topk", "top_mass", "main_top_mass", "refine_margin", "anchor_subset"]
            if self.label_norm != "sum":  # only when set: run ids of earlier default runs stay valid
                keys.append("label_norm")
        if self.method == "specfuse":
            keys += ["segment_tokens", "exit", "exit_delta", "exit_min_rounds"]
        d = {k: getattr(self, k) for k in keys}
        d["schema_version"] = SCHEMA_VERSION
        return d

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.output_affecting(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def effective_run_id(self) -> str:
        return self.run_id or self.config_hash[:12]

    def fuser_settings(self) -> dict[str, Any]:
        """What the fuser factory needs (picklable; no torch)."""
        return {k: getattr(self, k) for k in ("method", "members", "weights", "main", "deepen_lr", "deepen_steps",
                                              "topk", "top_mass", "main_top_mass", "refine_margin", "anchor_subset", "label_norm", "segment_tokens", "exit", "exit_delta", "exit_min_rounds",
                                              "dtype")}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=list, indent=1)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of JobConfig fields."""
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
    names = {f.name for f in dataclasses.fields(JobConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config file {path!r} has unknown keys {unknown}")
    return data
