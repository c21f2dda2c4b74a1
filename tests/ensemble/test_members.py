"""Member and Single on tiny real transformers models: cached vs uncached, batched vs alone,
rollback, scoring, sampling determinism, stops and labels."""
import math
import warnings

import pytest
import torch

from ensemble import DecodeParams, Single
from ensemble.reference import greedy_uncached, logprobs_uncached, next_logits_uncached
from ensemble.labeling import LabelParams
from ensemble.scoring import continuation_ids

PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Once upon a time there was a small cat who lived in a big house near the river. Tell me more.",
    "東京 café 🙂",
]


def test_cached_greedy_equals_uncached(any_member):
    single = Single(any_member)
    for prompt in PROMPTS:
        out = single.generate([prompt], DecodeParams(max_new_tokens=12))[0]
        ref = greedy_uncached(any_member, prompt, 12)
        assert out.token_count == len(ref) > 0
        assert out.text == any_member.decode(ref)


def test_batched_equals_alone(any_member):
    single = Single(any_member)
    batched = single.generate(PROMPTS, DecodeParams(max_new_tokens=10))
    alone = [single.generate([p], DecodeParams(max_new_tokens=10))[0] for p in PROMPTS]
    assert [o.text for o in batched] == [o.text for o in alone]
    assert all(o.text for o in batched)


def test_rollback_matches_clean_forward(any_member):
    m = any_member
    state = m.start(PROMPTS[:2])
    a, b = m.encode_text(" Paris is"), m.encode_text(" cat")
    m.feed(state, [a, b])
    m.feed(state, [[5, 6, 7], [8]])  # tokens to discard, different counts per row
    m.feed(state, [m.encode_text(" Rome"), []], rollback=[3, 1])  # row 1: rollback only
    p0, p1 = m.encode_prompt(PROMPTS[0]), m.encode_prompt(PROMPTS[1])
    want0 = next_logits_uncached(m, p0 + a + m.encode_text(" Rome"))
    want1 = next_logits_uncached(m, p1 + b)
    torch.testing.assert_close(state.logits[0], want0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(state.logits[1], want1, atol=2e-4, rtol=1e-4)
    assert state.ids[1] == p1 + b


def test_score_matches_uncached(any_member):
    m = any_member
    state = m.start(PROMPTS[:2])
    conts = [[m.encode_text(" Paris"), m.encode_text(" Rome is nice")], [m.encode_text(" yes")]]
    before = state.logits.clone()
    got = m.score(state, conts)
    for b, prompt in enumerate(PROMPTS[:2]):
        for c, toks in enumerate(conts[b]):
            want = logprobs_uncached(m, m.encode_prompt(prompt), toks)
            torch.testing.assert_close(got[b][c], want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(state.logits, before)  # scoring leaves the state as it was


def test_sampling_depends_only_on_seed(bpe_member):
    single = Single(bpe_member)
    p = DecodeParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    alone = single.generate([PROMPTS[0]], p)[0].text
    in_batch = single.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [p.with_(seed=1), p, p.with_(seed=3)])[1].text
    assert alone == in_batch and alone
    others = {single.generate([PROMPTS[0]], p.with_(seed=s))[0].text for s in range(5)}
    assert len(others) > 1, "different seeds should give different samples"


def test_max_new_tokens_and_stop_strings(bpe_member):
    single = Single(bpe_member)
    full = single.generate([PROMPTS[0]], DecodeParams(max_new_tokens=20))[0]
    short = single.generate([PROMPTS[0]], DecodeParams(max_new_tokens=3))[0]
    assert short.token_count == 3 and short.finish_reason.value == "length"
    assert full.text.startswith(short.text)
    text = full.text
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    cut = single.generate([PROMPTS[0]], DecodeParams(max_new_tokens=20, stop=(stop, "never seen")))[0]
    assert cut.finish_reason.value == "stop" and cut.text == text[: text.index(stop)]
    ref = greedy_uncached(bpe_member, PROMPTS[0], 20)  # the row stops on the first token completing the stop
    assert cut.token_count == next(n for n in range(1, 21) if stop in bpe_member.decode(ref[:n]))


def test_no_deprecation_warnings_from_transformers(bpe_member):
    """The KV cache goes through the current ``cache`` argument (no FutureWarning per forward)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        Single(bpe_member).generate(PROMPTS[:2], DecodeParams(max_new_tokens=3))
        state = bpe_member.start(PROMPTS[:1])
        bpe_member.score(state, [[bpe_member.encode_text(" yes")]])


def test_eos_stops_row(bpe_member):
    m = bpe_member
    single = Single(m)
    eos = next(iter(m.eos_ids))
    bias = torch.zeros(m.vocab_size)
    bias[eos] = 1e4
    head = m.model.get_output_embeddings()
    old = head.bias
    head.bias = torch.nn.Parameter(bias)
    try:
        out = single.generate(["Hi"], DecodeParams(max_new_tokens=5))[0]
    finally:
        head.bias = old
    assert out.finish_reason.value == "stop" and out.token_count == 0 and out.text == ""


def test_label_probabilities(any_member):
    m = any_member
    single = Single(m)
    choices = [["yes", "no", "maybe so"], ["Paris", "Rome"]]
    prompts = ["Is fire hot? Answer yes or no.", "Capital of France?"]
    outs = single.label(prompts, choices, params=LabelParams(norm="token"))
    for prompt, cs, out in zip(prompts, choices, outs):
        assert math.isclose(sum(out.probs), 1.0, rel_tol=1e-6)
        # norm 'token': mean log-prob of the continuation (" " + choice without a chat template)
        means = [float(logprobs_uncached(m, m.encode_prompt(prompt), continuation_ids(m, c, LabelParams())).mean())
                 for c in cs]
        want = torch.softmax(torch.tensor(means), 0).tolist()
        assert out.probs == pytest.approx(want, abs=1e-4)
        assert out.label == cs[max(range(len(cs)), key=lambda i: want[i])]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"seed": -3}, "seed must be an integer in [0, 2**63-1], got -3"),
        ({"stop": "x"}, "stop must be a tuple of non-empty strings"),
    ],
)
def test_decode_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        DecodeParams(**kwargs)


def test_system_message_is_used(bpe_member, sp_member):
    for m in (bpe_member, sp_member):
        with_sys = m.encode_prompt("Hi", system="Be brief.")
        assert m.decode(with_sys).count("Be brief.") == 1
        assert len(with_sys) > len(m.encode_prompt("Hi"))
