"""The pure partition function: Arrow record batches of prepared rows in, output rows out.

``process_partition(batches, *, make_fuser, config)`` needs no Spark (tests call it directly on
batches made by :func:`jobs.rows.prepare`).
Every input row yields exactly ``n_samples`` output rows for generation or one for labeling and
errors: bad rows become ``status = error`` rows with a reason and ``error_kind = input``; a fuser
failure on a micro-batch is retried row by row so that one bad row cannot take the others down, and a
row that fails alone becomes an ``error_kind = fuser`` row (the driver's error budget counts those:
docs/jobs.md).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from jobs.config import JobConfig
from jobs.rows import Rejected, Request, derive_seed, requests
from schemas import OUTPUT_SCHEMA, SCHEMA_VERSION
from schemas.tables import ERROR_KINDS, MEMBER_STATS_FIELDS

log = logging.getLogger(__name__)


def _stats_dicts(stats) -> list[dict[str, Any]]:
    return [{k: v for k, v in dataclasses.asdict(s).items() if k in MEMBER_STATS_FIELDS} for s in stats]


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

    def error_row(self, rid: str, reason: str, kind: str, seed: int | None = None) -> dict[str, Any]:
        """An error row; ``kind`` is ``input`` (a bad row) or ``fuser`` (the fuser raised on it)."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {ERROR_KINDS}, got {kind!r}")
        return self.row(id=rid, status="error", error=reason, error_kind=kind, finish_reason="error", seed=seed)

    # ---- fusion ----------------------------------------------------------------------------------
    def run(self, reqs: list[Request]) -> list[dict[str, Any]]:
        """Fit the prompts (the fuser checks them against max_prompt_tokens and every member's context
        window), then label the rows with choices and generate the others."""
        out: list[dict[str, Any]] = []
        fitted: list[Request] = []
        for r in self._isolated(reqs, self._fit):
            (fitted if isinstance(r, Request) else out).append(r)
        labels = [r for r in fitted if r.choices is not None]
        gens = [r for r in fitted if r.choices is None]
        priors = self.config.label.priors
        if labels and priors is not None:  # a choice without a dev prior: bad input, not a fuser failure
            why = {r.id: priors.uncovered(r.choices) for r in labels}
            out += [self.error_row(r.id, why[r.id], "input", r.seed) for r in labels if why[r.id]]
            labels = [r for r in labels if not why[r.id]]
        if labels:
            out += self._isolated(labels, self._label_rows)
        if gens:
            out += self._isolated(gens, self._generate_rows)
        return out

    def _fit(self, reqs: list[Request]) -> list[Request | dict[str, Any]]:
        """Each request with its prompt fitted, or an error row naming the member and the limit."""
        cfg = self.config
        fits = self.fuser.fit_prompts([r.prompt for r in reqs], [r.system for r in reqs],
                                      [r.max_new_tokens for r in reqs], cfg.max_prompt_tokens, cfg.long_prompt)
        return [dataclasses.replace(r, prompt=f) if isinstance(f, str)
                else self.error_row(r.id, str(f), "input", r.seed) for r, f in zip(reqs, fits)]

    def _isolated(self, reqs: list[Request], fn: Callable[[list[Request]], list]) -> list:
        """``fn(reqs)``; when it raises, ``fn`` row by row, and a row that fails alone becomes a fuser error row."""
        try:
            return fn(reqs)
        except Exception as exc:  # a fuser failure must not fail the task: isolate the bad row (budget: driver)
            if len(reqs) == 1:
                log.warning("row %s failed: %s", reqs[0].id, exc, exc_info=True)
                return [self.error_row(reqs[0].id, f"{type(exc).__name__}: {exc}", "fuser", reqs[0].seed)]
            log.warning("micro-batch of %d rows failed (%s); retrying row by row", len(reqs), exc)
            return [r for req in reqs for r in self._isolated([req], fn)]

    def _label_rows(self, reqs: list[Request]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        outs = self.fuser.label([r.prompt for r in reqs], [r.choices for r in reqs], [r.system for r in reqs],
                                params=self.config.label)
        ms = (time.perf_counter() - t0) * 1000
        return [
            self.row(id=r.id, label=o.label, label_probs=list(map(float, o.probs)), gated=bool(o.gated),
                     finish_reason="stop", status="ok", latency_ms=ms, seed=r.seed,
                     member_stats=_stats_dicts(o.member_stats))
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
    """Prepared batches (PREPARED_SCHEMA, with ``_rank`` when the job ranked duplicates) ->
    OUTPUT_SCHEMA batches, one per micro-batch of ``config.batch_size`` valid rows (error rows ride along)."""
    runner = PartitionRunner(config, make_fuser)
    seen: set[str] = set()
    pending: list[Request] = []
    ready: list[dict[str, Any]] = []
    for batch in batches:
        for res in requests(batch, seen):
            if isinstance(res, Rejected):
                ready.append(runner.error_row(res.id, res.reason, "input", res.seed))
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
