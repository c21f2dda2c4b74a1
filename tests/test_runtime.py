"""Device placement and the GPU discovery script."""
import json
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


def test_gpu_discovery_script_prints_spark_json():
    out = subprocess.run(["bash", "scripts/getGpusResources.sh"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["name"] == "gpu" and isinstance(data["addresses"], list)
