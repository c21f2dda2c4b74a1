"""Run training-free LLM ensembles over a dataset of prompts as a Spark job writing Parquet.

    ensemble-fuse --input data/sample.jsonl --output output/sample --method deepen \\
        --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct

The same job runs as ``python -m jobs.fuse ...`` and under ``spark-submit jobs/fuse.py ...``
(local, standalone, YARN, Kubernetes: the master and resources come from configuration).
Output: data/part-*.parquet, summary.parquet, report.md, _run.json, _SUCCESS (docs/jobs.md).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import logging
import re
import sys
import textwrap
import typing
from enum import Enum
from typing import Any, Callable

from ensemble.config import FUSERS, flag_of
from ensemble.labeling import LABEL_GROUP, LabelParams
from jobs.config import GROUPS, IO, NESTED, JobConfig, load_config_file

log = logging.getLogger("jobs.cli")
FUSER_KEY = "fuser."  # flag destinations of the method's settings: "fuser.<field>"
LABEL_KEY = "label."  # ... and of the labeling settings (LabelParams): "label.<field>"
REMOVED = {"--deepen-label-norm": "--choice-norm", "--label-norm": "--choice-norm"}
"""Flags that were removed: old flag -> the flag that replaces it (a use fails naming it)."""
# descriptions of the help groups of the methods' own settings
_ONLY = {spec.title: f"settings of method {name} only" for name, spec in FUSERS.items() if spec.config}


# ---- flags generated from the config dataclasses ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag of the job: ``flag`` sets ``key`` (a JobConfig field, or ``fuser.<field>``) from the
    fields ``targets`` ((class, field) pairs: two for a setting several methods share, like --weights)."""

    flag: str
    key: str
    group: str
    targets: tuple[tuple[type, str], ...]


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring (the string literal after it in the class body), whitespace folded}."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


def job_flags() -> list[Flag]:
    """Every flag of the job but --config: JobConfig's fields, the labeling settings, then every
    method's settings."""
    out = [Flag(f.metadata.get("flag", kebab(f.name)), f.name, f.metadata["group"], ((JobConfig, f.name),))
           for f in dataclasses.fields(JobConfig) if f.name not in NESTED]
    out += [Flag(flag_of(LabelParams, f.name), LABEL_KEY + f.name, f.metadata.get("group", LABEL_GROUP),
                 ((LabelParams, f.name),)) for f in dataclasses.fields(LabelParams)]
    shared: dict[str, int] = {}
    for spec in FUSERS.values():
        for f in dataclasses.fields(spec.config) if spec.config else ():
            flag = flag_of(spec.config, f.name)
            if flag in shared:  # a setting more methods take (--main, --weights): one flag
                old = out[shared[flag]]
                out[shared[flag]] = dataclasses.replace(old, targets=old.targets + ((spec.config, f.name),))
                continue
            shared[flag] = len(out)
            out.append(Flag(flag, FUSER_KEY + f.name, f.metadata.get("group", spec.title), ((spec.config, f.name),)))
    return out


def optional_arg(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type accepting ``none`` for None."""
    def parse(value: str):
        return None if value.lower() == "none" else kind(value)

    parse.__name__ = kind.__name__
    return parse


def _reasoned(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ValueError's message shown by argparse (which hides a plain ValueError's)."""
    def wrapped(value: str):
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return wrapped


def _shown(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def _argument(flag: Flag) -> dict[str, Any]:
    """argparse keywords of a flag, from its (first) field's type, default, metadata and docstring."""
    cls, name = flag.targets[0]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional else hint
    kw: dict[str, Any] = {"dest": flag.key, "default": argparse.SUPPRESS}
    metavar = name.upper()
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) is tuple:
        kw["type"] = typing.get_args(base)[0]
        kw["nargs"] = "*" if f.default == () else "+"
    elif isinstance(base, type) and issubclass(base, Enum):
        kw["type"] = str
    elif optional and base in (int, float):
        kw["type"], metavar = optional_arg(base), f"{metavar}|none"
    elif hasattr(base, "from_arg"):  # a setting read from a file (--choice-priors FILE)
        kw["type"], metavar = optional_arg(_reasoned(base.from_arg)), "FILE|none"
    else:
        kw["type"] = base
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    elif "action" not in kw:
        kw["metavar"] = metavar
    if f.default is dataclasses.MISSING:
        shown = " (required, here or in --config)"
    elif f.default == () or (f.default is None and isinstance(kw.get("type"), type)):
        shown = ""  # nothing, or a None whose meaning the docstring gives (run_id, master, dtype, weights)
    else:
        shown = f" (default: {_shown(f.default)})"
    kw["help"] = (field_docs(cls).get(name, "") + shown).replace("%", "%%")
    return kw


class _Misspelt(argparse.Action):
    """A flag the job does not have, which looks like one it has: fail naming the right one."""

    def __init__(self, option_strings, dest, message: str, **kw):
        super().__init__(option_strings, dest, nargs="*", help=argparse.SUPPRESS, **kw)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.message)


def _squash(flag: str) -> str:
    return re.sub(r"[-_]", "", flag.lower())


def _misspellings(flags: list[Flag]) -> dict[str, str]:
    """{bare flag: message} for the methods' settings spelt with a prefix (``--topk`` -> ``--deepen-topk``)."""
    real = {f.flag for f in flags}
    out = {}
    for f in flags:
        cls, name = f.targets[0]
        bare = kebab(name)
        if bare == f.flag or bare in real:
            continue
        title = next((s.title for s in FUSERS.values() if s.config is cls), LABEL_GROUP)
        msg = f"there is no {bare}: {title}'s {name} is {f.flag}"
        near = [g for g in flags if _squash(g.flag) == _squash(bare)]
        out[bare] = msg + (f" ({near[0].flag} is {near[0].targets[0][1]}, another setting)" if near else "")
    return out


def build_parser(prog: str = "python -m jobs.fuse") -> argparse.ArgumentParser:
    commands = "\n".join(f"  ensemble-fuse {name} ...   {text}" for name, (_, text) in COMMANDS.items())
    p = argparse.ArgumentParser(prog=prog, description=__doc__, allow_abbrev=False,
                                usage="%(prog)s --input PATH --output DIR [--config FILE] [FLAG ...]",
                                epilog=f"commands (ensemble-fuse):\n{commands}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = job_flags()
    groups = {name: p.add_argument_group(name, _ONLY.get(name)) for name in GROUPS}
    groups[IO].add_argument("--config", help="YAML or JSON file of job settings (the method's under 'fuser:'); "
                                             "flags override it")
    for flag in flags:  # left out, a flag keeps the config file's value, then the dataclass default
        groups[flag.group].add_argument(flag.flag, **_argument(flag))
    for bare, message in _misspellings(flags).items():
        p.add_argument(bare, action=_Misspelt, dest=argparse.SUPPRESS, message=message)
    for old, new in REMOVED.items():
        p.add_argument(old, action=_Misspelt, dest=argparse.SUPPRESS,
                       message=f"there is no {old}: the choice normalisation of every method is {new} "
                               f"(sum, token, char or pmi; DeePEn's --deepen-label-norm was removed)")
    return p


def parse_config(argv: list[str] | None = None, prog: str = "python -m jobs.fuse") -> JobConfig:
    ns = vars(build_parser(prog).parse_args(argv))
    path = ns.pop("config", None)
    settings: dict[str, Any] = load_config_file(path) if path else {}
    nested = {"fuser": dict(settings.get("fuser") or {}), "label": dict(settings.get("label") or {})}
    for key, value in ns.items():
        if key.startswith((FUSER_KEY, LABEL_KEY)):
            outer, _, name = key.partition(".")
            nested[outer][name] = value
        else:
            settings[key] = value
    settings.update({k: v for k, v in nested.items() if v})
    if settings.get("profile"):
        from jobs.profiles import apply_profile

        settings = apply_profile(settings, settings["profile"])
    missing = [k for k in ("input", "output") if k not in settings]
    if missing:
        raise ValueError(f"missing required settings {missing} (flags --input/--output or the config file)")
    return JobConfig(**settings)


EXIT_BAD_CONFIG = 2
EXIT_ERROR_BUDGET = 3  # the run's fuser errors are over --max-fuser-error-rate: rows committed, no _SUCCESS


def main(argv: list[str] | None = None, prog: str = "python -m jobs.fuse") -> int:
    """The job: flags -> JobConfig -> a Spark session -> the driver's run -> where the output is.
    Exits 0, :data:`EXIT_BAD_CONFIG` or :data:`EXIT_ERROR_BUDGET` (docs/jobs.md)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_config(argv, prog)
    except (ValueError, TypeError) as exc:
        log.error("bad configuration: %s", exc)
        return EXIT_BAD_CONFIG
    from jobs.budget import ErrorBudgetExceeded
    from jobs.driver import run, spark_session

    spark = spark_session(cfg)
    try:
        result = run(spark, cfg)
    except ErrorBudgetExceeded as exc:
        log.error("%s", exc)
        return EXIT_ERROR_BUDGET
    finally:
        spark.stop()
    print_where(result)
    return 0


def print_where(result) -> None:
    rows = sum(c["rows"] for c in result.commits)
    resumed = " (resumed: rows committed by an earlier run of this config were skipped)" if result.skipped_committed else ""
    sys.stdout.write(
        f"\nWrote {rows} rows in {result.seconds:.0f}s to {result.data_dir}/ (Parquet){resumed}\n"
        f"Report: {result.output}/report.md   Summary: {result.output}/summary.parquet\n"
        f"Read it: python -c \"import pyarrow.parquet as pq; "
        f"print(pq.read_table('{result.data_dir}').to_pandas()[['id','status','text','label']])\"\n"
    )


def calibrate(argv: list[str] | None = None, prog: str = "python -m jobs.calibrate") -> int:
    """``jobs.calibrate``'s command line (imported when called)."""
    from jobs.calibrate import main as calibrate_main

    return calibrate_main(argv, prog)


COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "fuse": (main, "run the fusion job over a dataset (the default command)"),
    "calibrate": (calibrate, "choose an ensemble's profile on a labeled dev set (--profile applies it)"),
}
"""Subcommands of ``ensemble-fuse``: name -> (function of (argv, prog), help)."""


def entry(argv: list[str] | None = None) -> int:
    """The console script ``ensemble-fuse [COMMAND] FLAGS`` (pyproject.toml): COMMAND is one of
    :data:`COMMANDS`, ``fuse`` when left out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = bool(argv) and argv[0] in COMMANDS
    name = argv.pop(0) if explicit else "fuse"
    return COMMANDS[name][0](argv, prog=f"ensemble-fuse {name}" if explicit else "ensemble-fuse")


if __name__ == "__main__":
    sys.exit(entry())
