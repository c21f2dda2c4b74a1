"""Teacher forcing through the DeePEn step: the forced token is a candidate on every path (top-k with
``extra``, mass cuts, refinement and its splice, dense), and :meth:`FuseResult.forced_logprobs` is its
log-probability over the whole main vocabulary (docs/algorithms.md, DeePEn: labeling)."""
import pytest
import torch

from ensemble.relative import RelativeEnsemble, RowSource, SearchParams, top_candidates

REDUCTIONS = ("mean", "sum")


def _sources(seed=0, V=(200, 150)):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.arange(0, 100)
    return [RowSource(torch.randn(v, 16, generator=g), anchors, tau=100.0, cache_rows=64) for v in V]


def _logits(B=6, V=(200, 150), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(B, v, generator=g) for v in V]


def _forced(logits, ranks):
    """Per row the main member's token of the given rank (0 = its top token; large = far outside top-k)."""
    order = logits.argsort(dim=-1, descending=True)
    return order[torch.arange(logits.shape[0]), torch.tensor(ranks)]


PATHS = {  # name -> RelativeEnsemble keywords
    "topk": dict(topk=16, top_mass=None, main_top_mass=None),
    "masscut": dict(topk=16, top_mass=0.5, main_top_mass=0.6),
    "refine-all": dict(topk=16, top_mass=0.5, main_top_mass=0.6, refine_margin=1e9),
    "refine-some": dict(topk=16, top_mass=0.5, main_top_mass=0.6, refine_margin=0.5),
    "dense": dict(topk=16, top_mass=None, main_top_mass=None, dense=True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forced_token_is_a_candidate_on_every_path(path, reduction):
    sources, logits = _sources(), _logits()
    eng = RelativeEnsemble(sources, (0.5, 0.5), 0, search=SearchParams(kl_reduction=reduction), **PATHS[path])
    extra = _forced(logits[0], [0, 1, 7, 40, 150, 199])  # inside and far outside every cut
    res = eng.fuse(logits, extra=extra)
    k = res.cand.shape[1]
    assert ((res.cand == extra[:, None]) & res.valid[:, :k]).any(dim=-1).all()
    lp = res.forced_logprobs(extra)
    assert lp.shape == (6,) and torch.isfinite(lp).all() and (lp <= 0).all()
    if path.startswith("refine"):
        assert eng.refined > 0
    if path == "dense":
        torch.testing.assert_close(lp, torch.log_softmax(res.z, -1).gather(1, extra[:, None])[:, 0])


def test_forced_token_missing_is_an_error_not_column_zero():
    sources, logits = _sources(), _logits()
    eng = RelativeEnsemble(sources, (0.5, 0.5), 0, topk=4, top_mass=None, main_top_mass=None, search=SearchParams())
    far = _forced(logits[0], [150] * 6)
    res = eng.fuse(logits)  # not forced: the far tokens are not candidates
    with pytest.raises(ValueError, match=r"forced tokens .* of rows \[0, 1, 2, 3, 4, 5\] are not among"):
        res.forced_logprobs(far)


def test_top_candidates_extra_survives_cut_and_duplicates():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -9.0], [0.0, 9.0, 1.0, 2.0, 3.0]])
    for extra in ([4, 1], [1, 0], [2, 4]):  # cut away, inside the cut, inside top-k but beyond the mass
        ids, ok = top_candidates(logits, k=3, top_mass=0.5, extra=torch.tensor(extra))
        for b in range(2):
            assert ids[b][ok[b]].tolist().count(extra[b]) == 1


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", ["topk", "masscut", "refine-all"])
def test_two_copies_of_one_member_give_its_own_logprobs(path, reduction):
    """Every member identical: the aggregate equals the main member's relative distribution, the search
    does not move, and the forced token's fused log-probability is the member's own, exactly up to
    float rounding, wherever the token ranks."""
    src = _sources(V=(200,))[0]
    lg = _logits(V=(200,))[0]
    eng = RelativeEnsemble([src, src], (0.3, 0.7), 0, search=SearchParams(kl_reduction=reduction), **PATHS[path])
    for ranks in ([0, 1, 2, 3, 4, 5], [20, 60, 100, 150, 190, 199]):
        extra = _forced(lg, ranks)
        res = eng.fuse([lg, lg.clone()], extra=extra)
        want = torch.log_softmax(lg, -1).gather(1, extra[:, None])[:, 0]
        torch.testing.assert_close(res.forced_logprobs(extra), want, atol=1e-5, rtol=0)


def test_rest_is_the_decayed_mass_outside_the_candidates():
    """A searched row's non-candidate tokens carry the main member's logits times the weight-decay
    factor (as the dense search leaves them); a row the search keeps carries them unchanged."""
    sources, logits = _sources(), _logits()
    params = SearchParams()
    eng = RelativeEnsemble(sources, (0.5, 0.5), 0, topk=16, top_mass=None, main_top_mass=None, search=params)
    assert eng.fuse(logits).rest is None  # generation (no forced tokens) never reads it, so skips it
    forced = logits[0].argmax(dim=-1)  # (B,): already a candidate, so the candidates stay the same
    res = eng.fuse(logits, extra=forced)
    other = logits[0].scatter(1, res.cand, float("-inf"))
    torch.testing.assert_close(res.rest, torch.logsumexp(other * params.decay(), -1))
    kept = RelativeEnsemble(sources, (1.0, 0.0), 0, topk=16, top_mass=None, main_top_mass=None, search=params)
    res = kept.fuse(logits, extra=forced)
    torch.testing.assert_close(res.rest, torch.logsumexp(other, -1), atol=0, rtol=0)
