"""bench/label_stack.py: the weight grid and the dev choice of pool and weights."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import label_stack as ls  # noqa: E402


def test_weight_grid_covers_the_simplex_with_two_members_or_more():
    grid = ls.weight_grid(3, 4)
    assert all(sum(w) == pytest.approx(1.0) and sum(x > 0 for x in w) >= 2 for w in grid)
    assert (1.0, 0.0, 0.0) not in grid and (0.5, 0.5, 0.0) in grid and (0.25, 0.25, 0.5) in grid
    assert len(grid) == 15 - 3  # C(6, 2) points of the simplex, less the three corners
    assert ls.weight_grid(2, 1) == [] and ls.weight_grid(2, 2) == [(0.5, 0.5)]


def test_choose_picks_the_weights_that_fix_the_main_members_mistakes():
    # member 0 right on rows 0-2 and confidently wrong on row 3; member 1 right only on row 3, where
    # member 0 is unsure: some weight on member 1 fixes row 3 without losing rows 0-2
    posts = [[[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.45, 0.55]],
             [[0.4, 0.6], [0.4, 0.6], [0.4, 0.6], [0.9, 0.1]]]
    golds = [0, 0, 0, 0]
    kind, w, acc = ls.choose(posts, golds, base=0, steps=10)
    # linear fixes row 3 up to weight 0.8 on member 0, log-linear up to 0.9: among the pools and grid
    # points that reach 1.0, the most weight on the base member wins
    assert (kind, w, acc) == ("loglinear", (0.9, 0.1), 1.0)
    # when no pool beats the base member, the choice keeps the most weight on it
    kind, w, acc = ls.choose([[[0.9, 0.1]] * 2, [[0.1, 0.9]] * 2], [0, 0], base=0, steps=10)
    assert acc == 1.0 and w == (0.9, 0.1)


def test_adapt_pool_keeps_the_calibration_weights_and_chooses_the_pool_on_dev():
    posts = [[[0.9, 0.1], [0.9, 0.1], [0.45, 0.55]],
             [[0.4, 0.6], [0.4, 0.6], [0.9, 0.1]]]
    kind, w, acc = ls.adapt_pool(posts, [0, 0, 0], [0.6, 0.2])
    assert w == pytest.approx((0.75, 0.25))  # proportional to the dev accuracies, as jobs.calibrate's
    # linear: row 2 pools to 0.56 for choice 0; log-linear as well; both reach 1.0, POOLS order wins
    assert (kind, acc) == ("linear", 1.0)
    # the weights are not fitted: where member 1 alone is right, its weight (0.25) does not carry a row
    kind, w, acc = ls.adapt_pool(posts, [1, 1, 1], [0.6, 0.2])
    assert w == pytest.approx((0.75, 0.25)) and acc == 0.0
