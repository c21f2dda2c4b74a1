"""bench/bench_specfuse_exit.py records what a run was made with: the code version and each exit run's
resolved settings (on the scripted fake members of tests/ensemble/test_specfuse.py), and its baseline
of a member alone (a tiny real member) with the ratios to it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_specfuse_exit as bench  # noqa: E402

from ensemble import DecodeParams  # noqa: E402
from tests.ensemble.test_specfuse import trio  # noqa: E402

ROWS = [{"prompt": "p0", "answer": "1"}]


def test_each_exit_run_records_its_rule_window_and_resolved_level():
    params = DecodeParams(max_new_tokens=20)
    lead = bench.run(list(trio()), ROWS, params, segment_tokens=4)
    assert lead["exit_settings"] == {"exit_rule": "lead", "exit_window": 4, "exit_alpha": 0.3, "exit_min_rounds": 2}
    rank = bench.run(list(trio()), ROWS, params, segment_tokens=4, exit_rule="rank", exit_window=3)
    assert rank["exit_settings"]["exit_alpha"] == 0.1 and rank["exit_settings"]["exit_window"] == 3
    assert bench.run(list(trio()), ROWS, params, segment_tokens=4, exit=False)["exit_settings"] is None


def test_the_report_names_the_code_version():
    res = {"command": "c", "code": "abc1234", "members": ["a"], "threads": 1, "note": "n", "sets": {}}
    assert "Code: abc1234." in bench.markdown(res)


def test_alone_baseline_and_ratios_come_from_the_runs(bpe_member):
    params = DecodeParams(max_new_tokens=12)
    members = list(trio())
    first, second = (bench.run_alone(bpe_member, ROWS, params) for _ in range(2))
    assert first["rows"] == 1 and first["tokens_out"] > 0 and first["texts"] == second["texts"]
    alone = bench.mean_runs([{**first, "wall_s": 2.0, "tokens_out": 10}, {**second, "wall_s": 4.0, "tokens_out": 10}])
    assert alone["wall_s"] == 3.0 and alone["walls"] == [2.0, 4.0]
    ratios = bench.alone_ratios({"wall_s": 9.0, "tokens_out": 15}, alone)
    assert ratios == {"time_per_token_vs_alone": (9.0 / 15) / (3.0 / 10), "time_vs_alone": 3.0}
    table = bench.markdown({"command": "c", "code": "x", "members": ["a"], "threads": 1, "note": "n", "sets": {
        "gsm8k": {"prompts": 1, "max_new_tokens": 12, "runs": {
            "off": {**bench.run(members, ROWS, params, segment_tokens=4, exit=False), **ratios}, "a alone": alone}}}})
    assert "| time_per_token_vs_alone | **2.00** | - |" in table and "a alone" in table
