"""Input rows -> validated requests or error reasons. Nothing here raises on bad data: every input
row becomes either a :class:`Request` or a :class:`Rejected` with a reason that names the value.

Documented normalisations: C0/C1 control characters other than tab, newline and carriage return are
removed from prompt and system text; a row's ``max_new_tokens`` above the job's is capped to it;
an id that is missing or not a string gets the key ``__noid__:<input position>`` in the output.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from ensemble.config import MAX_SEED

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
RAW_COLUMN = "value"  # JSON-lines input arrives as one text column
POS_COLUMN = "_pos"  # deterministic input position, added by the job
RANK_COLUMN = "_rank"  # 1 for the first occurrence of an id (by position), 2, 3... for duplicates
NOID = "__noid__:"


def row_key(row_id: Any, pos: int) -> str:
    """The output key of a row: its id when it is a usable string, else ``__noid__:<position>``."""
    return row_id if isinstance(row_id, str) and row_id.strip() else f"{NOID}{pos}"


def line_key(line: str | None, pos: int) -> str:
    """``row_key`` of a JSON line (what the Spark job partitions and resumes by)."""
    try:
        row = json.loads(line) if line is not None else None
    except json.JSONDecodeError:
        row = None
    return row_key(row.get("id") if isinstance(row, dict) else None, pos)


@dataclass(frozen=True)
class Request:
    id: str
    prompt: str
    system: str | None
    choices: list[str] | None
    seed: int
    max_new_tokens: int


@dataclass(frozen=True)
class Rejected:
    id: str
    reason: str
    seed: int | None = None


def derive_seed(run_seed: int, row_id: str, sample: int = 0) -> int:
    """A row's default seed: a function of (run seed, id, sample) only."""
    digest = hashlib.sha256(f"{run_seed}\x1f{row_id}\x1f{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _clean_text(name: str, v: Any, *, required: bool) -> tuple[str | None, str | None]:
    """-> (text, error)."""
    if v is None:
        return None, (f"{name} is null" if required else None)
    if not isinstance(v, str):
        return None, f"{name} must be a string, got {type(v).__name__} {_short(v)}"
    if "\ufffd" in v:
        return None, f"{name} is not valid UTF-8 (holds U+FFFD replacement characters)"
    v = _CONTROL.sub("", v)
    if required and not v.strip():
        return None, f"{name} is empty or blank"
    return v, None


def validate(raw: dict[str, Any], *, pos: int, seen: set[str], run_seed: int, job_max_new: int,
             mode: str, rank: int | None = None) -> Request | Rejected:
    """``rank`` (from the job) marks duplicates globally; without it, ``seen`` does within this call."""
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid.strip():
        return Rejected(row_key(rid, pos), f"id must be a non-empty string, got {_short(rid)}")
    if (rank is not None and rank > 1) or (rank is None and rid in seen):
        return Rejected(rid, f"duplicate id {rid!r}: only its first occurrence is processed")
    seen.add(rid)
    prompt, err = _clean_text("prompt", raw.get("prompt"), required=True)
    if err:
        return Rejected(rid, err)
    system, err = _clean_text("system", raw.get("system"), required=False)
    if err:
        return Rejected(rid, err)
    seed = raw.get("seed")
    if seed is None:
        seed = derive_seed(run_seed, rid)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        return Rejected(rid, f"seed must be an integer in [0, 2**63-1], got {_short(seed)}")
    mnt = raw.get("max_new_tokens")
    if mnt is None:
        mnt = job_max_new
    elif isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
        return Rejected(rid, f"max_new_tokens must be an integer >= 1, got {_short(mnt)}", seed)
    mnt = min(mnt, job_max_new)
    choices = raw.get("choices")
    if choices is not None:
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
            return Rejected(rid, f"choices must be a list of strings, got {_short(choices)}", seed)
        if len(choices) == 0:
            return Rejected(rid, "choices is an empty list", seed)
        bad = [c for c in choices if not isinstance(c, str) or not c.strip() or "\ufffd" in c]
        if bad:
            return Rejected(rid, f"choices must be non-empty UTF-8 strings, got {_short(bad)}", seed)
        if len(set(choices)) != len(choices):
            return Rejected(rid, f"choices must be distinct, got {_short(list(choices))}", seed)
        choices = [_CONTROL.sub("", c) for c in choices]
    if mode == "label" and choices is None:
        return Rejected(rid, "mode is label but the row has no choices", seed)
    if mode == "generate":
        choices = None
    return Request(rid, prompt, system, list(choices) if choices is not None else None, seed, mnt)


def iter_raw(batch: pa.RecordBatch) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    """(input position, duplicate rank or None, row dict) for each row; JSON-lines text is parsed
    here, so a bad line becomes a row dict with an ``__error__`` entry instead of failing the task."""
    names = batch.schema.names
    positions = batch.column(POS_COLUMN).to_pylist() if POS_COLUMN in names else list(range(batch.num_rows))
    ranks = batch.column(RANK_COLUMN).to_pylist() if RANK_COLUMN in names else [None] * batch.num_rows
    if RAW_COLUMN in names:
        for line, pos, rank in zip(batch.column(RAW_COLUMN).to_pylist(), positions, ranks):
            try:
                row = json.loads(line) if line is not None else None
            except json.JSONDecodeError as exc:
                yield pos, rank, {"__error__": f"line is not valid JSON: {exc.msg} at char {exc.pos}"}
                continue
            if not isinstance(row, dict):
                yield pos, rank, {"__error__": f"line must hold a JSON object, got {_short(row)}"}
                continue
            yield pos, rank, row
        return
    cols = {n: batch.column(n).to_pylist() for n in names if n not in (POS_COLUMN, RANK_COLUMN)}
    for i in range(batch.num_rows):
        yield positions[i], ranks[i], {n: v[i] for n, v in cols.items()}
