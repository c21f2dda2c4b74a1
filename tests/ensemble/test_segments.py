"""SpecFuse math (ensemble/segments.py): trimming, scoring, ranking, the exit rule."""
import itertools
import math

import pytest
import torch

from ensemble.segments import (
    LAST_MARGIN,
    Outcome,
    ends_inside_word,
    exit_mask,
    exit_probabilities,
    exit_temperature,
    last_place_pvalue,
    lead_exit_mask,
    lead_pvalue,
    rank,
    rank_exit_mask,
    round_outcomes,
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


# ---- rank without self-scores; the exit rule 'rank' ------------------------------------------------
def test_rank_without_self_scores():
    scores = [[0.9, 0.1, 0.1], [0.8, 0.2, 0.4], [0.2, 0.1, 0.7]]
    final, winner = rank(scores, [1 / 3] * 3, self_score=False)
    rows = [[v / sum(r) for v in r] for r in scores]
    votes = [(rows[1][0] + rows[2][0]) / 2, (rows[0][1] + rows[2][1]) / 2, (rows[0][2] + rows[1][2]) / 2]
    assert final == pytest.approx([v / sum(votes) for v in votes]) and winner == 0
    # a member that loves its own draft cannot vote it in
    loud = [[0.1, 0.8, 0.4], [0.8, 0.1, 0.4], [0.7, 0.2, 0.9]]  # member 2 rates its own draft highest
    assert rank(loud, [1 / 3] * 3)[1] == 2 and rank(loud, [1 / 3] * 3, self_score=False)[1] == 0
    assert rank([[0.4]], [1.0], self_score=False) == ([1.0], 0)
    with pytest.raises(ValueError, match="self_score=False needs a square matrix"):
        rank([[0.1, 0.3, 0.6], [0.2, 0.2, 0.2]], [0.5, 0.5], self_score=False)


def test_round_outcomes_last_place_is_strict():
    assert round_outcomes([0.5, 0.3, 0.2], 0) == [Outcome(3, True, False), Outcome(3, False, False, beaten=True),
                                                  Outcome(3, False, True, beaten=True)]
    # beaten: the winner is ahead by more than the margin (a tie with the winner is no defeat)
    assert [o.beaten for o in round_outcomes([0.4, 0.4, 0.2], 0)] == [False, False, True]
    # equal or nearly equal scores are nobody's last place (identical members never rank last)
    assert not any(o.last for o in round_outcomes([1 / 3] * 3, 0))
    assert not any(o.last for o in round_outcomes([0.5, 0.5 - LAST_MARGIN / 2], 0))
    assert [o.last for o in round_outcomes([0.6, 0.2, 0.2], 0)] == [False, False, False]  # a tie for last
    assert round_outcomes([1.0], 0) == [Outcome(1, True, False)]


def test_last_place_pvalue_is_the_binomial_tail():
    assert last_place_pvalue([3, 3, 3], 3) == pytest.approx(1 / 27)
    assert last_place_pvalue([3] * 4, 3) == pytest.approx(4 * (1 / 27) * (2 / 3) + 1 / 81)
    assert last_place_pvalue([2] * 4, 4) == pytest.approx(1 / 16)
    assert last_place_pvalue([3, 2], 2) == pytest.approx(1 / 6)  # Poisson-binomial when n changed
    assert last_place_pvalue([3, 3], 0) == 1.0 and last_place_pvalue([], 1) == 0.0


def _history(*places: str, n: int = 3) -> list[Outcome]:
    """'w' won, 'l' ranked last, 'm' in between."""
    return [Outcome(n, p == "w", p == "l") for p in places]


def test_rank_exit_rule():
    fair = _history("w", "m", "l")
    # three straight last places out of three: p = 1/27 <= 0.1 exits; three of four: p = 0.11 does not
    assert rank_exit_mask([fair, fair, _history("l", "l", "l")], 4, 0.1) == [False, False, True]
    assert rank_exit_mask([fair, fair, _history("m", "l", "l", "l")], 4, 0.1) == [False, False, False]
    assert rank_exit_mask([fair, fair, _history("m", "l", "l", "l")], 4, 0.12) == [False, False, True]
    # a win in the window keeps the member, however often it ranked last; out of the window it counts no more
    assert rank_exit_mask([fair, fair, _history("w", "l", "l", "l")], 4, 0.5) == [False, False, False]
    assert rank_exit_mask([fair, fair, _history("w", "l", "l", "l", "l")], 4, 0.1) == [False, False, True]
    # never last, never winning: no evidence of last places, no exit
    assert rank_exit_mask([fair, fair, _history(*"mmmmmm")], 4, 1.0) == [False, False, False]
    # alpha 0 never exits; fewer than two members: nobody
    assert rank_exit_mask([fair, _history("l", "l", "l")], 4, 0.0) == [False, False]
    assert rank_exit_mask([_history("l", "l")], 4, 1.0) == [False]


def test_rank_exit_rule_does_not_depend_on_the_answer_length():
    # the same recent record decides after 4 rounds and after 40
    recent = ["l", "l", "l", "l"]
    short, long = _history(*recent, n=2), _history(*(["w", "l"] * 18 + recent), n=2)
    assert rank_exit_mask([_history(*"wwww", n=2), short], 4, 0.1) == [False, True]
    assert rank_exit_mask([_history(*("lw" * 18 + "wwww"), n=2), long], 4, 0.1) == [False, True]


def test_rank_rule_the_last_member_never_exits():
    # every member's record would exit it: the one with the weakest evidence stays (ties: lower index)
    assert rank_exit_mask([_history("l", "l", "l"), _history("l", "l", "l")], 4, 1.0) == [False, True]
    assert rank_exit_mask([_history("l", "l", "l"), _history("m", "l", "l")], 4, 1.0) == [True, False]


# ---- the exit rule 'lead' -------------------------------------------------------------------------
def _lead(*rounds: str, n: int = 3) -> list[list[Outcome]]:
    """Histories of ``n`` members from one string per round: the winner's index, then the indices of
    the members it beat ('0' + '12': member 0 won and beat 1 and 2; '0' alone: ties everywhere)."""
    hist: list[list[Outcome]] = [[] for _ in range(n)]
    for r in rounds:
        w, beat = int(r[0]), {int(c) for c in r[1:]}
        for i in range(n):
            hist[i].append(Outcome(n, i == w, False, beaten=i in beat))
    return hist


def test_lead_pvalue_counts_rounds_won_by_one_other_member_while_i_won_none():
    assert lead_pvalue([3, 3], 2) == pytest.approx(1 / 9)
    assert lead_pvalue([3, 3, 3], 2) == pytest.approx(3 * (1 / 9) * (1 / 3) + 1 / 27)
    assert lead_pvalue([3] * 4, 2) == pytest.approx(11 / 81)
    assert lead_pvalue([2] * 4, 4) == pytest.approx(1 / 16)  # two members: i won none = k won all
    assert lead_pvalue([3, 2], 2) == pytest.approx(1 / 6)  # n changed
    assert lead_pvalue([3, 3], 0) == pytest.approx(4 / 9)  # h 0: just "i won none"


def test_lead_exit_rule():
    # with three members, p = (n - 1) * P(i won none, one other won >= h); at alpha 0.3:
    # two rounds both won by member 0 over member 2: p = 2 / 9 exits; one each by two members: p = 2 / 3 stays
    assert lead_exit_mask(_lead("02", "02"), 4, 0.3) == [False, False, True]
    assert lead_exit_mask(_lead("02", "12"), 4, 0.3) == [False, False, False]
    # 2 of 3 by member 0 (p = 8/27 = 0.296), 2 of 4 (p = 22/81 = 0.27): exit at 0.3, not at 0.2
    assert lead_exit_mask(_lead("02", "12", "02"), 4, 0.3)[2] and not lead_exit_mask(_lead("02", "12", "02"), 4, 0.2)[2]
    assert lead_exit_mask(_lead("12", "02", "12", "02"), 4, 0.3)[2]
    # a win in the window keeps a member; the window slides past it
    assert lead_exit_mask(_lead("21", "02", "02"), 3, 1.0)[2] is False
    assert lead_exit_mask(_lead("21", "02", "02", "02"), 3, 0.3)[2] is True
    # rounds that member won without beating i (a near tie) are no evidence
    assert lead_exit_mask(_lead("0", "0", "0", "0"), 4, 1.0) == [False, False, False]
    # alpha 0 never; one member: nobody
    assert lead_exit_mask(_lead("02", "02", "02"), 4, 0.0) == [False, False, False]
    assert lead_exit_mask(_lead("0", "0", n=1), 4, 1.0) == [False]


def test_lead_rule_at_the_defaults_with_three_members_in_plain_words():
    """docs/algorithms.md: at window 4, alpha 0.3, three members and no ties with the winner, a member
    exits at round 2 when it lost both rounds to the same member, and from round 3 on when it won none
    of its last 3 or 4 rounds (checked over every sequence of round winners)."""
    for t in range(2, 8):
        for winners in itertools.product(range(3), repeat=t):
            hist: list[list[Outcome]] = [[] for _ in range(3)]
            for w in winners:
                for i, o in enumerate(round_outcomes([0.5 if k == w else 0.25 for k in range(3)], w)):
                    hist[i].append(o)
            recent = winners[-4:]
            plain = [i not in recent and (t > 2 or recent[0] == recent[1]) for i in range(3)]
            assert lead_exit_mask(hist, 4, 0.3) == plain, winners


def test_lead_exit_rule_does_not_depend_on_the_answer_length():
    recent = ["01"] * 4
    assert lead_exit_mask(_lead(*recent, n=2), 4, 0.1) == [False, True]  # p = 1/16
    assert lead_exit_mask(_lead(*(["01", "10"] * 18 + recent), n=2), 4, 0.1) == [False, True]
    assert lead_exit_mask(_lead(*(["01", "10"] * 18 + recent[:3]), n=2), 4, 0.1) == [False, False]


def test_lead_rule_the_last_member_never_exits():
    hist = _lead("01", "01", n=2)
    hist[0] = [Outcome(2, False, False, beaten=True)] * 2  # an impossible record: nobody ever won
    hist[1] = [Outcome(2, True, False)] * 2
    assert lead_exit_mask(hist, 4, 1.0) == [True, False]
    both = [[Outcome(2, False, False, beaten=True)] * 2, [Outcome(2, False, False, beaten=True)] * 2]
    assert not all(lead_exit_mask(both, 4, 1.0))
