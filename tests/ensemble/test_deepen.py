"""DeePEn on tiny real transformers members with different tokenizers (byte-level BPE with two
vocabularies, SentencePiece with byte fallback): the invariants of docs/algorithms.md, the
cached incremental broadcast against the uncached re-encoding oracle, labeling, stops and config."""
import logging
import re

import pytest
import torch

from ensemble import DecodeParams, Single
from ensemble.fusers.deepen import DeePEn, DeePEnConfig, _Rows
from ensemble.labeling import CHOICE_NORMS, LabelParams
from ensemble.members import Member
from ensemble.reference import logprobs_uncached, next_logits_uncached
from ensemble.scoring import continuation_ids
from ensemble.text import complete_utf8_prefix

PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Once upon a time there was a small cat who lived in a big house near the river. Tell me more.",
    "東京 café 🙂",
]
GREEDY = DecodeParams(max_new_tokens=10)


def _ids(_, outs):
    return [o.text for o in outs], [o.token_count for o in outs]


def _copy(m: Member, name: str) -> Member:
    return Member(m.model, m.tokenizer, name=name)


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_two_copies_reproduce_the_member(which, bpe_member, sp_member):
    m = bpe_member if which == "bpe" else sp_member
    alone = Single(m).generate(PROMPTS, GREEDY)
    assert all(o.token_count > 0 for o in alone)  # the comparison below is not between empty outputs
    for weights in (None, (0.3, 0.7)):
        fused = DeePEn([m, _copy(m, "copy")], weights=weights).generate(PROMPTS, GREEDY)
        assert _ids(None, fused) == _ids(None, alone)
        for o in fused:  # the copy always agrees with the fused token and sits on the aggregate
            assert [s.agreement for s in o.member_stats] == [1.0, 1.0]
            assert o.member_stats[1].mean_kl == 0.0
            assert o.member_stats[1].tokens_out == o.token_count


def test_main_only_weights_and_zero_lr_reproduce_the_main(bpe_member, bpe_member_qwen, sp_member):
    want_bpe = _ids(None, Single(bpe_member).generate(PROMPTS, GREEDY))
    want_sp = _ids(None, Single(sp_member).generate(PROMPTS, GREEDY))
    assert all(want_bpe[1]) and all(want_sp[1])  # every reference output has tokens
    assert _ids(None, DeePEn([bpe_member, sp_member], weights=(1, 0)).generate(PROMPTS, GREEDY)) == want_bpe
    assert _ids(None, DeePEn([bpe_member, sp_member], main=1, weights=(0, 1)).generate(PROMPTS, GREEDY)) == want_sp
    trio = [sp_member, bpe_member, bpe_member_qwen]
    assert _ids(None, DeePEn(trio, lr=0.0).generate(PROMPTS, GREEDY)) == want_sp
    # ... while the ensemble proper decodes what the uncached oracle decodes, which is not the main's output
    fuser = DeePEn([bpe_member, bpe_member_qwen, sp_member])
    oracle = [fuser.greedy_uncached(p, GREEDY.max_new_tokens) for p in PROMPTS]
    fused = _ids(None, fuser.generate(PROMPTS, GREEDY))
    assert fused == ([fuser.main.decode(ids) for ids in oracle], [len(ids) for ids in oracle])
    assert any(text != alone for text, alone in zip(fused[0], want_bpe[0]))


@pytest.mark.parametrize("main", [0, 2])
def test_cached_incremental_equals_uncached_oracle(main, bpe_member, bpe_member_qwen, sp_member):
    """KV-cached batched decoding with tail re-tokenisation and rollback makes the same choices as
    re-encoding every member's whole sequence each step (multi-byte text, stray bytes, byte fallback)."""
    fuser = DeePEn([bpe_member, bpe_member_qwen, sp_member], main=main)
    outs = fuser.generate(PROMPTS, DecodeParams(max_new_tokens=12))
    for prompt, out in zip(PROMPTS, outs):
        ref = fuser.greedy_uncached(prompt, 12)
        assert out.token_count == len(ref) > 0
        assert out.text == fuser.main.decode(ref)


def test_prompt_output_does_not_depend_on_the_batch(bpe_member, bpe_member_qwen, sp_member):
    fuser = DeePEn([bpe_member_qwen, sp_member, bpe_member])
    batched = fuser.generate(PROMPTS, GREEDY)
    alone = [fuser.generate([p], GREEDY)[0] for p in PROMPTS]
    assert [o.text for o in batched] == [o.text for o in alone] and all(o.text for o in alone)
    p = DecodeParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    one = fuser.generate([PROMPTS[2]], p)[0].text
    mixed = fuser.generate(PROMPTS, [p.with_(seed=1), GREEDY, p, p.with_(seed=3)])[2].text
    assert one == mixed and one
    seeds = {fuser.generate([PROMPTS[2]], p.with_(seed=s))[0].text for s in range(4)}
    assert len(seeds) > 1


def test_broadcast_follows_multibyte_newlines_and_byte_fallback(bpe_member, bpe_member_qwen, sp_member):
    """Push a text through the broadcast one main (SentencePiece, byte fallback) token at a time: every
    other member's live tokens equal its own encoding of the text, and its logits a clean forward."""
    fuser = DeePEn([sp_member, bpe_member, bpe_member_qwen])
    text = "東京\nnaïve café 🙂\n\n  def add(a, b):\n\treturn a + b ½"
    toks = sp_member.encode_text(text)
    assert any(sp_member.tokenizer.convert_ids_to_tokens(t).startswith("<0x") for t in toks)
    prompt = "Hi"
    states = [m.start([prompt]) for m in fuser.members]
    rows, live = _Rows(fuser, 1), [0]
    for t in toks:
        feeds, rbs = [[] for _ in fuser.members], [[] for _ in fuser.members]
        fuser._broadcast(rows, 0, t, feeds, rbs)
        states, live = fuser._advance(states, live, [0], feeds, rbs)
    assert rows.resp[0] == text.encode()
    for m, s in zip(fuser.members, states):
        want = m.encode_prompt(prompt) + m.encode_text(text)
        assert s.ids[0] == want, m.name
        torch.testing.assert_close(s.logits[0], next_logits_uncached(m, want), atol=2e-4, rtol=1e-4)
        assert "<0x" not in m.decode(s.response_ids(0))


def test_stops_budget_and_statistics(bpe_member, sp_member):
    fuser = DeePEn([bpe_member, sp_member])
    full = fuser.generate([PROMPTS[0]], DecodeParams(max_new_tokens=16))[0]
    assert full.token_count == 16 and full.finish_reason.value == "length"
    short = fuser.generate([PROMPTS[0]], DecodeParams(max_new_tokens=4))[0]
    assert full.text.startswith(short.text) and short.token_count == 4
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    cut = fuser.generate([PROMPTS[0]], DecodeParams(max_new_tokens=16, stop=(stop,)))[0]
    assert cut.finish_reason.value == "stop" and cut.text == full.text[: full.text.index(stop)]
    main, other = full.member_stats
    assert (main.role, other.role, main.weight) == ("main", "member", 0.5)
    assert main.tokens_out == 16
    ids = fuser.greedy_uncached(PROMPTS[0], 16)  # the oracle's main ids of this response
    assert bpe_member.decode(ids) == full.text
    followed = complete_utf8_prefix(b"".join(bpe_member.codec.token_bytes(t) for t in ids))
    assert other.tokens_out == len(sp_member.encode_text(followed.decode("utf-8", errors="replace")))  # its own tokenisation
    assert main.calls == 16 and 1 <= other.calls <= 16  # one prefill + one forward per step, at most
    assert main.tokens_in == len(bpe_member.encode_prompt(PROMPTS[0])) + 15
    assert other.tokens_in >= len(sp_member.encode_prompt(PROMPTS[0]))
    assert 0.0 <= other.agreement <= 1.0 and other.mean_kl > 0.0


def test_eos_policy_any_stops_on_another_members_eos(bpe_member, bpe_member_qwen):
    other = _copy(bpe_member_qwen, "q")
    first = int(other.start([PROMPTS[0]]).logits[0].argmax())
    other.eos_ids = frozenset({first})  # this member now "wants to stop" at once
    assert DeePEn([bpe_member, other]).generate([PROMPTS[0]], GREEDY)[0].token_count == 10
    out = DeePEn([bpe_member, other], eos_policy="any").generate([PROMPTS[0]], GREEDY)[0]
    assert (out.token_count, out.finish_reason.value, out.text) == (0, "stop", "")


@pytest.mark.parametrize("main", [0, 1])
def test_label_with_main_only_is_the_main_members_likelihood(main, bpe_member, sp_member):
    """Weights on the main only, lr 0, every token a candidate, norm 'sum': the fused probability of
    each choice is the main member's own sequence probability (sum of the log-probs of its scorer's
    continuation: the choice itself for the chat member, " " + choice for the completion one)."""
    prompts, choices = PROMPTS[:2], [["Paris", "Rome", "a big house"], ["yes", "no"]]
    m = [bpe_member, sp_member][main]
    fuser = DeePEn([bpe_member, sp_member], main=main, weights=(1 - main, main), lr=0.0, topk=10_000)
    got = fuser.label(prompts, choices, params=LabelParams(norm="sum"))
    for prompt, cs, out in zip(prompts, choices, got):
        scores = torch.tensor([float(logprobs_uncached(m, m.encode_prompt(prompt),
                                                       continuation_ids(m, c, LabelParams())).sum()) for c in cs])
        torch.testing.assert_close(torch.tensor(out.probs), torch.softmax(scores, 0).float(), atol=1e-4, rtol=1e-3)
        assert out.label == cs[int(scores.argmax())]


@pytest.mark.parametrize("norm", CHOICE_NORMS)
def test_label_with_main_only_is_singles_labeling(norm, bpe_member, sp_member):
    """Every norm goes through the one scorer: DeePEn with weights (1, 0) and lr 0 labels like the main
    member alone (norm 'pmi': the fused pass after the neutral context is the main member's too)."""
    prompts, choices = PROMPTS[:2], [["Paris", "Rome", "a big house"], ["yes", "no"]]
    params = LabelParams(norm=norm)
    got = DeePEn([bpe_member, sp_member], weights=(1, 0), lr=0.0, topk=10_000).label(prompts, choices, params=params)
    want = Single(bpe_member).label(prompts, choices, params=params)
    for g, w in zip(got, want):
        assert g.label == w.label
        torch.testing.assert_close(torch.tensor(g.probs), torch.tensor(w.probs), atol=1e-4, rtol=1e-3)
    with pytest.raises(TypeError, match="label_norm"):  # replaced by LabelParams.norm (--choice-norm)
        DeePEn([bpe_member, sp_member], label_norm="sum")


def test_label_is_batch_independent_and_reports_stats(bpe_member, bpe_member_qwen, sp_member):
    fuser = DeePEn([bpe_member, bpe_member_qwen, sp_member])
    prompts, choices = PROMPTS[:3], [["Paris", "Rome"], ["yes", "no", "maybe not"], ["The cat", "東京 🙂"]]
    batched = fuser.label(prompts, choices)
    for b, out in enumerate(batched):
        assert abs(sum(out.probs) - 1) < 1e-9 and out.label == choices[b][out.index]
        alone = fuser.label([prompts[b]], [choices[b]])[0]
        assert out.label == alone.label
        torch.testing.assert_close(torch.tensor(out.probs), torch.tensor(alone.probs), atol=1e-4, rtol=1e-3)
        for s in out.member_stats:
            assert s.calls >= 2 and s.tokens_in > 0 and s.mean_kl >= 0.0
        # the main member scores the choices itself (one call), then feeds every choice's tokens, one
        # per forward shared by the row's live choices
        lengths = [len(bpe_member.encode_text(c)) for c in choices[b]]
        main = out.member_stats[0]
        assert main.calls == max(lengths) + 1 and 3 <= out.member_stats[1].calls <= main.calls
        assert main.tokens_in == len(bpe_member.encode_prompt(prompts[b])) + 2 * sum(n - 1 for n in lengths)
        assert main.choice_tokens == lengths and len(main.choice_probs) == len(choices[b])


def test_dense_reference_path_runs_and_matches_at_lr_zero(bpe_member, sp_member):
    want = _ids(None, Single(bpe_member).generate(PROMPTS[:2], GREEDY))
    assert all(want[1])
    assert _ids(None, DeePEn([bpe_member, sp_member], lr=0.0, dense=True).generate(PROMPTS[:2], GREEDY)) == want
    dense = DeePEn([bpe_member, sp_member], dense=True)  # cached decoding on the dense engine = its uncached oracle
    oracle = [dense.greedy_uncached(p, GREEDY.max_new_tokens) for p in PROMPTS[:2]]
    assert _ids(None, dense.generate(PROMPTS[:2], GREEDY)) == ([dense.main.decode(i) for i in oracle], [len(i) for i in oracle])
    assert all(oracle)


def test_anchor_count_is_logged_and_too_few_is_an_error(bpe_member, sp_member, caplog):
    with caplog.at_level(logging.INFO, logger="ensemble.relative"):
        fuser = DeePEn([bpe_member, sp_member])
    found = [m for r in caplog.records
             if (m := re.search(r"DeePEn anchors: (\d+) .* \['tiny-bpe', 'tiny-sp'\]; using (\d+)", r.getMessage()))]
    assert len(found) == 1  # the count logged is the count in use: all shared tokens (no anchor_subset)
    assert int(found[0].group(1)) == int(found[0].group(2)) == len(fuser.anchor_strings) > 0
    with pytest.raises(ValueError, match=r"anchor tokens are shared by members \['tiny-bpe', 'tiny-sp'\].*min_anchors=5000"):
        DeePEn([bpe_member, sp_member], min_anchors=5000)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1), r"lr must be >= 0, got -1"),
    (dict(steps=-2), r"steps must be an integer >= 0, got -2"),
    (dict(topk=0), r"topk must be an integer >= 1, got 0"),
    (dict(top_mass=1.5), r"top_mass must be None or in \(0, 1\], got 1.5"),
    (dict(main_top_mass=0.0), r"main_top_mass must be None or in \(0, 1\], got 0.0"),
    (dict(row_store="bfloat16"), r"row_store must be one of \('float32', 'float16'\), got 'bfloat16'"),
    (dict(tau=0), r"tau must be > 0, got 0"),
    (dict(eos_policy="all"), r"eos_policy must be 'main' or 'any', got 'all'"),
    (dict(row_cache_size=-1), r"row_cache_size must be an integer >= 0, got -1"),
])
def test_config_errors_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeePEnConfig(**kwargs)


def test_member_level_errors(bpe_member, sp_member):
    with pytest.raises(ValueError, match=r"weights must be non-negative, got \[-0.5, 1.5\]"):
        DeePEn([bpe_member, sp_member], weights=(-0.5, 1.5))
    with pytest.raises(ValueError, match=r"weights must sum to 1 .*got \[0.5, 0.6\]"):
        DeePEn([bpe_member, sp_member], weights=(0.5, 0.6))
    with pytest.raises(ValueError, match=r"main must be in \[0, 2\), got 2"):
        DeePEn([bpe_member, sp_member], main=2)
