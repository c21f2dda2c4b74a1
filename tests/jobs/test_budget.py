"""The error budget without Spark (jobs/budget.py, docs/jobs.md): the partition function marks error
rows input or fuser, a fault injected into the fuser (through process_partition's make_fuser seam)
makes fuser-error rows, and the verdict counts only what the fuser attempted."""
import dataclasses
import json
import logging
from collections import Counter

import pyarrow as pa
import pytest

from ensemble import Single
from jobs import cli
from jobs.budget import FIRST_ERRORS, ErrorBudgetExceeded, tallied
from jobs.config import JobConfig
from jobs.partition import process_partition
from jobs.rows import prepare
from schemas import OUTPUT_SCHEMA, SCHEMA_VERSION
from schemas.tables import ERROR_KINDS

BAD = [{"id": "e", "prompt": None}, {"id": "f", "prompt": "   "}, {"id": "g", "prompt": "x", "choices": []},
       {"id": "m", "prompt": "word " * 400}]  # the last is over max_prompt_tokens: fit_prompts' input error


class Broken(Single):
    """A fuser that raises on every call (a bug, an out-of-memory), and checks prompts as Single does."""

    calls = 0

    def generate(self, prompts, params):
        Broken.calls += 1
        raise RuntimeError(f"injected fuser fault on {len(prompts)} prompts")

    def label(self, prompts, choices, systems=None, params=None):
        Broken.calls += 1
        raise MemoryError("injected label fault")


class FailsOn(Single):
    """A fuser that raises on any micro-batch holding the prompt ``bad``: one bad row."""

    def generate(self, prompts, params):
        if "bad" in prompts:
            raise ValueError("cannot decode this one")
        return super().generate(prompts, params)


def _rows(cfg, rows, fuser):
    lines = [json.dumps(r) for r in rows]
    batch = pa.RecordBatch.from_pydict({"value": lines, "_pos": list(range(len(lines)))})
    prepared = prepare(batch, run_seed=cfg.seed, job_max_new=cfg.max_new_tokens, mode=cfg.mode)
    out = pa.Table.from_batches(list(process_partition([prepared], make_fuser=lambda: fuser, config=cfg)))
    assert out.schema == OUTPUT_SCHEMA
    return out.to_pylist()


def _verdict(rows, budget):
    """What the driver's Spark query hands tallied: (status, kind, rows, rows of sample 0) per group,
    and the first fuser errors by id."""
    n, prompts = Counter(), Counter()
    for r in rows:
        n[r["status"], r["error_kind"]] += 1
        prompts[r["status"], r["error_kind"]] += r["sample"] == 0
    first = sorted((r["id"], r["error"]) for r in rows if r["error_kind"] == "fuser")[:FIRST_ERRORS]
    return tallied([(s, k, n[s, k], prompts[s, k]) for s, k in n], first, budget)


@pytest.fixture()
def cfg():
    return JobConfig(input="in.jsonl", output="out", members=("tiny",), max_new_tokens=4, batch_size=3,
                     max_prompt_tokens=200)


def test_error_kind_column_and_schema_version():
    assert OUTPUT_SCHEMA.field("error_kind").type == pa.string() and OUTPUT_SCHEMA.field("error_kind").nullable
    assert OUTPUT_SCHEMA.names.index("error_kind") == OUTPUT_SCHEMA.names.index("error") + 1
    assert SCHEMA_VERSION >= 2 and ERROR_KINDS == ("input", "fuser")  # 2 added error_kind


def test_a_fuser_failing_on_every_batch_fails_the_run(cfg, bpe_member):
    good = [{"id": f"g{i}", "prompt": f"Tell me about {i}."} for i in range(5)]
    good.append({"id": "lab", "prompt": "Is fire hot?", "choices": ["yes", "no"]})
    Broken.calls = 0
    rows = _rows(cfg, good + BAD, Broken(bpe_member))
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(good) + len(BAD)
    for r in good:  # every attempted row is a fuser error row naming the exception
        out = by_id[r["id"]]
        assert (out["status"], out["error_kind"], out["finish_reason"]) == ("error", "fuser", "error"), out
    assert "RuntimeError: injected fuser fault on 1 prompts" in by_id["g0"]["error"]
    assert by_id["lab"]["error"] == "MemoryError: injected label fault"
    assert {by_id[r["id"]]["error_kind"] for r in BAD} == {"input"}
    assert "over the limit" in by_id["m"]["error"]
    # micro-batches of 3 valid rows: generate g0-g2 (1 call, then 3 alone), then label [lab] (1, a batch of
    # one is not retried) and generate g3-g4 (1, then 2 alone)
    assert Broken.calls == (1 + 3) + 1 + (1 + 2)
    verdict = _verdict(rows, cfg.max_fuser_error_rate)
    assert (verdict.fuser_errors, verdict.attempted, verdict.rate) == (6, 6, 1.0) and verdict.exceeded
    assert verdict.rows == {("error", "fuser"): 6, ("error", "input"): 4}
    assert verdict.tally() == "error/input 4, error/fuser 6"
    msg = verdict.message("/out")
    assert msg.startswith("fuser error budget exceeded: 6 of 6 rows the fuser attempted failed "
                          "(rate 1 > --max-fuser-error-rate 0.01)")
    assert "_SUCCESS is not written" in msg and "/out/data" in msg
    # the first errors by id, with their reasons
    assert "First errors: 'g0': RuntimeError: injected fuser fault on 1 prompts; 'g1': " in msg
    assert msg.count("injected") == FIRST_ERRORS and "'lab'" not in msg


def test_one_bad_row_in_a_hundred_is_within_the_default_budget(cfg, bpe_member):
    good = [{"id": f"r{i:03d}", "prompt": f"Count {i}"} for i in range(99)] + [{"id": "x", "prompt": "bad"}]
    cfg = dataclasses.replace(cfg, max_new_tokens=1, batch_size=25)
    rows = _rows(cfg, good + BAD, FailsOn(bpe_member))
    kinds = Counter((r["status"], r["error_kind"]) for r in rows)
    assert kinds == {("ok", None): 99, ("error", "fuser"): 1, ("error", "input"): len(BAD)}
    assert next(r for r in rows if r["id"] == "x")["error"] == "ValueError: cannot decode this one"
    verdict = _verdict(rows, cfg.max_fuser_error_rate)
    assert (verdict.fuser_errors, verdict.attempted) == (1, 100)  # input errors are not in the denominator
    assert verdict.rate == 0.01 and not verdict.exceeded  # "above" the budget fails; at it does not
    assert verdict.describe() == "1 of 100 rows the fuser attempted failed (rate 0.01 <= --max-fuser-error-rate 0.01)"
    assert _verdict(rows, 0.0).exceeded and _verdict(rows, 0.009).exceeded  # a stricter budget fails


def test_input_errors_never_count(cfg, bpe_member):
    rows = _rows(cfg, BAD + [{"id": "ok", "prompt": "Hello"}], Single(bpe_member))
    verdict = _verdict(rows, 0.0)  # not even against a budget of 0
    assert (verdict.fuser_errors, verdict.attempted, verdict.exceeded) == (0, 1, False)
    assert [r["error_kind"] for r in rows if r["id"] == "ok"] == [None]
    only_bad = _verdict(_rows(cfg, BAD, Broken(bpe_member)), 0.0)  # nothing attempted: rate 0
    assert (only_bad.attempted, only_bad.rate, only_bad.exceeded) == (0, 0.0, False)
    assert not tallied((), (), 0.0).exceeded and tallied((), (), 0.0).tally() == "no rows"


def test_samples_count_once_per_prompt(cfg, bpe_member):
    cfg = dataclasses.replace(cfg, n_samples=3, temperature=1.0)
    rows = _rows(cfg, [{"id": "a", "prompt": "Hi"}, {"id": "x", "prompt": "bad"}], FailsOn(bpe_member))
    assert Counter((r["status"], r["error_kind"]) for r in rows) == {("ok", None): 3, ("error", "fuser"): 1}
    verdict = _verdict(rows, 0.5)
    assert (verdict.fuser_errors, verdict.attempted, verdict.exceeded) == (1, 2, False)


def test_budget_setting():
    base = JobConfig(input="i", output="o")
    assert base.max_fuser_error_rate == 0.01
    assert JobConfig(input="i", output="o", max_fuser_error_rate=0).max_fuser_error_rate == 0.0
    assert JobConfig(input="i", output="o", max_fuser_error_rate=1).max_fuser_error_rate == 1.0
    for bad in (-0.1, 1.5, float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match=r"max_fuser_error_rate must be a number in \[0, 1\], got "):
            JobConfig(input="i", output="o", max_fuser_error_rate=bad)
    # it decides whether a run passes, not what its rows are: not in config_hash (a rerun may change it)
    assert dataclasses.replace(base, max_fuser_error_rate=0.5).config_hash == base.config_hash
    assert "max_fuser_error_rate" not in base.output_affecting()
    assert cli.parse_config(["--input", "i", "--output", "o", "--max-fuser-error-rate", "0"]).max_fuser_error_rate == 0.0
    help_text = cli._argument(next(f for f in cli.job_flags() if f.flag == "--max-fuser-error-rate"))["help"]
    assert "rows the fuser attempted" in help_text and help_text.endswith("(default: 0.01)")


def test_cli_exits_3_with_the_message(monkeypatch, caplog):
    import jobs.driver

    verdict = tallied([("error", "fuser", 2, 2)], [("a", "RuntimeError: boom")], 0.01)
    stopped = []

    def run(spark, cfg):
        raise ErrorBudgetExceeded(verdict.message(cfg.output), verdict, result=None)

    monkeypatch.setattr(jobs.driver, "spark_session", lambda cfg: type("S", (), {"stop": lambda s: stopped.append(1)})())
    monkeypatch.setattr(jobs.driver, "run", run)
    with caplog.at_level(logging.ERROR, logger="jobs.cli"):
        assert cli.main(["--input", "i", "--output", "o"]) == cli.EXIT_ERROR_BUDGET == 3
    assert stopped == [1]  # the session is stopped on the failure too
    assert "fuser error budget exceeded: 2 of 2 rows the fuser attempted failed (rate 1 > " in caplog.text
    assert "'a': RuntimeError: boom" in caplog.text
