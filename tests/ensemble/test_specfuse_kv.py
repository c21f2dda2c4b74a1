"""SpecFuse's KV reuse and compaction (issue 17, point 3) on tiny real models: the old rounds
(kv_reuse=False, kv_compact=False) are the oracle; greedy outputs are token for token identical,
fewer forwards and fewer tokens fed per member-round.

The Gemma member gets a sliding window wider than any row here, as gemma3-270m's 512 is for the
job's usual rows: ``transformers`` counts the window in cache slots (padding and dead slots
included), the old rounds keep more of them, so past the window the old rounds see fewer live
tokens than the new ones (docs/algorithms.md, SpecFuse: KV reuse and compaction)."""
import pytest

from ensemble import DecodeParams
from ensemble.fusers.specfuse import SpecFuse
from tests import tiny

PROMPTS = ["What is the capital of France?", "Hi", "東京 café 🙂", "Once upon a time there was a small cat.",
           "def add(a, b):", "Answer yes or no. Is fire hot?"]
SETTINGS = [dict(kv_reuse=r, kv_compact=c) for r in (False, True) for c in (False, True)]


def wide_window(member, window: int = 512):
    """``member`` (a fresh one: this changes its model) with a sliding window of ``window`` slots."""
    member.model.config.sliding_window = window
    for layer in member.model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = window
    return member


@pytest.fixture(scope="module")
def mixed(bpe_member, bpe_member_qwen):
    return [bpe_member, bpe_member_qwen, wide_window(tiny.member_sp())]


class Counter:
    """Forward passes per member (model pre-hooks) and member-rounds (propose calls) of one fuser."""

    def __init__(self, fuser: SpecFuse):
        self.forwards = [0] * len(fuser.members)
        self.rounds = [0] * len(fuser.members)
        propose = fuser._propose

        def counted(i, state, rows):
            self.rounds[i] += 1
            return propose(i, state, rows)

        fuser._propose = counted
        self.hooks = [m.model.register_forward_pre_hook(lambda *_, i=i: self._count(i))
                      for i, m in enumerate(fuser.members)]

    def _count(self, i: int) -> None:
        self.forwards[i] += 1

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def run(members, settings, params, **config):
    fuser = SpecFuse(members, **config, **settings)
    counter = Counter(fuser)
    try:
        outs = fuser.generate(PROMPTS, params)
    finally:
        counter.close()
    return outs, counter


@pytest.mark.parametrize("config", [dict(segment_tokens=5, exit=False), dict(segment_tokens=10),
                                    dict(segment_tokens=3, self_score=False)])
def test_compaction_and_reuse_leave_greedy_outputs_unchanged(mixed, config):
    params = DecodeParams(max_new_tokens=28)
    base, _ = run(mixed, SETTINGS[0], params, **config)
    assert sum(bool(o.text) for o in base) >= len(PROMPTS) - 1
    for settings in SETTINGS[1:]:
        outs, _ = run(mixed, settings, params, **config)
        assert [o.text for o in outs] == [o.text for o in base], settings
        for a, b in zip(base, outs):
            assert (b.token_count, b.finish_reason) == (a.token_count, a.finish_reason)
            for sa, sb in zip(a.member_stats, b.member_stats):
                assert (sb.calls, sb.proposed, sb.accepted, sb.tokens_out, sb.rounds_active, sb.exit_round) == \
                       (sa.calls, sa.proposed, sa.accepted, sa.tokens_out, sa.rounds_active, sa.exit_round)
                assert sb.mean_score == pytest.approx(sa.mean_score, abs=1e-5)


def test_two_members_of_one_vocabulary_and_a_lone_member(bpe_member):
    twin = tiny.member_bpe(seed=5, name="tiny-bpe-5")
    params = DecodeParams(max_new_tokens=24)
    for members in ([bpe_member, twin], [twin]):
        base, _ = run(members, SETTINGS[0], params, segment_tokens=4)
        outs, _ = run(members, SETTINGS[-1], params, segment_tokens=4)
        assert [o.text for o in outs] == [o.text for o in base] and any(o.text for o in base)


def test_reuse_saves_forwards_and_fed_tokens_per_member_round(mixed):
    params = DecodeParams(max_new_tokens=28)
    base, old = run(mixed, SETTINGS[0], params, segment_tokens=6, exit=False)
    outs, new = run(mixed, SETTINGS[-1], params, segment_tokens=6, exit=False)
    assert [o.text for o in outs] == [o.text for o in base]
    assert new.rounds == old.rounds
    # a member skips its broadcast forward in rounds where every row revives its slots, never adds one
    assert all(n <= o for n, o in zip(new.forwards, old.forwards)) and sum(new.forwards) < sum(old.forwards)
    fed = [sum(o.member_stats[k].tokens_in for o in outs) for k in range(len(mixed))]
    fed_old = [sum(o.member_stats[k].tokens_in for o in base) for k in range(len(mixed))]
    assert all(n < o for n, o in zip(fed, fed_old))


def test_one_row_of_one_vocabulary_skips_the_losers_broadcast_forward(bpe_member):
    """Batch 1, one vocabulary: the winner's tokens are always in the other member's scored slots."""
    twin = tiny.member_bpe(seed=5, name="tiny-bpe-5")
    params = DecodeParams(max_new_tokens=24)
    fuser = SpecFuse([bpe_member, twin], segment_tokens=4, exit=False)
    counter = Counter(fuser)
    try:
        out = fuser.generate([PROMPTS[0]], params)[0]
    finally:
        counter.close()
    base = SpecFuse([bpe_member, twin], segment_tokens=4, exit=False, kv_reuse=False, kv_compact=False)
    old = Counter(base)
    try:
        want = base.generate([PROMPTS[0]], params)[0]
    finally:
        old.close()
    assert out.text == want.text
    rounds = out.member_stats[0].rounds_active
    # old: a broadcast forward per member after every round but the last; new: the loser of a round
    # revives the winner's scored tokens (no forward), the winner its draft (a forward only for a
    # last draft token it never fed)
    assert all(o >= n for o, n in zip(old.forwards, counter.forwards))
    assert sum(old.forwards) - sum(counter.forwards) >= rounds - 1 > 0
    assert sum(o.tokens_in for o in out.member_stats) < sum(o.tokens_in for o in want.member_stats)
