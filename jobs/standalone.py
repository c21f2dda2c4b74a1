"""Start a Spark standalone master and workers on loopback from the pyspark installation, and
submit the job to it with ``spark-submit`` (used by the cluster test and the scaling benchmark).

    with standalone_cluster(workers=2, cores=1) as master_url:
        submit(["--input", ..., "--output", ...], master=master_url)
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


def spark_home() -> str:
    import pyspark

    return os.environ.get("SPARK_HOME") or str(Path(pyspark.__file__).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(SPARK_HOME=spark_home(), PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1", SPARK_MASTER_HOST="127.0.0.1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _wait_for_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}: {path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no {needle!r} in {path} after {timeout}s")


@contextlib.contextmanager
def standalone_cluster(workers: int = 2, cores: int = 1, memory: str = "6g",
                       log_dir: Path | None = None) -> Iterator[str]:
    """A master and ``workers`` workers (``cores`` each) on 127.0.0.1; yields the master URL.

    The master's and workers' logs go to ``log_dir`` (default: a new temporary directory), and each
    worker ``i``'s executors run in ``log_dir/work<i>/<app id>/<executor id>/`` with their ``stderr``
    there (the job's executor-side logs: Python workers inherit it)."""
    home = spark_home()
    spark_class = str(Path(home) / "bin" / "spark-class")
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    logs = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="spark-standalone-"))
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    env = _env()
    try:
        mlog = logs / "master.log"
        master = subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(_free_port())], stdout=mlog.open("w"), stderr=subprocess.STDOUT, env=env)
        procs.append(master)
        _wait_for_log(mlog, "I have been elected leader", master)
        for i in range(workers):
            wlog = logs / f"worker{i}.log"
            w = subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", url, "--cores", str(cores), "--memory", memory,
                 "--webui-port", str(_free_port()), "--work-dir", str(logs / f"work{i}")],
                stdout=wlog.open("w"), stderr=subprocess.STDOUT, env=env)
            procs.append(w)
            _wait_for_log(wlog, "Successfully registered with master", w)
        log.info("standalone cluster at %s with %d workers x %d cores (logs in %s)", url, workers, cores, logs)
        yield url
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def submit(job_args: list[str], *, master: str, conf: dict[str, str] | None = None, timeout: float = 1800,
           log_path: Path | None = None) -> subprocess.CompletedProcess:
    """``spark-submit jobs/fuse.py <job_args>`` against ``master``; raises on a non-zero exit."""
    cmd = [str(Path(spark_home()) / "bin" / "spark-submit"), "--master", master,
           "--conf", f"spark.pyspark.python={sys.executable}", "--conf", f"spark.pyspark.driver.python={sys.executable}"]
    for k, v in (conf or {}).items():
        cmd += ["--conf", f"{k}={v}"]
    cmd += [str(REPO / "jobs" / "fuse.py"), *job_args]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if log_path is not None:
        log_path.write_text(out.stdout + "\n" + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"spark-submit exited with {out.returncode}:\n{out.stderr[-4000:]}")
    return out
