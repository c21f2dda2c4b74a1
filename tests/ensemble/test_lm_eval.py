"""The ensemble-fuse lm-eval model (ensemble/lm_eval/, docs/lm_eval.md): lm-eval's own Python API
runs it on tiny members and local tasks; its log-likelihoods are the project's scorer's and, for a
single member, lm-eval's ``hf`` model's; errors name what is wrong. The consistency with hf on the packaged
members (Gemma-3, SmolLM2) is marked slow."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: local tasks only
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import ensemble.lm_eval  # noqa: E402,F401  (registers ensemble-fuse)
from ensemble.labeling import LabelParams  # noqa: E402
from ensemble.lm_eval.args import parse_model_args  # noqa: E402
from ensemble.lm_eval.chat import CHAT_MARKER, decode_context, encode_chat  # noqa: E402
from ensemble.lm_eval.model import decode_params  # noqa: E402
from ensemble.models import load_member  # noqa: E402
from ensemble.scoring import score_choices  # noqa: E402
from tests import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    {"id": "a", "prompt": "Question: The capital of France is?\nAnswer:", "choices": ["Paris", "Rome", "Berlin"], "gold": 0},
    {"id": "b", "prompt": "Question: Is fire hot?\nAnswer:", "choices": ["yes", "no"], "gold": 0},
    {"id": "c", "prompt": "Question: Two plus two is?\nAnswer:", "choices": ["four", "nine", "two"], "gold": 0},
    {"id": "d", "prompt": "Question: Where does the cat live?\nAnswer:", "choices": ["in a big house", "near the sun"], "gold": 0},
]
GEN = [{"id": "g1", "prompt": "Once upon a time", "answer": "cat"}, {"id": "g2", "prompt": "The capital of", "answer": "Paris"}]


def save_member(member, directory: Path) -> str:
    member.model.save_pretrained(directory, safe_serialization=True)
    member.tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny members saved as Hugging Face directories (member specs both models can load)."""
    return {name: save_member(make(), tmp_path_factory.mktemp(name))
            for name, make in (("bpe", tiny.member_bpe), ("qwen", tiny.member_bpe_qwen), ("sp", tiny.member_sp))}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two local tasks: tiny_mc (multiple choice) and tiny_gen (generate_until)."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: prompt\nmetadata:\n  version: 1.0\n"
    (d / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "utils.py").write_text("def words(doc, results):\n    return {'words': float(len(results[0].split()))}\n")
    (d / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "process_results: !function utils.words\n"
        "metric_list:\n  - metric: words\n    aggregation: mean\n    higher_is_better: true\n")
    return d


def run(task_dir: Path, tasks: list[str], model_args, model: str = "ensemble-fuse", **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir)), **kw)


def lls(out: dict, task: str) -> list[float]:
    """Every request's log-likelihood, in document and choice order."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [float(r[0][0]) for s in samples for r in s["resps"]]


def scorer(spec: str, params: LabelParams, delimiter: str = " ", plain: bool = False) -> list[float]:
    """The project's scorer on the member (``plain``: as if it had no chat template), each choice
    preceded by ``delimiter`` (lm-eval's)."""
    member = load_member(spec, device="cpu")
    member.has_chat_template = member.has_chat_template and not plain
    out = score_choices(member, [d["prompt"] for d in DOCS], [[delimiter + c for c in d["choices"]] for d in DOCS],
                        params=params)
    return [v for s in out for v in s.scores.logprob]


# ---- (a) lm-eval runs the model ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["single", "deepen", "specfuse"])
def test_simple_evaluate_runs_every_method(dirs, task_dir, method):
    members = dirs["bpe"] if method == "single" else f"{dirs['bpe']}|{dirs['qwen']}"
    out = run(task_dir, ["tiny_mc", "tiny_gen"], {"method": method, "members": members, "device": "cpu"})
    mc, gen = out["results"]["tiny_mc"], out["results"]["tiny_gen"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert gen["words,none"] >= 0.0
    values = lls(out, "tiny_mc")
    assert len(values) == sum(len(d["choices"]) for d in DOCS)
    assert all(v < 0 and math.isfinite(v) for v in values)
    per_doc, at = [], 0
    for d in DOCS:
        per_doc.append(values[at:at + len(d["choices"])])
        at += len(d["choices"])
    acc = sum(max(range(len(v)), key=v.__getitem__) == d["gold"] for v, d in zip(per_doc, DOCS)) / len(DOCS)
    assert mc["acc,none"] == pytest.approx(acc)
    texts = [s["resps"][0][0] for s in sorted(out["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert all(isinstance(t, str) and "." not in t for t in texts)


def test_single_is_the_scorer(dirs, task_dir):
    """Raw text (no --apply_chat_template): a chat member scores the text as is and the continuation as
    lm-eval gives it (its delimiter included). --apply_chat_template: a chat member scores the choice
    as its reply after its own template, a completion member after the job's target delimiter (the
    job's scorer, ensemble/scoring.py)."""
    raw = lls(run(task_dir, ["tiny_mc"], f"members={dirs['bpe']}"), "tiny_mc")
    assert raw == pytest.approx(scorer(dirs["bpe"], LabelParams(norm="sum", target_delimiter=""), plain=True), abs=1e-5)
    chat = lls(run(task_dir, ["tiny_mc"], f"members={dirs['bpe']}", apply_chat_template=True), "tiny_mc")
    assert chat == pytest.approx(scorer(dirs["bpe"], LabelParams(norm="sum"), delimiter=""), abs=1e-5)
    assert chat != pytest.approx(raw, abs=1e-3)
    completion = lls(run(task_dir, ["tiny_mc"], f"members={dirs['sp']}", apply_chat_template=True), "tiny_mc")
    assert completion == pytest.approx(scorer(dirs["sp"], LabelParams(norm="sum", target_delimiter="")), abs=1e-5)


def requests_of(out: dict, task: str) -> list[tuple[str, str, float]]:
    """(context, continuation, log-likelihood) of every request, in document and choice order."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [(a[0], a[1], float(r[0][0])) for s in samples for a, r in zip(s["arguments"], s["resps"])]


def compare_with_hf(task_dir: Path, task: str, spec: str, hf_dir: str, chat: bool) -> dict[str, int]:
    """Single through ensemble-fuse and lm-eval's hf model on the same member directory, request by
    request. Every hf value is the project's member on hf's own tokens (the numerics agree); ours
    equals hf's wherever both score the same tokens. By design the token split can differ
    (docs/lm_eval.md): hf moves the context's trailing whitespace into the continuation ('moved': the
    same tokens, split elsewhere, e.g. after a chat template's final newline) and encodes context and
    continuation in one piece ('merged': other tokens). Returns the count of each case."""
    from lm_eval.api.registry import get_model

    from ensemble.lm_eval.scores import CHAT, RAW, as_text
    from ensemble.scoring import continuation_ids

    ours_lm = get_model("ensemble-fuse").create_from_arg_string(f"members={spec},device=cpu")
    hf_lm = get_model("hf").create_from_arg_string(f"pretrained={hf_dir},dtype=float32,device=cpu")
    ours = requests_of(run(task_dir, [task], None, model=ours_lm, apply_chat_template=chat), task)
    hf = requests_of(run(task_dir, [task], None, model=hf_lm, apply_chat_template=chat), task)
    member = ours_lm.fuser.members[0]

    def member_ll(ctx: list[int], cont: list[int]) -> float:
        return float(member.score(member.start_ids([ctx]), [[cont]])[0][0].double().sum())

    counts = {"same": 0, "moved": 0, "merged": 0}
    assert [c for _, c, _ in ours] == [c for _, c, _ in hf]
    with as_text(ours_lm.fuser, raw=not chat):
        for (ctx, cont, ll), (hf_ctx, _, hf_ll) in zip(ours, hf):
            turn = decode_context(ctx)
            assert turn.chat is chat and (hf_ctx == turn.prompt) is (not chat)
            want = hf_lm._encode_pair(hf_ctx, cont)
            got = (member.encode_prompt(turn.prompt, turn.system), continuation_ids(member, cont, CHAT if chat else RAW))
            assert hf_ll == pytest.approx(member_ll(*want), rel=1e-4, abs=2e-3), (hf_ctx, cont)
            if got == want:
                counts["same"] += 1
                assert ll == pytest.approx(hf_ll, rel=1e-4, abs=2e-3), (ctx, cont)
            else:
                counts["moved" if got[0] + got[1] == want[0] + want[1] else "merged"] += 1
    return counts


@pytest.mark.parametrize("member, chat", [("bpe", False), ("sp", False), ("bpe", True)])
def test_single_matches_lm_eval_hf_on_tiny_members(dirs, task_dir, member, chat):
    counts = compare_with_hf(task_dir, "tiny_mc", dirs[member], dirs[member], chat)
    if chat:  # ChatML's generation prompt ends with a newline, which hf scores as part of every choice
        assert counts["moved"] == sum(len(d["choices"]) for d in DOCS), counts
    else:
        assert counts["same"] == sum(len(d["choices"]) for d in DOCS), counts


def test_ensembles_of_one_member_reproduce_single(dirs, task_dir):
    """SpecFuse with one member, and DeePEn with its search off (lr=0, a fuser setting through model_args)
    over two copies of one member: Single's log-likelihoods."""
    single = lls(run(task_dir, ["tiny_mc"], f"members={dirs['bpe']}"), "tiny_mc")
    spec = lls(run(task_dir, ["tiny_mc"], f"method=specfuse,members={dirs['bpe']}"), "tiny_mc")
    assert spec == pytest.approx(single, abs=1e-6)
    twin = lls(run(task_dir, ["tiny_mc"], f"method=deepen,members={dirs['bpe']}|{dirs['bpe']},lr=0"), "tiny_mc")
    assert twin == pytest.approx(single, abs=1e-5)


def test_greedy_check(dirs):
    """greedy_check: the member's greedy text (and a prefix of it) is greedy, another text is not."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    lm = get_model("ensemble-fuse").create_from_arg_string(f"members={dirs['bpe']},greedy_check=true")
    prompt = "def add(a, b):"  # the random tiny member's greedy tokens here are text that re-encodes to them
    gen = lm.generate_until([Instance("generate_until", {}, (prompt, {"max_gen_toks": 3}), 0)])[0]
    assert len(lm.fuser.members[0].encode_text(gen)) == 3, repr(gen)
    conts = [gen, gen[:-1], gen + "zzz"]
    res = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, c), i) for i, c in enumerate(conts)])
    assert [g for _, g in res] == [True, True, False]
    plain = get_model("ensemble-fuse").create_from_arg_string(f"members={dirs['bpe']}")
    assert [v for v, _ in plain.loglikelihood([Instance("loglikelihood", {}, (prompt, c), 0) for c in conts])] == \
        [v for v, _ in res]


def test_python_m_ensemble_lm_eval_passes_flags_through(dirs, task_dir, tmp_path):
    cmd = [sys.executable, "-m", "ensemble.lm_eval", "--model", "ensemble-fuse", "--model_args",
           f"members={dirs['bpe']}", "--tasks", "tiny_mc", "--include_path", str(task_dir), "--limit", "2",
           "--output_path", str(tmp_path / "out")]  # no --device: lm-eval passes cuda:0 (the CPU without CUDA)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and "tiny_mc" in json.loads(results[0].read_text())["results"]


# ---- (c) errors ---------------------------------------------------------------------------------------
def test_unknown_model_arg_is_named(dirs):
    from lm_eval.api.registry import get_model

    with pytest.raises(ValueError, match="unknown model_args key 'temprature'"):
        get_model("ensemble-fuse").create_from_arg_string(f"members={dirs['bpe']},temprature=0.5")


@pytest.mark.parametrize("args, match", [
    ({}, "must name the members"),
    ({"members": "a|b"}, "exactly one member for method single"),
    ({"method": "mix", "members": "a"}, "method must be one of"),
    ({"method": "specfuse", "members": "a|b", "main": 1}, "SpecFuse has no main member"),
    ({"method": "single", "members": "a", "lr": 0.1}, "not of method single"),
    ({"members": "a", "batch_size": 0}, "batch_size must be 'auto' or an integer"),
    ({"method": "deepen", "members": "a|b", "weights": "0.5|x"}, "weights must be numbers, got 'x'"),
])
def test_bad_model_args(args, match):
    with pytest.raises(ValueError, match=match):
        parse_model_args(args)


def test_model_args_parse():
    spec = parse_model_args({"method": "deepen", "members": "a|b", "main": 1, "weights": "0.25|0.75", "lr": 0,
                             "batch_size": "auto:4", "max_batch_size": 64, "device": "cpu"})
    assert spec.members == ("a", "b") and spec.fuser.main == 1 and spec.fuser.weights == (0.25, 0.75)
    assert spec.fuser.lr == 0 and spec.batch_size is None and spec.device == "cpu"
    assert parse_model_args({"members": "a", "batch_size": "8"}).batch_size == 8


def test_profile_applies_members_and_refuses_contradictions(tmp_path):
    from jobs.profiles import Profile

    path = tmp_path / "p.json"
    Profile(method="deepen", members=("a", "b"), main=1, weights=(0.4, 0.6), choice_norm="sum",
            neutral_context="Answer:", target_delimiter=" ", gate=None).save(path)
    spec = parse_model_args({"profile": str(path)})
    assert (spec.method, spec.members, spec.fuser.main, spec.fuser.weights) == ("deepen", ("a", "b"), 1, (0.4, 0.6))
    with pytest.raises(ValueError, match="--main is 0 but the profile"):
        parse_model_args({"profile": str(path), "main": 0})


def test_loglikelihood_rolling_is_refused_by_name(dirs):
    from lm_eval.api.registry import get_model

    lm = get_model("ensemble-fuse").create_from_arg_string(f"members={dirs['bpe']}")
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


def test_chat_contexts():
    ctx = encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    assert ctx.startswith(CHAT_MARKER)
    turn = decode_context(ctx)
    assert (turn.prompt, turn.system, turn.chat) == ("Hi?", "Be brief.", True)
    assert decode_context("Hi?").chat is False
    with pytest.raises(ValueError, match=r"got roles \['user', 'assistant', 'user'\]"):
        encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}])
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        encode_chat([{"role": "user", "content": "a"}], add_generation_prompt=False)
    with pytest.raises(ValueError, match="empty context"):
        decode_context("")


def test_generation_kwargs():
    p = decode_params({"until": ["\n\n", "Question:"], "max_gen_toks": 32, "do_sample": False}, "sys", 3)
    assert (p.stop, p.max_new_tokens, p.greedy, p.system, p.seed) == (("\n\n", "Question:"), 32, True, "sys", 3)
    assert decode_params({"until": "x", "do_sample": True, "temperature": 0.7}, None, 0).temperature == 0.7
    with pytest.raises(ValueError, match="generation kwarg 'repetition_penalty'"):
        decode_params({"repetition_penalty": 1.1}, None, 0)


# ---- the ef_* task configs ----------------------------------------------------------------------------
def test_bench_task_configs_load_offline(dirs, monkeypatch):
    """bench/lm_eval_tasks: prepare writes the rows (the job's dev items, prompts and choices) and
    lm-eval runs the ef_* configs from the repository root, the label group and GSM8K's scoring."""
    from bench.lm_eval_tasks.prepare import DATA_DIR, prepare, prepare_ifeval
    from bench import tasks

    prepare(DATA_DIR, ("arc_challenge", "gsm8k"), ("dev",))
    rows = [json.loads(line) for line in (DATA_DIR / "arc_challenge_dev.jsonl").read_text().splitlines()]
    dev = tasks.load_split("arc_challenge", "dev")
    assert [r["id"] for r in rows] == [r["id"] for r in dev] and len(rows) == 200
    assert all(r["prompt"] == d["prompt"] and r["choices"][r["gold"]] == d["gold"] for r, d in zip(rows, dev))
    monkeypatch.chdir(REPO)
    prepare_ifeval(DATA_DIR)
    out = run(REPO / "bench" / "lm_eval_tasks", ["ef_arc_challenge", "ef_gsm8k", "ef_ifeval"], f"members={dirs['bpe']}",
              limit=2, gen_kwargs="max_gen_toks=4")
    assert set(out["results"]) >= {"ef_arc_challenge", "ef_gsm8k", "ef_ifeval"}
    assert out["results"]["ef_gsm8k"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert out["results"]["ef_ifeval"]["prompt_level_strict_acc,none"] in (0.0, 0.5, 1.0)


def test_ifeval_scoring_is_benchkits_checker():
    """ef_ifeval's process_results: every instruction of the prompt must hold (benchkit's checker)."""
    import importlib.util

    from bench.lm_eval_tasks.prepare import DATA_DIR, prepare_ifeval

    rows = [json.loads(line) for line in prepare_ifeval(DATA_DIR).read_text().splitlines()]
    assert len(rows) == 541
    spec = importlib.util.spec_from_file_location("ef_utils", REPO / "bench" / "lm_eval_tasks" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    no_comma = next(r for r in rows if r["instruction_id_list"] == ["punctuation:no_comma"])
    assert utils.process_ifeval(no_comma, ["plain words only"]) == {"prompt_level_strict_acc": 1.0}
    assert utils.process_ifeval(no_comma, ["one, two"]) == {"prompt_level_strict_acc": 0.0}
    lower = next(r for r in rows if r["instruction_id_list"] == ["change_case:english_lowercase"])
    assert utils.process_ifeval(lower, ["all lower case"])["prompt_level_strict_acc"] == 1.0
    assert utils.process_ifeval(lower, ["Not Lower"])["prompt_level_strict_acc"] == 0.0


def test_report_tabulates_runs_next_to_the_job(dirs, tmp_path):
    """bench/lm_eval_tasks/report.py reads what `python -m ensemble.lm_eval --output_path
    RUNS/<system>/results.json --log_samples` writes, and compares its picks with a job's labels."""
    from bench.lm_eval_tasks.prepare import DATA_DIR, prepare
    from bench.lm_eval_tasks.report import main as report

    prepare(DATA_DIR, ("piqa",), ("dev",))
    cmd = [sys.executable, "-m", "ensemble.lm_eval", "--model", "ensemble-fuse", "--model_args",
           f"members={dirs['bpe']}", "--tasks", "ef_piqa", "--include_path", "bench/lm_eval_tasks", "--limit", "3",
           "--output_path", str(tmp_path / "runs" / "tiny" / "results.json"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "runs" / "tiny").glob("samples_ef_piqa_*.jsonl")).open()]
    picks = {}
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        picks[s["doc"]["id"]] = s["doc"]["choices"][lls.index(max(lls))]
    job = {"split": "dev", "labels": {"sys": {f"piqa/{i}": c for i, c in picks.items()}}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    report(["--runs", str(tmp_path / "runs"), "--job", str(tmp_path / "job.json"), "--pair", "tiny=sys",
            "--out", str(tmp_path / "t.md")])
    text = (tmp_path / "t.md").read_text()
    assert "| tiny |" in text and "(3)" in text
    assert "| tiny vs job sys | " in text and " / 100.0 (3) |" in text  # the same picks: full agreement


# ---- (b) consistency with lm-eval's hf model on the packaged members (slow) ---------------------------
REAL_ITEMS = 8


@pytest.fixture(scope="module")
def arc_dir(tmp_path_factory) -> Path:
    """The first ARC-Challenge dev items (bench/tasks.py's prompts and choices) as a local task."""
    from bench import tasks

    d = tmp_path_factory.mktemp("arc")
    rows = [{"prompt": r["prompt"], "choices": r["choices"], "gold": r["choices"].index(r["gold"])}
            for r in tasks.load_split("arc_challenge", "dev", REAL_ITEMS)]
    (d / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny_arc.yaml").write_text(
        f"task: tiny_arc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'arc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return d


@pytest.mark.slow
@pytest.mark.parametrize("alias, chat", [("gemma3-270m", False), ("smollm2-135m-instruct", False),
                                         ("smollm2-135m-instruct", True)])
def test_single_matches_lm_eval_hf(arc_dir, alias, chat):
    """The packaged members: Gemma-3 (completion-style) and SmolLM2 (chat) on raw text, SmolLM2 with
    --apply_chat_template, against lm-eval's hf model on the converted member directory."""
    from ensemble.models import resolve

    counts = compare_with_hf(arc_dir, "tiny_arc", alias, str(resolve(alias)[1]), chat)
    total = sum(counts.values())
    if chat:  # ChatML's generation prompt ends with a newline, which hf scores as part of every choice
        assert counts["moved"] == total, counts
    else:
        assert counts["same"] >= total // 2, counts
