"""SpecFuse math (ensemble/segments.py): trimming, scoring, ranking, the exit rule."""
import math

import pytest
import torch

from ensemble.segments import (
    ends_inside_word,
    exit_mask,
    exit_probabilities,
    exit_temperature,
    rank,
    segment_score,
    trim_to_word,
)


def pieces(*texts: str) -> list[bytes]:
    return [t.encode() for t in texts]


@pytest.mark.parametrize(
    "draft, ended, keep",
    [
        (pieces("The", " capital", " of", " Fra"), False, 3),  # inside a word: cut before " Fra"
        (pieces("The", " capital", " is", " Paris", "."), False, 5),  # ends with punctuation: whole
        (pieces("Paris", " is", " "), False, 2),  # trailing whitespace token is cut
        (pieces(" Constanti", "nople"), False, 2),  # only the first token starts a word: keep whole
        (pieces("abc"), False, 1),
        (pieces("The", " capital", " of", " Fra"), True, 4),  # EOS or budget: whole
        ([b"a", b" caf", b"\xc3"], False, 1),  # ends inside a UTF-8 character
        ([b"x", b" \xe6\x9d\xb1", b"\xe4\xba\xac"], False, 1),  # CJK letters are word characters
        ([b"Hi", b"", b" there"], False, 2),  # special tokens have no bytes and start nothing
        ([], False, 0),
    ],
)
def test_trim_to_word(draft, ended, keep):
    assert trim_to_word(draft, ended) == keep


def test_ends_inside_word():
    assert ends_inside_word(b"Par") and ends_inside_word(b"x_1") and ends_inside_word(b"\xe6\x9d")
    assert not ends_inside_word(b"Paris.") and not ends_inside_word(b"a ") and not ends_inside_word(b"")


def test_segment_score_is_mean_probability():
    lp = torch.log(torch.tensor([0.5, 0.25, 1.0]))
    assert segment_score(lp) == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert segment_score(torch.zeros(0)) == 0.0


def test_rank_normalises_each_verifier_then_weights():
    scores = [[0.8, 0.2, 0.0], [0.1, 0.6, 0.3], [0.5, 0.5, 1.0]]
    final, winner = rank(scores, [1 / 3, 1 / 3, 1 / 3])
    rows = [[v / sum(r) for v in r] for r in scores]
    want = [sum(rows[j][c] for j in range(3)) / 3 for c in range(3)]
    assert final == pytest.approx(want)
    assert math.isclose(sum(final), 1.0)
    assert winner == max(range(3), key=lambda c: want[c])
    # a single verifier with all the weight decides alone
    assert rank(scores, [0.0, 1.0, 0.0])[1] == 1
    # unnormalised weights are renormalised; all-zero weights are uniform
    assert rank(scores, [2.0, 2.0, 2.0])[0] == pytest.approx(final)
    assert rank(scores, [0.0, 0.0, 0.0])[0] == pytest.approx(final)


def test_rank_scale_of_a_verifier_does_not_matter():
    scores = [[0.8, 0.2], [0.1, 0.3]]
    scaled = [[0.8, 0.2], [0.01, 0.03]]
    assert rank(scores, [0.5, 0.5])[0] == pytest.approx(rank(scaled, [0.5, 0.5])[0])


def test_rank_ties_go_to_the_lower_index():
    assert rank([[0.5, 0.5], [0.5, 0.5]], [0.5, 0.5]) == ([0.5, 0.5], 0)
    assert rank([[0.2, 0.4, 0.4], [0.2, 0.4, 0.4], [0.2, 0.4, 0.4]], [1, 1, 1])[1] == 1
    final, winner = rank([[0.0, 0.0], [0.0, 0.0]], [0.5, 0.5])  # nothing to go on: uniform
    assert final == [0.5, 0.5] and winner == 0


def test_rank_rectangular_for_labeling():
    final, winner = rank([[0.1, 0.3, 0.6], [0.2, 0.2, 0.2]], [0.5, 0.5])
    # by hand: the rows normalise to [0.1, 0.3, 0.6] and [1/3, 1/3, 1/3], then an even mean
    assert final == pytest.approx([(0.1 + 1 / 3) / 2, (0.3 + 1 / 3) / 2, (0.6 + 1 / 3) / 2]) and winner == 2
    assert math.isclose(sum(final), 1.0)


def test_rank_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weights must have one entry per verifier"):
        rank([[0.1, 0.2], [0.3, 0.4]], [1.0])
    with pytest.raises(ValueError, match="non-empty verifier x candidate matrix"):
        rank([[0.1, 0.2], [0.3]], [0.5, 0.5])


def test_exit_temperature_is_entropy_with_a_floor():
    assert exit_temperature([1.0, 1.0, 1.0], 0.05) == pytest.approx(math.log(3))
    assert exit_temperature([2.0, 0.0], 0.05) == 0.05
    s = [0.6, 0.3, 0.1]
    assert exit_temperature([6.0, 3.0, 1.0], 0.05) == pytest.approx(-sum(p * math.log(p) for p in s))


def test_exit_rule():
    # an even quality distribution: nobody exits, however many rounds
    assert exit_mask([5.0, 5.0, 5.0], 0.5, 0.05) == [False, False, False]
    # a clear loser exits; the delta / n threshold is strict
    q = [1.6, 0.3, 0.1]
    p = exit_probabilities(q, exit_temperature(q, 0.05))
    assert exit_mask(q, 0.5, 0.05) == [pi < 0.5 / 3 for pi in p] == [False, True, True]
    # trailing by the same share: no exit after 2 rounds, exit after 3
    share = [0.45, 0.45, 0.10]
    assert exit_mask([2 * s for s in share], 0.5, 0.05) == [False, False, False]
    assert exit_mask([3 * s for s in share], 0.5, 0.05) == [False, False, True]
    # delta 0: never; fewer than two members: never
    assert exit_mask(q, 0.0, 0.05) == [False, False, False]
    assert exit_mask([0.1], 1.0, 0.05) == [False]


def test_the_last_member_never_exits():
    for q in ([1.0, 0.0], [0.3, 0.3], [0.0, 0.0, 0.0], [5.0, 4.0, 0.1]):
        for delta in (0.5, 1.0, 3.0):  # delta > 1 would otherwise remove everyone
            assert not all(exit_mask(q, delta, 0.05))
    assert exit_mask([0.3, 0.3], 3.0, 0.05) == [False, True]  # ties keep the lower index
