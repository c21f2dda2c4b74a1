"""The incremental stop checker against the slow path (full re-decode + find after every token),
on random token streams whose stop strings span tokens and multi-byte characters; EOS and budget."""
import random

import pytest

from ensemble.fusers.base import FinishReason
from ensemble.fusers.stopping import Stop, StopChecker, StopMatcher, cut_at_stop, first_stop
from ensemble.text import Codec
from tests import tiny

# pieces that split characters across tokens: 'é' = C3 A9, '東' = E6 9D B1, '🙂' = F0 9F 99 82
PIECES = [b"a", b"b", b"ab", b" ", b"\n", b"\n\n", b"ba", b".", b"\xc3", b"\xa9", b"\xc3\xa9", b"\xe6",
          b"\x9d", b"\xb1", b"\xe6\x9d", b"\xf0\x9f", b"\x99\x82", b"\xff", b"\x80", b"", b"ab\xe6\x9d\xb1c"]
STOPS = ["ab", "b a", "\n\n", "é", "東c", "a東", "🙂", "\ufffd", "aaaa", "\xe9b", ". ", "é\n"]


def slow(pieces: list[bytes], stops) -> int | None:
    """The oracle: decode everything seen so far and look for the stops."""
    return first_stop(b"".join(pieces).decode("utf-8", errors="replace"), stops)


def run_matcher(stream: list[bytes], stops, follow: bool) -> tuple[int, int | None]:
    """Feed ``stream`` piece by piece; (pieces consumed, cut) at the first hit, or (len, None)."""
    m = StopMatcher(stops)
    for n, piece in enumerate(stream, 1):
        cut = m.follow(b"".join(stream[:n])) if follow else m.push(piece)
        if cut is not None:
            return n, cut
    return len(stream), None


def run_oracle(stream: list[bytes], stops) -> tuple[int, int | None]:
    for n in range(1, len(stream) + 1):
        cut = slow(stream[:n], stops)
        if cut is not None:
            return n, cut
    return len(stream), None


@pytest.mark.parametrize("follow", [False, True])
def test_matcher_equals_full_redecode_on_random_streams(follow):
    rng = random.Random(7)
    hits = 0
    for _ in range(3000):
        stream = [rng.choice(PIECES) for _ in range(rng.randrange(1, 25))]
        stops = tuple(rng.sample(STOPS, rng.randrange(1, 4)))
        want = run_oracle(stream, stops)
        assert run_matcher(stream, stops, follow) == want, (stream, stops)
        hits += want[1] is not None
    assert 1000 < hits < 2900  # both outcomes are exercised


def test_follow_matches_again_when_the_response_is_rewritten():
    m = StopMatcher(["xy"])
    assert m.follow(b"abcx") is None
    assert m.follow(b"abQ") is None  # not an extension: matched from the start again
    assert m.follow(b"abQxy") == 3
    m = StopMatcher(["cd"])
    assert m.follow(b"ab") is None
    assert m.follow(b"abcd"[:1] + b"cd") == 1  # rewritten to "acd": the earlier cut is found


def test_stop_spanning_tokens_and_a_split_character():
    m = StopMatcher(["é!"])
    assert [m.push(p) for p in (b"hello ", b"\xc3")] == [None, None]
    assert m.push(b"\xa9") is None
    assert m.push(b"!") == 6
    # the pending half character shows as U+FFFD, as a full decode shows it
    m = StopMatcher(["x\ufffd"])
    assert m.push(b"x") is None
    assert m.push(b"\xc3") == 0


def test_matcher_keeps_only_a_tail():
    m = StopMatcher(["abc", "z"])
    for _ in range(1000):
        assert m.push(b"xyxy \xe6\x9d\xb1") is None
    assert len(m.tail) <= 2 and m.offset == 6000 - len(m.tail)
    assert m.push(b"ab") is None and m.push(b"c") == 6000


def test_push_and_follow_do_not_mix():
    m = StopMatcher(["a"])
    m.push(b"x")
    with pytest.raises(ValueError, match="follow"):
        m.follow(b"xb")


def test_checker_token_eos_stop_and_budget():
    table = {1: b"a", 2: b"b", 3: b" ", 9: b""}
    chk = StopChecker(("b a",), max_new_tokens=4, eos_ids={9}, token_bytes=table.__getitem__)
    assert [chk.token(t) for t in (1, 2, 3)] == [None, None, None]
    assert chk.token(1) == Stop(FinishReason.STOP, cut=1)
    chk = StopChecker(("zz",), max_new_tokens=3, eos_ids={9}, token_bytes=table.__getitem__)
    assert [chk.token(t) for t in (1, 2)] == [None, None]
    assert chk.token(1) == Stop(FinishReason.LENGTH)
    chk = StopChecker((), max_new_tokens=3, eos_ids={9})  # no stops: token bytes never needed
    assert chk.token(1) is None
    assert chk.token(9) == Stop(FinishReason.STOP, eos=True) and chk.count == 1
    assert StopChecker((), 5).token(4, eos=True) == Stop(FinishReason.STOP, eos=True)
    # a stop string and the budget on the same token: the stop string wins
    chk = StopChecker(("a",), max_new_tokens=1, token_bytes=table.__getitem__)
    assert chk.token(1) == Stop(FinishReason.STOP, cut=0)


def test_checker_segment_order_of_checks():
    chk = StopChecker(("end",), max_new_tokens=5)
    assert chk.segment(b"the e", 2, eos=False) is None
    assert chk.segment(b"the end", 3, eos=True) == Stop(FinishReason.STOP, cut=4)
    chk = StopChecker(("end",), max_new_tokens=5)
    assert chk.segment(b"abc", 5, eos=True) == Stop(FinishReason.STOP, eos=True)
    assert StopChecker((), 5).segment(b"abc", 5, eos=False) == Stop(FinishReason.LENGTH)
    assert StopChecker((), 5).segment(b"abc", 4, eos=False) is None


def test_checker_validates_budget():
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        StopChecker((), 0)


def test_cut_at_stop():
    assert cut_at_stop("abc. def", (". ", "c")) == "ab"
    assert cut_at_stop("abc", ()) == "abc"
    assert cut_at_stop("abc", ("x",)) == "abc"


def old_single_loop(tok, ids, stops, max_new_tokens):
    """The fusers' stop handling before the checker: re-decode the whole output after every token."""
    eos, out = {tok.eos_token_id}, []
    for t in ids:
        if t in eos:
            return out, FinishReason.STOP
        out.append(t)
        if stops and first_stop(tok.decode(out, skip_special_tokens=True), stops) is not None:
            return out, FinishReason.STOP
        if len(out) >= max_new_tokens:
            return out, FinishReason.LENGTH
    return out, None


@pytest.mark.parametrize("family", ["bpe", "sp"])
def test_checker_on_token_streams_equals_the_old_redecode(family):
    """Random streams of a tiny vocabulary (text-like, with random tokens mixed in: specials, byte
    pieces, EOS): the checker stops on the same token with the same reason as the old loop, and the
    cut text is the same."""
    tok = tiny.bpe_tokenizer() if family == "bpe" else tiny.sp_tokenizer()
    codec = Codec(tok)
    rng = random.Random(3)
    corpus = tok.encode("".join(tiny.CORPUS[:7]), add_special_tokens=False)
    reasons = {}
    for _ in range(400):
        start = rng.randrange(len(corpus) - 40)
        ids = [rng.randrange(len(tok)) if rng.random() < 0.1 else t for t in corpus[start:start + 40]]
        text = codec.token_bytes(ids[0]) + b"".join(codec.token_bytes(t) for t in ids[1:])
        text = text.decode("utf-8", errors="replace").replace("\ufffd", "")
        at = rng.randrange(max(1, len(text) - 3))
        stops = tuple(s for s in (text[at:at + rng.randrange(1, 5)], "zq", "東京 c") if s)
        budget = rng.randrange(1, 50)
        want_ids, want_reason = old_single_loop(tok, ids, stops, budget)
        chk = StopChecker(stops, budget, eos_ids={tok.eos_token_id}, token_bytes=codec.token_bytes)
        out, stop = [], None
        for t in ids:
            stop = chk.token(t)
            if stop is None or not stop.eos:
                out.append(t)
            if stop is not None:
                break
        assert (out, stop and stop.reason) == (want_ids, want_reason), stops
        full = tok.decode(out, skip_special_tokens=True)
        cut = first_stop(full, stops)
        assert cut_at_stop(full, stops) == (full if cut is None else full[:cut])
        if stop is not None and stop.cut is not None:
            data = b"".join(codec.token_bytes(t) for t in out).decode("utf-8", errors="replace")
            assert stop.cut == first_stop(data, stops)
        key = "eos" if stop and stop.eos else stop.reason.value if stop else None
        reasons[key] = reasons.get(key, 0) + 1
    assert reasons.get("stop", 0) > 100 and reasons.get("length", 0) > 20
