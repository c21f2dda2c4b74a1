"""The pure partition function: Arrow record batches of input rows in, output rows out.

``process_partition(batches, *, make_fuser, config)`` needs no Spark (tests call it directly).
Every input row yields exactly ``n_samples`` output rows for generation or one for labeling and
errors: bad rows become ``status = error`` rows with a reason; a fuser failure on a micro-batch is
retried row by row so that one bad row cannot take the others down.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from jobs.config import JobConfig
from jobs.rows import Rejected, Request, derive_seed, iter_raw, row_key, validate
from schemas import OUTPUT_SCHEMA, SCHEMA_VERSION
from schemas.tables import MEMBER_STATS_FIELDS

log = logging.getLogger(__name__)


class RowTooLong(ValueError):
    pass


def _stats_dicts(stats) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(s).items() if k in MEMBER_STATS_FIELDS} for s in stats]


class PartitionRunner:
    """Holds the per-partition context: config, lazily built fuser, output row factory."""

    def __init__(self, config: JobConfig, make_fuser: Callable[[], Any]):
        self.config = config
        self._make_fuser = make_fuser
        self._fuser = None
        self.base = {
            "run_id": config.effective_run_id, "method": config.method, "members": list(config.members),
            "config_hash": config.config_hash, "schema_version": SCHEMA_VERSION,
        }

    @property
    def fuser(self):
        if self._fuser is None:
            self._fuser = self._make_fuser()
        return self._fuser

    def row(self, **fields) -> dict[str, Any]:
        out = {name: None for name in OUTPUT_SCHEMA.names}
        out.update(self.base)
        out["sample"] = 0
        out.update(fields)
        return out

    def error_row(self, rid: str, reason: str, seed: int | None = None, sample: int = 0) -> dict[str, Any]:
        return self.row(id=rid, sample=sample, status="error", error=reason, finish_reason="error", seed=seed)

    # ---- prompt length ---------------------------------------------------------------------------
    def fit_prompt(self, req: Request) -> Request:
        """Enforce max_prompt_tokens (and each member's context window) per config."""
        cfg = self.config
        for _ in range(8):
            worst = 0
            for m in self.fuser.members:
                n = len(m.encode_prompt(req.prompt, req.system))
                limit = cfg.max_prompt_tokens
                if m.context_window:
                    limit = min(limit, m.context_window - req.max_new_tokens)
                worst = max(worst, n / max(limit, 1))
                if n > limit and cfg.long_prompt == "error":
                    raise RowTooLong(
                        f"prompt has {n} tokens for member {m.name}, over the limit of {limit} "
                        f"(max_prompt_tokens={cfg.max_prompt_tokens}, context window {m.context_window})"
                    )
            if worst <= 1:
                return req
            keep = int(len(req.prompt) / worst * 0.95)
            req = Request(req.id, req.prompt[:keep], req.system, req.choices, req.seed, req.max_new_tokens)
        raise RowTooLong(f"prompt could not be truncated under {cfg.max_prompt_tokens} tokens")

    # ---- fusion ----------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        fitted: list[Request] = []
        for req in requests:
            try:
                fitted.append(self.fit_prompt(req))
            except RowTooLong as exc:
                out.append(self.error_row(req.id, str(exc), req.seed))
        labels = [r for r in fitted if r.choices is not None]
        gens = [r for r in fitted if r.choices is None]
        if labels:
            out += self._isolated(labels, self._label_rows)
        if gens:
            out += self._isolated(gens, self._generate_rows)
        return out

    def _isolated(self, reqs: list[Request], fn) -> list[dict[str, Any]]:
        try:
            return fn(reqs)
        except Exception as exc:  # a fuser failure must not fail the job: isolate the bad row
            if len(reqs) == 1:
                log.warning("row %s failed: %s", reqs[0].id, exc, exc_info=True)
                return [self.error_row(reqs[0].id, f"{type(exc).__name__}: {exc}", reqs[0].seed)]
            log.warning("micro-batch of %d rows failed (%s); retrying row by row", len(reqs), exc)
            return [r for req in reqs for r in self._isolated([req], fn)]

    def _label_rows(self, reqs: list[Request]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        outs = self.fuser.label([r.prompt for r in reqs], [r.choices for r in reqs], [r.system for r in reqs])
        ms = (time.perf_counter() - t0) * 1000
        return [
            self.row(id=r.id, label=o.label, label_probs=list(map(float, o.probs)), finish_reason="stop",
                     status="ok", latency_ms=ms, seed=r.seed, member_stats=_stats_dicts(o.member_stats))
            for r, o in zip(reqs, outs)
        ]

    def _generate_rows(self, reqs: list[Request]) -> list[dict[str, Any]]:
        from ensemble.config import DecodeParams

        cfg = self.config
        jobs: list[tuple[Request, int, int]] = []
        for r in reqs:
            for s in range(cfg.n_samples):
                jobs.append((r, s, r.seed if cfg.n_samples == 1 else derive_seed(r.seed, r.id, s)))
        params = [
            DecodeParams(max_new_tokens=r.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                         top_k=cfg.top_k, seed=seed, stop=cfg.stop, system=r.system)
            for r, _, seed in jobs
        ]
        t0 = time.perf_counter()
        outs = self.fuser.generate([r.prompt for r, _, _ in jobs], params)
        ms = (time.perf_counter() - t0) * 1000
        return [
            self.row(id=r.id, sample=s, text=o.text, finish_reason=o.finish_reason.value, status="ok",
                     token_count=o.token_count, latency_ms=ms, seed=seed, member_stats=_stats_dicts(o.member_stats))
            for (r, s, seed), o in zip(jobs, outs)
        ]


def to_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=OUTPUT_SCHEMA)


def process_partition(
    batches: Iterable[pa.RecordBatch], *, make_fuser: Callable[[], Any], config: JobConfig
) -> Iterator[pa.RecordBatch]:
    """Input batches (typed columns, or a ``value`` column of JSON lines) -> OUTPUT_SCHEMA batches,
    one per micro-batch of ``config.batch_size`` valid rows (error rows ride along)."""
    runner = PartitionRunner(config, make_fuser)
    seen: set[str] = set()
    pending: list[Request] = []
    ready: list[dict[str, Any]] = []
    for batch in batches:
        for pos, rank, raw in iter_raw(batch):
            if "__error__" in raw:
                ready.append(runner.error_row(row_key(None, pos), raw["__error__"]))
                continue
            res = validate(raw, pos=pos, seen=seen, run_seed=config.seed, job_max_new=config.max_new_tokens,
                           mode=config.mode, rank=rank)
            if isinstance(res, Rejected):
                ready.append(runner.error_row(res.id, res.reason, res.seed))
            else:
                pending.append(res)
            if len(pending) >= config.batch_size:
                ready += runner.run(pending)
                pending = []
                yield to_batch(ready)
                ready = []
    if pending:
        ready += runner.run(pending)
    if ready:
        yield to_batch(ready)
