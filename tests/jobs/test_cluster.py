"""A real Spark standalone cluster on loopback: a master and two workers started from the pyspark
installation; the job goes through spark-submit; the output is checked."""
import json

import pyarrow.parquet as pq
import pytest

from jobs.standalone import standalone_cluster, submit
from tests import tiny

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_spark_submit_to_standalone_cluster(tmp_path):
    model_dir = tmp_path / "tiny-model"
    m = tiny.member_bpe()
    m.model.save_pretrained(model_dir, safe_serialization=True)
    m.tokenizer.save_pretrained(model_dir)
    rows = [json.loads(line) for line in open("data/sample.jsonl")][:12] + [{"id": "oops", "prompt": None}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with standalone_cluster(workers=2, cores=1, memory="2g") as master:
        res = submit(["--input", str(inp), "--output", str(out), "--members", str(model_dir),
                      "--max-new-tokens", "6", "--partitions", "4", "--no-report"], master=master, timeout=600)
    assert "Wrote 13 rows" in res.stdout
    table = pq.read_table(out / "data").to_pylist()
    assert sorted(r["id"] for r in table) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in table}
    assert by_id["oops"]["status"] == "error" and "prompt is null" in by_id["oops"]["error"]
    assert sum(r["status"] == "ok" for r in table) == 12
    assert (out / "_SUCCESS").exists()
    parts = {p.name.split("-")[1] for p in (out / "data").iterdir()}
    assert len(parts) >= 2, "rows should be spread over several partitions"
