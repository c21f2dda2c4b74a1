"""SpecFuse on the packaged real members (slow): real tokenizers with really different vocabularies
(byte-level BPE 49k and 152k, SentencePiece 262k), chat templates and a base model."""
import math

import pytest

from ensemble import DecodeParams, Single, load_member
from ensemble.fusers.specfuse import SpecFuse

pytestmark = pytest.mark.slow

TRIO = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"]


@pytest.fixture(scope="module")
def trio():
    return [load_member(name) for name in TRIO]


def test_one_real_member_reproduces_its_greedy_output(trio):
    smol = trio[0]
    prompt = "What is the capital of France?"
    want = Single(smol).generate([prompt], DecodeParams(max_new_tokens=16))[0]
    got = SpecFuse([smol], segment_tokens=5).generate([prompt], DecodeParams(max_new_tokens=16))[0]
    assert got.text == want.text and got.token_count == want.token_count > 0


def test_generate_with_the_packaged_trio(trio):
    prompts = ["What is the capital of France?", "Question: What is 3 + 4?\nAnswer:"]
    outs = SpecFuse(trio, segment_tokens=8, exit=False).generate(prompts, DecodeParams(max_new_tokens=16))
    assert "Paris" in outs[0].text
    for out in outs:
        assert out.text.strip() and "\ufffd" not in out.text and 0 < out.token_count <= 16
        rounds = out.member_stats[0].rounds_active
        assert sum(s.accepted for s in out.member_stats) == rounds
        assert all(s.calls == 2 * rounds and s.rounds_active == rounds for s in out.member_stats)
        assert math.isclose(sum(s.mean_score for s in out.member_stats), 1.0, rel_tol=1e-6)


def test_label_with_the_packaged_trio(trio):
    out = SpecFuse(trio).label(["What is the capital of France?"], [["Paris", "Berlin", "a green banana"]])[0]
    assert math.isclose(sum(out.probs), 1.0, rel_tol=1e-6)
    assert out.label == "Paris" and out.probs[0] > out.probs[2]


def test_kv_reuse_and_compaction_leave_greedy_outputs_unchanged(trio):
    """Issue 17, point 3: the old rounds (no reuse, no compaction) are the oracle."""
    prompts = ["What is the capital of France?", "Question: What is 3 + 4?\nAnswer:", "Write a haiku about the sea."]
    params = DecodeParams(max_new_tokens=32)
    old = SpecFuse(trio, segment_tokens=8, kv_reuse=False, kv_compact=False).generate(prompts, params)
    new = SpecFuse(trio, segment_tokens=8).generate(prompts, params)
    assert [o.text for o in new] == [o.text for o in old] and all(o.text for o in old)
    for a, b in zip(old, new):
        assert (b.token_count, b.finish_reason) == (a.token_count, a.finish_reason)
        assert [(s.calls, s.rounds_active, s.exit_round) for s in b.member_stats] == \
               [(s.calls, s.rounds_active, s.exit_round) for s in a.member_stats]
        # two members proposing the same text tie up to float noise (the scores differ in their last
        # bits between the two scoring paths): the credit may go to either, the text is the same
        assert sum(s.accepted for s in b.member_stats) == sum(s.accepted for s in a.member_stats)
        # shared verification feeds a candidate's last token too (its KV is what a reviving member keeps):
        # one more token per candidate scored, won back by every broadcast that revives instead of re-feeding
        scored = sum(s.rounds_active for s in a.member_stats) * (len(trio) - 1)
        assert sum(s.tokens_in for s in b.member_stats) <= sum(s.tokens_in for s in a.member_stats) + scored
    assert sum(s.tokens_in for o in new for s in o.member_stats) < sum(s.tokens_in for o in old for s in o.member_stats)
