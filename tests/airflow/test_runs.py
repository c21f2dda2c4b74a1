"""DAG runs through ``dag.test()`` (a scheduler-free run of the real tasks against the test DB):
conf keys that are not Params stop a run before Spark, the Asset is published only for a committed
partition, a job that fails publishes nothing, and real end to end runs submit jobs/fuse.py to
local Spark with a packaged member and write the date-keyed Parquet partition: generation (a rerun
of the same date leaves it as it was) and labeling (labels among the choices, probabilities summing
to 1, one row per input row)."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import REPO

LOGICAL = datetime(2025, 3, 4, tzinfo=timezone.utc)
MEMBER = "smollm2-135m-instruct"


def states(dr) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}


def asset_events(asset_name: str, run_id: str) -> list[dict]:
    from sqlalchemy import select

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.name == asset_name, AssetEvent.source_run_id == run_id)).all()
        return [dict(e.extra or {}) for e in rows]


def xcom(dr, task_id: str, key: str):
    from sqlalchemy import select

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=dr.run_id, dag_ids=dr.dag_id, task_ids=task_id,
                                                 key=key)).first()
        assert row is not None, (task_id, key)
        return XComModel.deserialize_value(row)


def test_conf_keys_that_are_not_params_stop_the_run_before_spark(load_dag, airflow_db, tmp_path):
    """Airflow accepts conf keys it has no Param for; plan refuses them (here the top-level method
    and members that ensemble replaced), so that they do not silently run the defaults."""
    dag = load_dag("ensemble_labeling")
    dr = dag.test(logical_date=LOGICAL, run_conf={"input": str(tmp_path / "in.jsonl"), "output_root": str(tmp_path),
                                                  "method": "deepen", "members": [MEMBER, "gemma3-270m"]})
    assert str(dr.state) == "failed"
    assert states(dr) == {"plan": "failed", "calibrate": "upstream_failed", "fuse": "upstream_failed",
                          "publish": "upstream_failed"}
    assert list(tmp_path.iterdir()) == []
    assert asset_events("ensemble_fuse.labels", dr.run_id) == []


def test_no_asset_without_a_committed_partition(load_dag, airflow_db, tmp_path, monkeypatch):
    """The Spark task is marked successful without running (so nothing was committed): publish
    refuses and no Asset event is emitted. Null input/output_root come from Variables, the Spark
    conf from the shared and the per-DAG Variable, and overwrite deletes only the run's partition."""
    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_LABELING_INPUT", str(tmp_path / "prompts/{ds}.jsonl"))
    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_OUTPUT_ROOT", str(tmp_path / "out"))
    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_SPARK_CONF", json.dumps({"spark.task.resource.gpu.amount": "1"}))
    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_LABELING_SPARK_CONF",
                       json.dumps({"spark.executor.resource.gpu.amount": "1"}))
    partition = tmp_path / "out" / "ensemble_labeling" / "ds=2025-03-04"
    (partition / "data").mkdir(parents=True)
    (partition / "_SUCCESS").write_text("")  # a stale commit of other settings: overwrite deletes it
    other = tmp_path / "out" / "ensemble_labeling" / "ds=2025-03-03"
    other.mkdir()
    dag = load_dag("ensemble_labeling")
    dr = dag.test(logical_date=LOGICAL, run_conf={"overwrite": True}, mark_success_pattern="fuse")
    assert states(dr) == {"plan": "success", "calibrate": "skipped", "fuse": "success", "publish": "failed"}
    assert asset_events("ensemble_fuse.labels", dr.run_id) == []
    assert not partition.exists() and other.is_dir()  # its own date only
    args = xcom(dr, "plan", "args")
    assert args[args.index("--input") + 1] == str(tmp_path / "prompts/2025-03-04.jsonl")
    assert args[args.index("--output") + 1] == str(partition)
    assert args[args.index("--run-id") + 1] == "ensemble_labeling__20250304"
    assert args[args.index("--seed") + 1] == "20250304"  # null seed: derived from the date
    assert args[args.index("--mode") + 1] == "label"
    assert xcom(dr, "plan", "conf") == {"spark.task.resource.gpu.amount": "1",
                                        "spark.executor.resource.gpu.amount": "1"}
    assert xcom(dr, "plan", "calibrate") is None and "--profile" not in args  # no dev set: no calibration


def test_a_dev_set_runs_calibration_before_the_job(load_dag, airflow_db, tmp_path, monkeypatch):
    """With ensemble.dev_set, plan builds jobs.calibrate's command (the project's Python from the
    Variable ensemble_spark_env, the profile under the partition) and the job's arguments take the
    profile instead of method and members; calibrate runs before fuse (here both are marked
    successful without running). Without the project's Python plan refuses the run before any work."""
    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_SPARK_ENV", json.dumps({"PYSPARK_DRIVER_PYTHON": "/opt/proj/bin/python"}))
    conf = {"input": str(tmp_path / "in.jsonl"), "output_root": str(tmp_path / "out"),
            "ensemble": {"method": "specfuse", "members": [MEMBER, "gemma3-270m"], "dev_set": str(tmp_path / "dev.jsonl")}}
    dr = load_dag("ensemble_labeling").test(logical_date=LOGICAL, run_conf=conf, mark_success_pattern="calibrate|fuse")
    assert states(dr) == {"plan": "success", "calibrate": "success", "fuse": "success", "publish": "failed"}
    profile = str(tmp_path / "out" / "ds=2025-03-04" / "_calibration" / "profile.json")
    assert xcom(dr, "plan", "calibrate") == [
        "/opt/proj/bin/python", "-m", "jobs.calibrate", "--dev", str(tmp_path / "dev.jsonl"),
        "--members", MEMBER, "gemma3-270m", "--method", "specfuse", "--output", profile,
        "--batch-size", "8", "--max-prompt-tokens", "2048"]
    args = xcom(dr, "plan", "args")
    assert args[args.index("--profile") + 1] == profile and "--method" not in args and "--members" not in args

    monkeypatch.setenv("AIRFLOW_VAR_ENSEMBLE_SPARK_ENV", json.dumps({}))
    dr = load_dag("ensemble_labeling").test(logical_date=LOGICAL, run_conf=conf)
    assert states(dr) == {"plan": "failed", "calibrate": "upstream_failed", "fuse": "upstream_failed",
                          "publish": "upstream_failed"}
    assert not (tmp_path / "out").exists()


def sample_rows(*, choices: bool, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "data" / "sample.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if bool(r.get("choices")) is choices][:n]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _input(tmp_path: Path) -> tuple[Path, list[str]]:
    prompts = sample_rows(choices=False, n=3)
    return write_jsonl(tmp_path / "prompts.jsonl", prompts), [r["id"] for r in prompts]


@pytest.mark.slow
def test_end_to_end_synthetic_generation_on_local_spark(load_dag, spark_deployment, tmp_path):
    import pyarrow.parquet as pq

    src, ids = _input(tmp_path)
    root = tmp_path / "out"
    conf = {"input": str(src), "output_root": str(root), "ensemble": {"method": "single", "members": [MEMBER]},
            "max_new_tokens": 4, "temperature": 0.8, "top_p": 0.95, "n_samples": 2, "seed": 11,
            "partitions": 1, "batch_size": 4, "report": False}
    dag = load_dag("synthetic_generation")
    t0 = time.perf_counter()
    dr = dag.test(logical_date=LOGICAL, run_conf=conf)
    first_s = time.perf_counter() - t0
    assert states(dr) == {"plan": "success", "fuse": "success", "publish": "success"}, states(dr)
    assert str(dr.state) == "success"

    partition = root / "ds=2025-03-04"
    assert sorted(p.name for p in root.iterdir()) == ["ds=2025-03-04"]
    assert (partition / "_SUCCESS").is_file()
    table = pq.read_table(partition / "data")
    rows = table.to_pylist()
    assert sorted((r["id"], r["sample"]) for r in rows) == sorted((i, s) for i in ids for s in range(2))
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows]
    assert {r["run_id"] for r in rows} == {"synthetic_generation__20250304"}
    assert {r["method"] for r in rows} == {"single"} and all(r["members"] == [MEMBER] for r in rows)
    assert all(isinstance(r["text"], str) and 1 <= r["token_count"] <= 4 for r in rows)
    assert len({(r["id"], r["seed"]) for r in rows}) == len(rows)  # per-row, per-sample seeds
    manifest = json.loads((partition / "_run.json").read_text())
    assert manifest["config"]["seed"] == 11 and manifest["config"]["temperature"] == 0.8
    assert manifest["config"]["mode"] == "generate" and manifest["config"]["n_samples"] == 2

    events = asset_events("ensemble_fuse.synthetic", dr.run_id)
    assert len(events) == 1
    assert events[0]["path"] == str(partition) and events[0]["ds"] == "2025-03-04"
    assert events[0]["config_hash"] == manifest["config_hash"]

    # A rerun of the same date writes the same partition: the job resumes, finds every row
    # committed, and leaves the data as it was; the Asset is published again for that partition.
    files = {p.name: p.stat().st_mtime_ns for p in (partition / "data").glob("*.parquet")}
    assert files  # the comparison after the rerun is not between two empty listings
    t0 = time.perf_counter()
    dr2 = load_dag("synthetic_generation").test(logical_date=LOGICAL, run_conf=conf)
    second_s = time.perf_counter() - t0
    assert states(dr2) == {"plan": "success", "fuse": "success", "publish": "success"}, states(dr2)
    assert {p.name: p.stat().st_mtime_ns for p in (partition / "data").glob("*.parquet")} == files
    assert pq.read_table(partition / "data").to_pylist() == rows
    assert len(asset_events("ensemble_fuse.synthetic", dr2.run_id)) == 1
    print(f"end to end: first run {first_s:.0f}s, rerun {second_s:.0f}s")


@pytest.mark.slow
def test_end_to_end_labeling_on_local_spark(load_dag, spark_deployment, tmp_path):
    """ensemble_labeling through Spark: the input path's {ds} is the run's date, every input row has
    one output row, a labeled row's label is one of its choices with one probability per choice
    summing to 1, a row without choices is an input error row (label mode), which does not stop the
    run from committing and publishing."""
    import pyarrow.parquet as pq

    labeled = sample_rows(choices=True, n=3)
    unlabeled = sample_rows(choices=False, n=1)
    write_jsonl(tmp_path / "prompts" / "2025-03-04.jsonl", labeled + unlabeled)
    root = tmp_path / "out"
    conf = {"input": str(tmp_path / "prompts" / "{ds}.jsonl"), "output_root": str(root),
            "ensemble": {"method": "single", "members": [MEMBER]}, "partitions": 1, "batch_size": 4,
            "max_prompt_tokens": 512}
    t0 = time.perf_counter()
    dr = load_dag("ensemble_labeling").test(logical_date=LOGICAL, run_conf=conf)
    seconds = time.perf_counter() - t0
    assert states(dr) == {"plan": "success", "calibrate": "skipped", "fuse": "success", "publish": "success"}, \
        states(dr)

    partition = root / "ds=2025-03-04"
    assert (partition / "_SUCCESS").is_file() and (partition / "summary.parquet").is_file()
    rows = {r["id"]: r for r in pq.read_table(partition / "data").to_pylist()}
    assert sorted(rows) == sorted(r["id"] for r in labeled + unlabeled)  # one row per input row
    for src in labeled:
        row = rows[src["id"]]
        assert row["status"] == "ok", row["error"]
        assert row["label"] in src["choices"]
        assert len(row["label_probs"]) == len(src["choices"])
        assert sum(row["label_probs"]) == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 <= p <= 1.0 for p in row["label_probs"])
        assert row["label"] == src["choices"][max(range(len(src["choices"])), key=row["label_probs"].__getitem__)]
        assert row["text"] is None and row["run_id"] == "ensemble_labeling__20250304"
        assert row["method"] == "single" and row["members"] == [MEMBER]
    missing = rows[unlabeled[0]["id"]]
    assert missing["status"] == "error" and missing["label"] is None and "choices" in missing["error"]
    manifest = json.loads((partition / "_run.json").read_text())
    assert manifest["config"]["mode"] == "label" and manifest["config"]["seed"] == 20250304

    events = asset_events("ensemble_fuse.labels", dr.run_id)
    assert events == [{"path": str(partition), "data": str(partition / "data"), "ds": "2025-03-04",
                       "run_id": "ensemble_labeling__20250304", "config_hash": manifest["config_hash"]}]
    print(f"labeling end to end: {seconds:.0f}s")


@pytest.mark.slow
def test_a_failed_job_publishes_nothing(load_dag, spark_deployment, tmp_path):
    """A run over its error budget: the member cannot be built, so the fuser fails on every row; the
    job commits them as fuser error rows, writes no _SUCCESS and exits non-zero. fuse fails, publish
    does not run and no Asset event is emitted. The test runs fuse once (the DAG's retries resume the
    partition, whose committed fuser errors are not retried, and fail the same way)."""
    import pyarrow.parquet as pq

    src = write_jsonl(tmp_path / "prompts.jsonl", sample_rows(choices=True, n=2))
    root = tmp_path / "out"
    conf = {"input": str(src), "output_root": str(root), "partitions": 1, "max_fuser_error_rate": 0,
            "ensemble": {"method": "single", "members": [str(tmp_path / "missing-member.gguf")]}}
    dag = load_dag("ensemble_labeling")
    assert dag.get_task("fuse").retries >= 1
    dag.get_task("fuse").retries = 0
    dr = dag.test(logical_date=LOGICAL, run_conf=conf)
    assert str(dr.state) == "failed"
    assert states(dr) == {"plan": "success", "calibrate": "skipped", "fuse": "failed", "publish": "upstream_failed"}
    args = xcom(dr, "plan", "args")
    assert args[args.index("--max-fuser-error-rate") + 1] == "0.0"
    partition = root / "ds=2025-03-04"
    assert not (partition / "_SUCCESS").exists()
    rows = pq.read_table(partition / "data").to_pylist()
    assert len(rows) == 2 and {(r["status"], r["error_kind"]) for r in rows} == {("error", "fuser")}
    assert asset_events("ensemble_fuse.labels", dr.run_id) == []


@pytest.mark.slow
def test_end_to_end_calibrated_labeling_on_local_spark(load_dag, spark_deployment, tmp_path):
    """ensemble_labeling with a dev set: calibrate runs jobs.calibrate (SpecFuse over the two smallest
    packaged members, in process on a four-row dev set) and writes the profile under the partition;
    the job applies it (--profile): the Parquet's method, members, per-member weights and gate, and the
    run's config (choice normalisation, gate, pool), are the profile's; the Asset is published."""
    import pyarrow.parquet as pq

    dev = [dict(r, answer=r["choices"][0]) for r in sample_rows(choices=True, n=14) if r["id"].startswith("PIQA")]
    assert len(dev) == 4
    dev_path = write_jsonl(tmp_path / "dev.jsonl", dev)
    labeled = sample_rows(choices=True, n=2)
    src = write_jsonl(tmp_path / "prompts.jsonl", labeled)
    root = tmp_path / "out"
    members = [MEMBER, "gemma3-270m"]
    conf = {"input": str(src), "output_root": str(root), "partitions": 1, "batch_size": 4, "max_prompt_tokens": 512,
            "ensemble": {"method": "specfuse", "members": members, "dev_set": str(dev_path)}}
    dag = load_dag("ensemble_labeling")
    dag.get_task("fuse").retries = 0  # a failure shows at once (a retry would resume and fail the same way)
    t0 = time.perf_counter()
    dr = dag.test(logical_date=LOGICAL, run_conf=conf)
    seconds = time.perf_counter() - t0
    assert states(dr) == {"plan": "success", "calibrate": "success", "fuse": "success", "publish": "success"}, \
        states(dr)

    partition = root / "ds=2025-03-04"
    profile_file = partition / "_calibration" / "profile.json"
    assert profile_file.is_file() and (partition / "_SUCCESS").is_file()
    profile = json.loads(profile_file.read_text())
    assert profile["requested_method"] == "specfuse" and profile["dev"]["rows"] == 4
    assert set(profile["members"]) | set(profile["dropped"]) == set(members)
    manifest = json.loads((partition / "_run.json").read_text())
    config = manifest["config"]
    assert config["profile"] == str(profile_file)
    assert (config["method"], config["members"]) == (profile["method"], profile["members"])
    assert config["label"]["norm"] == profile["choice_norm"] and config["label"]["gate"] == profile["gate"]
    if profile["method"] == "specfuse":
        assert config["fuser"]["label_pool"] == profile["label_pool"]
        assert config["fuser"]["weights"] == pytest.approx(profile["weights"])

    rows = {r["id"]: r for r in pq.read_table(partition / "data").to_pylist()}
    assert sorted(rows) == sorted(r["id"] for r in labeled)
    for src_row in labeled:
        row = rows[src_row["id"]]
        assert row["status"] == "ok", row["error"]
        assert row["method"] == profile["method"] and row["members"] == profile["members"]
        assert row["config_hash"] == manifest["config_hash"]
        assert row["label"] in src_row["choices"]
        assert sum(row["label_probs"]) == pytest.approx(1.0, abs=1e-6)
        if profile["gate"] is None:
            assert not row["gated"]
        if profile["weights"] is not None:
            assert [s["weight"] for s in row["member_stats"]] == pytest.approx(profile["weights"])
    events = asset_events("ensemble_fuse.labels", dr.run_id)
    assert len(events) == 1 and events[0]["config_hash"] == manifest["config_hash"]
    print(f"calibrated labeling end to end: {seconds:.0f}s; profile: {profile['method']} over {profile['members']}, "
          f"norm {profile['choice_norm']}, gate {profile['gate']}, pool {profile['label_pool']}")
