"""Integration: the packaged real members (different vocabularies) through Member and Single."""
import pytest

from ensemble import DecodeParams, Single, load_member
from ensemble.reference import greedy_uncached, logprobs_uncached

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_member("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def qwen():
    return load_member("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="module")
def gemma():
    return load_member("gemma3-270m")


def test_chat_members_answer_france(smol, qwen):
    for m in (smol, qwen):
        out = Single(m).generate(["What is the capital of France?"], DecodeParams(max_new_tokens=16))[0]
        assert "Paris" in out.text, (m.name, out.text)
        assert out.member_stats[0].calls == out.token_count + (out.finish_reason.value == "stop")


def test_real_cached_equals_uncached_and_batch_independent(smol, gemma):
    prompts = ["What is the capital of France?", "Name three primary colors, please, and explain why."]
    for m in (smol, gemma):
        single = Single(m)
        batched = single.generate(prompts, DecodeParams(max_new_tokens=8))
        for p, out in zip(prompts, batched):
            ref = greedy_uncached(m, p, 8)
            assert ref and (out.text, out.token_count) == (m.decode(ref), len(ref))


def test_gemma_base_completes_plain_prompt(gemma):
    assert not gemma.has_chat_template
    ids = gemma.encode_prompt("The capital of France is")
    assert ids[0] == gemma.tokenizer.bos_token_id  # base model needs its BOS
    out = Single(gemma).generate(["The capital of France is"], DecodeParams(max_new_tokens=8))[0]
    words = out.text.split()
    assert len(words) >= 4 and len(set(words)) >= len(words) / 2, out.text  # not "and and and ..."
    assert "France" in out.text or "Paris" in out.text, out.text


def test_label_with_real_member(smol):
    out = Single(smol).label(["Is fire hot? Answer yes or no."], [["yes", "no"]])[0]
    assert out.label == "yes" and out.probs[0] > out.probs[1]


def test_gemma_within_a_small_memory_bound_equals_one_batch(gemma):
    """Bounded memory on the 262k-vocabulary member: a small max_batch_tokens (groups of 2 rows, logits
    for 2 positions at a time, a long choice fed in slices) gives the texts and labels of one batch,
    probabilities within 1e-5 (float rounding of other batch shapes), and the choices' log-probabilities
    of the uncached oracle."""
    prompts = ["The capital of France is", "Water boils at a temperature of", "The largest planet is",
               "Photosynthesis turns light into"]
    choices = [["Paris", "Rome", "Berlin", "a city on the river Seine in the north of the country"],
               ["100 degrees Celsius", "0 degrees", "50 degrees", "minus ten"],
               ["Jupiter", "Mars", "Earth", "Venus"], ["chemical energy", "sound", "heat", "wind"]]
    small, whole = Single(gemma, max_batch_tokens=128), Single(gemma, max_batch_tokens=10**9)
    params = DecodeParams(max_new_tokens=6)
    a, b = small.generate(prompts, params), whole.generate(prompts, params)
    assert [o.text for o in a] == [o.text for o in b] and all(o.text for o in a)
    la, lb = small.label(prompts, choices), whole.label(prompts, choices)
    assert [o.label for o in la] == [o.label for o in lb]
    for x, y in zip(la, lb):
        assert x.probs == pytest.approx(y.probs, abs=1e-5, rel=0)
    state = gemma.start(prompts[:1])
    conts = [[gemma.encode_text(c) for c in choices[0]]]
    for toks, lp in zip(conts[0], gemma.score(state, conts, max_batch_tokens=128)[0]):
        ref = logprobs_uncached(gemma, gemma.encode_prompt(prompts[0]), toks)
        assert lp.shape == ref.shape and float((lp - ref).abs().max()) < 1e-3
