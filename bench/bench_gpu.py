"""GPU throughput of DeePEn and SpecFuse over the trio (SmolLM2-135M-Instruct main, Qwen2.5-Coder-0.5B-
Instruct, Gemma-3-270M), and the members' own decoding at the same batch, for issue 18 point 6.

Members are built from each member's real config and tokenizer with RANDOM weights
(``AutoModelForCausalLM.from_config``): the packaged weights are GGUF files far larger than what can be
carried to a lent device. The compute per forward is the architecture's, so the figures are throughput
only, never quality; near-uniform random distributions are DeePEn's worst case (large candidate sets,
most rows refined) and SpecFuse's drafts are meaningless text. EOS is switched off on every member
(``Member.eos_ids`` emptied) so that every row decodes ``--new-tokens`` tokens.

    python bench/bench_gpu.py bench --members-dir DIR --out gpu.jsonl [--device cuda] [--dtype bfloat16]
        [--batches 8 32 64] [--new-tokens 32] [--repeats 3] [--methods deepen specfuse] [--deadline-s 300]
    python bench/bench_gpu.py bench --members tiny --device cpu --batches 2 --new-tokens 4 --out x.jsonl
    python bench/bench_gpu.py spark --out DIR [--discovery scripts/getGpusResources.sh] [--device auto]
    python bench/bench_gpu.py report --jsonl run1.jsonl [run2.jsonl ...] [--md bench/results/gpu.md]
        [--json bench/results/gpu.json] [--header header.md] [--extra extra.json]

``--members-dir`` holds one folder per member alias with ``config.json`` and the tokenizer files
(``bench/gpu_check.sh`` unpacks them from ``.gpu_carry/members.tar.gz``); ``--members tiny`` uses the
test members of ``tests/tiny.py`` (a quick CPU smoke). Measured, per batch B (prompts from
``data/sample.jsonl`` repeated to fill the batch), after an untimed warm-up, with the device synchronised
around every timer and the median over ``--repeats``:

- each member's own greedy decode (``Single``) of the same number of tokens: seconds per step (one
  token for each of the B rows), prefill share included, and the prefill alone;
- each method (a fresh fuser per repeat: cold row cache): generated tokens/s of the fused system;
- the floor: B / the sum of the members' own seconds per step (the members' forwards alone, one after
  the other), and the ratio fused seconds per step / that sum.

Every measured item is one JSON line, written as soon as it is measured (``kind``: meta, own, fused,
skipped, error with its traceback, spark), so a crash or a timeout keeps what was measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ensemble import DecodeParams, DeePEn, Member, Single, SpecFuse  # noqa: E402

log = logging.getLogger("bench.gpu")
TRIO = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"]
METHODS: dict[str, Callable[[list[Member]], object]] = {"deepen": DeePEn, "specfuse": SpecFuse}
SAMPLE = REPO / "data" / "sample.jsonl"


# ---- members -----------------------------------------------------------------------------------
def random_member(model_dir: Path, *, device: torch.device, dtype: torch.dtype, seed: int) -> Member:
    """A member with the real config and tokenizer of ``model_dir`` and random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise the weights where they will run
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return Member(model.eval(), tok, name=model_dir.name)


def tiny_members(device: torch.device, dtype: torch.dtype) -> list[Member]:
    """The three test members of tests/tiny.py (three tokenisers), moved to ``device``/``dtype``."""
    from tests import tiny

    out = []
    for make in (tiny.member_bpe, tiny.member_bpe_qwen, tiny.member_sp):
        m = make()
        out.append(Member(m.model.to(device=device, dtype=dtype), m.tokenizer, name=m.name))
    return out


def build_members(args) -> list[Member]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.members == ["tiny"]:
        members = tiny_members(device, dtype)
    else:
        root = Path(args.members_dir)
        members = [random_member(root / alias, device=device, dtype=dtype, seed=i)
                   for i, alias in enumerate(args.members)]
    for m in members:
        m.eos_ids = frozenset()  # every row decodes exactly --new-tokens tokens (no EOS stop)
    return members


def prompts_for(batch: int) -> list[str]:
    """``batch`` prompts: data/sample.jsonl's prompts in order, repeated to fill the batch."""
    base = [json.loads(line)["prompt"] for line in SAMPLE.read_text().splitlines() if line.strip()]
    return [base[i % len(base)] for i in range(batch)]


# ---- timing ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


class Recorder:
    """Appends one JSON object per line to ``path`` and flushes at once."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()
        log.info("%s", json.dumps(obj)[:400])


def meta(args, members: list[Member]) -> dict:
    import transformers

    dev = torch.device(args.device)
    info = {"kind": "meta", "device": str(dev), "dtype": args.dtype, "weights": "random (from each real config)"
            if args.members != ["tiny"] else "random (tests/tiny.py members)",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "new_tokens": args.new_tokens, "repeats": args.repeats,
            "batches": args.batches, "members": [m.name for m in members],
            "params_m": [round(sum(p.numel() for p in m.model.parameters()) / 1e6, 1) for m in members],
            "vocab": [m.vocab_size for m in members], "eos": "off (Member.eos_ids emptied)"}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def own_step(member: Member, prompts: list[str], params: DecodeParams, repeats: int, dev) -> dict:
    """The member's own batched greedy decode through ``Single``: seconds per step, prefill included."""
    Single(member).generate(prompts[:2], params.with_(max_new_tokens=2))  # warm-up
    walls, prefills, counts = [], [], []
    for _ in range(repeats):
        pre, _ = timed(lambda: member.start(prompts), dev)
        wall, outs = timed(lambda: Single(member).generate(prompts, params), dev)
        walls.append(wall)
        prefills.append(pre)
        counts.append([o.token_count for o in outs])
    n = params.max_new_tokens
    wall = statistics.median(walls)
    return {"wall_s": walls, "prefill_s": statistics.median(prefills),
            "step_s": wall / n, "decode_step_s": (wall - statistics.median(prefills)) / max(n - 1, 1),
            "tokens_min": min(map(min, counts)), "tokens_max": max(map(max, counts))}


def fused(make: Callable[[], object], prompts: list[str], params: DecodeParams, repeats: int, dev) -> dict:
    """A fresh fuser per repeat (cold caches); construction not timed; untimed warm-up first."""
    make().generate(prompts, params.with_(max_new_tokens=min(4, params.max_new_tokens)))
    walls, builds, tokens = [], [], []
    for _ in range(repeats):
        build, fuser = timed(make, dev)
        wall, outs = timed(lambda: fuser.generate(prompts, params), dev)
        walls.append(wall)
        builds.append(build)
        tokens.append([o.token_count for o in outs])
        del fuser
    i = walls.index(statistics.median_low(walls))
    return {"wall_s": walls, "build_s": builds, "median_wall_s": walls[i], "tokens": sum(tokens[i]),
            "tokens_min": min(map(min, tokens)), "tokens_max": max(map(max, tokens))}


def make_fuser(method: str, members: list[Member]):
    return METHODS[method](members)


def bench(args) -> int:
    t_start = time.monotonic()
    rec = Recorder(Path(args.out))
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        rec.write({"kind": "error", "what": "setup", "error": "CUDA requested but torch.cuda.is_available() is False"})
        return 2
    try:
        t_build, members = timed(lambda: build_members(args), dev)
    except Exception as exc:  # noqa: BLE001  -- recorded, then the run stops
        rec.write({"kind": "error", "what": "members", "error": repr(exc), "traceback": traceback.format_exc()})
        return 1
    info = meta(args, members)
    info["members_built_s"] = round(t_build, 2)
    rec.write(info)
    params = DecodeParams(max_new_tokens=args.new_tokens)

    def over_deadline(what: dict) -> bool:
        left = args.deadline_s - (time.monotonic() - t_start)
        if left > 0:
            return False
        rec.write({"kind": "skipped", **what, "why": f"deadline of {args.deadline_s}s reached"})
        return True

    failures = 0
    for B in args.batches:
        prompts = prompts_for(B)
        own: dict[str, dict] = {}
        for m in members:
            item = {"member": m.name, "batch": B}
            if over_deadline(item):
                continue
            try:
                r = own_step(m, prompts, params, args.repeats, dev)
                own[m.name] = r
                rec.write({"kind": "own", **item, **r})
            except Exception as exc:  # noqa: BLE001  -- one item's failure must not lose the others
                failures += 1
                rec.write({"kind": "error", **item, "error": repr(exc), "traceback": traceback.format_exc()})
            _free(dev)
        floor_step = sum(r["step_s"] for r in own.values()) if len(own) == len(members) else None
        for method in args.methods:
            item = {"method": method, "batch": B}
            if over_deadline(item):
                continue
            try:
                r = fused(lambda: make_fuser(method, members), prompts, params, args.fused_repeats, dev)
                step = r["median_wall_s"] * B / r["tokens"]  # seconds per token of each row
                r.update(fused_tok_s=r["tokens"] / r["median_wall_s"], step_s=step)
                if floor_step is not None:
                    r.update(floor_step_s=floor_step, floor_tok_s=B / floor_step, ratio=step / floor_step)
                if dev.type == "cuda":
                    r["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
                rec.write({"kind": "fused", **item, **r})
            except Exception as exc:  # noqa: BLE001  -- recorded with its traceback; the next item runs
                failures += 1
                rec.write({"kind": "error", **item, "error": repr(exc), "traceback": traceback.format_exc()})
            _free(dev)
    rec.write({"kind": "done", "elapsed_s": round(time.monotonic() - t_start, 1), "failures": failures})
    return 1 if failures else 0


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---- the job on one GPU executor through Spark's resource scheduling -------------------------------
def spark(args) -> int:
    """Save a tiny random member as a Hugging Face folder, start a one-worker standalone cluster whose
    worker offers one GPU (discovery script), and submit the job with one GPU per executor and per task;
    the task's device comes from ``TaskContext.resources()`` (jobs/runtime.py)."""
    import os

    import pyarrow.parquet as pq

    from jobs.standalone import standalone_cluster, submit
    from tests import tiny

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out / "spark.jsonl")
    member_dir = out / "tiny-member"
    m = tiny.member_bpe()
    m.model.save_pretrained(member_dir, safe_serialization=True)
    m.tokenizer.save_pretrained(member_dir)
    discovery = str(Path(args.discovery).resolve())
    os.environ["SPARK_WORKER_OPTS"] = (f"-Dspark.worker.resource.gpu.amount=1 "
                                       f"-Dspark.worker.resource.gpu.discoveryScript={discovery}")
    conf = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
            "spark.executor.resource.gpu.discoveryScript": discovery, "spark.executor.cores": "1"}
    t0, t0_wall = time.monotonic(), time.time()
    try:
        with standalone_cluster(workers=1, cores=1) as url:
            done = submit(["--input", str(SAMPLE), "--output", str(out / "job"), "--method", "single",
                           "--members", str(member_dir), "--max-new-tokens", "8", "--device", args.device,
                           "--partitions", "1"], master=url, conf=conf, timeout=args.timeout,
                          log_path=out / "spark-submit.log")
        rows = pq.read_table(out / "job" / "data").num_rows
        rec.write({"kind": "spark", "ok": True, "seconds": round(time.monotonic() - t0, 1), "rows": rows,
                   "conf": conf, **_executor_evidence(t0_wall), "stdout_tail": done.stdout[-800:]})
        return 0
    except Exception as exc:  # noqa: BLE001  -- recorded for the report, exit code says it failed
        rec.write({"kind": "spark", "ok": False, "error": repr(exc), "traceback": traceback.format_exc()})
        return 1


def _executor_evidence(since: float) -> dict:
    """What the executors of standalone clusters started since ``since`` were given (their resources
    file) and which device their tasks built the ensemble on (jobs/runtime.py logs it)."""
    import glob
    import os
    import re
    import tempfile

    resources, devices = [], []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "spark-standalone-*")):
        if os.path.getmtime(d) < since - 5:
            continue
        for f in glob.glob(os.path.join(d, "work*", "app-*", "*", "resource-executor-*.json")):
            resources += json.loads(Path(f).read_text())
        for f in glob.glob(os.path.join(d, "work*", "app-*", "*", "stderr")):
            devices += re.findall(r"building \S+ ensemble of .* on (\S+)", Path(f).read_text(errors="replace"))
    return {"executor_resources": resources, "task_devices": devices}


# ---- report ------------------------------------------------------------------------------------
def report(args) -> int:
    """gpu.json (every line, tagged with its run: the position of its file in --jsonl) and the tables."""
    lines = []
    for run, path in enumerate(args.jsonl, 1):
        lines += [{"run": run, **json.loads(x)} for x in Path(path).read_text().splitlines() if x.strip()]
    by_kind = {k: [x for x in lines if x["kind"] == k] for k in ("meta", "own", "fused", "error", "skipped", "done")}
    extra = json.loads(Path(args.extra).read_text()) if args.extra else {}
    Path(args.json).write_text(json.dumps({**by_kind, **extra}, indent=1) + "\n")
    md = ["| method | batch | fused tok/s | floor tok/s | ratio (fused / floor time per step) | fused s/step | tokens per row | run |",
          "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for x in sorted(by_kind["fused"], key=lambda x: (x["method"], x["batch"])):
        floor = f"{x['floor_tok_s']:.0f}" if "floor_tok_s" in x else "n/a"
        ratio = f"{x['ratio']:.2f}" if "ratio" in x else "n/a"
        md.append(f"| {x['method']} | {x['batch']} | {x['fused_tok_s']:.0f} | {floor} | {ratio} | "
                  f"{x['step_s'] * 1e3:.0f} ms | {x['tokens_min']}-{x['tokens_max']} | {x['run']} |")
    md += ["", "| member | batch | own s/step (prefill share incl.) | decode s/step | prefill | run |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for x in sorted(by_kind["own"], key=lambda x: (x["member"], x["batch"], x["run"])):
        md.append(f"| {x['member']} | {x['batch']} | {x['step_s'] * 1e3:.1f} ms | {x['decode_step_s'] * 1e3:.1f} ms "
                  f"| {x['prefill_s'] * 1e3:.1f} ms | {x['run']} |")
    if by_kind["error"] or by_kind["skipped"]:
        md += ["", "Errors and skipped items, as recorded:", ""]
        md += [f"- run {x['run']}, {x.get('method') or x.get('member') or x.get('what')} batch {x.get('batch', '-')}: "
               f"{x.get('error') or x.get('why')}" for x in by_kind["error"] + by_kind["skipped"]]
    table = "\n".join(md)
    if args.md:
        header = Path(args.header).read_text() if args.header else ""
        Path(args.md).write_text(header + table + "\n")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="measure fused and own throughput; one JSON line per item")
    b.add_argument("--members", nargs="+", default=TRIO, help="aliases under --members-dir (first is main), or 'tiny'")
    b.add_argument("--members-dir", default=".gpu_members", help="one folder per alias: config + tokenizer")
    b.add_argument("--out", required=True, help="JSON-lines file to append to")
    b.add_argument("--device", default="cuda")
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3, help="timed repeats of each member's own decode")
    b.add_argument("--fused-repeats", type=int, default=2, help="timed repeats of each fused run")
    b.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    b.add_argument("--deadline-s", type=float, default=1e9, help="skip the items not started by then")
    s = sub.add_parser("spark", help="the job on one GPU executor through Spark's resource scheduling")
    s.add_argument("--out", required=True, help="folder for the member, the job's output and spark.jsonl")
    s.add_argument("--discovery", default=str(REPO / "scripts" / "getGpusResources.sh"))
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--timeout", type=float, default=300)
    r = sub.add_parser("report", help="gpu.json and the markdown tables from a bench JSON-lines file")
    r.add_argument("--jsonl", nargs="+", required=True, help="one file per run, in run order")
    r.add_argument("--json", default=str(REPO / "bench" / "results" / "gpu.json"))
    r.add_argument("--md", default=None, help="write the tables (after --header's text) to this file")
    r.add_argument("--header", default=None, help="markdown placed before the tables")
    r.add_argument("--extra", default=None, help="a JSON object merged into gpu.json (e.g. tests, skipped steps)")
    args = p.parse_args(argv)
    return {"bench": bench, "spark": spark, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
