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


def process_ifeval(doc: dict, results: list[str]) -> dict[str, float]:
    """Prompt-level strict accuracy: 1 when the response follows every instruction of the prompt
    (bench/tasks.py's ``ifeval_pass``, the job evaluation's scorer)."""
    return {"prompt_level_strict_acc": float(_tasks.ifeval_pass(doc, results[0]))}
