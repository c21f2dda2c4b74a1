"""The inverse search's KL reduction (docs/algorithms.md, DeePEn: inverse transformation): the mean over
the anchors, as the reference code's ``nn.KLDivLoss()`` reduces it, and the sum; the fast path against
its ``torch.optim`` oracle for both, what each does to low-probability candidates, and the search's
radius (which bounds how far any logit moves) for both."""
import math

import pytest
import torch

from ensemble.config import DeePEnConfig
from ensemble.relative import (RowSource, SearchParams, decided_rows, inverse_search, inverse_search_reference,
                               mix, moving_rows, search_radius)

REDUCTIONS = ("mean", "sum")


def _problem(B=4, k=12, A=60, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.softmax(3 * torch.randn(B, k, A, generator=g), -1)  # (B, k, A)
    z0 = spread * torch.randn(B, k, generator=g)
    target = torch.softmax(torch.randn(B, A, generator=g), -1)
    return z0, rows, target


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("A", [60, 3000])
def test_fast_path_matches_the_oracle(reduction, A):
    """Also with many anchors, where the mean's gradients are near Adam's eps."""
    z0, rows, target = _problem(A=A, seed=A)
    params = SearchParams(kl_reduction=reduction)
    got = inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), rows, target, params)
    for b in range(z0.shape[0]):
        want = inverse_search_reference(z0[b], rows[b], target[b], params)
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)


def test_default_is_the_reference_mean():
    assert SearchParams().kl_reduction == "mean"
    assert DeePEnConfig().kl_reduction == "mean"
    assert DeePEnConfig(kl_reduction="sum").search_params().kl_reduction == "sum"
    with pytest.raises(ValueError, match="kl_reduction must be 'mean' or 'sum', got 'max'"):
        DeePEnConfig(kl_reduction="max")
    with pytest.raises(ValueError, match=r"kl_reduction must be one of \('mean', 'sum'\), got 'batchmean'"):
        SearchParams(kl_reduction="batchmean")


def test_mean_leaves_low_probability_candidates_in_place_where_sum_moves_them():
    """The defect the sum caused. Relative rows as DeePEn builds them over 4,000 anchors; the main
    member is sure of candidate 0; the other member moves 0.3 of the mass to candidate 1. Under the
    mean, the candidates no member favours (probability ~1e-6) have gradients far below Adam's eps and
    keep their logits (up to the weight decay); under the sum each moves by about a learning-rate step
    per iteration, like every candidate. Candidate 1, which the aggregate favours, moves under both."""
    g = torch.Generator().manual_seed(0)
    src = RowSource(torch.randn(4000, 32, generator=g), torch.arange(4000), tau=100.0, cache_rows=0)
    rows = src.compute(torch.arange(10))  # (k, A)
    z0 = 2 * torch.randn(2, 10, generator=g)
    z0[:, 0] = 14.0
    own = torch.softmax(z0, -1)
    other = own + torch.tensor([-0.3, 0.3] + [0.0] * 8)
    target = mix(0.5 * own + 0.5 * other, rows)  # (B, A): the aggregate of two members
    moves = {}
    for reduction in REDUCTIONS:
        p = SearchParams(kl_reduction=reduction)
        z = inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), rows, target, p)
        moves[reduction] = (z - z0 * p.decay()).abs()  # (B, k)
    assert float(moves["mean"][:, 3:].max()) < 0.1 and float(moves["mean"][:, 3:].median()) < 0.02
    assert float(moves["sum"][:, 3:].min()) > 0.5  # sum_t lr_t is 0.65 for the reference settings
    assert float(moves["mean"][:, 1].min()) > 0.3 and float(moves["sum"][:, 1].min()) > 0.3


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_radius_bounds_every_move(reduction):
    params = SearchParams(kl_reduction=reduction)
    worst = 0.0
    for seed in range(6):
        z0, rows, target = _problem(B=8, k=16, A=60 if seed % 3 else 2000, seed=seed)
        if seed % 2:
            target = torch.softmax(12 * torch.randn(target.shape, generator=torch.Generator().manual_seed(seed)), -1)
        z = inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), rows, target, params)
        worst = max(worst, float((z - z0 * params.decay()).abs().max()))
    assert 0.5 * search_radius(params) < worst <= search_radius(params) + 1e-5


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_decided_rows_keep_their_argmax(reduction):
    params = SearchParams(kl_reduction=reduction)
    z0, rows, target = _problem(B=16, k=12, seed=4, spread=0.3)
    lead = torch.linspace(0.0, 3.0, 16)
    best = z0.argmax(-1)
    z0 = z0.scatter(1, best[:, None], z0.max(-1, keepdim=True).values + lead[:, None])
    valid = torch.ones_like(z0, dtype=torch.bool)
    done = decided_rows(z0, valid, params)
    assert 0 < int(done.sum()) < 16
    z = inverse_search(z0, valid, rows, target, params)
    assert torch.equal(z[done].argmax(-1), best[done])


def test_moving_rows_and_decay():
    z0, rows, target = _problem()
    pred = torch.softmax(z0, -1)[:, None, :].bmm(rows)[:, 0]
    target[1] = pred[1]
    assert moving_rows(pred, target, SearchParams()).tolist() == [True, False, True, True]
    assert not moving_rows(pred, target, SearchParams(lr=0.0)).any()
    p = SearchParams()
    assert math.isclose(p.decay(), math.prod(1 - p.lr_at(t) * p.weight_decay for t in range(p.steps)))
    assert SearchParams(steps=0).decay() == 1.0
