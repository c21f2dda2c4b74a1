"""The pure partition function on tiny models: bad rows become error rows, one output per input."""
import dataclasses
import json

import pyarrow as pa
import pytest

from ensemble import DecodeParams, Single
from ensemble.config import DeePEnConfig, SpecFuseConfig
from jobs.config import JobConfig
from jobs.partition import process_partition
from jobs.rows import derive_seed, prepare
from schemas import OUTPUT_SCHEMA

GOOD = [
    {"id": "a", "prompt": "What is the capital of France?"},
    {"id": "b", "prompt": "Is fire hot?", "choices": ["yes", "no"]},
    {"id": "c", "prompt": "Hi\x07 there\x00", "seed": 5, "max_new_tokens": 3},
    {"id": "d", "prompt": "Tell me a story.", "system": "Be brief.", "max_new_tokens": 9999},
]
BAD = [
    ({"id": "e", "prompt": None}, "prompt is null"),
    ({"id": "f", "prompt": "   "}, "prompt is empty or blank"),
    ({"id": "g", "prompt": "x", "choices": []}, "choices is an empty list"),
    ({"id": "h", "prompt": "x", "choices": ["ok", 3]}, "choices must be non-empty UTF-8 strings"),
    ({"id": "a", "prompt": "dup"}, "duplicate id 'a'"),
    ({"prompt": "no id"}, "id must be a non-empty string"),
    ({"id": "i", "prompt": "x", "seed": -1}, "seed must be an integer in [0, 2**63-1], got -1"),
    ({"id": "j", "prompt": "x", "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"id": "k", "prompt": "bad \ufffd bytes"}, "not valid UTF-8"),
    ({"id": "l", "prompt": "x", "choices": "yes"}, "choices must be a list of strings"),
    ({"id": "m", "prompt": "word " * 400}, "over the limit"),
    ({"id": 7, "prompt": "numeric id"}, "id must be a non-empty string, got 7"),
]


def _lines(rows, extra=()):
    lines = [json.dumps(r) for r in rows] + list(extra)
    return pa.RecordBatch.from_pydict({"value": lines, "_pos": list(range(len(lines)))})


def _prepared(batch, cfg):
    """What the job's input pass makes of a batch (keyed, parsed once, validated)."""
    return prepare(batch, run_seed=cfg.seed, job_max_new=cfg.max_new_tokens, mode=cfg.mode)


@pytest.fixture()
def cfg():
    return JobConfig(input="in.jsonl", output="out", members=("tiny",), max_new_tokens=6, batch_size=3,
                     max_prompt_tokens=200)


def test_every_input_row_has_one_output_row(cfg, bpe_member):
    batch = _lines(GOOD + [r for r, _ in BAD], extra=["{not json", "[1, 2]"])
    out = pa.Table.from_batches(list(process_partition([_prepared(batch, cfg)], make_fuser=lambda: Single(bpe_member), config=cfg)))
    assert out.schema == OUTPUT_SCHEMA
    rows = out.to_pylist()
    assert len(rows) == len(GOOD) + len(BAD) + 2
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {"a", "b", "c", "d"}
    # each ok row is what the fuser itself gives for the row's normalised request (oracle: Single alone)
    single = Single(bpe_member)
    want_b = single.label(["Is fire hot?"], [["yes", "no"]])[0]
    assert ok["b"]["label"] == want_b.label and ok["b"]["label_probs"] == pytest.approx(want_b.probs, abs=1e-5)
    want = single.generate(["What is the capital of France?", "Hi there", "Tell me a story."], [
        DecodeParams(max_new_tokens=6),  # the job's budget
        DecodeParams(max_new_tokens=3, seed=5),  # control characters removed, the row's own budget
        DecodeParams(max_new_tokens=6, system="Be brief."),  # 9999 capped by the job's budget
    ])
    for rid, w in zip("acd", want):
        assert (ok[rid]["text"], ok[rid]["token_count"], ok[rid]["finish_reason"]) == (
            w.text, w.token_count, w.finish_reason.value), rid
    assert all(w.token_count > 0 for w in want) and ok["c"]["seed"] == 5
    assert ok["a"]["seed"] == derive_seed(cfg.seed, "a")
    errors = [r for r in rows if r["status"] == "error"]
    assert all(r["error"] and r["finish_reason"] == "error" and r["config_hash"] == cfg.config_hash for r in errors)
    assert {r["error_kind"] for r in errors} == {"input"} and {r["error_kind"] for r in ok.values()} == {None}
    for _, reason in BAD:
        assert sum(reason in r["error"] for r in errors) >= 1, reason
    assert sum("not valid JSON" in r["error"] for r in errors) == 1
    assert sum("must hold a JSON object" in r["error"] for r in errors) == 1
    assert all(r["id"] is not None for r in rows)


@pytest.mark.parametrize("method", ["single", "specfuse"])
def test_label_rows_carry_the_jobs_label_params_gated_and_member_scores(cfg, bpe_member, sp_member, method):
    from ensemble import SpecFuse
    from ensemble.labeling import LabelParams

    params = LabelParams(norm="pmi", gate=0.0 if method == "specfuse" else None)
    job = dataclasses.replace(cfg, method=method, members=("a", "b") if method == "specfuse" else ("a",),
                              fuser=None, label=params)
    make = (lambda: SpecFuse([bpe_member, sp_member])) if method == "specfuse" else (lambda: Single(bpe_member))
    batch = _lines([{"id": "b", "prompt": "Is fire hot?", "choices": ["yes", "no", "maybe so"]},
                    {"id": "a", "prompt": "What is the capital of France?"}])
    rows = {r["id"]: r for r in pa.Table.from_batches(list(process_partition(
        [_prepared(batch, job)], make_fuser=make, config=job))).to_pylist()}
    want = make().label(["Is fire hot?"], [["yes", "no", "maybe so"]], params=params)[0]
    lab = rows["b"]
    assert lab["label"] == want.label and lab["label_probs"] == pytest.approx(want.probs, abs=1e-6)
    assert lab["gated"] is want.gated is (method == "specfuse")  # gate 0.0: always the main member's answer
    for got, st in zip(lab["member_stats"], want.member_stats):
        assert got["choice_probs"] == pytest.approx(st.choice_probs, abs=1e-6)
        assert got["choice_logprobs"] == pytest.approx(st.choice_logprobs, abs=1e-5)
        assert got["choice_tokens"] == st.choice_tokens and len(got["choice_neutral"]) == 3
    gen = rows["a"]  # generation rows: no gate, no choice scores
    assert gen["gated"] is None and all(s["choice_probs"] is None for s in gen["member_stats"])


def test_long_prompt_truncate(cfg, bpe_member):
    cfg = JobConfig(**{**cfg.__dict__, "long_prompt": "truncate"})
    batch = _lines([{"id": "m", "prompt": "word " * 400}])
    rows = pa.Table.from_batches(list(process_partition([_prepared(batch, cfg)], make_fuser=lambda: Single(bpe_member), config=cfg))).to_pylist()
    assert rows[0]["status"] == "ok" and rows[0]["text"]
    # the row is generated from the head of the prompt that fits max_prompt_tokens
    fitted = Single(bpe_member).fit_prompts(["word " * 400], [None], [6], 200, "truncate")[0]
    assert isinstance(fitted, str) and ("word " * 400).startswith(fitted) and len(fitted) < len("word " * 400)
    assert 0 < len(bpe_member.encode_prompt(fitted)) <= 200
    assert rows[0]["text"] == Single(bpe_member).generate([fitted], DecodeParams(max_new_tokens=6))[0].text


def test_fuser_failure_is_isolated_to_its_row(cfg, bpe_member):
    class Flaky(Single):
        def generate(self, prompts, params):
            if any("boom" in p for p in prompts):
                raise RuntimeError("boom in the fuser")
            return super().generate(prompts, params)

    batch = _lines([{"id": "x", "prompt": "fine"}, {"id": "y", "prompt": "boom"}, {"id": "z", "prompt": "also fine"}])
    rows = pa.Table.from_batches(list(process_partition([_prepared(batch, cfg)], make_fuser=lambda: Flaky(bpe_member), config=cfg))).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert by_id["x"]["status"] == by_id["z"]["status"] == "ok"
    want = Single(bpe_member).generate(["fine", "also fine"], DecodeParams(max_new_tokens=6))
    assert [by_id["x"]["text"], by_id["z"]["text"]] == [o.text for o in want] and all(o.text for o in want)
    assert by_id["y"]["status"] == "error" and "boom in the fuser" in by_id["y"]["error"]
    assert (by_id["y"]["error_kind"], by_id["x"]["error_kind"]) == ("fuser", None)


def test_n_samples_rows_and_seeds(cfg, bpe_member):
    cfg = JobConfig(**{**cfg.__dict__, "n_samples": 3, "temperature": 1.0})
    batch = _lines([{"id": "s", "prompt": "Once upon a time"}, {"id": "t", "prompt": "x", "choices": ["a", "b"]}])
    rows = pa.Table.from_batches(list(process_partition([_prepared(batch, cfg)], make_fuser=lambda: Single(bpe_member), config=cfg))).to_pylist()
    samples = [r for r in rows if r["id"] == "s"]
    assert sorted(r["sample"] for r in samples) == [0, 1, 2]
    assert len({r["seed"] for r in samples}) == 3
    for r in samples:  # the seed written with a sample reproduces it
        want = Single(bpe_member).generate(["Once upon a time"], DecodeParams(max_new_tokens=6, temperature=1.0,
                                                                           seed=r["seed"]))[0]
        assert (r["text"], r["token_count"]) == (want.text, want.token_count) and want.text
    assert len([r for r in rows if r["id"] == "t"]) == 1  # labeling: one row


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="method must be one of"):
        JobConfig(input="i", output="o", method="nope")
    with pytest.raises(ValueError, match=r"weights must sum to 1 \(within 0.0001\), got \[0.7, 0.7\] \(sum 1.4\)"):
        JobConfig(input="i", output="o", method="deepen", members=("a", "b"), fuser={"weights": (0.7, 0.7)})
    with pytest.raises(ValueError, match=r"weights must have one entry per member \(3\), got \[0.5, 0.5\]"):
        JobConfig(input="i", output="o", method="specfuse", members=("a", "b", "c"), fuser={"weights": (0.5, 0.5)})
    with pytest.raises(ValueError, match=r"main must be an index into members \(0..1\), got 2"):
        JobConfig(input="i", output="o", method="deepen", members=("a", "b"), fuser={"main": 2})
    # weights printed with 6 decimals (bench/compat.py) are accepted: one tolerance for job and fusers
    printed = (0.333333, 0.307692, 0.358974)
    job = JobConfig(input="i", output="o", method="deepen", members=("a", "b", "c"), fuser={"weights": printed})
    assert job.fuser.weights == printed
    from ensemble.config import normalise_weights
    assert sum(normalise_weights(printed, 3)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="top_p must be in"):
        JobConfig(input="i", output="o", top_p=2.0)
    with pytest.raises(ValueError, match="exactly one member"):
        JobConfig(input="i", output="o", members=("a", "b"))


def test_config_hash_covers_outputs_only():
    a = JobConfig(input="i", output="o")
    assert a.config_hash == JobConfig(input="i2", output="o2", partitions=7, batch_size=2).config_hash
    assert a.config_hash != JobConfig(input="i", output="o", max_new_tokens=5).config_hash
    assert a.config_hash != JobConfig(input="i", output="o", seed=1).config_hash


def test_config_file_and_flags(tmp_path):
    from jobs.cli import parse_config

    f = tmp_path / "job.yaml"
    f.write_text("input: in.jsonl\noutput: out\nmethod: specfuse\nmembers: [a, b]\n"
                 "fuser:\n  segment_tokens: 6\n  exit: false\n  exit_min_temperature: 0.1\n")
    cfg = parse_config(["--config", str(f), "--segment-tokens", "8"])
    assert (cfg.method, cfg.members) == ("specfuse", ("a", "b"))
    assert cfg.fuser == SpecFuseConfig(segment_tokens=8, exit=False, exit_min_temperature=0.1)
    flat = tmp_path / "flat.yaml"  # the method's settings belong under fuser:
    flat.write_text("input: i\noutput: o\nmethod: specfuse\nmembers: [a, b]\nsegment_tokens: 6\n")
    with pytest.raises(ValueError, match=r"unknown keys \['segment_tokens'\] \('segment_tokens' is a SpecFuse setting: "
                                         r"write it as fuser: \{segment_tokens: ...\} \(flag --segment-tokens\)\)"):
        parse_config(["--config", str(flat)])
    f2 = tmp_path / "bad.json"
    f2.write_text('{"input": "i", "output": "o", "segmnt_tokens": 3}')
    with pytest.raises(ValueError, match=r"unknown keys \['segmnt_tokens'\]"):
        parse_config(["--config", str(f2)])
    with pytest.raises(ValueError, match="exit_delta must be in"):
        parse_config(["--input", "i", "--output", "o", "--method", "specfuse", "--members", "a", "b",
                      "--exit-delta", "2"])


def test_sampled_rows_depend_only_on_seed_and_id(cfg, bpe_member):
    cfg = JobConfig(**{**cfg.__dict__, "temperature": 1.0})
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(["Once upon", "The capital", "Hi", "Tell me"])]

    def texts(batch_size, order):
        c = JobConfig(**{**cfg.__dict__, "batch_size": batch_size})
        out = process_partition([_prepared(_lines([rows[i] for i in order]), c)], make_fuser=lambda: Single(bpe_member), config=c)
        return {r["id"]: r["text"] for b in out for r in b.to_pylist()}

    a = texts(4, [0, 1, 2, 3])
    b = texts(1, [3, 1, 0, 2])
    assert a == b and len(set(a.values())) > 1


def test_fuser_is_built_once_per_worker(monkeypatch):
    from ensemble.fusers import registry
    from jobs import runtime

    built = []
    monkeypatch.setattr(registry, "make_fuser", lambda *args, **kw: built.append((args, kw)) or object())
    job = JobConfig(input="i", output="o", method="deepen", members=("x", "y"))
    first = runtime.build_fuser(job.method, job.members, job.fuser, job.dtype, job.max_batch_tokens, "cpu")
    same = JobConfig(input="i2", output="o2", method="deepen", members=["x", "y"], fuser={"topk": 64})
    assert runtime.build_fuser(same.method, same.members, same.fuser, same.dtype, same.max_batch_tokens,
                               "cpu") is first
    assert built == [(("deepen", ("x", "y"), job.fuser),
                      {"dtype": None, "device": "cpu", "max_batch_tokens": job.max_batch_tokens})]
    other = dataclasses.replace(job.fuser, topk=8)
    assert runtime.build_fuser(job.method, job.members, other, job.dtype, job.max_batch_tokens, "cpu") is not first
    smaller = JobConfig(input="i", output="o", method="deepen", members=("x", "y"), max_batch_tokens=512)
    assert smaller.config_hash == job.config_hash  # a memory bound, not an output setting
    assert runtime.build_fuser(job.method, job.members, job.fuser, job.dtype, 512, "cpu") is not first
    assert built[-1][1]["max_batch_tokens"] == 512
    with pytest.raises(ValueError, match="max_batch_tokens must be an integer >= 1, got 0"):
        JobConfig(input="i", output="o", max_batch_tokens=0)
    runtime._FUSERS.clear()


def test_deepen_approximation_flags():
    from jobs.cli import parse_config

    base = ["--input", "i", "--output", "o", "--method", "deepen", "--members", "a", "b"]
    cfg = parse_config(base)
    assert cfg.fuser == DeePEnConfig()
    assert (cfg.fuser.top_mass, cfg.fuser.main_top_mass, cfg.fuser.refine_margin) == (0.9, 0.99, 0.3)
    assert parse_config(base + ["--deepen-refine-margin", "0"]).fuser.refine_margin == 0.0
    with pytest.raises(ValueError, match=r"refine_margin must be >= 0, got -1.0"):
        parse_config(base + ["--deepen-refine-margin", "-1"])
    main_all = parse_config(base + ["--deepen-main-top-mass", "none"])
    assert main_all.fuser.main_top_mass is None and main_all.config_hash != cfg.config_hash
    with pytest.raises(ValueError, match=r"main_top_mass must be None or in \(0, 1\], got 0.0"):
        parse_config(base + ["--deepen-main-top-mass", "0"])
    pmi = parse_config(base + ["--choice-norm", "token"])  # every method's normalisation (was --deepen-label-norm)
    assert pmi.label.norm == "token" and pmi.fuser == cfg.fuser and pmi.config_hash != cfg.config_hash
    exact = parse_config(base + ["--deepen-top-mass", "none", "--deepen-anchor-subset", "8192", "--deepen-topk", "32"])
    assert (exact.fuser.top_mass, exact.fuser.anchor_subset, exact.fuser.topk) == (None, 8192, 32)
    assert exact.config_hash != cfg.config_hash
    assert parse_config(base + ["--deepen-anchor-subset", "none"]).fuser.anchor_subset is None
    with pytest.raises(ValueError, match="top_mass must be None or in"):
        parse_config(base + ["--deepen-top-mass", "1.5"])
    with pytest.raises(ValueError, match="anchor_subset must be None or an integer"):
        parse_config(base + ["--deepen-anchor-subset", "0"])

def test_fusers_check_and_fit_prompts_in_one_call(bpe_member, bpe_member_qwen):
    from ensemble.fusers import base, deepen, single, specfuse

    assert single.Single.fit_prompts is deepen.DeePEn.fit_prompts is specfuse.SpecFuse.fit_prompts is base.fit_prompts
    fuser = specfuse.SpecFuse([bpe_member, bpe_member_qwen])
    long = "word " * 400
    fits = fuser.fit_prompts(["short", long, "short"], [None, None, "Be brief."], [8, 8, 500], 200, "error")
    assert fits[0] == "short"
    n = len(bpe_member.encode_prompt(long))
    assert isinstance(fits[1], base.PromptTooLong) and str(fits[1]) == (
        f"prompt has {n} tokens for member {bpe_member.name}, over the limit of 200 "
        f"(max_prompt_tokens=200, context window {bpe_member.context_window})")
    # the limit is also the context window less the row's max_new_tokens (512 - 500 here)
    assert isinstance(fits[2], base.PromptTooLong) and "over the limit of 12 " in str(fits[2])
    cut = fuser.fit_prompts([long], [None], [8], 200, "truncate")[0]
    assert long.startswith(cut) and 0 < len(cut) < len(long)
    assert all(len(m.encode_prompt(cut)) <= 200 for m in fuser.members)
    with pytest.raises(ValueError, match="policy must be one of"):
        fuser.fit_prompts([long], [None], [8], 200, "cut")
