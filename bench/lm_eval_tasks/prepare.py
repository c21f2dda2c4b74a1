"""Write the local lm-eval data of the ``ef_*`` tasks (docs/lm_eval.md) from the
benchkit data, offline:

    python -m bench.lm_eval_tasks.prepare            # bench/lm_eval_tasks/data/<task>_<split>.jsonl

Rows come from ``bench/tasks.py`` (``load_split``): the same fixed dev split (positions 200-399 of the
task's order, 200 items) and test split (500; OpenBookQA 300) as ``bench/eval_label.py``, with the
same prompts and choices. Each labeling row is ``{"id", "prompt", "choices", "gold"}`` (``gold``: the
correct choice's index); a GSM8K row is ``{"id", "prompt", "answer"}``. The task YAMLs beside this
file read them (paths relative to the repository root). IFEval: all 541 prompts in ``data/ifeval.jsonl``
(``ef_ifeval``), with their instruction ids and arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bench import tasks

log = logging.getLogger("bench.lm_eval_tasks.prepare")

DATA_DIR = Path(__file__).resolve().parent / "data"
LABEL_TASKS = ("arc_challenge", "piqa", "boolq", "hellaswag", "winogrande", "openbookqa")
"""The six labeling tasks of the ef_* configs (BANKING77's 77 choices per item are left to the job)."""
TASKS = LABEL_TASKS + ("gsm8k",)
IFEVAL = "ifeval"
"""IFEval's 541 prompts (one file, ``data/ifeval.jsonl``), scored by benchkit's stdlib-only checker."""


def lm_eval_row(task: str, row: dict) -> dict:
    """A bench/tasks.py row as the ef_* YAMLs read it."""
    if "choices" not in row:
        return {"id": row["id"], "prompt": row["prompt"], "answer": row["gold"]}
    return {"id": row["id"], "prompt": row["prompt"], "choices": row["choices"],
            "gold": row["choices"].index(row["gold"])}


def prepare_ifeval(out: Path = DATA_DIR) -> Path:
    """Write ``out/ifeval.jsonl``: benchkit's IFEval prompts with their instructions and arguments."""
    import importlib.resources

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{IFEVAL}.jsonl"
    raw = importlib.resources.files("benchkit").joinpath("datasets/ifeval.jsonl").read_text(encoding="utf-8")
    rows = [{"id": d["task_id"], "prompt": d["prompt"], "instruction_id_list": d["instruction_id_list"],
             "kwargs": d["kwargs"]} for d in map(json.loads, raw.splitlines())]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log.info("%s: %d rows", path, len(rows))
    return path


def prepare(out: Path = DATA_DIR, task_names: tuple[str, ...] = TASKS, splits: tuple[str, ...] = tasks.SPLITS) -> list[Path]:
    """Write ``out/<task>_<split>.jsonl`` for each task and split; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in task_names:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        for split in splits:
            path = out / f"{task}_{split}.jsonl"
            rows = [lm_eval_row(task, r) for r in tasks.load_split(task, split)]
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            log.info("%s: %d rows", path, len(rows))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="where the JSONL files go (the YAMLs read data/)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--splits", nargs="+", default=list(tasks.SPLITS), choices=tasks.SPLITS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    prepare(args.out, tuple(args.tasks), tuple(args.splits))
    prepare_ifeval(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
