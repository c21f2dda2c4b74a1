"""Gated DeePEn (``fuse_below``, ``gate_on``; ensemble/fusers/gate.py) on tiny members with different
tokenizers: the two reductions (1: DeePEn as published, 0: the main member alone), the gated cached
path against the gated uncached oracle, lazy catch-up against eager feeding, calls, seeds, config."""
import pytest
import torch

from ensemble import DecodeParams, Single
from ensemble.config import DeePEnConfig, flag_of, hashed_fields
from ensemble.fusers.deepen import DeePEn, _Rows
from ensemble.fusers.gate import confident_rows
from ensemble.members import Member
from jobs.cli import parse_config

PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Once upon a time there was a small cat who lived in a big house near the river. Tell me more.",
    "東京 café 🙂",
]
GREEDY = DecodeParams(max_new_tokens=12)
SAMPLED = DecodeParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
# gates that fuse some steps and not others on these random members (their top-1 probabilities are low)
MIXED = {0: {"top1": 0.05, "margin": 0.015}, 2: {"top1": 0.11, "margin": 0.06}}


@pytest.fixture(scope="module")
def trio(bpe_member, bpe_member_qwen, sp_member):
    return [bpe_member, bpe_member_qwen, sp_member]


def _texts(outs):
    return [(o.text, o.token_count, o.finish_reason) for o in outs]


def _fused_steps(out) -> int:
    steps = out.token_count + (out.finish_reason.value == "stop")  # an EOS step emits no token
    return round(out.member_stats[0].fused_share * steps)


def test_the_gate_rule():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [1.0, 0.0, 0.0]]))
    assert confident_rows(logits, 1.0, "top1") == [False] * 3  # strict: 1 fuses even a top-1 of exactly 1
    assert confident_rows(logits, 0.0, "top1") == [True] * 3
    assert confident_rows(logits, 0.0, "margin") == [True] * 3
    assert confident_rows(logits, 0.5, "top1") == [True, False, True]
    assert confident_rows(logits, 0.2, "margin") == [True, False, True]  # margins 0.3, 0.05, 1
    assert confident_rows(logits, 0.6, "top1") == [True, False, True]  # >= is confident
    with pytest.raises(ValueError, match="gate_on must be 'top1' or 'margin', got 'x'"):
        confident_rows(logits, 0.5, "x")


@pytest.mark.parametrize("main", [0, 2])
def test_fuse_below_one_is_deepen_as_published(main, trio):
    ungated = DeePEn(trio, main=main)
    assert ungated.config.fuse_below == 1.0  # the default
    outs = DeePEn(trio, main=main, fuse_below=1.0).generate(PROMPTS, GREEDY)
    want = ungated.generate(PROMPTS, GREEDY)
    assert _texts(outs) == _texts(want)
    assert [[vars(s) for s in o.member_stats] for o in outs] == [[vars(s) for s in o.member_stats] for o in want]
    for prompt, out in zip(PROMPTS, outs):
        ref = ungated.greedy_uncached(prompt, GREEDY.max_new_tokens)
        assert (out.text, out.token_count) == (ungated.main.decode(ref), len(ref))
        assert all(s.fused_share == 1.0 and s.agreement is not None for s in out.member_stats)


@pytest.mark.parametrize("main", [0, 2])
def test_fuse_below_zero_is_the_main_member_alone(main, trio):
    fuser = DeePEn(trio, main=main, fuse_below=0.0)
    for params in (GREEDY, [SAMPLED, GREEDY, SAMPLED.with_(seed=8), SAMPLED.with_(stop=("e",))]):
        want = Single(trio[main]).generate(PROMPTS, params)
        outs = fuser.generate(PROMPTS, params)
        assert _texts(outs) == _texts(want) and all(o.token_count for o in want)
        for o, w in zip(outs, want):
            main_stats, others = o.member_stats[main], [s for i, s in enumerate(o.member_stats) if i != main]
            assert (main_stats.calls, main_stats.tokens_in) == (w.member_stats[0].calls, w.member_stats[0].tokens_in)
            for s in o.member_stats:
                assert s.fused_share == 0.0 and s.agreement is None and s.mean_kl is None
            for s, m in zip(others, [m for i, m in enumerate(trio) if i != main]):
                assert s.calls == 1 and s.tokens_in == len(m.encode_prompt(PROMPTS[outs.index(o)]))  # prefill only
                assert s.tokens_out > 0  # its tokenisation of the response, without a forward


@pytest.mark.parametrize("main", [0, 2])
@pytest.mark.parametrize("gate_on", ["top1", "margin"])
def test_gated_cached_equals_gated_uncached_oracle(main, gate_on, trio):
    """Confident steps emit the main member's token, fused steps fuse every member caught up lazily:
    the same tokens as the oracle, which re-encodes every member's whole sequence at fused steps."""
    fuser = DeePEn(trio, main=main, fuse_below=MIXED[main][gate_on], gate_on=gate_on)
    outs = fuser.generate(PROMPTS, GREEDY)
    shares = [o.member_stats[0].fused_share for o in outs]
    assert any(0 < s < 1 for s in shares), shares  # the gate splits the steps of some row
    for prompt, out in zip(PROMPTS, outs):
        ref = fuser.greedy_uncached(prompt, GREEDY.max_new_tokens)
        assert (out.text, out.token_count) == (fuser.main.decode(ref), len(ref)) and ref
        assert len({s.fused_share for s in out.member_stats}) == 1  # a row's share, on every member


def test_lazy_catch_up_equals_eager_feeding(trio):
    """At every fused step, each other member's live tokens and logits after catching up its backlog in
    one forward are those of feeding it every token as it came (today's broadcast, one forward a token)."""
    fuser = DeePEn(trio, main=2, fuse_below=MIXED[2]["top1"])
    seen = []  # (row, response length in main tokens, member, live ids, logits) at each fused step
    fuse_rows = fuser._fuse_rows

    def spy(st, states, live, fuse, *args):
        fuse_rows(st, states, live, fuse, *args)
        for j in fuse:
            for i, s in enumerate(states[:2]):
                seen.append((live[j], len(st.out[live[j]]), i, list(s.ids[j]), s.logits[j].clone()))
        spy.st = st

    fuser._fuse_rows = spy
    outs = fuser.generate(PROMPTS, GREEDY)
    assert any(0 < o.member_stats[0].fused_share < 1 for o in outs)
    lagged = 0
    for r, prompt in enumerate(PROMPTS):
        at = {(n, i): (ids, lg) for rr, n, i, ids, lg in seen if rr == r}
        toks = spy.st.out[r]
        states = [m.start([prompt]) for m in fuser.members]
        rows, live = _Rows(fuser, 1), [0]
        for n in range(len(toks) + 1):
            for i in range(2):
                if (n, i) in at:
                    ids, lg = at[(n, i)]
                    assert states[i].ids[0] == ids, (r, n, fuser.members[i].name)
                    torch.testing.assert_close(lg, states[i].logits[0], atol=2e-4, rtol=1e-4)
            lagged += (n, 0) in at and n > 0 and (n - 1, 0) not in at  # caught up after confident steps
            if n < len(toks):
                feeds, rbs = [[] for _ in fuser.members], [[] for _ in fuser.members]
                fuser._broadcast(rows, 0, toks[n], feeds, rbs)
                states, live = fuser._advance(states, live, [0], feeds, rbs)
    assert lagged > 0  # some fused step came after confident ones: a backlog of several tokens


def test_a_confident_step_runs_no_other_member(bpe_member, sp_member, monkeypatch):
    """The other members run only at steps that fuse some row (one forward each, whatever the
    backlog); the main member runs every step. Alone, a row's other members are called once per
    fused step (none at the first: nothing to catch up); in a batch, every row is caught up at a step
    that fuses any of them. A copy of the main member (same vocabulary) catches up from its ids."""
    copy = Member(bpe_member.model, bpe_member.tokenizer, name="copy")
    forwards = {"copy": 0, sp_member.name: 0}
    for m in (sp_member, copy):
        def counted(state, new, *a, _m=m, **kw):
            forwards[_m.name] += any(new)
            return Member.feed(_m, state, new, *a, **kw)
        monkeypatch.setattr(m, "feed", counted)
    fuser = DeePEn([bpe_member, sp_member, copy], fuse_below=MIXED[0]["top1"])
    fusing_steps = []
    fuse_rows = fuser._fuse_rows

    def spy(st, states, live, fuse, *args):
        fusing_steps.append(len(fuse))
        return fuse_rows(st, states, live, fuse, *args)

    fuser._fuse_rows = spy
    for prompt in PROMPTS:
        fusing_steps.clear()
        [o] = fuser.generate([prompt], GREEDY)
        f, n = _fused_steps(o), o.token_count + (o.finish_reason.value == "stop")
        main, sp, cp = o.member_stats
        assert main.calls == n  # the prefill, then one feed per step but the last
        assert f <= cp.calls <= 1 + f and 1 <= sp.calls <= 1 + f and sp.tokens_out > 0
        assert len(fusing_steps) == f
    fusing_steps.clear()
    forwards.update({k: 0 for k in forwards})
    outs = fuser.generate(PROMPTS, GREEDY)
    fused = [_fused_steps(o) for o in outs]
    steps = [o.token_count + (o.finish_reason.value == "stop") for o in outs]
    assert 0 < sum(fused) < sum(steps)
    assert sum(fusing_steps) == sum(fused)  # fused_share counts the rows each step fused
    # the other members' forwards: the prefill, then at most one per step that fused some row
    assert 1 < forwards["copy"] <= 1 + len(fusing_steps) and 1 < forwards[sp_member.name] <= 1 + len(fusing_steps)
    assert all(s.calls <= 1 + len(fusing_steps) for o in outs for s in o.member_stats[1:])


def test_sampled_rows_are_reproducible_by_seed(trio):
    fuser = DeePEn(trio, main=2, fuse_below=MIXED[2]["top1"])
    one = fuser.generate([PROMPTS[2]], SAMPLED)[0]
    mixed = fuser.generate(PROMPTS, [SAMPLED.with_(seed=1), GREEDY, SAMPLED, SAMPLED.with_(seed=4)])[2]
    assert (one.text, one.token_count) == (mixed.text, mixed.token_count) and one.text
    assert fuser.generate([PROMPTS[2]], SAMPLED)[0].text == one.text
    assert len({fuser.generate([PROMPTS[2]], SAMPLED.with_(seed=s))[0].text for s in range(4)}) > 1


def test_config_flag_and_errors():
    assert DeePEnConfig().fuse_below == 1.0 and DeePEnConfig().gate_on == "top1"
    assert flag_of(DeePEnConfig, "fuse_below") == "--fuse-below"
    assert flag_of(DeePEnConfig, "gate_on") == "--fuse-gate-on"
    for bad in (-0.1, 1.5, "0.5", True, None):
        with pytest.raises(ValueError, match=rf"fuse_below must be in \[0, 1\], got {bad!r}"):
            DeePEnConfig(fuse_below=bad)
    with pytest.raises(ValueError, match="gate_on must be 'top1' or 'margin', got 'entropy'"):
        DeePEnConfig(gate_on="entropy")
    cfg = parse_config(["--input", "i", "--output", "o", "--method", "deepen", "--members", "a", "b",
                        "--fuse-below", "0.4", "--fuse-gate-on", "margin"])
    assert (cfg.fuser.fuse_below, cfg.fuser.gate_on) == (0.4, "margin")
    assert {"fuse_below", "gate_on"} <= set(hashed_fields(cfg.fuser))


@pytest.mark.slow
def test_reductions_on_packaged_members():
    """SmolLM2-135M-Instruct (main) and Gemma-3-270M (SentencePiece, 262k): fuse_below=1 is the ungated
    DeePEn of the oracle, 0 is SmolLM2 alone (Gemma prefilled only), and a gate in between fuses some
    steps, catching Gemma up lazily, as the gated oracle does."""
    from ensemble import load_member

    pair = [load_member("smollm2-135m-instruct"), load_member("gemma3-270m")]
    prompts = ["What is the capital of France?", "Name three colours of the rainbow."]
    params = DecodeParams(max_new_tokens=16)
    for fuse_below in (1.0, 0.6):
        fuser = DeePEn(pair, fuse_below=fuse_below)
        outs = fuser.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            ref = fuser.greedy_uncached(prompt, params.max_new_tokens, cache_main=True)
            assert (out.text, out.token_count) == (fuser.main.decode(ref), len(ref)) and ref
        shares = [o.member_stats[0].fused_share for o in outs]
        assert all(s == 1.0 for s in shares) if fuse_below == 1.0 else any(s < 1.0 for s in shares), shares
    alone = Single(pair[0]).generate(prompts, params)
    zero = DeePEn(pair, fuse_below=0.0).generate(prompts, params)
    assert _texts(zero) == _texts(alone) and all(o.token_count for o in alone)
    assert all(o.member_stats[1].calls == 1 and o.member_stats[1].fused_share == 0.0 for o in zero)
