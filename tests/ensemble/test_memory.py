"""Bounded memory (ensemble.config.MAX_BATCH_TOKENS): every fuser's generate and label take their
prompts in groups, and Member.score packs its candidates, within ``max_batch_tokens``; outputs do not
depend on the bound.

The oracles: the same call with an unlimited bound (one group, one scoring forward: the code path
before the bound existed) and ``ensemble.reference.logprobs_uncached`` (one clean forward per
candidate). Greedy and seeded texts, labels and statistics must be equal; log-probabilities and label
probabilities within 1e-5, because a different batch shape, or a candidate fed in slices through the
KV cache, changes float32 results in their last bits (measured: at most 2e-6).
"""
from __future__ import annotations

import pytest
import torch

from ensemble import DecodeParams, Single
from ensemble.batching import LOGIT_SHARE, logit_rows, pack
from ensemble.config import MAX_BATCH_TOKENS, check_batch_tokens
from ensemble.fusers.deepen import DeePEn
from ensemble.fusers.specfuse import SpecFuse
from ensemble.reference import logprobs_uncached

UNLIMITED = 10**9
PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Once upon a time there was a small cat who lived in a big house near the river. Tell me more.",
    "東京 café 🙂",
    "Answer yes or no. Is fire hot?",
    "def add(a, b):",
    "The capital of Italy is",
]
CHOICES = [["Paris", "Rome", "Berlin is a city"], ["yes", "no"], ["The cat", "東京 🙂", "a dog"], ["café", "tea"],
           ["Yes", "No", "Maybe"], ["return a + b", "pass"], ["Rome", "Paris"]]
GREEDY = DecodeParams(max_new_tokens=8)


class Forwards:
    """Every forward of some members: its padded area (rows x attended positions) and the number of
    full-vocabulary logit vectors it returned."""

    def __init__(self, members):
        self.areas: list[int] = []
        self.logits: list[int] = []
        self._hooks = [m.model.register_forward_hook(self._record, with_kwargs=True) for m in members]

    def _record(self, module, args, kwargs, out) -> None:
        if "attention_mask" not in kwargs:  # ensemble.reference's uncached oracle, not the library
            return
        mask = kwargs["attention_mask"]
        if isinstance(mask, dict):  # SpecFuse's shared verification: a 4-D mask per layer type
            mask = next(iter(mask.values()))
        self.areas.append(mask.shape[0] * mask.shape[-1])  # rows x attended positions (2-D or 4-D)
        self.logits.append(out.logits.numel() // out.logits.shape[-1])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@pytest.fixture
def forwards(request):
    made: list[Forwards] = []

    def watch(*members) -> Forwards:
        made.append(Forwards(members))
        return made[-1]

    yield watch
    for f in made:
        f.remove()


def _budget(member, rows: int, extra: int) -> int:
    """A bound that fits at least ``rows`` of the prompts (each plus ``extra`` tokens) per group, with
    logits for at least ``rows`` rows."""
    return max(LOGIT_SHARE * rows, rows * (max(len(member.encode_prompt(p)) for p in PROMPTS) + extra))


# ---- the setting and the packing ------------------------------------------------------------------
def test_the_setting_is_validated_with_its_name_and_value(bpe_member, sp_member):
    for bad in (0, -5, 2.5, True, "8"):
        with pytest.raises(ValueError, match=f"max_batch_tokens must be an integer >= 1, got {bad!r}"):
            check_batch_tokens(bad)
    with pytest.raises(ValueError, match="max_batch_tokens must be an integer >= 1, got 0"):
        Single(bpe_member, max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_batch_tokens must be an integer >= 1, got -1"):
        DeePEn([bpe_member, sp_member], max_batch_tokens=-1)
    with pytest.raises(ValueError, match="max_batch_tokens must be an integer >= 1, got None"):
        SpecFuse([bpe_member, sp_member], max_batch_tokens=None)
    assert Single(bpe_member).max_batch_tokens == MAX_BATCH_TOKENS
    assert logit_rows(MAX_BATCH_TOKENS) == MAX_BATCH_TOKENS // LOGIT_SHARE and logit_rows(1) == 1


def test_pack_keeps_order_and_both_bounds():
    lengths = [100, 300, 50, 1000, 80, 80, 80, 80]
    groups = pack(lengths, 640)  # logit_rows(640) == 10: only the area binds here
    assert groups == [[0, 1], [2], [3], [4, 5, 6, 7]]  # [0, 1, 2] would pad to 3 x 300; 1000 is alone
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 640 or len(g) == 1
    assert pack([], 640) == []
    # widths: an item of 3 rows counts 3 times its length
    assert pack([100, 100, 100], 640, widths=[3, 3, 1]) == [[0, 1], [2]]
    # logits: at most logit_rows(256) == 4 per group (default: one per row); an item over it is alone
    assert pack([1] * 10, 256) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert pack([1, 1, 1], 256, logits=[3, 2, 9]) == [[0], [1], [2]]


# ---- scoring ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [UNLIMITED, 400, 64 * 3, 64])
def test_score_within_the_bound_equals_one_forward_and_the_uncached_oracle(any_member, forwards, budget):
    m = any_member
    state = m.start(PROMPTS[:4])
    conts = [[m.encode_text(c) for c in cs] for cs in CHOICES[:4]]
    conts[2].append(m.encode_text(" and then the cat sat on the mat by the river, happy and warm"))  # sliced
    before = (state.logits.clone(), [list(i) for i in state.ids], list(state.calls), list(state.tokens_in))
    whole = m.score(state, conts, max_batch_tokens=UNLIMITED)
    seen = forwards(m)
    state.calls, state.tokens_in = list(before[2]), list(before[3])
    got = m.score(state, conts, max_batch_tokens=budget)
    width = state.mask.shape[1]
    for b, prompt in enumerate(PROMPTS[:4]):
        for c, toks in enumerate(conts[b]):
            assert got[b][c].shape == (len(toks),)
            torch.testing.assert_close(got[b][c], whole[b][c], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[b][c], logprobs_uncached(m, m.encode_prompt(prompt), toks),
                                       atol=2e-4, rtol=1e-4)
    assert max(seen.logits) <= logit_rows(budget)
    longest = max(width + len(t) - 1 for cs in conts for t in cs)
    assert max(seen.areas) <= max(budget, longest)
    if budget < UNLIMITED:
        assert len(seen.areas) > 1
    # the state is as it was; one call per row with candidates, however many forwards
    torch.testing.assert_close(state.logits, before[0], atol=0, rtol=0)
    assert state.ids == before[1]
    assert state.calls == [c + 1 for c in before[2]]
    assert state.tokens_in == [t + sum(len(x) - 1 for x in cs) for t, cs in zip(before[3], conts)]


# ---- fusers -----------------------------------------------------------------------------------------
def _same_generation(a, b) -> None:
    assert [o.text for o in a] == [o.text for o in b] and all(o.text for o in a)
    assert [(o.token_count, o.finish_reason) for o in a] == [(o.token_count, o.finish_reason) for o in b]
    for x, y in zip(a, b):
        for sx, sy in zip(x.member_stats, y.member_stats):
            assert (sx.name, sx.calls, sx.tokens_in, sx.tokens_out, sx.agreement) == \
                (sy.name, sy.calls, sy.tokens_in, sy.tokens_out, sy.agreement)
            assert sx.mean_kl == pytest.approx(sy.mean_kl, abs=1e-5)


def _same_labels(a, b, atol: float = 1e-5) -> None:
    assert [o.label for o in a] == [o.label for o in b]
    for x, y in zip(a, b):
        assert x.probs == pytest.approx(y.probs, abs=atol, rel=0)
        for sx, sy in zip(x.member_stats, y.member_stats):
            assert (sx.name, sx.calls, sx.tokens_in, sx.tokens_out) == (sy.name, sy.calls, sy.tokens_in, sy.tokens_out)


def test_single_generate_in_groups_equals_one_batch(any_member, forwards):
    budget = _budget(any_member, 3, GREEDY.max_new_tokens)
    sampled = [GREEDY.with_(temperature=0.9, top_p=0.95, seed=s) if s % 2 else GREEDY for s in range(len(PROMPTS))]
    whole = [Single(any_member, max_batch_tokens=UNLIMITED).generate(PROMPTS, p) for p in (GREEDY, sampled)]
    seen = forwards(any_member)
    grouped = [Single(any_member, max_batch_tokens=budget).generate(PROMPTS, p) for p in (GREEDY, sampled)]
    for a, b in zip(grouped, whole):
        _same_generation(a, b)
    assert max(seen.areas) <= budget and max(seen.logits) <= logit_rows(budget)
    assert 1 < max(seen.logits) < len(PROMPTS)  # groups of several rows, not all at once


def test_single_label_in_groups_equals_one_batch(any_member, forwards):
    budget = _budget(any_member, 3, 8)
    whole = Single(any_member, max_batch_tokens=UNLIMITED).label(PROMPTS, CHOICES)
    seen = forwards(any_member)
    grouped = Single(any_member, max_batch_tokens=budget).label(PROMPTS, CHOICES)
    _same_labels(grouped, whole)
    assert max(seen.areas) <= budget and max(seen.logits) <= logit_rows(budget)
    assert sum(1 for n in seen.logits if n) > 3  # several groups and scoring forwards


def test_deepen_in_groups_equals_one_batch(bpe_member, bpe_member_qwen, sp_member, forwards):
    members = [bpe_member_qwen, sp_member, bpe_member]
    budget = 2 * max(_budget(m, 1, 16) for m in members)
    whole = DeePEn(members, max_batch_tokens=UNLIMITED)
    want = whole.generate(PROMPTS, GREEDY), whole.label(PROMPTS, CHOICES)
    seen = forwards(*members)
    grouped = DeePEn(members, max_batch_tokens=budget)
    _same_generation(grouped.generate(PROMPTS, GREEDY), want[0])
    # the search is AdamW on the fused rows: the last bits of its inputs move the probabilities a
    # little more (as in test_deepen's batch independence, 1e-4)
    _same_labels(grouped.label(PROMPTS, CHOICES), want[1], atol=1e-4)
    # label holds one state row per choice: a row's choices are never split
    assert 1 < max(seen.logits) <= max(logit_rows(budget), max(map(len, CHOICES)))


def test_specfuse_in_groups_equals_one_batch(bpe_member, bpe_member_qwen, sp_member, forwards):
    members = [bpe_member, bpe_member_qwen, sp_member]
    budget = 2 * max(_budget(m, 1, 16) for m in members)
    whole = SpecFuse(members, segment_tokens=4, exit=False, max_batch_tokens=UNLIMITED)
    want = whole.generate(PROMPTS, GREEDY), whole.label(PROMPTS, CHOICES)
    seen = forwards(*members)
    grouped = SpecFuse(members, segment_tokens=4, exit=False, max_batch_tokens=budget)
    got = grouped.generate(PROMPTS, GREEDY)
    assert [o.text for o in got] == [o.text for o in want[0]] and all(o.text for o in got)
    for x, y in zip(got, want[0]):
        assert (x.token_count, x.finish_reason) == (y.token_count, y.finish_reason)
        for sx, sy in zip(x.member_stats, y.member_stats):
            assert (sx.calls, sx.tokens_in, sx.proposed, sx.accepted) == (sy.calls, sy.tokens_in, sy.proposed, sy.accepted)
            assert sx.mean_score == pytest.approx(sy.mean_score, abs=1e-5)
    _same_labels(grouped.label(PROMPTS, CHOICES), want[1])
    assert 1 < max(seen.logits) <= logit_rows(budget)
