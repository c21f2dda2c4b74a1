"""The pure partition function on tiny models: bad rows become error rows, one output per input."""
import json

import pyarrow as pa
import pytest

from ensemble import DecodeParams, Single
from jobs.config import JobConfig
from jobs.partition import process_partition
from jobs.rows import derive_seed
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


@pytest.fixture()
def cfg():
    return JobConfig(input="in.jsonl", output="out", members=("tiny",), max_new_tokens=6, batch_size=3,
                     max_prompt_tokens=200)


def test_every_input_row_has_one_output_row(cfg, bpe_member):
    batch = _lines(GOOD + [r for r, _ in BAD], extra=["{not json", "[1, 2]"])
    out = pa.Table.from_batches(list(process_partition([batch], make_fuser=lambda: Single(bpe_member), config=cfg)))
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
    for _, reason in BAD:
        assert sum(reason in r["error"] for r in errors) >= 1, reason
    assert sum("not valid JSON" in r["error"] for r in errors) == 1
    assert sum("must hold a JSON object" in r["error"] for r in errors) == 1
    assert all(r["id"] is not None for r in rows)


def test_long_prompt_truncate(cfg, bpe_member):
    cfg = JobConfig(**{**cfg.__dict__, "long_prompt": "truncate", "extra": {}})
    batch = _lines([{"id": "m", "prompt": "word " * 400}])
    rows = pa.Table.from_batches(list(process_partition([batch], make_fuser=lambda: Single(bpe_member), config=cfg))).to_pylist()
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
    rows = pa.Table.from_batches(list(process_partition([batch], make_fuser=lambda: Flaky(bpe_member), config=cfg))).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert by_id["x"]["status"] == by_id["z"]["status"] == "ok"
    want = Single(bpe_member).generate(["fine", "also fine"], DecodeParams(max_new_tokens=6))
    assert [by_id["x"]["text"], by_id["z"]["text"]] == [o.text for o in want] and all(o.text for o in want)
    assert by_id["y"]["status"] == "error" and "boom in the fuser" in by_id["y"]["error"]


def test_n_samples_rows_and_seeds(cfg, bpe_member):
    cfg = JobConfig(**{**cfg.__dict__, "n_samples": 3, "temperature": 1.0, "extra": {}})
    batch = _lines([{"id": "s", "prompt": "Once upon a time"}, {"id": "t", "prompt": "x", "choices": ["a", "b"]}])
    rows = pa.Table.from_batches(list(process_partition([batch], make_fuser=lambda: Single(bpe_member), config=cfg))).to_pylist()
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
    with pytest.raises(ValueError, match=r"weights must be non-negative and summing to 1, got \(0.7, 0.7\)"):
        JobConfig(input="i", output="o", method="deepen", members=("a", "b"), weights=(0.7, 0.7))
    # weights printed with 6 decimals (bench/compat.py) are accepted: one tolerance for job and fusers
    printed = (0.333333, 0.307692, 0.358974)
    assert JobConfig(input="i", output="o", method="deepen", members=("a", "b", "c"), weights=printed).weights == printed
    from ensemble.config import WEIGHT_TOL, normalise_weights
    from jobs.config import WEIGHT_TOL as JOB_WEIGHT_TOL
    assert JOB_WEIGHT_TOL == WEIGHT_TOL
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
    f.write_text("input: in.jsonl\noutput: out\nmethod: specfuse\nmembers: [a, b]\nsegment_tokens: 6\nexit: false\n")
    cfg = parse_config(["--config", str(f), "--segment-tokens", "8"])
    assert (cfg.method, cfg.members, cfg.segment_tokens, cfg.exit) == ("specfuse", ("a", "b"), 8, False)
    f2 = tmp_path / "bad.json"
    f2.write_text('{"input": "i", "output": "o", "segmnt_tokens": 3}')
    with pytest.raises(ValueError, match=r"unknown keys \['segmnt_tokens'\]"):
        parse_config(["--config", str(f2)])
    with pytest.raises(ValueError, match="exit_delta must be in"):
        parse_config(["--input", "i", "--output", "o", "--method", "specfuse", "--members", "a", "b",
                      "--exit-delta", "2"])


def test_sampled_rows_depend_only_on_seed_and_id(cfg, bpe_member):
    cfg = JobConfig(**{**cfg.__dict__, "temperature": 1.0, "extra": {}})
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(["Once upon", "The capital", "Hi", "Tell me"])]

    def texts(batch_size, order):
        c = JobConfig(**{**cfg.__dict__, "batch_size": batch_size, "extra": {}})
        out = process_partition([_lines([rows[i] for i in order])], make_fuser=lambda: Single(bpe_member), config=c)
        return {r["id"]: r["text"] for b in out for r in b.to_pylist()}

    a = texts(4, [0, 1, 2, 3])
    b = texts(1, [3, 1, 0, 2])
    assert a == b and len(set(a.values())) > 1


def test_fuser_is_built_once_per_worker(monkeypatch):
    from ensemble.fusers import registry
    from jobs import runtime

    built = []
    monkeypatch.setattr(registry, "make_fuser", lambda settings, device=None: built.append(1) or object())
    settings = {"method": "single", "members": ("x",)}
    first = runtime.build_fuser(settings, "cpu")
    assert runtime.build_fuser(dict(settings), "cpu") is first
    assert len(built) == 1
    runtime._FUSERS.clear()


def test_deepen_approximation_flags():
    from jobs.cli import parse_config

    base = ["--input", "i", "--output", "o", "--method", "deepen", "--members", "a", "b"]
    cfg = parse_config(base)
    assert (cfg.top_mass, cfg.main_top_mass, cfg.refine_margin, cfg.anchor_subset) == (0.9, 0.99, 0.3, None)
    assert parse_config(base + ["--refine-margin", "0"]).fuser_settings()["refine_margin"] == 0.0
    with pytest.raises(ValueError, match=r"refine_margin must be >= 0, got -1.0"):
        parse_config(base + ["--refine-margin", "-1"])
    main_all = parse_config(base + ["--main-top-mass", "none"])
    assert main_all.main_top_mass is None and main_all.config_hash != cfg.config_hash
    assert main_all.fuser_settings()["main_top_mass"] is None
    with pytest.raises(ValueError, match=r"main_top_mass must be None or in \(0, 1\], got 0.0"):
        parse_config(base + ["--main-top-mass", "0"])
    assert "label_norm" not in cfg.output_affecting()  # the default keeps earlier run ids
    mean = parse_config(base + ["--label-norm", "mean"])
    assert mean.label_norm == "mean" and mean.config_hash != cfg.config_hash
    assert mean.fuser_settings()["label_norm"] == "mean"
    exact = parse_config(base + ["--top-mass", "none", "--anchor-subset", "8192"])
    assert (exact.top_mass, exact.anchor_subset) == (None, 8192)
    assert exact.config_hash != cfg.config_hash and exact.fuser_settings()["anchor_subset"] == 8192
    assert parse_config(base + ["--anchor-subset", "none"]).anchor_subset is None
    with pytest.raises(ValueError, match="top_mass must be None or in"):
        parse_config(base + ["--top-mass", "1.5"])
    with pytest.raises(ValueError, match="anchor_subset must be None or an integer"):
        parse_config(base + ["--anchor-subset", "0"])
