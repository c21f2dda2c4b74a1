"""The job benchmark's bookkeeping (bench/bench_job.py) on made-up logs and output files: which
executor ran which partitions, its sha256 hashes and loads, fuser time per partition (one latency per
micro-batch), rows per partition, and the comparison of two runs' rows."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from bench import bench_job


def _rows(ids, latency, label=None):
    """Output rows with the columns the benchmark reads."""
    return [{"id": i, "sample": 0, "status": "ok", "label": label, "label_probs": [0.5, 0.5], "text": None,
             "token_count": None, "latency_ms": latency} for i in ids]


def test_executor_logs_and_output_give_fuser_time_per_executor(tmp_path):
    for ex, text in (("0", "x jobs.task INFO partition 1: 3 rows to fuse on cpu\n"
                           "ensemble.models INFO sha256 hashed m.gguf (98 MB in 0.4s)\n"
                           "ensemble.models INFO sha256 hashed model.safetensors (538 MB in 2.0s)\n"
                           "ensemble.models INFO loaded member smollm2 from x\n"),
                     ("1", "jobs.task INFO partition 0: 2 rows to fuse on cpu\nloaded member smollm2\n")):
        d = tmp_path / "logs" / f"work{ex}" / "app-1" / ex
        d.mkdir(parents=True)
        (d / "stderr").write_text(text)
    execs = bench_job.executor_logs(tmp_path / "logs")
    assert execs["work0/app-1/0"] == {"partitions": [1], "loads": 1,
                                      "sha256_hashed": {"m.gguf": 1, "model.safetensors": 1}}
    assert execs["work1/app-1/1"] == {"partitions": [0], "loads": 1, "sha256_hashed": {}}
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    # partition 1: two micro-batches (1000 ms for two rows, 500 ms for one) in one file
    pq.write_table(pa.Table.from_pylist(_rows(["a", "b"], 1000.0) + _rows(["c"], 500.0)),
                   data / "part-00001-abc.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(["d", "e"], 250.0)),
                   data / "part-00000-def.parquet")
    rows_per, fuser_per, rows = bench_job.read_output(tmp_path / "out")
    assert rows_per == {1: 3, 0: 2} and fuser_per == {1: 1.5, 0: 0.25} and len(rows) == 5


def test_same_outputs_names_the_rows_that_differ():
    a = {r["id"]: r for r in _rows(["x", "y"], 1.0, label="yes")}
    b = {k: dict(v) for k, v in a.items()}
    assert bench_job.same_outputs(a, b) == {"same_ids": True, "rows_differing": 0, "first_differing": [],
                                            "max_label_prob_gap": 0.0}
    b["y"]["label"], b["y"]["label_probs"] = "no", [0.25, 0.75]
    got = bench_job.same_outputs(a, b)
    assert got["rows_differing"] == 1 and got["first_differing"] == ["y"] and got["max_label_prob_gap"] == 0.25


def test_make_input_mixes_labeling_and_generation_rows(tmp_path):
    counts = bench_job.make_input(tmp_path / "in.jsonl", 7, 2, ["arc_challenge", "piqa"], 32)
    rows = [json.loads(line) for line in (tmp_path / "in.jsonl").read_text().splitlines()]
    assert counts == {"arc_challenge": 4, "piqa": 3, "gsm8k": 2} and len(rows) == 9
    assert len({r["id"] for r in rows}) == 9 and not any("gold" in r for r in rows)
    gen = [r for r in rows if "choices" not in r]
    assert len(gen) == 2 and all(r["max_new_tokens"] == 32 for r in gen)
