"""The GPU path (issue 18 point 6). Tests marked ``gpu`` need a CUDA device and are skipped without one
(CI has none): ``bench/gpu_check.sh`` runs them on a lent GPU machine. The other two check, on CPU, that
the script fails fast without CUDA and that the GPU benchmark runs end to end on tiny members."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensemble import DecodeParams, DeePEn, Member, Single, SpecFuse, load_member
from tests import tiny

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bench/gpu_check.sh runs these on one)")
PROMPTS = ["The capital of France is", "Two plus two is", "Once upon a time", "def add(a, b):"]
MAKERS = (tiny.member_bpe, tiny.member_bpe_qwen, tiny.member_sp)
BUILD = {"single": lambda ms: Single(ms[0]), "deepen": DeePEn, "specfuse": SpecFuse}


def on(member: Member, device: str, dtype: torch.dtype = torch.float32) -> Member:
    return Member(member.model.to(device=device, dtype=dtype), member.tokenizer, name=member.name)


@pytest.fixture
def exact_matmul():
    """float32 products without TF32, so CUDA and CPU agree up to rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", sorted(BUILD))
def test_cuda_greedy_matches_cpu(method, exact_matmul):
    cpu = [make() for make in MAKERS]
    gpu = [on(make(), "cuda") for make in MAKERS]
    assert all(m.device.type == "cuda" for m in gpu)
    params = DecodeParams(max_new_tokens=12)
    want = BUILD[method](cpu).generate(PROMPTS, params)
    got = BUILD[method](gpu).generate(PROMPTS, params)
    assert [o.text for o in got] == [o.text for o in want]
    assert [(o.token_count, o.finish_reason) for o in got] == [(o.token_count, o.finish_reason) for o in want]


@pytest.mark.gpu
@needs_cuda
def test_cuda_label_matches_cpu(exact_matmul):
    choices = [["Paris", "Rome"], ["four", "five"], ["cat", "dog"], ["return a + b", "pass"]]
    cpu = [make() for make in MAKERS]
    gpu = [on(make(), "cuda") for make in MAKERS]
    for name in ("deepen", "specfuse"):
        want = BUILD[name](cpu).label(PROMPTS, choices)
        got = BUILD[name](gpu).label(PROMPTS, choices)
        assert [o.label for o in got] == [o.label for o in want], name
        for g, w in zip(got, want):
            assert g.probs == pytest.approx(w.probs, abs=1e-4), name


@pytest.mark.gpu
@needs_cuda
def test_bf16_load_on_cuda_and_fuse(tmp_path):
    """load_member on CUDA defaults to bfloat16; every fuser runs on bf16 members."""
    src = tiny.member_bpe()
    src.model.save_pretrained(tmp_path / "tiny-bpe", safe_serialization=True)
    src.tokenizer.save_pretrained(tmp_path / "tiny-bpe")
    main = load_member(str(tmp_path / "tiny-bpe"), device="cuda")
    assert main.device.type == "cuda"
    assert next(main.model.parameters()).dtype == torch.bfloat16
    members = [main] + [on(make(), "cuda", torch.bfloat16) for make in MAKERS[1:]]
    params = DecodeParams(max_new_tokens=8)
    for name, build in BUILD.items():
        outs = build(members).generate(PROMPTS, params)
        assert len(outs) == len(PROMPTS), name
        assert all(1 <= o.token_count <= 8 or o.finish_reason.value == "stop" for o in outs), name


# ---- on CPU: the script's guard and the benchmark's plumbing ----------------------------------------------
@pytest.mark.skipif(CUDA, reason="checks the behaviour without CUDA")
def test_gpu_check_fails_fast_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no CUDA" in done.stdout + done.stderr
    assert "ran nothing" in done.stdout + done.stderr
    assert not (tmp_path / "tests.txt").exists() and not (tmp_path / "gpu.jsonl").exists()
    assert json.loads((tmp_path / "steps.json").read_text())["cuda"].startswith("absent")


def test_bench_gpu_smoke_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu

    out = tmp_path / "gpu.jsonl"
    rc = bench_gpu.main(["bench", "--members", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "2",
                         "--new-tokens", "3", "--repeats", "1", "--fused-repeats", "1", "--out", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["meta", "own", "own", "own", "fused", "fused", "done"]
    for x in lines:
        if x["kind"] == "fused":
            assert x["tokens"] == 2 * 3 and x["tokens_min"] == x["tokens_max"] == 3  # EOS off: fixed length
            assert x["ratio"] == pytest.approx(x["step_s"] / x["floor_step_s"])
            assert x["floor_tok_s"] == pytest.approx(2 / x["floor_step_s"])
    assert bench_gpu.main(["report", "--jsonl", str(out), "--json", str(tmp_path / "gpu.json"),
                           "--md", str(tmp_path / "gpu.md")]) == 0
    assert "| deepen | 2 |" in (tmp_path / "gpu.md").read_text()
    assert len(json.loads((tmp_path / "gpu.json").read_text())["fused"]) == 2
