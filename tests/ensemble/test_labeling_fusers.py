"""The one choice scorer (ensemble/scoring.py) behind every fuser's label, on tiny real members: a chat
member (byte-level BPE with a chat template) and a completion-style one (SentencePiece, no template).

Invariants (issue 16): SpecFuse with one member is exactly Single, and DeePEn with two copies of one
member is Single within 1e-5, for every normalisation; each member's posterior is in its statistics;
the gate never / always."""
import math

import pytest

from ensemble import Single
from ensemble.fusers.deepen import DeePEn
from ensemble.fusers.specfuse import SpecFuse
from ensemble.labeling import CHOICE_NORMS, POOLS, LabelParams, pool, posterior, temper
from ensemble.members import Member
from ensemble.reference import logprobs_uncached
from ensemble.scoring import continuation_ids, score_choices

PROMPTS = ["Is fire hot? Answer yes or no.", "What is the capital of France?", "Tell me about the cat."]
CHOICES = [["yes", "no", "maybe so"], ["Paris", "Rome", "a big house near the river"], ["The cat", "東京 🙂"]]


def _copy(m: Member, name: str) -> Member:
    return Member(m.model, m.tokenizer, name=name)


@pytest.fixture(scope="module", params=["chat", "completion"])
def member(request, bpe_member, sp_member):
    return {"chat": bpe_member, "completion": sp_member}[request.param]


def test_completion_members_get_the_delimiter_and_chat_members_do_not(bpe_member, sp_member):
    assert bpe_member.has_chat_template and not sp_member.has_chat_template
    p = LabelParams()
    assert continuation_ids(bpe_member, "Paris", p) == bpe_member.encode_text("Paris")
    assert continuation_ids(sp_member, "Paris", p) == sp_member.encode_text(" Paris")
    assert sp_member.encode_text(" Paris") != sp_member.encode_text("Paris")
    assert continuation_ids(sp_member, "Paris", p.with_(target_delimiter="\n")) == sp_member.encode_text("\nParis")
    assert continuation_ids(bpe_member, "Paris", p.with_(target_delimiter="\n")) == bpe_member.encode_text("Paris")


@pytest.mark.parametrize("norm", CHOICE_NORMS)
def test_scores_are_the_continuations_log_probs(member, norm):
    """Each member's ChoiceScores against one clean forward per choice (pmi: also after the neutral
    context used as the prompt)."""
    params = LabelParams(norm=norm)
    got = score_choices(member, PROMPTS, CHOICES, params=params)
    neutral_prompt = member.encode_prompt(params.neutral_context)
    for prompt, cs, sc in zip(PROMPTS, CHOICES, got):
        ids = [continuation_ids(member, c, params) for c in cs]
        want = [float(logprobs_uncached(member, member.encode_prompt(prompt), t).sum()) for t in ids]
        assert list(sc.scores.logprob) == pytest.approx(want, abs=1e-4)
        assert sc.scores.tokens == tuple(map(len, ids)) and sc.scores.chars == tuple(map(len, cs))
        if norm == "pmi":
            neutral = [float(logprobs_uncached(member, neutral_prompt, t).sum()) for t in ids]
            assert list(sc.scores.neutral) == pytest.approx(neutral, abs=1e-4)
        else:
            assert sc.scores.neutral is None
        assert sc.calls == 2 and sc.tokens_in == len(member.encode_prompt(prompt)) + sum(len(t) - 1 for t in ids)


@pytest.mark.parametrize("norm", CHOICE_NORMS)
def test_single_labels_with_its_posterior_and_reports_it(member, norm):
    params = LabelParams(norm=norm)
    outs = Single(member).label(PROMPTS, CHOICES, params=params)
    for out, sc, cs in zip(outs, score_choices(member, PROMPTS, CHOICES, params=params), CHOICES):
        assert out.probs == posterior(sc.scores, norm) and out.label == cs[out.index] and not out.gated
        [st] = out.member_stats
        assert st.choice_probs == out.probs and st.choice_logprobs == list(sc.scores.logprob)
        assert st.choice_tokens == list(sc.scores.tokens)
        assert st.choice_neutral == (list(sc.scores.neutral) if norm == "pmi" else None)


@pytest.mark.parametrize("pool_kind", POOLS)
@pytest.mark.parametrize("norm", CHOICE_NORMS)
def test_specfuse_with_one_member_is_single(member, norm, pool_kind):
    params = LabelParams(norm=norm)
    want = Single(member).label(PROMPTS, CHOICES, params=params)
    got = SpecFuse([member], label_pool=pool_kind).label(PROMPTS, CHOICES, params=params)
    for g, w in zip(got, want):
        assert g.label == w.label
        assert g.probs == pytest.approx(w.probs, abs=1e-6)
        assert g.member_stats[0].choice_probs == w.member_stats[0].choice_probs


@pytest.mark.parametrize("norm", CHOICE_NORMS)
def test_deepen_with_two_copies_is_single(member, norm):
    params = LabelParams(norm=norm)
    want = Single(member).label(PROMPTS, CHOICES, params=params)
    for weights in (None, (0.3, 0.7)):
        got = DeePEn([member, _copy(member, "copy")], weights=weights).label(PROMPTS, CHOICES, params=params)
        for g, w in zip(got, want):
            assert g.label == w.label and not g.gated
            assert g.probs == pytest.approx(w.probs, abs=1e-5)
            for s in g.member_stats:  # each copy's own posterior is Single's
                assert s.choice_probs == pytest.approx(w.probs, abs=1e-6)


def test_specfuse_pools_the_members_posteriors(bpe_member, bpe_member_qwen, sp_member):
    members, weights = [bpe_member, bpe_member_qwen, sp_member], [0.5, 0.3, 0.2]
    for kind in POOLS:
        outs = SpecFuse(members, weights=weights, label_pool=kind).label(PROMPTS, CHOICES)
        for b, out in enumerate(outs):
            singles = [Single(m).label([PROMPTS[b]], [CHOICES[b]])[0].probs for m in members]
            posts = [s.choice_probs for s in out.member_stats]
            assert posts == [pytest.approx(p, abs=1e-6) for p in singles]
            if kind == "linear":
                want = [sum(w * p[c] for w, p in zip(weights, posts)) for c in range(len(CHOICES[b]))]
            else:
                raw = [math.prod(p[c] ** w for w, p in zip(weights, posts)) for c in range(len(CHOICES[b]))]
                want = [r / sum(raw) for r in raw]
            assert out.probs == pytest.approx(want, abs=1e-9) and out.label == CHOICES[b][out.index]
    with pytest.raises(ValueError, match="label_pool must be 'linear' or 'loglinear', got 'mean'"):
        SpecFuse(members, label_pool="mean")


def test_gate_never_and_always(bpe_member, bpe_member_qwen, sp_member):
    members = [sp_member, bpe_member, bpe_member_qwen]
    main = Single(sp_member).label(PROMPTS, CHOICES)
    for fuser in (SpecFuse(members), DeePEn(members)):
        never = fuser.label(PROMPTS, CHOICES)
        always = fuser.label(PROMPTS, CHOICES, params=LabelParams(gate=0.0))
        for n, a, m in zip(never, always, main):
            assert not n.gated and a.gated
            assert a.label == m.label and a.probs == pytest.approx(m.probs, abs=1e-6)
            assert [s.choice_probs for s in a.member_stats] == [s.choice_probs for s in n.member_stats]
        assert any(n.probs != pytest.approx(m.probs, abs=1e-3) for n, m in zip(never, main))
    # DeePEn skips the fused pass on gated rows: no fused steps, no agreement or KL
    gated = DeePEn(members).label(PROMPTS, CHOICES, params=LabelParams(gate=0.0))
    assert all(s.agreement is None and s.mean_kl is None for o in gated for s in o.member_stats)


def test_gate_in_between_follows_the_main_members_margin(bpe_member, sp_member):
    main = Single(bpe_member).label(PROMPTS, CHOICES)
    margins = sorted(sorted(o.probs)[-1] - sorted(o.probs)[-2] for o in main)
    theta = (margins[0] + margins[1]) / 2  # the least sure row goes to the ensemble, the others not
    outs = SpecFuse([bpe_member, sp_member]).label(PROMPTS, CHOICES, params=LabelParams(gate=theta))
    assert sorted(o.gated for o in outs) == [False, True, True]
    for o, m in zip(outs, main):
        assert o.gated == (sorted(m.probs)[-1] - sorted(m.probs)[-2] >= theta)


def test_deepen_pmi_is_batch_independent(bpe_member, sp_member):
    fuser = DeePEn([sp_member, bpe_member])
    params = LabelParams(norm="pmi")
    batched = fuser.label(PROMPTS, CHOICES, params=params)
    for b, out in enumerate(batched):
        alone = fuser.label([PROMPTS[b]], [CHOICES[b]], params=params)[0]
        assert out.label == alone.label and out.probs == pytest.approx(alone.probs, abs=1e-4)
        assert all(s.choice_neutral is not None for s in out.member_stats)


def test_temperature_tempers_every_posterior_and_keeps_single_and_deepen_labels(bpe_member, sp_member):
    """LabelParams.temperature: every member's choice_probs and the fused probabilities are
    softmax(scores / T); Single's and DeePEn's labels do not move, SpecFuse pools the tempered posteriors."""
    t, members = 3.0, [sp_member, bpe_member]
    base, hot = LabelParams(norm="token"), LabelParams(norm="token", temperature=t)
    scored = [score_choices(m, PROMPTS, CHOICES, params=base) for m in members]
    for fuser in (Single(sp_member), DeePEn(members), SpecFuse(members, label_pool="linear"),
                  SpecFuse(members, label_pool="loglinear")):
        cold, warm = fuser.label(PROMPTS, CHOICES, params=base), fuser.label(PROMPTS, CHOICES, params=hot)
        for b, (c, w) in enumerate(zip(cold, warm)):
            for i, s in enumerate(w.member_stats):
                assert s.choice_probs == pytest.approx(posterior(scored[i][b].scores, "token", t), abs=1e-9)
            if isinstance(fuser, SpecFuse):
                want = pool([s.choice_probs for s in w.member_stats], fuser.weights, fuser.config.label_pool)
                assert w.probs == pytest.approx(want, abs=1e-12)
            else:  # the fused (or the member's) posterior, tempered
                assert w.probs == pytest.approx(temper([math.log(q) for q in c.probs], t), abs=1e-6)
            if not (isinstance(fuser, SpecFuse) and fuser.config.label_pool == "linear"):
                assert w.label == c.label
            assert max(w.probs) <= max(c.probs) + 1e-12


def test_member_temperatures_temper_each_members_posterior_before_the_pool(bpe_member, sp_member):
    """LabelParams.member_temperatures (SpecFuse): member i's posterior (pooled, gated, in its
    choice_probs) is at temperature * member_temperatures[i]; equal member temperatures of 1 are the
    shared temperature; Single and DeePEn refuse them before any model call."""
    members, shared = [sp_member, bpe_member], 2.0
    params = LabelParams(norm="token", temperature=shared, member_temperatures=(0.5, 3.0))
    scored = [score_choices(m, PROMPTS, CHOICES, params=params) for m in members]
    for kind in POOLS:
        fuser = SpecFuse(members, label_pool=kind)
        got = fuser.label(PROMPTS, CHOICES, params=params)
        for b, out in enumerate(got):
            posts = [posterior(scored[i][b].scores, "token", shared * t) for i, t in enumerate((0.5, 3.0))]
            assert [s.choice_probs for s in out.member_stats] == [pytest.approx(p, abs=1e-9) for p in posts]
            assert out.probs == pytest.approx(pool(posts, fuser.weights, kind), abs=1e-12)
        ones = fuser.label(PROMPTS, CHOICES, params=params.with_(member_temperatures=(1.0, 1.0)))
        plain = fuser.label(PROMPTS, CHOICES, params=params.with_(member_temperatures=None))
        assert [o.probs for o in ones] == [p.probs for p in plain]
    with pytest.raises(ValueError, match=r"member_temperatures must have one entry per member \(1\)"):
        SpecFuse([sp_member]).label(PROMPTS, CHOICES, params=params)
    with pytest.raises(ValueError, match=r"member_temperatures are SpecFuse's .* not deepen's"):
        DeePEn(members).label(PROMPTS, CHOICES, params=params)
    with pytest.raises(ValueError, match=r"member_temperatures are SpecFuse's .* not single's"):
        Single(sp_member).label(PROMPTS, CHOICES, params=params)


@pytest.mark.parametrize("norm", ["token", "pmi"])
def test_invariants_hold_under_a_temperature(member, norm):
    params = LabelParams(norm=norm, temperature=0.5)
    want = Single(member).label(PROMPTS, CHOICES, params=params)
    for got, tol in ((SpecFuse([member]).label(PROMPTS, CHOICES, params=params), 1e-6),
                     (DeePEn([member, _copy(member, "copy")]).label(PROMPTS, CHOICES, params=params), 1e-5)):
        for g, w in zip(got, want):
            assert g.label == w.label and g.probs == pytest.approx(w.probs, abs=tol)
