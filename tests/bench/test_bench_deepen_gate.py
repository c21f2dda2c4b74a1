"""bench/bench_deepen_gate.py's --breakdown instrumentation: the clock counts only what it wraps while
on, and the catch-up cost measurement feeds a real (tiny) member."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_deepen_gate as bench  # noqa: E402

from tests.tiny import member_bpe  # noqa: E402


class Sleeper:
    def nap(self, s: float) -> float:
        time.sleep(s)
        return s


def test_clock_counts_wrapped_calls_only_while_on():
    clock, obj = bench.Clock(), Sleeper()
    clock.wrap(obj, "nap", "naps")
    assert obj.nap(0.01) == 0.01 and clock.acc == {}  # off: passed through, not counted
    clock.on = True
    obj.nap(0.02)
    obj.nap(0.02)
    assert 0.04 <= clock.acc["naps"] < 1.0 and set(clock.acc) == {"naps"}


def test_catch_up_costs_time_one_forward_against_k_on_a_real_member():
    m = member_bpe()
    rows = bench.catch_up_costs(m, k_values=(1, 3), prefix=8, repeats=2)
    assert [r["k"] for r in rows] == [1, 3] and {r["member"] for r in rows} == {m.name}
    for r in rows:
        assert r["one_forward_ms"] > 0 and r["k_forwards_ms"] > 0
        assert r["ratio"] == r["one_forward_ms"] / r["k_forwards_ms"]
