"""SpecFuse model exit, rules 'lead' and 'rank', and the verification ablation without self-scores,
on the scripted fake members of tests/ensemble/test_specfuse.py (docs/algorithms.md, SpecFuse)."""
from __future__ import annotations

import pytest

from ensemble import DecodeParams
from ensemble.config import EXIT_ALPHA, SpecFuseConfig, hashed_fields
from ensemble.fusers import specfuse as specfuse_module
from ensemble.fusers.specfuse import SpecFuse
from jobs.cli import parse_config
from tests.ensemble.test_specfuse import T, U, Scripted, trio

LONG = DecodeParams(max_new_tokens=40)


def test_the_default_rule_is_lead_and_its_settings_are_hashed():
    cfg = SpecFuseConfig()
    assert (cfg.exit, cfg.exit_rule, cfg.exit_alpha, cfg.self_score) == (True, "lead", None, True)
    assert EXIT_ALPHA == {"rank": 0.1, "lead": 0.3}  # the level each window rule uses at exit_alpha None
    assert {"exit_rule", "exit_window", "exit_alpha", "self_score"} <= set(hashed_fields(cfg))
    got = parse_config(["--input", "i", "--output", "o", "--method", "specfuse", "--members", "a", "b",
                        "--exit-rule", "softmax", "--exit-window", "6", "--exit-alpha", "0.05",
                        "--no-specfuse-self-score"]).fuser
    assert got == SpecFuseConfig(exit_rule="softmax", exit_window=6, exit_alpha=0.05, self_score=False)


def test_exit_alpha_levels_are_pinned_because_the_config_hash_does_not_see_them():
    assert EXIT_ALPHA == {"rank": 0.1, "lead": 0.3}, (
        "EXIT_ALPHA changed: exit_alpha None is hashed as None, so this changes SpecFuse outputs under an "
        "unchanged config_hash; bump ensemble.config.OUTPUTS_VERSION, then update this test")
    assert SpecFuseConfig().exit_level == 0.3 and SpecFuseConfig(exit_rule="rank").exit_level == 0.1
    assert SpecFuseConfig(exit_alpha=0.05).exit_level == 0.05
    assert SpecFuseConfig(exit_rule="softmax").exit_level is None


def test_an_exit_rule_without_a_mask_raises_naming_it():
    a, b, c = trio()
    fuser = SpecFuse([a, b, c], segment_tokens=4, exit_min_rounds=1)
    object.__setattr__(fuser.config, "exit_rule", "future")  # past validation, as a rule added to EXIT_RULES only
    with pytest.raises(ValueError, match="'future'"):
        fuser.generate(["p0"], LONG)


def test_exit_fires_for_an_always_last_member_and_it_makes_no_more_calls():
    a, b, c = trio()  # C's draft (U) ranks last every round
    out = SpecFuse([a, b, c], segment_tokens=4, exit_rule="rank").generate(["p0"], LONG)[0]
    sa, sb, sc = out.member_stats
    assert out.text == T[:40]
    # three last places out of three among three members: p = 1/27 <= 0.1
    assert sc.exit_round == sc.rounds_active == 3 and sc.accepted == 0 and sa.exit_round is None is sb.exit_round
    assert sa.rounds_active > 3
    assert sc.calls == 2 * 3 and sa.calls == 2 * sa.rounds_active
    # nothing touches C's row after its exit: 3 drafts (rewinds), 3 verifications, 2 broadcasts
    assert c.calls("rewind", "p0") == 3 and c.calls("score", "p0") == 3
    assert sum(1 for m, ps in c.log if m == "feed" and "p0" in ps) <= 3 * 4 + 2


def test_lead_exit_fires_for_an_always_beaten_member_and_it_makes_no_more_calls():
    a, b, c = trio()  # A's draft (T) wins every round (B's equal draft ties it, so B is never beaten); C's loses
    out = SpecFuse([a, b, c], segment_tokens=4, exit_rule="lead").generate(["p0"], LONG)[0]
    sa, sb, sc = out.member_stats
    assert out.text == T[:40]
    # two rounds won by A over C out of two, three members: p = 2 * (1/3)**2 = 2/9 <= 0.3 (the default level)
    assert sc.exit_round == sc.rounds_active == 2 and sc.accepted == 0 and sa.exit_round is None is sb.exit_round
    assert sc.calls == 2 * 2 and sa.calls == 2 * sa.rounds_active and sa.rounds_active > 2
    assert c.calls("rewind", "p0") == 2 and c.calls("score", "p0") == 2
    # at alpha 0.2 it takes three rounds (p = 2/27)
    assert SpecFuse([a, b, c], segment_tokens=4, exit_rule="lead", exit_alpha=0.2).generate(
        ["p0"], LONG)[0].member_stats[2].exit_round == 3


@pytest.mark.parametrize("rule", ["rank", "lead"])
@pytest.mark.parametrize("fingerprints", [("fake", "fake", "fake"), ("fake", "other", "third")])
def test_identical_members_never_exit(fingerprints, rule):
    members = [Scripted(name, {"p": [(T, 0.6), (U, 0.2)]}, fingerprint=f) for name, f in zip("ABC", fingerprints)]
    # the most eager settings: any last place or defeat would exit at once, yet identical members tie
    fuser = SpecFuse(members, segment_tokens=4, exit_rule=rule, exit_window=1, exit_alpha=1.0, exit_min_rounds=1)
    out = fuser.generate(["p"], LONG)[0]
    assert out.text == T[:40] and out.member_stats[0].rounds_active >= 10
    for s in out.member_stats:
        assert s.exit_round is None and s.rounds_active == out.member_stats[0].rounds_active


@pytest.mark.parametrize("rule, patched", [("rank", "rank_exit_mask"), ("lead", "lead_exit_mask"),
                                           ("softmax", "exit_mask")])
def test_a_member_never_exits_in_the_round_it_won(monkeypatch, rule, patched):
    """A rule that would remove every member: the round's winner stays, under either rule."""
    monkeypatch.setattr(specfuse_module, patched, lambda q, *_: [True] * len(q))
    a, b, c = trio()
    out = SpecFuse([a, b, c], segment_tokens=4, exit_rule=rule, exit_min_rounds=1).generate(["p0"], LONG)[0]
    sa, sb, sc = out.member_stats
    assert sa.exit_round is None and sb.exit_round == sc.exit_round == 1 and sb.accepted == sc.accepted == 0
    assert out.text == T[:40] and sa.accepted == sa.rounds_active > 1


@pytest.mark.parametrize("settings, exit_round", [
    ({"exit_window": 1, "exit_alpha": 1 / 3, "exit_min_rounds": 1}, 1),  # one last place of three: p = 1/3
    ({"exit_window": 100}, 3),  # a window longer than the answer: every round so far
    ({"exit_window": 3, "exit_alpha": 0.03}, None),  # 3 rounds can give no p below 1/27
    ({"exit_window": 4, "exit_alpha": 0.03}, 4),  # 4 last places in 4: p = 1/81
])
def test_window_and_alpha(settings, exit_round):
    a, b, c = trio()
    out = SpecFuse([a, b, c], segment_tokens=4, exit_rule="rank", **settings).generate(["p0"], LONG)[0]
    assert out.member_stats[2].exit_round == exit_round and out.text == T[:40]


def test_rows_are_independent():
    a, b, c = trio()
    fuser = SpecFuse([a, b, c], segment_tokens=4, exit_rule="rank")
    params = [DecodeParams(max_new_tokens=40), DecodeParams(max_new_tokens=23)]
    both = fuser.generate(["p0", "p1"], params)
    alone = [fuser.generate([p], q)[0] for p, q in zip(["p0", "p1"], params)]
    assert [o.text for o in both] == [o.text for o in alone]
    assert [[s.exit_round for s in o.member_stats] for o in both] == [[None, None, 3], [3, None, None]]
    assert [[s.calls for s in o.member_stats] for o in both] == [[s.calls for s in o.member_stats] for o in alone]


def test_without_self_scores_a_member_cannot_vote_its_own_draft_in():
    a, b, c = trio()
    # all the weight on C: with self-scores C's own preference (U) wins, without them the others rank
    # C's draft and C ranks theirs, and T wins
    kw = dict(segment_tokens=4, exit=False, weights=[0.0, 0.0, 1.0])
    assert SpecFuse([a, b, c], **kw).generate(["p0"], DecodeParams(max_new_tokens=17))[0].text == U[:17]
    out = SpecFuse([a, b, c], self_score=False, **kw).generate(["p0"], DecodeParams(max_new_tokens=17))[0]
    assert out.text == T[:17] and out.member_stats[2].accepted == 0
    # with even weights the trio agrees either way
    even = SpecFuse([a, b, c], segment_tokens=4, exit_rule="rank", self_score=False).generate(["p0"], LONG)[0]
    assert even.text == T[:40] and even.member_stats[2].exit_round == 3
