"""Device placement and the GPU discovery script."""
import json
import os
import shutil
import subprocess

from jobs.runtime import task_device


def test_task_device_without_spark_gpus_is_cpu():
    assert task_device("auto") == "cpu"
    assert task_device("cpu") == "cpu"


def test_task_device_uses_assigned_gpu(monkeypatch):
    import pyspark

    class Res:
        addresses = ["3"]

    class Ctx:
        def resources(self):
            return {"gpu": Res()}

    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: Ctx()))
    assert task_device("auto") == "cuda:3"


def test_gpu_discovery_script_prints_spark_json(tmp_path):
    out = subprocess.run(["bash", "scripts/getGpusResources.sh"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["name"] == "gpu" and all(isinstance(a, str) and a.isdigit() for a in data["addresses"])
    # the addresses are the GPU indices nvidia-smi lists (a fake one with two GPUs), none without it
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sed", "paste"):
        (tools / tool).symlink_to(shutil.which(tool))
    bash = shutil.which("bash")
    none = subprocess.run([bash, "scripts/getGpusResources.sh"], capture_output=True, text=True, check=True,
                          env={**os.environ, "PATH": str(tools)})
    assert json.loads(none.stdout) == {"name": "gpu", "addresses": []}
    (tools / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n 1\\n'\n")
    (tools / "nvidia-smi").chmod(0o755)
    two = subprocess.run([bash, "scripts/getGpusResources.sh"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": str(tools)})
    assert json.loads(two.stdout) == {"name": "gpu", "addresses": ["0", "1"]}


def test_torch_threads_follow_task_cpus(monkeypatch):
    import pyspark
    import torch

    from jobs.runtime import pin_threads, task_threads

    assert task_threads() is None  # outside a Spark task nothing is changed

    class Ctx:
        def cpus(self):
            return 1

    before = torch.get_num_threads()
    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: Ctx()))
    try:
        pin_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
