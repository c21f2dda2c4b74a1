"""IFEval scoring of ef_ifeval (``utils.process_ifeval``: benchkit's stdlib-only checker, prompt-level
strict accuracy, no NLTK) and GSM8K scoring of the ef_gsm8k tasks (``process_results: !function utils.process_gsm8k``): the
number after "answer is", else the last number, compared with the gold number as bench/tasks.py's
``gsm8k_correct`` does for the job's evaluation. lm-eval loads this file by its path, so bench/tasks.py
is loaded by path too."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("ef_bench_tasks", Path(__file__).resolve().parent.parent / "tasks.py")
_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tasks)


def process_gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(_tasks.gsm8k_correct(results[0], str(doc["answer"])))}


def _benchkit_module(name: str):
    """A stdlib-only module of benchkit's benchmarks, loaded by file path (``benchkit.benchmarks``'
    package imports network clients this project does not install)."""
    import importlib.resources

    path = importlib.resources.files("benchkit").joinpath(f"benchmarks/{name}.py")
    spec = importlib.util.spec_from_file_location(f"ef_benchkit_{name}", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_checks = _benchkit_module("ifeval_instructions")
_utils = _benchkit_module("utils")


def process_ifeval(doc: dict, results: list[str]) -> dict[str, float]:
    """Prompt-level strict accuracy: 1 when the response follows every instruction of the prompt, as
    benchkit's ``IFEval.evaluate`` decides (think tags stripped; ``follows_instruction`` per
    instruction; ``combination:repeat_prompt`` gets the prompt)."""
    text = _utils.strip_think_tags(results[0])
    for instruction_id, kwargs in zip(doc["instruction_id_list"], doc["kwargs"], strict=True):
        args = dict(kwargs or {})
        if instruction_id == "combination:repeat_prompt":
            args.setdefault("prompt_to_repeat", doc["prompt"])
        if not _checks.follows_instruction(instruction_id, text, args):
            return {"prompt_level_strict_acc": 0.0}
    return {"prompt_level_strict_acc": 1.0}
