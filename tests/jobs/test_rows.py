"""The job's input pass (jobs/rows.py): one key rule for JSON lines and typed columns, each line
parsed once into typed columns, duplicates decided by rank or by the ids met so far."""
import json

import pyarrow as pa
import pytest

from jobs import rows
from jobs.rows import KEY_COLUMN, NOID, PREPARED_SCHEMA, RANK_COLUMN, Rejected, Request, prepare, requests, row_key

KW = dict(run_seed=0, job_max_new=16, mode="auto")


def _lines(lines):
    return pa.RecordBatch.from_pydict({"value": lines, "_pos": list(range(10, 10 + len(lines)))})


@pytest.mark.parametrize("rid, key", [
    ("a", "a"), (" a ", " a "), ("", f"{NOID}3"), ("  ", f"{NOID}3"), ("\t\n", f"{NOID}3"), (None, f"{NOID}3"),
    (7, f"{NOID}3"), (["a"], f"{NOID}3"), ("\ud800", f"{NOID}3"),
])
def test_row_key(rid, key):
    assert row_key(rid, 3) == key


def test_json_lines_and_typed_columns_get_the_same_keys_and_fields():
    objs = [{"id": "a", "prompt": "p", "seed": 4}, {"id": "\t", "prompt": "p"}, {"id": 7, "prompt": "p"},
            {"prompt": "p"}, {"id": "b", "prompt": "q", "choices": ["x", "y"], "system": "s"}]
    from_lines = prepare(_lines([json.dumps(o) for o in objs]), **KW)
    typed = pa.RecordBatch.from_pylist(
        [{"id": o.get("id") if isinstance(o.get("id"), str) else None, "prompt": o["prompt"], "seed": o.get("seed"),
          "choices": o.get("choices"), "system": o.get("system"), "_pos": 10 + i} for i, o in enumerate(objs)])
    from_columns = prepare(typed, **KW)
    assert from_lines.schema == from_columns.schema == PREPARED_SCHEMA
    assert from_lines.column(KEY_COLUMN).to_pylist() == ["a", f"{NOID}11", f"{NOID}12", f"{NOID}13", "b"]
    same = [n for n in PREPARED_SCHEMA.names if n != "error"]  # the id error quotes the raw value (7 vs None)
    assert from_lines.select(same).to_pylist() == from_columns.select(same).to_pylist()
    first, last = from_lines.to_pylist()[0], from_lines.to_pylist()[-1]
    assert (first["seed"], first["max_new_tokens"], first["error"], first["id_ok"]) == (4, 16, None, True)
    assert (last["choices"], last["system"]) == (["x", "y"], "s")


def test_each_line_is_parsed_once(monkeypatch):
    calls = []
    real = json.loads
    monkeypatch.setattr(rows.json, "loads", lambda s, *a, **k: calls.append(s) or real(s, *a, **k))
    batch = prepare(_lines([json.dumps({"id": f"r{i}", "prompt": "p"}) for i in range(5)]), **KW)
    monkeypatch.setattr(rows.json, "loads", real)
    assert len(calls) == 5
    out = list(requests(batch, set()))  # the executor side reads typed columns: no parsing
    assert [r.id for r in out] == [f"r{i}" for i in range(5)] and all(isinstance(r, Request) for r in out)


def test_bad_lines_and_values_become_rejections_never_exceptions():
    lines = ["{broken", "[1, 2]", None, "[" * 100_000, json.dumps({"id": "s", "prompt": "bad \ud800 half"}),
             json.dumps({"id": "\ud800", "prompt": "p"}), json.dumps({"id": "c", "prompt": "p", "choices": ["\udfff"]})]
    batch = prepare(_lines(lines), **KW)
    out = {r.id: r for r in requests(batch, set())}
    assert all(isinstance(r, Rejected) for r in out.values())
    reasons = [out[f"{NOID}{10 + i}"].reason for i in range(4)]
    assert reasons[0].startswith("line is not valid JSON: Expecting property name")
    assert reasons[1] == "line must hold a JSON object, got [1, 2]"
    assert reasons[2] == "line must hold a JSON object, got None"
    assert reasons[3] == "line is not valid JSON: nested too deeply"
    assert out["s"].reason == "prompt is not valid UTF-8 (holds a lone surrogate)"
    assert out[f"{NOID}15"].reason == "id must be a non-empty string, got '\\ud800'"
    assert out["c"].reason.startswith("choices must be non-empty UTF-8 strings")


def test_duplicates_by_rank_or_by_ids_seen():
    lines = [json.dumps(o) for o in ({"id": "a", "prompt": ""}, {"id": "a", "prompt": "p"}, {"prompt": "p"},
                                     {"id": "b", "prompt": "p"})]
    batch = prepare(_lines(lines), **KW)
    seen_mode = list(requests(batch, set()))
    assert [type(r).__name__ for r in seen_mode] == ["Rejected", "Rejected", "Rejected", "Request"]
    assert seen_mode[0].reason == "prompt is empty or blank"  # a bad first occurrence still claims its id
    assert seen_mode[1].reason == "duplicate id 'a': only its first occurrence is processed"
    assert seen_mode[2].reason.startswith("id must be a non-empty string")
    ranked = batch.append_column(RANK_COLUMN, pa.array([2, 1, 1, 1]))  # the job ranks over the whole input
    by_rank = list(requests(ranked, {"b"}))
    assert by_rank[0].reason == "duplicate id 'a': only its first occurrence is processed"
    assert isinstance(by_rank[1], Request) and isinstance(by_rank[3], Request)  # ranks win over ``seen``
