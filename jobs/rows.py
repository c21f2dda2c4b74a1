"""Input rows -> keyed, validated requests or error reasons. Nothing here raises on bad data: every
input row becomes either a :class:`Request` or a :class:`Rejected` with a reason that names the value.

The job prepares its input in one pass (:func:`prepare`, see docs/jobs.md): each row is keyed by
:func:`row_key` (the one definition of the key the job partitions, deduplicates, resumes and writes
by), each JSON line is parsed exactly once, and the row is validated into the typed columns of
:data:`PREPARED_SCHEMA`. The executor task reads those columns back with :func:`requests`, which only
applies the duplicate rule (it needs the ranks the driver computes across the whole input).

Documented normalisations: C0/C1 control characters other than tab, newline and carriage return are
removed from prompt and system text; a row's ``max_new_tokens`` above the job's is capped to it;
an id that is missing, blank, not a string or not encodable as UTF-8 gets the key
``__noid__:<input position>`` in the output.
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
KEY_COLUMN = "_key"  # row_key of the row: what the job partitions, deduplicates and resumes by
RANK_COLUMN = "_rank"  # 1 for the first occurrence of a key (by position), 2, 3... for duplicates
NOID = "__noid__:"

# One prepared row: its key and position, whether the key is the row's own id (only those can be
# duplicates), the validated fields of a Request, or the error of a Rejected (with its seed if known).
PREPARED_SCHEMA = pa.schema([
    pa.field(KEY_COLUMN, pa.string(), nullable=False),
    pa.field(POS_COLUMN, pa.int64(), nullable=False),
    pa.field("id_ok", pa.bool_(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("system", pa.string()),
    pa.field("choices", pa.list_(pa.string())),
    pa.field("seed", pa.int64()),
    pa.field("max_new_tokens", pa.int64()),
    pa.field("error", pa.string()),
])


def _utf8(v: str) -> bool:
    """False for strings Arrow cannot store (lone surrogates, e.g. from a JSON ``\\ud800`` escape)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def row_key(row_id: Any, pos: int) -> str:
    """The key of a row: its id when it is a usable string, else ``__noid__:<position>``."""
    return row_id if isinstance(row_id, str) and row_id.strip() and _utf8(row_id) else f"{NOID}{pos}"


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
    if not _utf8(v):
        return None, f"{name} is not valid UTF-8 (holds a lone surrogate)"
    v = _CONTROL.sub("", v)
    if required and not v.strip():
        return None, f"{name} is empty or blank"
    return v, None


def validate(raw: dict[str, Any], *, pos: int, run_seed: int, job_max_new: int, mode: str) -> Request | Rejected:
    """One row's fields -> a Request, or a Rejected naming the first bad value. Duplicates are not
    decided here (see :func:`requests`)."""
    rid = raw.get("id")
    key = row_key(rid, pos)
    if key != rid:
        return Rejected(key, f"id must be a non-empty string, got {_short(rid)}")
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
        bad = [c for c in choices if not isinstance(c, str) or not c.strip() or "\ufffd" in c or not _utf8(c)]
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


def parse_line(line: str | None) -> dict[str, Any] | str:
    """A JSON line -> its object, or the reason it is not one (never raises)."""
    try:
        row = json.loads(line) if line is not None else None
    except json.JSONDecodeError as exc:
        return f"line is not valid JSON: {exc.msg} at char {exc.pos}"
    except RecursionError:
        return "line is not valid JSON: nested too deeply"
    if not isinstance(row, dict):
        return f"line must hold a JSON object, got {_short(row)}"
    return row


def _raw_rows(batch: pa.RecordBatch) -> Iterator[dict[str, Any] | str]:
    """Each input row as a dict (typed columns, or a JSON line parsed here), or a parse error."""
    if RAW_COLUMN in batch.schema.names:
        yield from map(parse_line, batch.column(RAW_COLUMN).to_pylist())
        return
    cols = {n: batch.column(n).to_pylist() for n in batch.schema.names if n != POS_COLUMN}
    for i in range(batch.num_rows):
        yield {n: v[i] for n, v in cols.items()}


def prepare(batch: pa.RecordBatch, *, run_seed: int, job_max_new: int, mode: str) -> pa.RecordBatch:
    """Input rows (typed columns, or a ``value`` column of JSON lines; ``_pos`` when the job numbered
    them, else 0..n-1) -> PREPARED_SCHEMA rows, one per input row."""
    names = batch.schema.names
    positions = batch.column(POS_COLUMN).to_pylist() if POS_COLUMN in names else list(range(batch.num_rows))
    out: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    for pos, raw in zip(positions, _raw_rows(batch)):
        if isinstance(raw, str):
            res: Request | Rejected = Rejected(row_key(None, pos), raw)
        else:
            res = validate(raw, pos=pos, run_seed=run_seed, job_max_new=job_max_new, mode=mode)
        ok = isinstance(res, Request)
        out[KEY_COLUMN].append(res.id)
        out[POS_COLUMN].append(pos)
        out["id_ok"].append(not isinstance(raw, str) and raw.get("id") == res.id)
        out["prompt"].append(res.prompt if ok else None)
        out["system"].append(res.system if ok else None)
        out["choices"].append(res.choices if ok else None)
        out["seed"].append(res.seed)
        out["max_new_tokens"].append(res.max_new_tokens if ok else None)
        out["error"].append(None if ok else res.reason)
    return pa.RecordBatch.from_pydict(out, schema=PREPARED_SCHEMA)


def requests(batch: pa.RecordBatch, seen: set[str]) -> Iterator[Request | Rejected]:
    """PREPARED_SCHEMA rows -> one Request or Rejected each. Only the first occurrence of an id (by
    input position) is processed: the job ranks them across the whole input (``_rank``); without
    ranks (a direct call), ``seen`` collects the ids met so far."""
    cols = {n: batch.column(n).to_pylist() for n in batch.schema.names}
    ranks = cols.get(RANK_COLUMN, [None] * batch.num_rows)
    for i, key in enumerate(cols[KEY_COLUMN]):
        if cols["id_ok"][i]:
            if (ranks[i] is not None and ranks[i] > 1) or (ranks[i] is None and key in seen):
                yield Rejected(key, f"duplicate id {key!r}: only its first occurrence is processed")
                continue
            seen.add(key)
        if cols["error"][i] is not None:
            yield Rejected(key, cols["error"][i], cols["seed"][i])
        else:
            yield Request(key, cols["prompt"][i], cols["system"][i], cols["choices"][i], cols["seed"][i],
                          cols["max_new_tokens"][i])
