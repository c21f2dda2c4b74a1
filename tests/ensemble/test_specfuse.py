"""SpecFuse: scripted fake members pin down propose / verify / rank / exit; tiny real transformers
models check the cache paths (greedy equivalence, copies, batched verification, broadcast)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ensemble import DecodeParams, Single
from ensemble.fusers.specfuse import SpecFuse
from ensemble.kv import Slots
from ensemble.labeling import LabelParams
from ensemble.reference import greedy_uncached, logprobs_uncached, next_logits_uncached
from ensemble.scoring import continuation_ids
from ensemble.segments import segment_score
from tests import tiny

# ---- scripted fake members ------------------------------------------------------------------------
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?"
EOS = len(ALPHABET)
V = EOS + 1


class FakeCodec:
    def token_bytes(self, t: int) -> bytes:
        return ALPHABET[t].encode() if 0 <= t < EOS else b""

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(ch) for ch in text]


@dataclass
class FakeState:
    prompts: list[str]
    ids: list[list[int]]
    logits: torch.Tensor  # (B, V)
    n_prompt: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    tokens_in: list[int] = field(default_factory=list)
    layout: int = 0

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def next_pos(self) -> list[int]:
        return [len(i) for i in self.ids]


class Scripted:
    """A member with a scripted character-level distribution. ``beliefs[prompt]`` is a list of
    ``(text, mass)``: at response position k the member puts ``mass`` on ``text[k]`` (EOS past its
    end), the rest spread uniformly. Greedy drafting follows its heaviest belief. Every method call
    is logged with the prompts of the rows it touched."""

    def __init__(self, name: str, beliefs: dict[str, list[tuple[str, float]]], fingerprint: str = "fake"):
        self.name, self.beliefs, self.vocab_fingerprint = name, beliefs, fingerprint
        self.eos_ids = frozenset({EOS})
        self.vocab_size, self.device = V, torch.device("cpu")
        self.codec = FakeCodec()
        self.has_chat_template = True  # a choice is scored as the reply itself (no target delimiter)
        self.tokenizer = type("Tok", (), {"eos_token_id": EOS})()
        self.log: list[tuple[str, tuple[str, ...]]] = []

    def dist(self, prompt: str, response: list[int]) -> torch.Tensor:
        mass = torch.zeros(V, dtype=torch.float64)
        for text, m in self.beliefs[prompt]:
            k = len(response)
            mass[ALPHABET.index(text[k]) if k < len(text) else EOS] += m
        mass += (1.0 - mass.sum()) / V
        return mass.log().float()

    def encode_text(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.codec.token_bytes(t) for t in ids).decode()

    def _refresh(self, state: FakeState, b: int) -> None:
        state.logits[b] = self.dist(state.prompts[b], state.ids[b])

    def encode_prompt(self, prompt: str, system=None) -> list[int]:
        return list(prompt.encode())  # the prompt's bytes: start_ids recovers the prompt

    def start_ids(self, encoded) -> FakeState:
        return self.start([bytes(e).decode() for e in encoded])

    def start(self, prompts, systems=None) -> FakeState:
        self.log.append(("start", tuple(prompts)))
        st = FakeState(list(prompts), [[] for _ in prompts], torch.zeros(len(prompts), V),
                       [0] * len(prompts), [1] * len(prompts), [1] * len(prompts))
        for b in range(st.size):
            self._refresh(st, b)
        return st

    def feed(self, state: FakeState, new, rollback=None, *, all_logits=False):
        self.log.append(("feed", tuple(p for p, t, r in zip(state.prompts, new, rollback or [0] * state.size) if t or r)))
        state.logits = state.logits.clone()
        for b, toks in enumerate(new):
            r = rollback[b] if rollback else 0
            if r:
                del state.ids[b][-r:]
            state.ids[b].extend(toks)
            if toks or r:
                self._refresh(state, b)
                state.calls[b] += 1
                state.tokens_in[b] += len(toks)

    def rewind(self, state: FakeState, counts, logits) -> list[torch.Tensor]:
        self.log.append(("rewind", tuple(state.prompts)))
        cols = []
        for b, r in enumerate(counts):
            cols.append(torch.arange(len(state.ids[b]) - max(r, 0), len(state.ids[b])))
            if r:
                del state.ids[b][-r:]
                self._refresh(state, b)
        return cols

    def revive(self, state: FakeState, rows) -> None:
        self.log.append(("revive", tuple(p for p, s in zip(state.prompts, rows) if s is not None)))
        state.logits = state.logits.clone()
        for b, slots in enumerate(rows):
            if slots is not None:
                assert len(state.ids[b]) == slots.next_pos
                state.ids[b].extend(slots.tokens)
                self._refresh(state, b)

    def compact(self, state: FakeState) -> int:
        return 0

    def score_shared(self, state: FakeState, conts, *, max_batch_tokens=None):
        out = self.score(state, conts)
        slots = [[Slots(torch.arange(len(t)), tuple(t), len(state.ids[b]), 0, self.dist(state.prompts[b], state.ids[b] + t))
                  if t else None for t in cs] for b, cs in enumerate(conts)]
        return out, slots

    def select(self, state: FakeState, rows) -> FakeState:
        return FakeState([state.prompts[r] for r in rows], [list(state.ids[r]) for r in rows],
                         state.logits[rows].clone(), [0] * len(rows), [state.calls[r] for r in rows],
                         [state.tokens_in[r] for r in rows])

    def score(self, state: FakeState, conts, *, max_batch_tokens=None):
        self.log.append(("score", tuple(p for p, cs in zip(state.prompts, conts) if cs)))
        out = []
        for b, cs in enumerate(conts):
            row = []
            for toks in cs:
                lp = [float(self.dist(state.prompts[b], state.ids[b] + toks[:k])[t]) for k, t in enumerate(toks)]
                row.append(torch.tensor(lp))
            out.append(row)
        return out

    def calls(self, method: str, prompt: str) -> int:
        return sum(1 for m, ps in self.log if m == method and prompt in ps)


T = "abc abc abc abc abc abc abc abc abc abc abc abc"  # what the majority wants to write
U = "zzzzz zzzzz zzzzz zzzzz zzzzz zzzzz zzzzz zzzz"  # the outlier


def trio(outlier_on: str = "p0", other: str = "p1"):
    """A and B believe T; C prefers U a little but also rates T (so its vote for itself is weak).
    On prompt ``other`` the roles of A and C are swapped."""
    a = Scripted("A", {outlier_on: [(T, 0.9)], other: [(U, 0.35), (T, 0.3)]})
    b = Scripted("B", {outlier_on: [(T, 0.9)], other: [(T, 0.9)]})
    c = Scripted("C", {outlier_on: [(U, 0.35), (T, 0.3)], other: [(T, 0.9)]})
    return a, b, c


def test_rank_majority_wins_and_ties_go_to_the_lower_member():
    a, b, c = trio()
    out = SpecFuse([a, b, c], segment_tokens=4, exit=False).generate(["p0"], DecodeParams(max_new_tokens=20))[0]
    assert out.text == T[:20] and out.token_count == 20 and out.finish_reason.value == "length"
    sa, sb, sc = out.member_stats
    # A and B propose identical text and score it identically: the tie goes to A every round
    assert sa.accepted == sa.rounds_active == sa.proposed and sb.accepted == 0 and sc.accepted == 0
    assert sa.mean_score == pytest.approx(sb.mean_score) and sc.mean_score < sa.mean_score
    assert sa.mean_score + sb.mean_score + sc.mean_score == pytest.approx(1.0)
    assert sa.role == "main" and sb.role == "member" and sa.exit_round is None


def test_weights_can_hand_the_decision_to_one_member():
    a, b, c = trio()
    out = SpecFuse([a, b, c], segment_tokens=4, exit=False, weights=[0.0, 0.0, 1.0]).generate(
        ["p0"], DecodeParams(max_new_tokens=17))[0]
    assert out.text == U[:17] and out.member_stats[2].accepted == out.member_stats[2].rounds_active


def test_segments_are_cut_to_whole_words():
    a = Scripted("A", {"p": [(T, 0.9)]})
    fuser = SpecFuse([a], segment_tokens=6)
    out = fuser.generate(["p"], DecodeParams(max_new_tokens=14))[0]
    assert out.text == T[:14]
    # drafts "abc ab" -> "abc", " abc a" -> " abc", " abc a" -> " abc", then " ab" (budget): 4 rounds
    assert out.member_stats[0].rounds_active == 4 and out.member_stats[0].tokens_out == 6 + 6 + 6 + 3


@pytest.mark.parametrize("rule, k", [("rank", 3), ("softmax", 3), ("lead", 2)])
def test_exit_removes_the_outlier_and_it_makes_no_more_calls(rule, k):
    a, b, c = trio()
    out = SpecFuse([a, b, c], segment_tokens=4, exit_rule=rule).generate(["p0"], DecodeParams(max_new_tokens=40))[0]
    sa, sb, sc = out.member_stats
    assert out.text == T[:40]
    assert sc.exit_round == k and sc.rounds_active == k and sa.exit_round is None and sb.exit_round is None
    assert sa.rounds_active > k
    # member calls: propose + verify in every round active, nothing after the exit
    assert sc.calls == 2 * k and sa.calls == 2 * sa.rounds_active and sb.calls == 2 * sb.rounds_active
    assert c.calls("score", "p0") == k and c.calls("rewind", "p0") == k
    assert a.calls("score", "p0") == sa.rounds_active


def test_without_exit_every_round_costs_2n_member_calls():
    a, b, c = trio()
    out = SpecFuse([a, b, c], segment_tokens=4, exit=False).generate(["p0"], DecodeParams(max_new_tokens=40))[0]
    rounds = out.member_stats[0].rounds_active
    for st, m in zip(out.member_stats, (a, b, c)):
        assert st.exit_round is None and st.rounds_active == rounds and st.calls == 2 * rounds
        assert m.calls("score", "p0") == rounds and m.calls("rewind", "p0") == rounds


def test_exit_min_rounds_and_delta():
    a, b, c = trio()
    for rule in ("rank", "softmax", "lead"):
        late = SpecFuse([a, b, c], segment_tokens=4, exit_rule=rule, exit_min_rounds=6).generate(
            ["p0"], DecodeParams(max_new_tokens=40))[0]
        assert late.member_stats[2].exit_round == 6
    never = [SpecFuse([a, b, c], segment_tokens=4, exit_rule="softmax", exit_delta=0.0),
             SpecFuse([a, b, c], segment_tokens=4, exit_rule="rank", exit_alpha=0.0),
             SpecFuse([a, b, c], segment_tokens=4, exit_rule="lead", exit_alpha=0.0)]
    for fuser in never:
        out = fuser.generate(["p0"], DecodeParams(max_new_tokens=40))[0]
        assert all(s.exit_round is None for s in out.member_stats)


@pytest.mark.parametrize("rule, settings, exit_round", [
    ("softmax", {"exit_delta": 1.0}, 1),  # the legacy rule as before
    ("rank", {"exit_alpha": 0.5}, 1),  # one loss out of two candidates: p = 1/2
    ("rank", {}, 4),  # the defaults: four straight losses out of two, p = 1/16
    ("lead", {}, 2),  # two rounds won by the other member out of two, p = 1/4 <= 0.3
])
def test_the_last_member_never_exits(rule, settings, exit_round):
    a = Scripted("A", {"p": [(T, 0.9)]})
    c = Scripted("C", {"p": [(U, 0.35), (T, 0.3)]})
    out = SpecFuse([a, c], segment_tokens=4, exit_rule=rule, exit_min_rounds=1, **settings).generate(
        ["p"], DecodeParams(max_new_tokens=30))[0]
    sa, sc = out.member_stats
    assert sc.exit_round == exit_round and sa.exit_round is None and out.text == T[:30]
    # alone after the exit: nothing to verify, one call a round
    assert sa.rounds_active > exit_round and sa.calls == 2 * exit_round + (sa.rounds_active - exit_round)


@pytest.mark.parametrize("rule, k", [("rank", 3), ("softmax", 3), ("lead", 2)])
def test_rows_are_independent_in_a_batch(rule, k):
    a, b, c = trio()
    fuser = SpecFuse([a, b, c], segment_tokens=4, exit_rule=rule)
    params = [DecodeParams(max_new_tokens=40), DecodeParams(max_new_tokens=23)]
    both = fuser.generate(["p0", "p1"], params)
    alone = [fuser.generate([p], q)[0] for p, q in zip(["p0", "p1"], params)]
    assert [o.text for o in both] == [o.text for o in alone] == [T[:40], T[:23]]
    assert [[s.exit_round for s in o.member_stats] for o in both] == [[None, None, k], [k, None, None]]
    assert [[s.calls for s in o.member_stats] for o in both] == [[s.calls for s in o.member_stats] for o in alone]
    # on p1 the main member (A) exited: the budget is still counted in its tokens
    assert both[1].token_count == 23 and both[1].finish_reason.value == "length"


def test_eos_and_stop_strings():
    a = Scripted("A", {"p": [("abc abc.", 0.9)]})
    b = Scripted("B", {"p": [("abc abc.", 0.8)]}, fingerprint="other")
    out = SpecFuse([a, b], segment_tokens=5).generate(["p"], DecodeParams(max_new_tokens=40))[0]
    assert out.text == "abc abc." and out.finish_reason.value == "stop" and out.token_count == 8
    cut = SpecFuse([a, b], segment_tokens=5).generate(["p"], DecodeParams(max_new_tokens=40, stop=("c a",)))[0]
    assert cut.text == "ab" and cut.finish_reason.value == "stop"


def test_label_is_one_verification_round():
    a, b, c = trio()
    out = SpecFuse([a, b, c]).label(["p0"], [["abc", "zzz", "q"]], params=LabelParams(norm="token"))[0]
    # every token of a choice has the same probability, so each member's posterior (norm 'token':
    # softmax of the mean log-prob) is proportional to that probability; the pool is the weighted mean
    low = 0.1 / V  # A and B: mass 0.9 on T's letters, the remaining 0.1 spread over all V tokens
    mean_a = [0.9 + low, low, low]
    mean_c = [0.3 + 0.35 / V, 0.35 + 0.35 / V, 0.35 / V]  # C: 0.3 on T, 0.35 on U, 0.35 spread
    rows = [[x / sum(r) for x in r] for r in (mean_a, mean_a, mean_c)]
    want = [sum(r[k] for r in rows) / 3 for k in range(3)]
    assert out.probs == pytest.approx(want, rel=1e-5) and out.label == "abc" and out.index == 0
    assert [s.calls for s in out.member_stats] == [1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"segment_tokens": 0}, "segment_tokens must be >= 1, got 0"),
        ({"exit_delta": 1.5}, "exit_delta must be in [0, 1], got 1.5"),
        ({"exit_min_rounds": -1}, "exit_min_rounds must be an integer >= 0, got -1"),
        ({"weights": [0.5, -0.5]}, "weights must be non-negative finite numbers, got [0.5, -0.5]"),
        ({"weights": [1.0]}, "weights must have one entry per member (2), got [1.0]"),
        ({"weights": [0.5, 0.6]}, "weights must sum to 1"),
        ({"exit": "yes"}, "exit must be a bool, got 'yes'"),
        ({"exit_rule": "legacy"}, "exit_rule must be one of ('rank', 'softmax', 'lead'), got 'legacy'"),
        ({"exit_window": 0}, "exit_window must be an integer >= 1, got 0"),
        ({"exit_alpha": 1.5}, "exit_alpha must be None or in [0, 1], got 1.5"),
        ({"self_score": 1}, "self_score must be a bool, got 1"),
        ({"max_rounds": 0}, "max_rounds must be None or an integer >= 1, got 0"),
    ],
)
def test_config_errors_name_the_parameter(kwargs, message):
    a, b, _ = trio()
    with pytest.raises(ValueError) as err:
        SpecFuse([a, b], **kwargs)
    assert message in str(err.value)
    with pytest.raises(ValueError, match="members must be a non-empty list"):
        SpecFuse([])


# ---- tiny real transformers models: the cache paths ------------------------------------------------
PROMPTS = ["What is the capital of France?", "Hi", "東京 café 🙂", "Once upon a time there was a small cat."]


@pytest.fixture(scope="module")
def mixed(bpe_member, bpe_member_qwen, sp_member):
    return [bpe_member, bpe_member_qwen, sp_member]


@pytest.mark.parametrize("segment_tokens", [3, 10])
def test_one_member_reproduces_its_own_greedy_output(any_member, segment_tokens):
    fuser = SpecFuse([any_member], segment_tokens=segment_tokens)
    outs = fuser.generate(PROMPTS, DecodeParams(max_new_tokens=20))
    for prompt, out in zip(PROMPTS, outs):
        ref = greedy_uncached(any_member, prompt, 20)
        assert out.token_count == len(ref) > 0
        assert out.text == any_member.decode(ref)
        assert out.finish_reason.value == ("length" if len(ref) == 20 else "stop")


def test_two_copies_reproduce_one(bpe_member, sp_member):
    for member, twin in ((bpe_member, tiny.member_bpe()), (sp_member, sp_member)):
        assert twin.vocab_fingerprint == member.vocab_fingerprint
        want = Single(member).generate(PROMPTS, DecodeParams(max_new_tokens=16))
        assert all(o.token_count > 0 for o in want)  # the comparison below is not between empty outputs
        got = SpecFuse([member, twin], segment_tokens=5, weights=[0.3, 0.7]).generate(PROMPTS, DecodeParams(max_new_tokens=16))
        assert [o.text for o in got] == [o.text for o in want]
        assert [o.token_count for o in got] == [o.token_count for o in want]
        assert all(s.exit_round is None for o in got for s in o.member_stats)


@pytest.fixture
def forwards(mixed):
    """Forward passes per member (model pre-hooks, removed after the test)."""
    counts = [[0] for _ in mixed]
    hooks = [m.model.register_forward_pre_hook(lambda *_, c=c: c.__setitem__(0, c[0] + 1)) for m, c in zip(mixed, counts)]
    yield counts
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("kv_reuse", [False, True])
def test_batched_verification_equals_scoring_each_candidate_separately(mixed, forwards, monkeypatch, kv_reuse):
    checked = [0]
    method = "score_shared" if kv_reuse else "score"
    for m, count in zip(mixed, forwards):
        orig = getattr(m, method)

        def score(state, conts, m=m, orig=orig, count=count, **kw):
            before = count[0]
            out = orig(state, conts, **kw)
            assert count[0] == before + 1, "one batched forward per verifier and round"
            if kv_reuse:
                out, slots = out
                assert all((s is None) == (not t) for ss, cs in zip(slots, conts) for s, t in zip(ss, cs))
            for b, cs in enumerate(conts):
                for c, toks in enumerate(cs):
                    ref = logprobs_uncached(m, state.ids[b], toks)
                    torch.testing.assert_close(out[b][c], ref, atol=1e-4, rtol=1e-4)
                    assert abs(segment_score(out[b][c]) - segment_score(ref)) < 1e-4
                    checked[0] += 1
            return (out, slots) if kv_reuse else out

        monkeypatch.setattr(m, method, score)
    SpecFuse(mixed, segment_tokens=6, exit=False, kv_reuse=kv_reuse).generate(PROMPTS, DecodeParams(max_new_tokens=24))
    assert checked[0] >= 2 * len(PROMPTS) * 3


def test_broadcast_extends_caches_incrementally(mixed, monkeypatch):
    """Every broadcast leaves each member's cache equal to a clean forward over its live tokens,
    rolling back only a short tail (never re-encoding the response)."""
    L, broadcasts = 6, [0]
    for m in mixed:
        orig = m.feed

        def feed(state, new, rollback=None, *, all_logits=False, m=m, orig=orig):
            out = orig(state, new, rollback, all_logits=all_logits)
            if rollback is not None:  # the broadcast (drafts are fed without rollback)
                broadcasts[0] += 1
                for b in range(state.size):
                    assert rollback[b] <= 8 and len(new[b]) <= 4 * L + 8
                    want = next_logits_uncached(m, state.ids[b])
                    torch.testing.assert_close(state.logits[b], want, atol=2e-4, rtol=1e-4)
            return out

        monkeypatch.setattr(m, "feed", feed)
    outs = SpecFuse(mixed, segment_tokens=L, exit=False).generate(PROMPTS, DecodeParams(max_new_tokens=30))
    assert all(o.text for o in outs)
    # exit off: every member broadcasts once after each round that leaves some row unfinished
    assert broadcasts[0] == len(mixed) * (max(o.member_stats[0].rounds_active for o in outs) - 1) > 0
    for o in outs:  # no stop strings: a row ends on EOS, or at the budget in the main member's tokens
        assert o.token_count == 30 if o.finish_reason.value == "length" else o.finish_reason.value == "stop"


def test_reencoding_ablation_matches_cached_rounds(mixed):
    """bench_specfuse's cache-reuse ablation (every member re-encoded after each round) decodes the
    same text as the cached rounds, with more tokens fed: the benchmark compares like with like."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from bench_specfuse import ReencodingSpecFuse

    params = DecodeParams(max_new_tokens=24)
    reusing = SpecFuse(mixed, segment_tokens=5, exit=False).generate(PROMPTS, params)
    # like for like: the ablation is the rounds without KV reuse, re-encoding instead of extending the cache
    cached = SpecFuse(mixed, segment_tokens=5, exit=False, kv_reuse=False, kv_compact=False).generate(PROMPTS, params)
    fresh = ReencodingSpecFuse(mixed, segment_tokens=5, exit=False).generate(PROMPTS, params)
    assert [o.text for o in fresh] == [o.text for o in cached] == [o.text for o in reusing] and all(o.text for o in cached)
    for prompt, a, b in zip(PROMPTS, cached, fresh):
        assert (b.token_count, b.finish_reason) == (a.token_count, a.finish_reason)
        for m, sa, sb in zip(mixed, a.member_stats, b.member_stats):
            assert (sb.calls, sb.proposed, sb.accepted, sb.tokens_out) == (sa.calls, sa.proposed, sa.accepted, sa.tokens_out)
            assert sb.mean_score == pytest.approx(sa.mean_score, abs=1e-4)
            # every round the ablation's verifier re-encodes its prefix (prompt included) once per other candidate
            assert sb.tokens_in - sa.tokens_in >= sa.rounds_active * (len(mixed) - 1) * len(m.encode_prompt(prompt))
    assert sum(s.tokens_in for o in fresh for s in o.member_stats) > sum(s.tokens_in for o in cached for s in o.member_stats)


def test_without_exit_2n_member_calls_per_round(mixed):
    outs = SpecFuse(mixed, segment_tokens=5, exit=False).generate(PROMPTS, DecodeParams(max_new_tokens=24))
    for prompt, o in zip(PROMPTS, outs):
        rounds = o.member_stats[0].rounds_active
        assert rounds >= 1 and sum(s.accepted for s in o.member_stats) == rounds
        # every member ranks in every round, and a round's final scores sum to 1
        assert sum(s.mean_score for s in o.member_stats) == pytest.approx(1.0)
        for m, s in zip(mixed, o.member_stats):
            assert s.rounds_active == s.proposed == rounds and s.calls == 2 * rounds and s.exit_round is None
            assert rounds <= s.tokens_out <= 5 * rounds and 0.0 < s.mean_score < 1.0  # a draft: 1 to 5 tokens
            # tokens fed: the prompt, every draft token but the last of each draft, verification, broadcast
            assert s.tokens_in >= len(m.encode_prompt(prompt)) + s.tokens_out - rounds


def test_batch_composition_does_not_change_a_row(mixed):
    fuser = SpecFuse(mixed, segment_tokens=5)
    greedy = DecodeParams(max_new_tokens=20)
    batched = fuser.generate(PROMPTS, greedy)
    alone = [fuser.generate([p], greedy)[0] for p in (PROMPTS[0], PROMPTS[-1])]
    assert [batched[0].text, batched[-1].text] == [o.text for o in alone] and all(o.text for o in alone)
    sampled = DecodeParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=11)
    one = fuser.generate([PROMPTS[0]], sampled)[0].text
    inside = fuser.generate([PROMPTS[1], PROMPTS[0]], [sampled.with_(seed=5), sampled])[1].text
    assert one == inside and one
    assert len({fuser.generate([PROMPTS[0]], sampled.with_(seed=s))[0].text for s in range(3)}) > 1


def test_eos_draft_stops_the_row(bpe_member):
    m = bpe_member
    head, bias = m.model.get_output_embeddings(), torch.zeros(m.vocab_size)
    bias[next(iter(m.eos_ids))] = 1e4
    old, head.bias = head.bias, torch.nn.Parameter(bias)
    try:
        out = SpecFuse([m, tiny.member_bpe()]).generate(["Hi"], DecodeParams(max_new_tokens=5))[0]
    finally:
        head.bias = old
    assert out.text == "" and out.token_count == 0 and out.finish_reason.value == "stop"


def test_label_with_tiny_models(mixed):
    prompts, choices = ["Is fire hot? Answer yes or no.", "Capital of France?"], [["yes", "no"], ["Paris", "Rome", "Tokyo"]]
    outs = SpecFuse(mixed, weights=[0.5, 0.25, 0.25]).label(prompts, choices, params=LabelParams(norm="token"))
    for prompt, cs, out in zip(prompts, choices, outs):
        per = []  # each member's posterior under the norm 'token', pooled linearly
        for m in mixed:
            means = [logprobs_uncached(m, m.encode_prompt(prompt), continuation_ids(m, c, LabelParams())).mean()
                     for c in cs]
            per.append(torch.softmax(torch.stack(means).double(), 0).tolist())
        want = [0.5 * per[0][k] + 0.25 * per[1][k] + 0.25 * per[2][k] for k in range(len(cs))]
        assert out.probs == pytest.approx(want, abs=1e-4) and out.label == cs[out.index]
        assert [s.choice_probs for s in out.member_stats] == [pytest.approx(p, abs=1e-4) for p in per]


def test_no_prompts():
    a, b, _ = trio()
    fuser = SpecFuse([a, b])
    assert fuser.generate([], DecodeParams()) == [] and fuser.label([], []) == []
