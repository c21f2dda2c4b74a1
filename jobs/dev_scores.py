"""Calibration's model calls (docs/jobs.md, "Calibration"), each made once and cached as Parquet.

- :func:`member_scores`: every member's raw choice scores on the dev set (``ChoiceScores``: summed
  log-probabilities, token counts, characters and the pmi neutral term, i.e. scored with norm "pmi" so
  that every normalisation can be computed offline);
- :func:`ensemble_labels`: DeePEn's labels on (a prefix of) the dev set, needed to choose its gate.

Dev sets of more than :data:`SPARK_ROWS` rows go through the job itself (``method single`` per
member, or the ensemble) on Spark (``local[*]`` unless a master is given); smaller ones are scored in
this process through the library (``ensemble.scoring``, the fusers). A cache file is keyed by the dev
file's sha256, the member(s) and every setting that changes the scores (:func:`cache_key`), and
lives next to the profile (``<profile>.cache/``): a rerun with the same inputs makes no model call.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ensemble.config import OUTPUTS_VERSION, hashed_fields
from ensemble.labeling import ChoiceScores, LabelParams
from jobs.devset import DevSet, write_job_input

log = logging.getLogger(__name__)

SPARK_ROWS = 2000
"""Dev sets with more rows than this are scored through the Spark job; smaller ones in process."""
RUNNERS = ("auto", "inprocess", "spark")
SCORES_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("logprob", pa.list_(pa.float64())),
                           pa.field("tokens", pa.list_(pa.int64())), pa.field("chars", pa.list_(pa.int64())),
                           pa.field("neutral", pa.list_(pa.float64()))])
LABELS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("probs", pa.list_(pa.float64()))])


@dataclass(frozen=True)
class Runtime:
    """Where and how calibration's model calls run (none of it changes a score beyond float rounding,
    except ``dtype`` and ``max_prompt_tokens``, which are in the cache key)."""

    runner: str = "auto"
    dtype: str | None = None
    device: str | None = None
    master: str | None = None
    batch_size: int = 8
    max_prompt_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    def uses_spark(self, rows: int) -> bool:
        return self.runner == "spark" or (self.runner == "auto" and rows > SPARK_ROWS)


def cache_key(**parts: Any) -> str:
    """sha256 of the parts (JSON, keys sorted) and of the code's outputs version."""
    blob = json.dumps({**parts, "outputs_version": OUTPUTS_VERSION}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)[:48]


def _read_cache(path: Path, key: str) -> pa.Table | None:
    if not path.is_file():
        return None
    table = pq.read_table(path)
    if (table.schema.metadata or {}).get(b"cache_key", b"").decode() != key:
        log.warning("cache %s holds other scores (key mismatch): computing again", path)
        return None
    log.info("cache hit: %s (no model calls)", path)
    return table


def _write_cache(path: Path, rows: list[dict], schema: pa.Schema, key: str, parts: dict) -> pa.Table:
    meta = {b"cache_key": key.encode(), b"parts": json.dumps(parts, default=list).encode()}
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return table


def scores_params(params: LabelParams) -> LabelParams:
    """The settings member scores are computed with: norm pmi (every raw component: logprob, tokens,
    chars, neutral), no gate and no priors."""
    return params.with_(norm="pmi", gate=None, priors=None)


def _scores_cache(dev: DevSet, member: str, params: LabelParams, rt: Runtime, cache_dir: Path) -> tuple[Path, str, dict]:
    """(path, key, parts) of the member's scores cache file."""
    parts = {"kind": "scores", "dev_sha256": dev.sha256, "member": member, "dtype": rt.dtype,
             "max_prompt_tokens": rt.max_prompt_tokens, "label": hashed_fields(scores_params(params))}
    key = cache_key(**parts)
    return cache_dir / f"scores-{_safe(member)}-{key[:12]}.parquet", key, parts


def seed_member_scores(dev: DevSet, member: str, params: LabelParams, rt: Runtime, cache_dir: Path,
                       rows: list[dict]) -> Path:
    """Write the member's scores cache from scores computed elsewhere with the same settings (e.g. the
    job's ``member_stats`` of a ``--method single --choice-norm pmi`` run on the dev rows): ``rows`` of
    SCORES_SCHEMA, one per dev row it scored. A later :func:`member_scores` then makes no model call.
    A row id not in the dev set is refused, naming it."""
    ids = {r.id for r in dev.rows}
    stray = sorted(r["id"] for r in rows if r["id"] not in ids)
    if stray:
        raise ValueError(f"scores for ids not in the dev set {dev.path!r}: {stray[:5]}")
    partial = sorted(r["id"] for r in rows if any(r.get(k) is None for k in SCORES_SCHEMA.names))
    if partial:  # e.g. no pmi neutral term: the scores were not computed with scores_params
        raise ValueError(f"scores without every component {SCORES_SCHEMA.names} for ids {partial[:5]}")
    path, key, parts = _scores_cache(dev, member, params, rt, cache_dir)
    _write_cache(path, rows, SCORES_SCHEMA, key, {**parts, "seeded": True})
    log.info("seeded %s with %d rows of %s's scores", path, len(rows), member)
    return path


def member_scores(dev: DevSet, member: str, params: LabelParams, rt: Runtime,
                  cache_dir: Path) -> dict[str, ChoiceScores]:
    """{row id: the member's ChoiceScores} on the dev rows it could score (a row it could not, e.g. a
    prompt over max_prompt_tokens, is left out and logged)."""
    path, key, parts = _scores_cache(dev, member, params, rt, cache_dir)
    params = scores_params(params)
    table = _read_cache(path, key)
    if table is None:
        log.info("scoring %d dev rows with %s (%s)", len(dev.rows), member,
                 "Spark job" if rt.uses_spark(len(dev.rows)) else "in process")
        if rt.uses_spark(len(dev.rows)):
            rows = _job_rows(dev, "single", (member,), None, params, rt, cache_dir, len(dev.rows))
            rows = [{"id": r["id"], "logprob": s["choice_logprobs"], "tokens": s["choice_tokens"],
                     "chars": [len(c) for c in r["choices"]], "neutral": s["choice_neutral"]}
                    for r in rows for s in [r["member_stats"][0]]]
        else:
            rows = _score_in_process(dev, member, params, rt)
        table = _write_cache(path, rows, SCORES_SCHEMA, key, parts)
    return {r["id"]: ChoiceScores(tuple(r["logprob"]), tuple(r["tokens"]), tuple(r["chars"]), tuple(r["neutral"]))
            for r in table.to_pylist()}


def ensemble_labels(dev: DevSet, method: str, members: Sequence[str], fuser: Any, params: LabelParams,
                    rt: Runtime, cache_dir: Path, limit: int | None) -> dict[str, list[float]]:
    """{row id: the ensemble's label probabilities} on the first ``limit`` dev rows (all when None),
    without the gate and without priors (the raw fused posteriors the fused prior is estimated on)."""
    params = params.with_(gate=None, priors=None)
    n = min(limit or len(dev.rows), len(dev.rows))
    parts = {"kind": "labels", "dev_sha256": dev.sha256, "method": method, "members": list(members),
             "fuser": hashed_fields(fuser), "label": hashed_fields(params), "rows": n, "dtype": rt.dtype,
             "max_prompt_tokens": rt.max_prompt_tokens}
    key = cache_key(**parts)
    path = cache_dir / f"labels-{method}-{key[:12]}.parquet"
    table = _read_cache(path, key)
    if table is None:
        log.info("labeling %d dev rows with %s over %s (%s)", n, method, list(members),
                 "Spark job" if rt.uses_spark(n) else "in process")
        if rt.uses_spark(n):
            rows = [{"id": r["id"], "probs": r["label_probs"]}
                    for r in _job_rows(dev, method, members, fuser, params, rt, cache_dir, n)]
        else:
            rows = _label_in_process(dev.rows[:n], method, members, fuser, params, rt)
        table = _write_cache(path, rows, LABELS_SCHEMA, key, parts)
    return {r["id"]: r["probs"] for r in table.to_pylist()}


# ---- in process ---------------------------------------------------------------------------------
def _score_in_process(dev: DevSet, member: str, params: LabelParams, rt: Runtime) -> list[dict]:
    from ensemble.fusers.single import Single
    from ensemble.models import load_member
    from ensemble.scoring import score_choices

    m = load_member(member, device=rt.device, dtype=rt.dtype)
    alone = Single(m)
    out = []
    for i in range(0, len(dev.rows), rt.batch_size):
        chunk = _fitting(dev.rows[i:i + rt.batch_size], alone, rt)
        for r, s in zip(chunk, score_choices(m, [r.prompt for r in chunk], [list(r.choices) for r in chunk],
                                             [r.system for r in chunk], params)):
            out.append({"id": r.id, "logprob": list(s.scores.logprob), "tokens": list(s.scores.tokens),
                        "chars": list(s.scores.chars), "neutral": list(s.scores.neutral)})
    return out


def _label_in_process(rows, method: str, members: Sequence[str], fuser: Any, params: LabelParams,
                      rt: Runtime) -> list[dict]:
    from ensemble.fusers.registry import make_fuser

    f = make_fuser(method, members, fuser, dtype=rt.dtype, device=rt.device)
    out = []
    for i in range(0, len(rows), rt.batch_size):
        chunk = _fitting(rows[i:i + rt.batch_size], f, rt)
        outs = f.label([r.prompt for r in chunk], [list(r.choices) for r in chunk], [r.system for r in chunk],
                       params=params)
        out += [{"id": r.id, "probs": [float(p) for p in o.probs]} for r, o in zip(chunk, outs)]
    return out


def _fitting(rows, fuser, rt: Runtime) -> list:
    """The rows whose prompt fits every member of ``fuser`` and max_prompt_tokens (the job's rule,
    long_prompt 'error'); the others are logged and left out, as the job makes them error rows."""
    fits = fuser.fit_prompts([r.prompt for r in rows], [r.system for r in rows], [1] * len(rows),
                             rt.max_prompt_tokens, "error")
    for r, f in zip(rows, fits):
        if not isinstance(f, str):
            log.warning("dev row %s left out: %s", r.id, f)
    return [r for r, f in zip(rows, fits) if isinstance(f, str)]


# ---- through the job ----------------------------------------------------------------------------
def _job_rows(dev: DevSet, method: str, members: Sequence[str], fuser: Any, params: LabelParams, rt: Runtime,
              cache_dir: Path, n: int) -> list[dict]:
    """Run the labeling job over the first ``n`` dev rows; its ok rows with their choices."""
    from jobs.config import JobConfig
    from jobs.driver import run, spark_session

    choices = {r.id: list(r.choices) for r in dev.rows[:n]}
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="job-") as tmp:
        cfg = JobConfig(input=write_job_input(dev, Path(tmp) / "dev.jsonl", n), output=str(Path(tmp) / "out"),
                        mode="label", method=method, members=tuple(members), fuser=fuser, label=params,
                        report=False, master=rt.master, dtype=rt.dtype, device=rt.device or "auto",
                        batch_size=rt.batch_size, max_prompt_tokens=rt.max_prompt_tokens,
                        max_fuser_error_rate=1.0)
        spark = spark_session(cfg)
        try:
            run(spark, cfg)
        finally:
            spark.stop()
        table = pq.read_table(Path(tmp) / "out" / "data")
        rows = table.to_pylist()
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad[:10]:
        log.warning("dev row %s left out: %s", r["id"], r["error"])
    return [{**r, "choices": choices[r["id"]]} for r in rows if r["status"] == "ok"]
