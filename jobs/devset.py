"""A calibration dev set (docs/jobs.md, "Calibration"): JSON lines or Parquet rows with ``id``,
``prompt``, ``choices`` and ``answer`` (the correct choice's text), optionally ``system``.

Unlike the job's input (jobs/rows.py), where a bad row becomes an error row, a bad dev row refuses
the whole file: calibrating on a silently shortened dev set would misreport every accuracy. The
message names the row (its 1-based position, the line of a JSON-lines file), its id when it has one,
and the field.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class DevRow:
    id: str
    prompt: str
    choices: tuple[str, ...]
    answer: str
    system: str | None = None

    @property
    def gold(self) -> int:
        """Index of the answer among the choices."""
        return self.choices.index(self.answer)


@dataclass(frozen=True)
class DevSet:
    path: str
    sha256: str
    """sha256 of the file's bytes: the cache of member scores and the profile are keyed by it."""
    rows: tuple[DevRow, ...]

    @property
    def chance(self) -> float:
        """Accuracy of a uniform random pick: the mean of 1/len(choices) over the rows."""
        return sum(1 / len(r.choices) for r in self.rows) / len(self.rows)


class DevSetError(ValueError):
    """A dev file that cannot be used; the message names the row and the field."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) per row: ``line N`` of a JSON-lines file (blank lines skipped), ``row N`` of Parquet."""
    if path.name.endswith(JSONL_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DevSetError(f"{path}: line {n}: not valid JSON ({exc.msg} at char {exc.pos})") from None
    elif path.name.endswith(PARQUET_SUFFIXES) or path.is_dir():
        import pyarrow.parquet as pq

        for n, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"row {n}", rec
    else:
        raise DevSetError(f"dev file must be JSON lines ({', '.join(JSONL_SUFFIXES)}) or Parquet "
                          f"({', '.join(PARQUET_SUFFIXES)}), got {str(path)!r}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _row(where: str, rec: Any) -> DevRow:
    if not isinstance(rec, dict):
        raise DevSetError(f"{where}: a dev row must be an object with id, prompt, choices, answer, got {_short(rec)}")
    rid = rec.get("id")
    at = f"{where} (id {rid!r})" if isinstance(rid, str) and rid.strip() else where

    def bad(field: str, rule: str) -> DevSetError:
        got = "it is missing" if field not in rec else f"got {_short(rec[field])}"
        return DevSetError(f"{at}: field '{field}' must be {rule}, {got}")

    if not isinstance(rid, str) or not rid.strip():
        raise bad("id", "a non-empty string")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt", "a non-empty string")
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise bad("system", "a string or null")
    choices = rec.get("choices")
    if (not isinstance(choices, (list, tuple)) or len(choices) < 2
            or any(not isinstance(c, str) or not c.strip() for c in choices)):
        raise bad("choices", "a list of at least two non-empty strings")
    if len(set(choices)) != len(choices):
        raise bad("choices", "distinct strings")
    answer = rec.get("answer")
    if not isinstance(answer, str):
        raise bad("answer", "the text of one of the choices")
    if answer not in choices:
        raise DevSetError(f"{at}: field 'answer' must be one of the row's choices {_short(list(choices))}, "
                          f"got {_short(answer)}")
    return DevRow(rid, prompt, tuple(choices), answer, system)


def read_dev(path: str) -> DevSet:
    """Read and check a dev file; raises :class:`DevSetError` naming the row and the field."""
    p = Path(path)
    if not p.exists():
        raise DevSetError(f"dev file {path!r} does not exist")
    rows: list[DevRow] = []
    seen: dict[str, str] = {}
    for where, rec in _records(p):
        row = _row(where, rec)
        if row.id in seen:
            raise DevSetError(f"{where} (id {row.id!r}): field 'id' must be unique, it is also at {seen[row.id]}")
        seen[row.id] = where
        rows.append(row)
    if not rows:
        raise DevSetError(f"dev file {path!r} is empty: it needs rows with id, prompt, choices, answer")
    return DevSet(str(p), file_sha256(p) if p.is_file() else _dir_sha256(p), tuple(rows))


def _dir_sha256(path: Path) -> str:
    """sha256 over a Parquet directory's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith((".", "_"))):
        h.update(str(f.relative_to(path)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def write_job_input(dev: DevSet, path: str | Path, limit: int | None = None) -> str:
    """The dev rows as the job's input (JSON lines with id, prompt, system, choices)."""
    rows = dev.rows[:limit] if limit else dev.rows
    Path(path).write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt, "system": r.system,
                                              "choices": list(r.choices)}) + "\n" for r in rows))
    return str(path)
