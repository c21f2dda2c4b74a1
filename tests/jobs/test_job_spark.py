"""The Spark job in local mode on a tiny saved model: schema, one row per input, determinism across
partitionings, fault injection and resume without duplicates or recomputation, the error budget
with a fault injected into the fuser."""
import json
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from ensemble import DecodeParams, Single, load_member
from jobs.budget import ErrorBudgetExceeded
from jobs.config import JobConfig
from jobs.sink import InjectedFailure
from schemas import OUTPUT_SCHEMA, SUMMARY_SCHEMA, spark_schema
from tests import tiny

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    from jobs.driver import use_driver_python

    use_driver_python("local[2]")
    s = (SparkSession.builder.master("local[2]").appName("test-job")
         .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4").getOrCreate())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    m = tiny.member_bpe()
    m.model.save_pretrained(d, safe_serialization=True)
    m.tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory):
    """A fault injected into the fuser: a saved member whose embedding table (4 rows) is smaller than
    its tokenizer's vocabulary, so every forward raises IndexError (a checkpoint that does not match its
    tokenizer): every micro-batch and every row's retry fail, while prompts still fit."""
    d = tmp_path_factory.mktemp("broken-model")
    m = tiny.member_bpe()
    m.model.resize_token_embeddings(4)
    m.model.save_pretrained(d, safe_serialization=True)
    m.tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    rows = [json.loads(line) for line in open("data/sample.jsonl")]
    rows.append({"id": "bad-1", "prompt": ""})
    rows.append({"id": "gen-00", "prompt": "duplicate id"})
    path = tmp_path_factory.mktemp("in") / "sample.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n")
    return str(path), len(rows) + 1


def _cfg(tiny_dir, inp, out, **kw):
    kw.setdefault("report", False)
    return JobConfig(input=inp, output=str(out), members=(tiny_dir,), max_new_tokens=8, **kw)


def test_job_writes_one_row_per_input(spark, tiny_dir, sample, tmp_path):
    from pyspark.testing import assertSchemaEqual

    from jobs.driver import run

    inp, n = sample
    result = run(spark, _cfg(tiny_dir, inp, tmp_path / "o", partitions=2, report=True))
    df = spark.read.parquet(result.data_dir)
    assertSchemaEqual(df.schema, spark_schema(OUTPUT_SCHEMA))
    rows = df.collect()
    assert len(rows) == n
    errors = {r["id"]: r["error"] for r in rows if r["status"] == "error"}
    n_errors = len(errors)
    assert Counter(r["error_kind"] for r in rows) == {None: n - n_errors, "input": n_errors}
    assert "empty or blank" in errors.pop("bad-1")
    assert "not valid JSON" in errors.pop(next(k for k in errors if k.startswith("__noid__")))
    # the duplicate "gen-00" row and the long BoolQ passages (the tiny model's context is 512 tokens)
    assert all("duplicate id" in e or "context window 512" in e for e in errors.values()), errors
    assert sum(r["id"] == "gen-00" and r["status"] == "ok" for r in rows) == 1
    ok = [r for r in rows if r["status"] == "ok"]
    # every ok row is what the library gives for that input row with the same member (oracle: Single)
    inputs: dict = {}
    for line in open(inp):
        if line.startswith("{broken"):
            continue
        row = json.loads(line)
        inputs.setdefault(row["id"], row)  # the first occurrence of a duplicated id is the one processed
    gen = [r for r in ok if not inputs[r["id"]].get("choices")]
    lab = [r for r in ok if inputs[r["id"]].get("choices")]
    assert gen and lab and len(gen) + len(lab) == len(ok)
    assert all(r["label"] is None and r["label_probs"] is None for r in gen) and all(r["text"] is None for r in lab)
    single = Single(load_member(tiny_dir))
    want = single.generate([inputs[r["id"]]["prompt"] for r in gen], [
        DecodeParams(max_new_tokens=min(inputs[r["id"]].get("max_new_tokens", 8), 8), system=inputs[r["id"]].get("system"))
        for r in gen])  # a row's budget is capped by the job's (8)
    assert [(r["id"], r["text"], r["token_count"]) for r in gen] == [(r["id"], w.text, w.token_count) for r, w in zip(gen, want)]
    labels = single.label([inputs[r["id"]]["prompt"] for r in lab], [inputs[r["id"]]["choices"] for r in lab])
    for r, w in zip(lab, labels):
        assert r["label"] == w.label and r["label_probs"] == pytest.approx(w.probs, abs=1e-4), r["id"]
    assert (tmp_path / "o" / "_SUCCESS").exists() and (tmp_path / "o" / "report.md").exists()
    report = (tmp_path / "o" / "report.md").read_text()
    assert f"rows by status and kind: ok {len(ok)}, error/input {n_errors};" in report
    assert f"error budget: 0 of {len(ok)} rows the fuser attempted failed (rate 0 <= --max-fuser-error-rate 0.01): " \
           "within budget" in report
    summary = pq.read_table(tmp_path / "o" / "summary.parquet").to_pylist()
    assert summary[0]["rows"] == len(ok) and summary[0]["calls"] == sum(r["member_stats"][0]["calls"] for r in ok) > 0
    assert [(s["rows_ok"], s["rows_input_error"], s["rows_fuser_error"], s["fuser_error_rate"], s["budget_exceeded"])
            for s in summary] == [(len(ok), n_errors, 0, 0.0, False)] * len(summary)
    names = sorted(p.name for p in (tmp_path / "o" / "data").iterdir())
    assert all(nm.startswith("part-0000") for nm in names)


def test_greedy_output_independent_of_partitioning(spark, tiny_dir, sample, tmp_path):
    from pyspark.testing import assertDataFrameEqual

    from jobs.driver import run

    inp, n = sample
    a = run(spark, _cfg(tiny_dir, inp, tmp_path / "a", partitions=1, batch_size=8))
    b = run(spark, _cfg(tiny_dir, inp, tmp_path / "b", partitions=3, batch_size=3))
    cols = ["id", "status", "text", "label", "token_count"]
    one = spark.read.parquet(a.data_dir).select(cols)
    assert one.count() == n and one.filter("status = 'ok' AND text != ''").count() > 0  # not two empty outputs
    assertDataFrameEqual(one, spark.read.parquet(b.data_dir).select(cols))


def test_fault_injection_then_resume(spark, tiny_dir, sample, tmp_path):
    from jobs.driver import run

    inp, n = sample
    out = tmp_path / "r"
    with pytest.raises(Exception) as info:
        # one partition: no sibling task keeps committing after the failure while we count
        run(spark, _cfg(tiny_dir, inp, out, partitions=1, commit_rows=4, batch_size=2, fail_after_rows=8))
    assert "InjectedFailure" in str(info.value) or isinstance(info.value, InjectedFailure)
    committed = pq.read_table(out / "data").num_rows
    assert 8 <= committed < n  # the failure follows the commit that reaches fail_after_rows
    assert not (out / "_SUCCESS").exists()
    result = run(spark, _cfg(tiny_dir, inp, out, partitions=2, commit_rows=4, batch_size=2))
    computed = sum(c["rows"] for c in result.commits)
    assert computed == n - committed, "the rerun must compute only the rows not yet committed"
    rows = spark.read.parquet(result.data_dir).collect()
    assert len(rows) == n
    from collections import Counter

    ids = Counter(r["id"] for r in rows)
    assert ids.pop("gen-00") == 2  # the id that is duplicated in the input: one ok row, one error row
    assert set(ids.values()) == {1}  # nothing duplicated, nothing missing
    # a third run has nothing left to do
    again = run(spark, _cfg(tiny_dir, inp, out, partitions=2, commit_rows=4, batch_size=2))
    assert sum(c["rows"] for c in again.commits) == 0


def test_rerun_with_other_config_is_refused(spark, tiny_dir, sample, tmp_path):
    from jobs.driver import run

    inp, _ = sample
    run(spark, _cfg(tiny_dir, inp, tmp_path / "x", partitions=1))
    with pytest.raises(ValueError, match="use a new output directory"):
        run(spark, _cfg(tiny_dir, inp, tmp_path / "x", partitions=1, seed=3))


def test_fuser_failing_on_every_batch_fails_the_run(spark, broken_dir, sample, tmp_path):
    from jobs.driver import run

    inp, n = sample
    out = tmp_path / "f"
    with pytest.raises(ErrorBudgetExceeded) as info:
        run(spark, _cfg(broken_dir, inp, out, partitions=2, batch_size=4, report=True))
    held, msg = info.value.outcome, str(info.value)
    assert not (out / "_SUCCESS").exists()
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == n == info.value.result.rows  # every row committed, none ok
    kinds = Counter(r["error_kind"] for r in rows)
    assert set(kinds) == {"input", "fuser"} and all(r["status"] == "error" for r in rows)
    fuser = sorted((r["id"], r["error"]) for r in rows if r["error_kind"] == "fuser")
    assert all(e == "IndexError: index out of range in self" for _, e in fuser)
    # the rate counts only the rows the fuser attempted: the input errors are not in it
    assert held.fuser_errors == held.attempted == kinds["fuser"] == len(fuser) > 0 and held.rate == 1.0
    assert msg.startswith(f"fuser error budget exceeded: {len(fuser)} of {len(fuser)} rows the fuser attempted "
                          "failed (rate 1 > --max-fuser-error-rate 0.01)")
    assert "First errors: " + "; ".join(f"{i!r}: {e}" for i, e in fuser[:3]) + ". " in msg
    report = (out / "report.md").read_text()
    assert f"error/input {kinds['input']}, error/fuser {kinds['fuser']}" in report and "**exceeded" in report
    # no row is ok, so the summary is one run-level row: the counts by kind and the verdict
    (summary,) = pq.read_table(out / "summary.parquet").to_pylist()
    assert summary["run_id"] and summary == {
        **{f: None for f in SUMMARY_SCHEMA.names}, "run_id": summary["run_id"], "rows_ok": 0,
        "rows_input_error": kinds["input"], "rows_fuser_error": kinds["fuser"], "fuser_error_rate": 1.0,
        "budget_exceeded": True}
    # a rerun skips the committed rows, error rows included (not retried), and reaches the same verdict
    with pytest.raises(ErrorBudgetExceeded) as again:
        run(spark, _cfg(broken_dir, inp, out, partitions=2, batch_size=4))
    assert again.value.result.rows == 0 and str(again.value) == msg
    assert not (out / "_SUCCESS").exists()
    # the budget is not part of config_hash: a rerun with a larger one accepts the output as it is
    accepted = run(spark, _cfg(broken_dir, inp, out, partitions=2, max_fuser_error_rate=1.0))
    assert accepted.rows == 0 and (out / "_SUCCESS").exists()
    assert pq.read_table(out / "data").num_rows == n


def test_partitions_hold_when_shuffle_partitions_equal_them(spark, tiny_dir, sample, tmp_path):
    """With spark.sql.shuffle.partitions == --partitions, Spark drops the job's repartition as
    redundant and adaptive execution merged the small shuffle into one task: --partitions 2 ran as 1."""
    from jobs.driver import run, spark_session

    cfg = _cfg(tiny_dir, sample[0], tmp_path / "o", partitions=2)
    spark.conf.set("spark.sql.shuffle.partitions", "2")
    try:
        result = run(spark_session(cfg), cfg)  # the job's own session settings, applied to this session
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "4")
    rows = {c["partition"]: c["rows"] for c in result.commits}
    assert sorted(rows) == [0, 1] and sum(rows.values()) == sample[1], rows
