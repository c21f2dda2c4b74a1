"""What the ensemble DAGs share: their Params, the tasks around the Spark submission, and the pure
functions that turn validated Params into the ``spark-submit jobs/fuse.py ...`` call.

Contract:
- Imports only the standard library and ``airflow.sdk``: no torch, transformers, ``ensemble``,
  ``jobs`` or Spark, and nothing here reads a Variable, a connection or a file at import time.
- Every rule on the Params lives in their JSON schemas, so a trigger that breaks one is refused
  when the run is created (API 400, ``ParamValidationError``), before any task exists. Airflow
  validates each Param on its own, so the rule across method and members (``single`` takes exactly
  one member, DeePEn and SpecFuse at least two) needs both in one Param: ``ensemble``, an object
  ``{"method": ..., "members": [...]}`` whose schema states the rule as if/then conditionals
  (:func:`dag_params`). ``plan``, the first task, checks again (:func:`check_params`) and refuses
  conf keys that are not Params (Airflow accepts and ignores them), before anything is submitted.
- The output of a run is the partition ``{output_root}/ds={YYYY-MM-DD}`` of the run's logical date
  with ``--run-id {dag_id}__{YYYYMMDD}``: a retry or a rerun of the same date writes the same
  directory with the same config, which the job resumes (it skips ids already committed and
  rewrites its own deterministic files). ``overwrite=true`` deletes the partition first.
- ``publish`` runs only after the Spark task succeeded, checks the job's ``_SUCCESS`` marker and
  only then emits the Asset event (extra: the partition's path, date, run id, config hash).
- Calibration (labeling only, :func:`calibration_params`): ``ensemble.dev_set``, a labeled dev set,
  makes ``calibrate`` run ``python -m jobs.calibrate`` (docs/jobs.md, "Calibration") before the Spark
  task; it writes the profile ``{partition}/_calibration/profile.json`` and the job applies it with
  ``--profile`` instead of ``--method``/``--members`` (the profile decides them: it may drop members,
  down to ``single``). Without a dev set ``calibrate`` is skipped and the job runs the Params' ensemble.
  The project's Python runs it: ``PYSPARK_DRIVER_PYTHON`` (else ``PYSPARK_PYTHON``) of the Variable
  ``ensemble_spark_env``, with that Variable's environment.

Deployment settings (never in code):
- connection ``spark_default``: the master and deploy mode, e.g.
  ``AIRFLOW_CONN_SPARK_DEFAULT='spark://local?deploy-mode=client'``; ``spark-submit`` must be on
  the worker's PATH (``$SPARK_HOME/bin``).
- Variable ``ensemble_spark_conf`` (JSON object): Spark conf for every DAG, e.g. the GPU settings
  ``spark.executor.resource.gpu.amount``; ``{dag_id}_spark_conf`` overlays it for one DAG.
- Variable ``ensemble_spark_env`` (JSON object): environment of ``spark-submit``, e.g.
  ``PYSPARK_PYTHON`` and ``PYSPARK_DRIVER_PYTHON`` (the interpreter that has the project).
- Variable ``ensemble_job_application``: path of ``jobs/fuse.py`` (default: the one next to this
  folder in the repository).
- Variables ``{dag_id}_input`` and ``ensemble_output_root``: used when the Params ``input`` /
  ``output_root`` are null (their defaults, so that scheduled runs read the deployment's data).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import Param, task

log = logging.getLogger(__name__)

# Copies of ensemble.config.METHODS / MAX_SEED and jobs.config.DEFAULT_MEMBERS: this file imports no
# project code (the Airflow environment does not have it); tests/jobs/test_cli.py checks that they agree.
METHODS = ("single", "deepen", "specfuse")
PACKAGED_MEMBERS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m")
MAX_SEED = 2**63 - 1
# A value that becomes one argv element: never empty, never starting with '-' (no flag injection).
ARG_PATTERN = r"^[^-\s].*$"
# How many members each method takes (JobConfig's rule, jobs/config.py): (fewest, most).
MAX_MEMBERS = 8
MEMBERS_PER_METHOD = {"single": (1, 1), "deepen": (2, MAX_MEMBERS), "specfuse": (2, MAX_MEMBERS)}
# Copy of jobs.calibrate.ENSEMBLES: the methods calibration takes (tests/airflow/test_fuse_submit.py checks it).
CALIBRATED_METHODS = ("deepen", "specfuse")
PROFILE_FILE = "_calibration/profile.json"  # under the partition; '_': not data to Spark or Arrow readers

CONF_VARIABLE = "ensemble_spark_conf"
ENV_VARIABLE = "ensemble_spark_env"
APPLICATION_VARIABLE = "ensemble_job_application"
OUTPUT_ROOT_VARIABLE = "ensemble_output_root"
SUCCESS_MARKER = "_SUCCESS"
RUN_MANIFEST = "_run.json"


# ---- Params ---------------------------------------------------------------------------------------
def common_params(*, max_new_tokens: int) -> dict[str, Param]:
    """The job settings both DAGs take, one Param (a per-field schema) each, flat as :func:`job_args`
    takes them. A DAG's Params are :func:`dag_params` of these (method and members grouped into
    ``ensemble``). Defaults must be valid: scheduled runs use them."""
    return {
        "input": Param(
            None, type=["null", "string"], minLength=1, pattern=ARG_PATTERN,
            title="Input", description="Input Parquet or JSONL path; '{ds}' and '{ds_nodash}' are replaced by "
            "the run's date. Null: the Variable '<dag_id>_input'."),
        "output_root": Param(
            None, type=["null", "string"], minLength=1, pattern=ARG_PATTERN,
            title="Output root", description="Partitions are written to <output_root>/ds=<logical date>. "
            "Null: the Variable 'ensemble_output_root' + '/<dag_id>'."),
        "method": Param("single", type="string", enum=list(METHODS), title="Method",
                        description="single needs exactly one member; deepen and specfuse at least two."),
        "members": Param(
            [PACKAGED_MEMBERS[0]], type="array", minItems=1, maxItems=MAX_MEMBERS, uniqueItems=True,
            items={"type": "string", "minLength": 1, "pattern": ARG_PATTERN},
            examples=[list(PACKAGED_MEMBERS)], title="Members",
            description="Member specs: packaged aliases (" + ", ".join(PACKAGED_MEMBERS) + "), HF model "
            "directories or .gguf files. The first is the main member."),
        "max_new_tokens": Param(max_new_tokens, type="integer", minimum=1, maximum=8192,
                                title="Budget: new tokens per row"),
        "max_prompt_tokens": Param(2048, type="integer", minimum=1, maximum=131072,
                                   title="Budget: prompt tokens per row (longer prompts become error rows)"),
        "seed": Param(None, type=["null", "integer"], minimum=0, maximum=MAX_SEED, title="Run seed",
                      description="Null: derived from the logical date (YYYYMMDD), so retries reproduce the run."),
        "partitions": Param(2, type="integer", minimum=1, maximum=100000, title="Spark partitions"),
        "batch_size": Param(8, type="integer", minimum=1, maximum=4096, title="Rows per fuser call"),
        "config_file": Param(None, type=["null", "string"], minLength=1, pattern=ARG_PATTERN,
                             title="Job config file (YAML/JSON) for ensemble settings; Params override it"),
        "report": Param(True, type="boolean", title="Write summary.parquet and report.md"),
        "overwrite": Param(False, type="boolean", title="Delete this date's partition before the run",
                           description="Needed when a date is rerun with different settings (the job refuses "
                           "to mix two configurations in one directory)."),
        "max_fuser_error_rate": Param(
            None, type=["null", "number"], minimum=0, maximum=1, title="Error budget: share of fuser errors",
            description="Above it the job writes no _SUCCESS and fails, and no Asset is published (input "
            "errors never count). Null: the job's default (0.01) or the config file's."),
    }


def sampling_params() -> dict[str, Param]:
    """Sampling settings of synthetic generation: sampling is required (temperature > 0)."""
    return {
        "temperature": Param(0.8, type="number", exclusiveMinimum=0, maximum=5, title="Temperature"),
        "top_p": Param(0.95, type="number", exclusiveMinimum=0, maximum=1, title="Top-p"),
        "top_k": Param(None, type=["null", "integer"], minimum=1, title="Top-k (null: off)"),
        "n_samples": Param(1, type="integer", minimum=1, maximum=256, title="Samples per prompt"),
    }


def calibration_params() -> dict[str, Param]:
    """Labeling's optional calibration: a labeled dev set. :func:`dag_params` puts it into ``ensemble``
    (a rule across fields needs them in one Param): it needs method deepen or specfuse."""
    return {"dev_set": Param(
        None, type=["null", "string"], minLength=1, pattern=ARG_PATTERN, title="Dev set (calibration)",
        description="A labeled dev set (JSON lines or Parquet: id, prompt, choices, answer) to calibrate the "
        "ensemble on before labeling (python -m jobs.calibrate; its profile chooses the members, the main "
        "member, the weights, the normalisation and the gate). Only with method " + " or ".join(CALIBRATED_METHODS)
        + ". Null: no calibration, the members as given.")}


def _members_rule(method: str) -> str:
    lo, hi = MEMBERS_PER_METHOD[method]
    return f"exactly {lo} member" if lo == hi == 1 else f"at least {lo} members"


def dag_params(settings: dict[str, Param]) -> dict[str, Param]:
    """A DAG's Params: ``settings`` (:func:`common_params` and the DAG's own) with ``method`` and
    ``members`` (and ``dev_set``, when given: :func:`calibration_params`) replaced by the one Param
    ``ensemble`` (in method's place). Its schema holds those fields' schemas and, as if/then
    conditionals, how many members each method takes and which methods calibrate, so that a trigger
    breaking a rule is refused when the run is created."""
    method, members, dev_set = settings["method"], settings["members"], settings.get("dev_set")
    rules = [
        {"if": {"properties": {"method": {"const": m}}, "required": ["method"]},
         "then": {"properties": {"members": {"minItems": lo, "maxItems": hi,
                                             "description": f"method {m} takes {_members_rule(m)}"}}}}
        for m, (lo, hi) in MEMBERS_PER_METHOD.items()]
    value = {"method": method.value, "members": list(members.value)}
    properties = {"method": method.schema, "members": members.schema}
    description = ("{\"method\": " + " | ".join(METHODS) + ", \"members\": [...]"
                   + (", \"dev_set\": null | path" if dev_set else "") + "}: "
                   + "; ".join(f"{m} takes {_members_rule(m)}" for m in MEMBERS_PER_METHOD) + ". ")
    if dev_set is not None:
        value["dev_set"], properties["dev_set"] = dev_set.value, dev_set.schema
        rules.append({"if": {"properties": {"dev_set": {"type": "string"}}, "required": ["dev_set"]},
                      "then": {"properties": {"method": {
                          "enum": list(CALIBRATED_METHODS),
                          "description": "calibration (dev_set) needs method " + " or ".join(CALIBRATED_METHODS)}}}})
        description += (dev_set.description or "") + " "
    ensemble = Param(
        value, type="object", properties=properties, required=["method", "members"],
        additionalProperties=False, allOf=rules,
        title="Ensemble: method and members" + (" (and a dev set to calibrate them on)" if dev_set else ""),
        description=description + (members.description or ""))
    out: dict[str, Param] = {}
    for name, param in settings.items():
        if name == "method":
            out["ensemble"] = ensemble
        elif name not in ("members", "dev_set"):
            out[name] = param
    return out


# ---- pure functions (tested without a scheduler) --------------------------------------------------
def settings_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """A run's Params -> the flat settings :func:`job_args` takes (``ensemble`` unpacked)."""
    flat = {k: v for k, v in params.items() if k != "ensemble"}
    flat["method"], flat["members"] = params["ensemble"]["method"], list(params["ensemble"]["members"])
    if "dev_set" in params["ensemble"]:
        flat["dev_set"] = params["ensemble"]["dev_set"]
    return flat


def check_params(params: Mapping[str, Any]) -> None:
    """How many members the method takes and which methods calibrate (the rules ``ensemble``'s schema
    states), on flat settings. Raises ValueError naming the Param."""
    method, members = params["method"], list(params["members"])
    if method not in MEMBERS_PER_METHOD:
        raise ValueError(f"method must be one of {list(MEMBERS_PER_METHOD)}, got {method!r}")
    lo, hi = MEMBERS_PER_METHOD[method]
    if not lo <= len(members) <= hi:
        raise ValueError(f"members must be {_members_rule(method)} for method {method}, got {members!r}")
    if params.get("dev_set") is not None and method not in CALIBRATED_METHODS:
        raise ValueError(f"dev_set (calibration) needs method {' or '.join(CALIBRATED_METHODS)}, got {method!r}")


def check_conf(conf: Mapping[str, Any] | None, declared: Iterable[str]) -> None:
    """Refuse conf keys that are not Params: Airflow accepts them and nothing reads them, so a typo
    (or the earlier top-level ``method`` / ``members``) would silently run the defaults."""
    declared = set(declared)
    unknown = sorted(set(conf or {}) - declared)
    if not unknown:
        return
    hint = ""
    if {"method", "members"} & set(unknown) and "ensemble" in declared:
        hint = ('; method and members are set together: {"ensemble": {"method": ..., "members": [...]}}')
    raise ValueError(f"conf keys {unknown} are not Params of this DAG (its Params: {sorted(declared)}){hint}")


def date_key(logical_date: datetime) -> tuple[str, str]:
    """(ds, ds_nodash) of a run."""
    return logical_date.strftime("%Y-%m-%d"), logical_date.strftime("%Y%m%d")


def partition_dir(output_root: str, ds: str) -> str:
    return f"{output_root.rstrip('/')}/ds={ds}"


def profile_path(output: str) -> str:
    """Where a run's calibration profile is written: under its partition."""
    return f"{output.rstrip('/')}/{PROFILE_FILE}"


def calibrate_args(params: Mapping[str, Any], *, profile: str) -> list[str]:
    """``jobs.calibrate``'s command line (after ``python -m jobs.calibrate``) for validated flat settings
    with a ``dev_set``: the run's members and method, its prompt budget and batch size."""
    return ["--dev", params["dev_set"], "--members", *params["members"], "--method", params["method"],
            "--output", profile, "--batch-size", str(params["batch_size"]),
            "--max-prompt-tokens", str(params["max_prompt_tokens"])]


def job_args(params: Mapping[str, Any], *, mode: str, input_path: str, output: str, run_id: str,
             seed: int, profile: str | None = None) -> list[str]:
    """The job's command line (after the application) for validated flat settings (:func:`settings_of`
    a run's Params). With a calibration ``profile`` the job takes method and members from it (it may
    have dropped members, down to single): passing the Params' would contradict it, and be refused."""
    ensemble = ["--profile", profile] if profile else ["--method", params["method"], "--members", *params["members"]]
    args = ["--input", input_path, "--output", output, "--run-id", run_id, "--mode", mode, *ensemble,
            "--max-new-tokens", str(params["max_new_tokens"]),
            "--max-prompt-tokens", str(params["max_prompt_tokens"]),
            "--seed", str(seed), "--partitions", str(params["partitions"]),
            "--batch-size", str(params["batch_size"]),
            "--report" if params["report"] else "--no-report"]
    if params.get("max_fuser_error_rate") is not None:
        args += ["--max-fuser-error-rate", repr(float(params["max_fuser_error_rate"]))]
    if params.get("config_file"):
        args = ["--config", params["config_file"], *args]
    if mode == "generate":
        args += ["--temperature", repr(float(params["temperature"])), "--top-p", repr(float(params["top_p"])),
                 "--n-samples", str(params["n_samples"])]
        if params.get("top_k") is not None:
            args += ["--top-k", str(params["top_k"])]
    return args


def default_application() -> str:
    """jobs/fuse.py of the repository this DAG folder sits in."""
    return str(Path(__file__).resolve().parent.parent / "jobs" / "fuse.py")


def _json_object(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"Variable {name} must be a JSON object, got {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> Path:
    return Path(path[len("file://"):] if path.startswith("file://") else path)


def read_commit(output: str) -> dict[str, Any]:
    """The committed run in ``output``: its manifest, or RuntimeError when ``_SUCCESS`` is missing."""
    if _is_remote(output):
        from airflow.sdk import ObjectStoragePath

        root = ObjectStoragePath(output)
        if not (root / SUCCESS_MARKER).exists():
            raise RuntimeError(f"{output} has no {SUCCESS_MARKER}: the job did not commit; not publishing")
        return json.loads((root / RUN_MANIFEST).read_text())
    root = _local(output)
    if not (root / SUCCESS_MARKER).is_file():
        raise RuntimeError(f"{output} has no {SUCCESS_MARKER}: the job did not commit; not publishing")
    return json.loads((root / RUN_MANIFEST).read_text())


def delete_partition(output: str) -> None:
    if _is_remote(output):
        from airflow.sdk import ObjectStoragePath

        root = ObjectStoragePath(output)
        if root.exists():
            root.rmdir(recursive=True)
        return
    shutil.rmtree(_local(output), ignore_errors=True)


# ---- tasks ----------------------------------------------------------------------------------------
def _logical_date(context: Mapping[str, Any]) -> datetime:
    """The run's logical date; a manual run created without one is keyed by its run_after."""
    logical = context.get("logical_date")
    return logical if logical is not None else context["dag_run"].run_after


@task(multiple_outputs=True, retries=0)
def plan(mode: str, **context: Any) -> dict[str, Any]:
    """Check the Params across fields, resolve the deployment settings and build the submission."""
    from airflow.sdk import Variable

    dag_id = context["dag"].dag_id
    check_conf(context["dag_run"].conf, context["dag"].params)
    params = settings_of(context["params"])
    check_params(params)
    ds, ds_nodash = date_key(_logical_date(context))
    input_path = params["input"] or Variable.get(f"{dag_id}_input", default=None)
    if not input_path:
        raise ValueError(f"input is null and the Variable {dag_id}_input is not set")
    input_path = input_path.replace("{ds}", ds).replace("{ds_nodash}", ds_nodash)
    root = params["output_root"]
    if not root:
        base = Variable.get(OUTPUT_ROOT_VARIABLE, default=None)
        if not base:
            raise ValueError(f"output_root is null and the Variable {OUTPUT_ROOT_VARIABLE} is not set")
        root = f"{base.rstrip('/')}/{dag_id}"
    output = partition_dir(root, ds)
    if params["overwrite"]:
        log.info("overwrite: deleting partition %s", output)
        delete_partition(output)
    seed = params["seed"] if params["seed"] is not None else int(ds_nodash)
    run_id = f"{dag_id}__{ds_nodash}"
    conf = _json_object(Variable.get(CONF_VARIABLE, default=None), CONF_VARIABLE)
    conf.update(_json_object(Variable.get(f"{dag_id}_spark_conf", default=None), f"{dag_id}_spark_conf"))
    env = _json_object(Variable.get(ENV_VARIABLE, default=None), ENV_VARIABLE)
    application = Variable.get(APPLICATION_VARIABLE, default=None) or default_application()
    profile, calibration = None, None
    if params.get("dev_set") is not None:
        profile = profile_path(output)
        calibration = calibrate_command(params, profile=profile, env=env)
        log.info("calibration: %s", shlex.join(calibration))
    args = job_args(params, mode=mode, input_path=input_path, output=output, run_id=run_id, seed=seed,
                    profile=profile)
    log.info("partition %s, run id %s: spark-submit %s %s", output, run_id, application, " ".join(args))
    return {"application": application, "args": args, "conf": conf, "env": env or None,
            "output": output, "run_id": run_id, "ds": ds, "name": f"{dag_id}-{ds_nodash}",
            "calibrate": calibration}


def calibrate_command(params: Mapping[str, Any], *, profile: str, env: Mapping[str, str]) -> list[str]:
    """``python -m jobs.calibrate ...`` with the project's Python (the Spark driver's, from the Variable
    ``ensemble_spark_env``). The profile is a local file (``jobs.calibrate`` writes it with the
    file system), so the partition must be local."""
    if _is_remote(profile):
        raise ValueError(f"dev_set: calibration writes its profile under the partition, which must be a local "
                         f"path, got {profile!r}")
    python = env.get("PYSPARK_DRIVER_PYTHON") or env.get("PYSPARK_PYTHON")
    if not python:
        raise ValueError(f"dev_set: calibration runs in the project's Python: set PYSPARK_DRIVER_PYTHON (or "
                         f"PYSPARK_PYTHON) in the Variable {ENV_VARIABLE}")
    return [python, "-m", "jobs.calibrate", *calibrate_args(params, profile=str(_local(profile)))]


@task(retries=0)
def calibrate(command: list[str] | None, env: Mapping[str, str] | None) -> None:
    """Run ``jobs.calibrate`` (its output into the task's log); skipped when the run has no dev set."""
    import subprocess

    from airflow.sdk.exceptions import AirflowSkipException

    if not command:
        raise AirflowSkipException("no dev_set: the job runs the Params' method and members, uncalibrated")
    log.info("running %s", shlex.join(command))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})}) as proc:
        for line in proc.stdout:
            log.info("%s", line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.calibrate exited with {proc.returncode} (its log is above): {shlex.join(command)}")


@task(retries=0)
def publish(output: str, date: str, **context: Any) -> dict[str, Any]:
    """Emit the Asset event for the committed partition (the task's outlets), never before."""
    manifest = read_commit(output)
    extra = {"path": output, "data": f"{output.rstrip('/')}/data", "ds": date,
             "run_id": manifest.get("run_id"), "config_hash": manifest.get("config_hash")}
    for outlet in context["task"].outlets:
        context["outlet_events"][outlet].extra = extra
    log.info("published %s", extra)
    return extra


# ---- The DAG ---------------------------------------------------------------------------------------
def fuse_dag(*, dag_id: str, description: str, mode: str, params: dict[str, Param], asset: Any,
             tags: list[str], doc_md: str | None, calibration: bool = False):
    """The shape every ensemble DAG has: plan >> fuse (SparkSubmitOperator) >> publish (the Asset);
    with ``calibration`` (the Params have ``ensemble.dev_set``): plan >> calibrate >> fuse, where fuse
    runs when calibrate succeeded or was skipped (no dev set), not when it failed.

    ``mode`` is the job's ``--mode`` (label | generate). The Spark task retries: the job is
    idempotent and resumes the partition's committed rows; plan, calibrate and publish do not.
    """
    from datetime import timedelta

    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
    from airflow.sdk import DAG, TriggerRule

    with DAG(dag_id=dag_id, description=description, schedule="@daily", start_date=datetime(2025, 1, 1),
             catchup=False, max_active_runs=1, params=params, tags=tags, doc_md=doc_md) as dag:
        submission = plan(mode=mode)
        fuse = SparkSubmitOperator(
            task_id="fuse", conn_id="spark_default", application=submission["application"],
            application_args=submission["args"], conf=submission["conf"], env_vars=submission["env"],
            retries=2, retry_delay=timedelta(minutes=1), name=submission["name"],
            trigger_rule=TriggerRule.NONE_FAILED if calibration else TriggerRule.ALL_SUCCESS,
        )
        published = publish.override(outlets=[asset])(submission["output"], submission["ds"])
        if calibration:
            submission >> calibrate(submission["calibrate"], submission["env"]) >> fuse
        submission >> fuse >> published
    return dag
