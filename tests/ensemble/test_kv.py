"""KV-cache operations on tiny real models (ensemble/kv.py through Member): compaction leaves logits
unchanged, shared scoring equals copy-and-feed scoring, reviving scored slots equals feeding them."""
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from ensemble.kv import Slots, reuse_plan
from ensemble.members import Member
from ensemble.reference import logprobs_uncached, next_logits_uncached
from tests import tiny

PROMPTS = ["What is the capital of France?", "Hi", "Once upon a time there was a small cat.", "東京 café 🙂"]
TOL = dict(atol=1e-5, rtol=1e-5)


def messy_state(m: Member):
    """Four rows with dead slots of every kind: left padding, a rewound draft, a rolled-back tail."""
    state = m.start(PROMPTS)
    m.feed(state, [m.encode_text(" Paris is"), m.encode_text(" cat"), [], m.encode_text(" yes")])
    saved = state.logits
    m.feed(state, [[5, 6, 7], [8], [9, 10], []])
    m.rewind(state, [3, 0, 2, 0], saved)
    m.feed(state, [m.encode_text(" Rome"), [], m.encode_text(" dog"), [11]], rollback=[1, 1, 0, 0])
    return state


def test_compaction_leaves_logits_unchanged(any_member):
    m = any_member
    a, b = messy_state(m), messy_state(m)
    removed = m.compact(b)
    assert removed > 0 and b.mask.shape[1] == int(b.mask.sum(1).max()) == a.mask.shape[1] - removed
    assert b.layout == a.layout + 1 and b.ids == a.ids and torch.equal(b.next_pos, a.next_pos)
    assert m.compact(b) == 0  # nothing left to remove
    more = [m.encode_text(" and"), [12, 13], [], m.encode_text(" no")]
    for s in (a, b):
        m.feed(s, more, rollback=[0, 1, 1, 0])
    torch.testing.assert_close(b.logits, a.logits, **TOL)
    for r in range(len(PROMPTS)):
        torch.testing.assert_close(b.logits[r], next_logits_uncached(m, b.ids[r]), atol=2e-4, rtol=1e-4)


def test_shared_scoring_equals_copy_scoring_and_leaves_the_state_live_part_alone(any_member):
    m = any_member
    state = messy_state(m)
    conts = [[m.encode_text(" Paris"), m.encode_text(" Rome is nice")], [], [m.encode_text(" yes"), []],
             [m.encode_text(" a b c d e f g")]]
    want = m.score(state, conts)
    ids, pos, logits, width = [list(i) for i in state.ids], state.next_pos.clone(), state.logits.clone(), state.mask.shape[1]
    live = state.mask.clone()
    got, slots = m.score_shared(state, conts)
    for b, cs in enumerate(conts):
        for c, toks in enumerate(cs):
            torch.testing.assert_close(got[b][c], want[b][c], **TOL)
            assert (slots[b][c] is None) == (not toks)
    assert state.ids == ids and torch.equal(state.next_pos, pos) and torch.equal(state.logits, logits)
    assert state.mask.shape[1] > width and torch.equal(state.mask[:, :width], live) and not state.mask[:, width:].any()


def test_reviving_scored_slots_equals_feeding_them(any_member):
    m = any_member
    fed, shared = messy_state(m), messy_state(m)
    conts = [[m.encode_text(" Paris"), m.encode_text(" Rome is nice")], [m.encode_text(" cat")], [],
             [m.encode_text(" a b"), m.encode_text(" c")]]
    _, slots = m.score_shared(shared, conts)
    pick = [slots[0][1], slots[1][0], None, slots[3][0]]
    m.revive(shared, pick)
    m.feed(fed, [list(s.tokens) if s else [] for s in pick])
    assert shared.ids == fed.ids and torch.equal(shared.next_pos, fed.next_pos)
    torch.testing.assert_close(shared.logits, fed.logits, **TOL)
    more = [[14], [15, 16], [17], m.encode_text(" end")]
    for s in (fed, shared):
        m.feed(s, more)
    torch.testing.assert_close(shared.logits, fed.logits, **TOL)
    m.compact(shared)  # the losers' slots go, the revived ones stay
    m.feed(shared, [[18]] * 4)
    m.feed(fed, [[18]] * 4)
    torch.testing.assert_close(shared.logits, fed.logits, **TOL)


def test_shared_scoring_in_slices_equals_one_forward(bpe_member):
    m = bpe_member
    conts = [[m.encode_text(" Paris is the capital of France"), m.encode_text(" no")], [m.encode_text(" yes it is")],
             [], [m.encode_text(" a b c d e f g h")]]
    one, many = messy_state(m), messy_state(m)
    want, want_slots = m.score_shared(one, conts)
    got, got_slots = m.score_shared(many, conts, max_batch_tokens=3 * 64)  # 3 logit rows per forward
    for b, cs in enumerate(conts):
        for c, _ in enumerate(cs):
            torch.testing.assert_close(got[b][c], want[b][c], **TOL)
            if want_slots[b][c] is not None:
                torch.testing.assert_close(got_slots[b][c].logits, want_slots[b][c].logits, **TOL)
    m.revive(many, [got_slots[0][0], None, None, got_slots[3][0]])
    m.revive(one, [want_slots[0][0], None, None, want_slots[3][0]])
    m.feed(many, [[5]] * 4)
    m.feed(one, [[5]] * 4)
    torch.testing.assert_close(many.logits, one.logits, **TOL)


def test_sliding_window_is_counted_in_positions_as_in_a_clean_forward():
    """A window shorter than the prompts and than some candidates (left-padded rows, slices): shared
    scoring sees the window of a clean forward."""
    tok = tiny.sp_tokenizer()
    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    m = Member(tiny.sharpen(Gemma3ForCausalLM(cfg).eval()), tok, name="tiny-sliding")
    state = m.start(PROMPTS)
    conts = [[m.encode_text(" Paris is the capital"), m.encode_text(" Rome")], [m.encode_text(" cat dog house")], [],
             [m.encode_text(" a b c d e f g h i")]]
    got, _ = m.score_shared(state, conts, max_batch_tokens=4 * 64)
    for b, cs in enumerate(conts):
        for c, toks in enumerate(cs):
            torch.testing.assert_close(got[b][c], logprobs_uncached(m, state.ids[b], toks), atol=1e-4, rtol=1e-4)


def test_slots_refuse_a_moved_row(bpe_member):
    m = bpe_member
    state = messy_state(m)
    _, slots = m.score_shared(state, [[m.encode_text(" Paris")], [], [], []])
    m.compact(state)
    with pytest.raises(ValueError, match="no longer fit the row"):
        m.revive(state, [slots[0][0], None, None, None])
    _, slots = m.score_shared(state, [[m.encode_text(" Paris")], [], [], []])
    m.revive(state, [slots[0][0], None, None, None])
    with pytest.raises(ValueError, match="no longer fit the row"):  # the row moved on by those tokens
        m.revive(state, [slots[0][0], None, None, None])
    with pytest.raises(ValueError, match="one entry per row"):
        m.revive(state, [None])
    with pytest.raises(ValueError, match="one column per token"):
        Slots(torch.arange(2), (1,), 0, 0, None)


def test_reuse_plan():
    s = Slots(torch.arange(3), (4, 5, 6), 0, 0, torch.zeros(2))
    assert reuse_plan(s, 0, [4, 5, 6]) == (s, [])
    assert reuse_plan(s, 0, [4, 5, 6, 7]) == (s, [7])
    part, left = reuse_plan(s, 0, [4, 5, 9])
    assert part.tokens == (4, 5) and part.logits is None and left == [9]
    part, left = reuse_plan(s, 0, [4, 5])  # the slots' logits after 2 tokens are not stored: feed the last
    assert part.tokens == (4,) and left == [5]
    assert reuse_plan(s, 1, [4, 5, 6]) == (None, [4, 5, 6])  # a rollback: the slots follow another prefix
    assert reuse_plan(s, 0, [9]) == (None, [9]) and reuse_plan(None, 0, [4]) == (None, [4])
    assert reuse_plan(s, 0, [4]) == (None, [4])
