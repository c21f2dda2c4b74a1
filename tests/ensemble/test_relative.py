"""DeePEn math on tiny tokenizers and random tensors: anchors, relative rows (on demand, cached, dense),
candidates, aggregation, the inverse search against its torch.optim oracle, sparse against dense."""
import logging
import math

import pytest
import torch

from ensemble.relative import (
    IndexedRows,
    RelativeEnsemble,
    RowSource,
    SearchParams,
    aggregate,
    decided_rows,
    find_anchors,
    inverse_search,
    inverse_search_reference,
    kl_rows,
    masked_softmax,
    mix,
    pull,
    search_radius,
    top_candidates,
)
from ensemble.text import token_bytes_table
from tests import tiny


@pytest.fixture(scope="module")
def toks():
    return tiny.bpe_tokenizer(), tiny.bpe_tokenizer(vocab_size=380), tiny.sp_tokenizer()


def test_anchors_are_the_same_text_in_every_vocabulary(toks):
    strings, ids = find_anchors(toks, ["a", "b", "c"], min_anchors=10)
    assert len(strings) == len(set(strings)) > 100
    tables = [token_bytes_table(t) for t in toks]
    for tok_ids, table in zip(ids, tables):
        assert [table[i].decode("utf-8") for i in tok_ids.tolist()] == strings
    sp = toks[2]
    assert "\n" in strings and "\t" in strings
    tab = strings.index("\t")  # the byte-fallback piece <0x09> and the byte-level Ċ-style piece meet
    assert int(ids[2][tab]) == sp.convert_tokens_to_ids("<0x09>")
    assert toks[0].convert_ids_to_tokens(int(ids[0][tab])) == "ĉ"
    assert any(s.startswith(" ") for s in strings)  # Ġ and ▁ both canonicalise to a space
    specials = {sp.bos_token_id, sp.eos_token_id, sp.pad_token_id}
    assert not specials & set(ids[2].tolist())
    assert not {"<|im_end|>", "<bos>", "<0x0A>"} & set(strings)


def test_too_few_anchors_is_a_clear_error(toks):
    with pytest.raises(ValueError, match=r"only \d+ anchor tokens are shared by members \['a', 'c'\].*min_anchors=100000"):
        find_anchors([toks[0], toks[2]], ["a", "c"], min_anchors=100000)


def test_anchor_subset_keeps_the_lowest_ids(toks):
    full, full_ids = find_anchors(toks, ["a", "b", "c"], min_anchors=1)
    sub, sub_ids = find_anchors(toks, ["a", "b", "c"], min_anchors=1, subset=50)
    assert len(sub) == 50 and set(sub) <= set(full)
    worst = {s: max(int(i[full.index(s)]) for i in full_ids) for s in full}
    assert max(worst[s] for s in sub) <= min(worst[s] for s in set(full) - set(sub))


def _formula_rows(emb, anchor_ids, tau):
    e = emb / emb.norm(dim=-1, keepdim=True)
    cos = e @ e[anchor_ids].T  # (V, A)
    return torch.softmax(tau * cos / cos.norm(dim=-1, keepdim=True), dim=-1)


def test_rows_follow_the_formula_and_cache_exactly():
    torch.manual_seed(0)
    emb = torch.randn(300, 24)
    anchors = torch.arange(0, 300, 3)
    src = RowSource(emb, anchors, tau=100.0, cache_rows=8)
    want = _formula_rows(emb, anchors, 100.0)
    ids = torch.tensor([5, 17, 250, 3])
    got = src.rows(ids)
    torch.testing.assert_close(got, want[ids], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(4))
    # cached rows and rows computed alongside other tokens are bit-identical to fresh ones
    again = src.rows(torch.tensor([3, 250, 99]))
    assert src.hits == 2 and torch.equal(again[:2], got[[3, 2]])
    for t in [3, 99, 250]:
        assert torch.equal(src.compute(torch.tensor([t]))[0], src.rows(torch.tensor([t]))[0])
    assert torch.equal(src.dense()[ids], src.compute(ids))
    # LRU: capacity holds, recently used rows survive
    src.rows(torch.arange(100, 120))
    assert len(src.cache) == 8 and src.cache.slab.shape[0] <= 8
    hits = src.hits
    src.rows(torch.arange(112, 120))  # the last 8 rows used are the ones kept ...
    assert src.hits - hits == 8
    src.rows(torch.tensor([3, 111]))  # ... and the earlier ones were evicted
    assert src.hits - hits == 8


def test_rows_do_not_depend_on_what_they_are_computed_with():
    """Blocks of any size give every row bitwise the same values (batch independence of the sparse
    step): a row alone, in a short padded block, in a full block and across block boundaries."""
    torch.manual_seed(3)
    emb = torch.randn(400, 48)
    src = RowSource(emb, torch.arange(0, 400, 2), tau=100.0, cache_rows=0, chunk=32, min_block=16)
    ids = torch.randperm(400)[:75]
    together = src.compute(ids)  # blocks of 32, 32, 11 (padded to 16)
    for n in (1, 5, 13, 16, 31, 33, 75):
        assert torch.equal(src.compute(ids[:n]), together[:n]), n
    for i in (0, 31, 32, 74):
        assert torch.equal(src.compute(ids[i : i + 1])[0], together[i]), i


@pytest.mark.parametrize("missing", ["oneDNN", "op"])
def test_rows_without_onednn_use_the_padded_plain_product_logged_once(monkeypatch, caplog, missing):
    """Where this torch build has no oneDNN (or lacks one of its private ops) the rows come from the
    plain product, padded to min_block: the same formula, still bitwise independent of the block they
    are computed in; the fallback is one warning per process, not one per member."""
    from ensemble.relative import onednn

    torch.manual_seed(3)
    emb = torch.randn(400, 48)
    anchors = torch.arange(0, 400, 2)
    ids = torch.randperm(400)[:75]
    fast = RowSource(emb, anchors, tau=100.0, cache_rows=0, chunk=32, min_block=16)
    if torch.backends.mkldnn.is_available():
        assert fast._packed is not None and fast.min_block == 1  # the other tests exercise oneDNN
    fast_rows = fast.compute(ids)
    if missing == "oneDNN":
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    else:
        def gone(x, packed):
            raise RuntimeError("mkldnn::_linear_pointwise is not available")
        monkeypatch.setattr(onednn, "linear", gone)
    monkeypatch.setattr(onednn, "_warned", False)
    with caplog.at_level(logging.DEBUG, logger="ensemble.relative"):
        slow = [RowSource(emb, anchors, tau=100.0, cache_rows=0, chunk=32, min_block=16) for _ in range(3)]
    notes = [r for r in caplog.records if r.name == "ensemble.relative.onednn"]
    assert [r.levelno for r in notes] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert ("no oneDNN" if missing == "oneDNN" else "RuntimeError: mkldnn::_linear_pointwise") in notes[0].getMessage()
    src = slow[0]
    assert src._packed is None and src.min_block == 16
    together = src.compute(ids)  # blocks of 32, 32, 11 (padded to 16)
    torch.testing.assert_close(together, _formula_rows(emb, anchors, 100.0)[ids], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(together, fast_rows, atol=1e-7, rtol=1e-5)
    for n in (1, 5, 13, 16, 31, 33, 75):
        assert torch.equal(src.compute(ids[:n]), together[:n]), n
    for i in (0, 31, 32, 74):
        assert torch.equal(src.compute(ids[i : i + 1])[0], together[i]), i


def test_float16_rows_round_the_same_whether_fresh_or_cached():
    """store='float16': rows within 2^-11 of the exact ones, identical from the cache and fresh, and
    the scaled table mixes / pulls like the probabilities it stands for."""
    torch.manual_seed(4)
    emb = torch.randn(300, 24)
    anchors = torch.arange(0, 300, 3)
    exact = RowSource(emb, anchors, tau=100.0, cache_rows=8)
    half = RowSource(emb, anchors, tau=100.0, cache_rows=8, store="float16")
    ids = torch.tensor([5, 17, 250, 3])
    want = exact.rows(ids)
    got = half.rows(ids)
    assert got.dtype == torch.float32 and half.cache.slab.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-8)
    assert not torch.equal(got, want)  # really rounded
    assert torch.equal(half.rows(torch.tensor([250, 3])), got[[2, 3]]) and half.hits == 2
    fresh = RowSource(emb, anchors, tau=100.0, cache_rows=0, store="float16")
    assert torch.equal(fresh.rows(ids), got)
    assert exact.nbytes - half.nbytes == 2 * exact.cache.slab.numel() > 0  # 2 of 4 bytes saved per cached value
    table = torch.empty(4, 100)
    half.rows_into(ids, table)
    rows = IndexedRows(table, torch.tensor([[0, 1], [3, 3]]), half.scale)
    probs = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    torch.testing.assert_close(mix(probs, rows), mix(probs, IndexedRows(got, rows.index)))
    vec = torch.randn(2, 100)
    torch.testing.assert_close(pull(rows, vec), pull(IndexedRows(got, rows.index), vec))
    with pytest.raises(ValueError, match="store must be one of .*got 'bfloat16'"):
        RowSource(emb, anchors, tau=100.0, cache_rows=8, store="bfloat16")


def test_main_member_has_its_own_candidate_cut_and_copies_share_its_table():
    torch.manual_seed(6)
    emb = torch.randn(200, 16)
    anchors = torch.arange(0, 200, 2)
    main_src = RowSource(emb, anchors, tau=100.0, cache_rows=0)
    other_src = RowSource(emb.flip(0).contiguous(), anchors, tau=100.0, cache_rows=0)
    logits = [3 * torch.randn(3, 200), 3 * torch.randn(3, 200)]
    eng = RelativeEnsemble([main_src, other_src], (0.5, 0.5), 0, topk=20, top_mass=0.5, main_top_mass=None,
                           search=SearchParams())
    res = eng.fuse(logits)
    assert res.valid.shape == (3, 21) and res.valid.all()  # the main member: all 20 candidates and the tail
    ids, ok = top_candidates(logits[1], 20, 0.5)
    assert not ok.all() and other_src.misses == torch.unique(ids).numel()  # the others: cut at 0.5
    # a copy of the main member (same rows, same logits) takes the main member's cut and its table
    copy = RelativeEnsemble([main_src, main_src], (0.3, 0.7), 0, topk=20, top_mass=0.5, main_top_mass=None,
                            search=SearchParams())
    before = main_src.misses
    res = copy.fuse([logits[0], logits[0]])
    assert torch.equal(res.q_members[0], res.q_members[1]) and torch.equal(res.q, res.q_members[0])
    assert main_src.misses - before == torch.unique(top_candidates(logits[0], 20)[0]).numel()  # rows computed once


def test_dense_refuses_large_vocabularies():
    src = RowSource(torch.randn(50, 8), torch.arange(10), tau=100.0, cache_rows=4)
    with pytest.raises(ValueError, match="dense relative matrix needs"):
        src.dense(max_bytes=100)


def test_top_candidates_sorted_masscut_and_extra():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0, 4.0, -3.0], [9.0, 0.0, 1.0, 2.0, 3.0, 0.5]])
    ids, ok = top_candidates(logits, k=4)
    assert ok.all() and (ids.diff(dim=-1) > 0).all()
    assert set(ids[0].tolist()) == {1, 2, 3, 4}
    z = logits.gather(1, ids)
    assert ids.gather(1, z.argmax(-1, keepdim=True))[:, 0].tolist() == logits.argmax(-1).tolist()  # ties: lowest id
    ids, ok = top_candidates(logits, k=4, top_mass=0.9)
    assert ids[1][ok[1]].tolist() == [0]  # row 1: one token holds > 90%
    mass = torch.softmax(logits, -1).gather(1, ids).masked_fill(~ok, 0).sum(-1)
    assert (mass >= 0.9).all()
    ids, ok = top_candidates(logits, k=2, extra=torch.tensor([5, 0]))
    assert 5 in ids[0][ok[0]].tolist() and ids[1][ok[1]].tolist().count(0) == 1


def test_aggregate_exact_for_main_only_and_copies():
    torch.manual_seed(1)
    qs = [torch.softmax(torch.randn(3, 40), -1) for _ in range(2)]
    assert torch.equal(aggregate(qs, (1.0, 0.0), 0), qs[0])
    assert torch.equal(aggregate([qs[0], qs[0].clone()], (0.3, 0.7), 0), qs[0])
    torch.testing.assert_close(aggregate(qs, (0.25, 0.75), 1), 0.25 * qs[0] + 0.75 * qs[1])


def _problem(B=4, k=12, A=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.softmax(3 * torch.randn(B, k, A, generator=g), -1)  # (B, k, A)
    z0 = 2 * torch.randn(B, k, generator=g)
    target = torch.softmax(torch.randn(B, A, generator=g), -1)
    return z0, rows, target


def test_search_matches_torch_optim_oracle():
    z0, rows, target = _problem()
    valid = torch.ones_like(z0, dtype=torch.bool)
    params = SearchParams(lr=0.15, steps=5)
    got = inverse_search(z0, valid, rows, target, params)
    for b in range(z0.shape[0]):
        want = inverse_search_reference(z0[b], rows[b], target[b], params)
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)
    before = kl_rows(target, mix(masked_softmax(z0, valid), rows))
    after = kl_rows(target, mix(masked_softmax(got, valid), rows))
    assert (after < before).all()
    # masked candidates keep their place and take no mass; a row alone equals the row in the batch
    valid[:, -3:] = False
    masked = inverse_search(z0, valid, rows, target, params)
    assert torch.equal(masked[:, -3:], z0[:, -3:])
    torch.testing.assert_close(masked[:, :-3], torch.stack([
        inverse_search_reference(z0[b, :-3], rows[b, :-3], target[b], params) for b in range(4)]), atol=1e-4, rtol=1e-4)
    alone = inverse_search(z0[2:3], valid[2:3], rows[2:3], target[2:3], params)
    torch.testing.assert_close(alone[0], masked[2], atol=1e-6, rtol=1e-6)


def test_search_lr_zero_and_zero_loss_rows_are_untouched():
    z0, rows, target = _problem(seed=3)
    valid = torch.ones_like(z0, dtype=torch.bool)
    assert torch.equal(inverse_search(z0, valid, rows, target, SearchParams(lr=0.0)), z0)
    own = mix(masked_softmax(z0, valid), rows)  # the main member's own relative distribution
    target[1] = own[1]
    z = inverse_search(z0, valid, rows, target, SearchParams())
    assert torch.equal(z[1], z0[1]) and not torch.equal(z[0], z0[0])


def test_search_moves_no_logit_further_than_its_radius():
    """search_radius bounds every logit's move (apart from the weight decay's common factor), also for
    targets far from the start, whose gradients are large and steady."""
    params = SearchParams()
    decay = math.prod(1 - params.lr_at(t) * params.weight_decay for t in range(params.steps))
    worst = 0.0
    for seed in range(6):
        z0, rows, target = _problem(B=8, k=16, seed=seed)
        if seed % 2:
            target = torch.softmax(12 * torch.randn(target.shape, generator=torch.Generator().manual_seed(seed)), -1)
        z = inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), rows, target, params)
        worst = max(worst, float((z - z0 * decay).abs().max()))
    assert 0.5 * search_radius(params) < worst <= search_radius(params) + 1e-5


def test_decided_rows_keep_their_argmax():
    """Rows whose lead exceeds twice the radius are decided: the full search keeps their argmax."""
    z0, rows, target = _problem(B=16, k=12, seed=4)
    lead = torch.linspace(0.0, 3.0, 16)  # give the best candidate a lead from 0 to 3
    best = z0.argmax(-1)
    z0 = z0.scatter(1, best[:, None], z0.max(-1, keepdim=True).values + lead[:, None])
    valid = torch.ones_like(z0, dtype=torch.bool)
    done = decided_rows(z0, valid, SearchParams())
    assert 0 < int(done.sum()) < 16  # some rows decided, some not (the test is not vacuous)
    z = inverse_search(z0, valid, rows, target, SearchParams())
    assert torch.equal(z[done].argmax(-1), best[done])
    one = valid.clone()
    one[:, 1:] = False  # a single valid candidate is always decided
    assert decided_rows(z0, one, SearchParams()).all()
    assert decided_rows(z0, valid, SearchParams(lr=0.0)).all()


def _two_members(seed=6, B=6):
    torch.manual_seed(seed)
    emb = torch.randn(200, 16)
    anchors = torch.arange(0, 200, 2)
    sources = [RowSource(emb, anchors, tau=100.0, cache_rows=64), RowSource(emb.flip(0).contiguous(), anchors,
                                                                            tau=100.0, cache_rows=64)]
    logits = [3 * torch.randn(B, 200), 3 * torch.randn(B, 200)]
    logits[0][::2, 7] += 20.0  # every other row: a clear favourite of the main member
    return sources, logits


def test_greedy_rows_skip_only_searches_that_cannot_change_the_token():
    sources, logits = _two_members()
    kw = dict(topk=20, top_mass=None, main_top_mass=None, search=SearchParams())
    full = RelativeEnsemble(sources, (0.5, 0.5), 0, **kw).fuse(logits)
    eng = RelativeEnsemble(sources, (0.5, 0.5), 0, **kw)
    res = eng.fuse(logits, greedy_rows=torch.ones(6, dtype=torch.bool))
    done = decided_rows(logits[0].gather(1, full.cand), full.valid[:, :-1], SearchParams())
    assert done[::2].all() and not done.all()  # the clear favourites, and not every row
    assert eng.decided == int(done.sum())
    assert torch.equal(res.greedy(), full.greedy())
    torch.testing.assert_close(res.z[~done], full.z[~done], atol=1e-5, rtol=1e-5)
    assert not torch.equal(res.z[0], full.z[0])  # a decided row keeps its initial logits
    # rows that need the fused distribution itself (sampling) are always searched
    eng2 = RelativeEnsemble(sources, (0.5, 0.5), 0, **kw)
    res2 = eng2.fuse(logits, greedy_rows=torch.tensor([False, True, False, True, False, True]))
    assert eng2.decided == int(done[1::2].sum())
    torch.testing.assert_close(res2.z[::2], full.z[::2], atol=1e-5, rtol=1e-5)


def test_refinement_reruns_close_rows_without_cuts():
    sources, logits = _two_members(seed=8)
    kw = dict(topk=20, search=SearchParams())
    cut = RelativeEnsemble(sources, (0.5, 0.5), 0, top_mass=0.6, main_top_mass=0.7, **kw).fuse(logits)
    nocut = RelativeEnsemble(sources, (0.5, 0.5), 0, top_mass=None, main_top_mass=None, **kw).fuse(logits)
    top = cut.token_logits().topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]  # inf where the cut left one candidate (it holds >= 0.7 of the mass)
    for threshold in (1e9, float(margin[margin.isfinite()].sort().values[:2].mean())):  # all, then one
        eng = RelativeEnsemble(sources, (0.5, 0.5), 0, top_mass=0.6, main_top_mass=0.7, refine_margin=threshold, **kw)
        res = eng.fuse(logits)
        close = margin < threshold
        assert eng.refined == int(close.sum()) > 0 and not close.all()
        for b in range(6):  # each row is the cut result or, when close, the no-cut one
            want = nocut if close[b] else cut
            assert torch.equal(res.cand[b][res.valid[b, :-1]], want.cand[b][want.valid[b, :-1]])
            torch.testing.assert_close(res.token_logits()[b][res.valid[b, :-1]],
                                       want.token_logits()[b][want.valid[b, :-1]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(res.z[b, -1], want.z[b, -1], atol=1e-5, rtol=1e-5)  # the tail
            torch.testing.assert_close(res.q_members[1][b], want.q_members[1][b], atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(res.q[b], want.q[b], atol=1e-7, rtol=1e-5)
            assert int(res.greedy()[b]) == int(want.greedy()[b])


def test_cosine_schedule_matches_torch():
    p = SearchParams(lr=0.15)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.15)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.15 / 4)
    for t in range(8):
        assert math.isclose(p.lr_at(t), opt.param_groups[0]["lr"], rel_tol=1e-9)
        opt.step()
        sched.step()


@pytest.fixture(scope="module")
def peaked_members():
    """Tiny members sharpened further so that their next-token distributions are about as peaked as the
    packaged members' (their median top-1 probability is in docs/results.md)."""
    members = [tiny.member_bpe(), tiny.member_bpe_qwen(), tiny.member_sp()]
    for m in members:
        tiny.sharpen(m.model, 4.0)
    return members


def _agreement(members, topk, steps=25):
    """Teacher-forced along each member's own greedy path in turn: how often the sparse step (top-k,
    on-demand rows, tail) and the dense reference step (full softmax, dense matrices, search over the
    whole main vocabulary) choose the same greedy token; also the main member's top-1 probabilities."""
    _, ids = find_anchors([m.tokenizer for m in members], [m.name for m in members], min_anchors=10)
    sources = [RowSource(m.input_embeddings(), i, tau=100.0, cache_rows=256) for m, i in zip(members, ids)]
    kw = dict(weights=(0.4, 0.3, 0.3), main=0, search=SearchParams())
    sparse = RelativeEnsemble(sources, topk=topk, top_mass=None, main_top_mass=None, **kw)
    dense = RelativeEnsemble(sources, topk=topk, top_mass=None, main_top_mass=None, dense=True, **kw)
    same = total = 0
    top1: list[float] = []
    prompts = ["What is the capital of France?", "Once upon a time", "東京 café", "def add(a, b):"]
    for m in members:
        states = [x.start(prompts) for x in members]
        for _ in range(steps):
            logits = [s.logits for s in states]
            top1 += torch.softmax(logits[0], -1).max(-1).values.tolist()
            a, b = sparse.fuse(logits).greedy(), dense.fuse(logits).greedy()
            same += int((a == b).sum())
            total += a.numel()
            nxt = states[members.index(m)].logits.argmax(-1)
            text = [m.decode([int(t)]) or " " for t in nxt]
            for x, s in zip(members, states):
                x.feed(s, [x.encode_text(t) or [0] for t in text])
    return same / total, sorted(top1)[len(top1) // 2]


def test_sparse_agrees_with_dense_on_peaked_members(peaked_members):
    rate, median_top1 = _agreement(peaked_members, topk=64)
    assert median_top1 < 0.8, "the members must not be so peaked that the comparison is vacuous"
    assert rate >= 0.99, f"sparse and dense agree on {rate:.1%} of steps"


def test_sparse_with_every_token_equals_dense(bpe_member, bpe_member_qwen, sp_member):
    """The random tiny members are nearly flat (top-1 ~0.06); with k >= V the sparse machinery
    (gathered cached rows, tail, batched search) must make the dense path's choices."""
    rate, _ = _agreement([bpe_member, bpe_member_qwen, sp_member], topk=10_000, steps=8)
    assert rate >= 0.99, f"sparse and dense agree on {rate:.1%} of steps"


def test_indexed_rows_equal_gathered_rows():
    """The table + index form used by the sparse step mixes, pulls and searches like the explicit
    (B, k, A) rows it stands for (shared candidates across rows, repeated masked slots included)."""
    g = torch.Generator().manual_seed(5)
    table = torch.softmax(3 * torch.randn(9, 50, generator=g), -1)  # (U, A)
    index = torch.randint(0, 9, (4, 7), generator=g)  # (B, k), with repeats
    index[:, -1] = 8  # a shared last row, like the tail
    rows = IndexedRows(table, index)
    explicit = rows.gathered()  # (B, k, A)
    valid = torch.ones(4, 7, dtype=torch.bool)
    valid[0, 3] = False
    z0 = torch.randn(4, 7, generator=g)
    probs = masked_softmax(z0, valid)
    torch.testing.assert_close(mix(probs, rows), mix(probs, explicit))
    vec = torch.randn(4, 50, generator=g)
    torch.testing.assert_close(pull(rows, vec), pull(explicit, vec))
    target = torch.softmax(torch.randn(4, 50, generator=g), -1)
    torch.testing.assert_close(inverse_search(z0, valid, rows, target, SearchParams()),
                               inverse_search(z0, valid, explicit, target, SearchParams()), atol=1e-6, rtol=1e-5)
    assert rows.nbytes == 9 * 50 * 4 < explicit.numel() * 4
