"""A worker killed mid-run on a real standalone cluster (loopback, jobs/standalone.py; docs/jobs.md,
"Guarantees"): ``kill -9`` the Python worker of a running fuse task, and in a second case its
executor JVM. The job must finish (Spark retries the task), every input row must have exactly one
output row, and the rows the task committed before the kill must not be computed again: the part
files that existed at the kill are untouched afterwards (same inode and mtime), the retried task
commits only the remaining rows, and it hands only those to the fuser (its "N rows to fuse" log line).
Each kill runs the job once (a module fixture per case); the two tests read that run.

Timing: the tiny member writes up to 256 tokens per row, one row per micro-batch, two rows per committed
file, so a partition's task runs for several seconds after its first commit; the test kills when a
partition has committed at least one file and has at least two more to go. The processes are found
through /proc: the executor JVM (CoarseGrainedExecutorBackend) whose working directory is the
executor's directory under this cluster's work dir, its ``pyspark.daemon`` child, and that daemon's
forked worker that has torch loaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.standalone import standalone_cluster, submit
from tests import tiny

pytestmark = [pytest.mark.spark, pytest.mark.slow]
log = logging.getLogger(__name__)

N_ROWS = 40
JOB_FLAGS = ["--max-new-tokens", "256", "--batch-size", "1", "--commit-rows", "2", "--partitions", "2", "--no-report"]
START = re.compile(r"partition (\d+): (\d+) rows to fuse")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    with standalone_cluster(workers=2, cores=1, memory="2g", log_dir=logs) as url:
        yield url, logs


@pytest.fixture(scope="module")
def job_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill-input")
    m = tiny.member_bpe()
    m.model.save_pretrained(d / "model", safe_serialization=True)
    m.tokenizer.save_pretrained(d / "model")
    rows = [{"id": f"row-{i:02d}", "prompt": f"Tell me about the cat number {i} who lived by the river."}
            for i in range(N_ROWS)]
    rows.append({"id": "bad-null", "prompt": None})  # an error row rides along with the others
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "model", d / "in.jsonl", sorted(r["id"] for r in rows)


# ---- processes (through /proc: psutil is not a dependency) ---------------------------------------
def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(d)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _has_torch(pid: int) -> bool:
    try:
        return "torch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _executor_processes(exec_dir: Path) -> tuple[int, list[int]]:
    """The executor JVM running in ``exec_dir`` and its Python workers that loaded torch (the ones
    running a fuse task: pyspark.daemon forks them; reused idle ones never imported torch)."""
    procs = _procs()
    jvm = [pid for pid, (_, cmd) in procs.items() if "CoarseGrainedExecutorBackend" in cmd
           and _cwd(pid) == exec_dir.resolve()]
    assert len(jvm) == 1, f"executor JVM in {exec_dir}: {jvm}"
    daemons = [pid for pid, (ppid, cmd) in procs.items() if ppid == jvm[0] and "pyspark.daemon" in cmd]
    workers = [pid for pid, (ppid, _) in procs.items() if ppid in daemons and _has_torch(pid)]
    return jvm[0], workers


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None


# ---- the job's observable progress ------------------------------------------------------------
def _apps(logs: Path) -> set[Path]:
    return set(logs.glob("work*/app-*"))


def _task_starts(logs: Path, earlier_apps: set[Path]) -> list[tuple[Path, int, int]]:
    """(executor dir, partition, rows handed to the fuser) for every fuse task attempt that started
    in an application not in ``earlier_apps``, from the executors' stderr (in order per executor)."""
    out = []
    for err in sorted(logs.glob("work*/app-*/*/stderr")):
        if err.parent.parent in earlier_apps:
            continue
        for m in START.finditer(err.read_text(errors="replace")):
            out.append((err.parent, int(m.group(1)), int(m.group(2))))
    return out


def _part_files(out: Path, partition: int) -> list[Path]:
    return sorted((out / "data").glob(f"part-{partition:05d}-*.parquet"))


def _ids(files: list[Path]) -> list[str]:
    return [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


class _Submit(threading.Thread):
    def __init__(self, args: list[str], master: str, log_path: Path):
        super().__init__(daemon=True)
        self.args, self.master, self.log_path = args, master, log_path
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            submit(self.args, master=self.master, timeout=TIMEOUT_S, log_path=self.log_path)
        except Exception as exc:  # reported by the test
            self.error = exc


def _run_and_kill(cluster, job_input, tmp_path: Path, target: str) -> dict:
    """Submit the job, wait for a partition mid-run, ``kill -9`` its Python worker (``target="worker"``)
    or executor JVM (``"executor"``), wait for the job; return what the checks need."""
    master, logs = cluster
    model, inp, _ = job_input
    out = tmp_path / "out"
    earlier_apps = _apps(logs)
    job = _Submit(["--input", str(inp), "--output", str(out), "--members", str(model), *JOB_FLAGS], master,
                  tmp_path / "submit.log")
    t0 = time.monotonic()
    job.start()
    victim = None
    while victim is None:
        assert job.is_alive(), f"the job ended before a partition could be caught mid-run: {job.error}"
        assert time.monotonic() - t0 < TIMEOUT_S, "no partition committed a file in time"
        for exec_dir, part, total in _task_starts(logs, earlier_apps):
            files = _part_files(out, part)
            done = sum(pq.read_metadata(f).num_rows for f in files)
            if files and done <= total - 4:  # committed a file, at least two more to go
                jvm, workers = _executor_processes(exec_dir)
                if workers:
                    victim = (exec_dir, part, total, jvm, workers)
                    break
        time.sleep(0.2)
    _, part, total, jvm, workers = victim
    killed = workers if target == "worker" else [jvm]
    assert len(killed) == 1, f"expected one Python worker running the task, found {workers}"
    os.kill(killed[0], signal.SIGKILL)
    t_kill = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in [*killed, *workers]):  # the JVM's workers die with it (daemon: SIGHUP)
        assert time.monotonic() < deadline, f"processes {killed + workers} still alive after the kill"
        time.sleep(0.1)
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in _part_files(out, part)}
    before_ids = _ids(_part_files(out, part))
    job.join(TIMEOUT_S)
    assert not job.is_alive(), "the job did not finish after the kill"
    assert job.error is None, f"the job failed after the kill: {job.error}"
    return {"out": out, "part": part, "total": total, "before": before, "before_ids": before_ids,
            "fused": [n for _, p, n in _task_starts(logs, earlier_apps) if p == part],
            "t_kill": t_kill, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module", params=["worker", "executor"])
def killed_run(request, cluster, job_input, tmp_path_factory) -> dict:
    res = _run_and_kill(cluster, job_input, tmp_path_factory.mktemp(f"kill-{request.param}"), request.param)
    log.info("%s killed at %.1fs with %d of %d rows of partition %d committed; rows fused per attempt %s; job %.1fs",
             request.param, res["t_kill"], len(res["before_ids"]), res["total"], res["part"], res["fused"],
             res["seconds"])
    return res


def test_killed_mid_run_the_job_finishes_with_every_row_once(killed_run, job_input):
    out, part = killed_run["out"], killed_run["part"]
    assert (out / "_SUCCESS").exists()
    assert len(killed_run["fused"]) >= 2, f"partition {part} was not retried: {killed_run['fused']}"
    table = pq.read_table(out / "data").to_pylist()
    assert sorted(r["id"] for r in table) == job_input[2], "duplicate or missing rows after the retry"
    assert {r["id"]: r["status"] for r in table}["bad-null"] == "error"
    assert sum(r["status"] == "ok" for r in table) == N_ROWS


def test_killed_mid_run_committed_rows_are_not_recomputed(killed_run):
    out, part, total, before = killed_run["out"], killed_run["part"], killed_run["total"], killed_run["before"]
    before_ids = killed_run["before_ids"]
    remaining = total - len(before_ids)
    # the fuser saw the committed rows once: every later attempt of the partition fused only the rest
    # (attempts are read executor by executor, not in time order: the first one is the one given all rows)
    retries = list(killed_run["fused"])
    assert total in retries and len(retries) >= 2, f"fuse attempts of partition {part}: {killed_run['fused']}"
    retries.remove(total)
    assert max(retries) <= remaining, (
        f"a retry of partition {part} handed {max(retries)} rows to the fuser; {remaining} were not committed")
    # the files committed before the kill are the ones the run ends with, untouched
    after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in _part_files(out, part)}
    rewritten = sorted(n for n, st in before.items() if after.get(n) != st)
    assert not rewritten, f"files committed before the kill were rewritten by the retry: {rewritten}"
    # and the retried task committed exactly the rows that were not committed at the kill
    new_ids = _ids([out / "data" / n for n in after if n not in before])
    assert len(new_ids) == remaining and not set(new_ids) & set(before_ids)
