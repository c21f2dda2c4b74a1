"""The run report's plots (jobs/report.py): only panels with data, so no empty exit-rounds plot for
methods without exits (single, DeePEn)."""
import struct

import pytest

pytest.importorskip("matplotlib")

from jobs.report import _plots  # noqa: E402
from jobs.sink import filesystem  # noqa: E402


def _member(name, **kw):
    return {"member": name, "win_rate": None, "agreement": None, **kw}


@pytest.mark.parametrize("rows, exits, titles", [
    ([_member("a")], [], ["tokens/s per partition"]),  # single
    ([_member("a", agreement=0.9), _member("b", agreement=0.7)], [], ["agreement with fused token",
                                                                      "tokens/s per partition"]),  # DeePEn
    ([_member("a", win_rate=0.6), _member("b", win_rate=0.4)], [2, 3, 3],
     ["win rate", "tokens/s per partition", "exit rounds (3 exits)"]),  # SpecFuse with exits
])
def test_plots_only_panels_with_data(tmp_path, rows, exits, titles):
    fs, root = filesystem(str(tmp_path))
    lines = _plots(None, rows, exits, {0: 12.5, 1: 10.0}, fs, root)
    assert lines[-1] == f"![{', '.join(titles)}](report.png)"
    png = (tmp_path / "report.png").read_bytes()
    width = struct.unpack(">I", png[16:20])[0]  # IHDR: one 4.4-inch panel per title at 90 dpi
    assert width == pytest.approx(4.4 * 90 * len(titles), abs=2)


def test_run_counts_on_every_member_row_and_refuse_unknown_kinds():
    from jobs.budget import tallied
    from jobs.report import RUN_COLUMNS, with_run_counts

    class Cfg:
        effective_run_id = "r1"

    held = tallied([("ok", None, 7, 7), ("error", "input", 2, 2), ("error", "fuser", 1, 1)], [("x", "boom")], 0.01)
    rows = with_run_counts([{"member": "a"}, {"member": "b"}], Cfg, held)
    assert [tuple(r[c] for c in RUN_COLUMNS) for r in rows] == [(7, 2, 1, 0.125, True)] * 2
    assert with_run_counts([], Cfg, held) == [{"run_id": "r1", "member": None, "rows_ok": 7, "rows_input_error": 2,
                                               "rows_fuser_error": 1, "fuser_error_rate": 0.125,
                                               "budget_exceeded": True}]
    odd = tallied([("ok", None, 1, 1), ("error", "disk", 1, 1)], [], 0.01)
    with pytest.raises(ValueError, match=r"unknown \(status, error_kind\): \['error/disk'\]"):
        with_run_counts([{"member": "a"}], Cfg, odd)
