"""Prior correction (ensemble/priors.py, docs/algorithms.md "Prior correction"): the math, the priors'
checks and JSON form, and every fuser's label with priors on tiny real members: member statistics keep
the uncorrected posteriors, the label uses the corrected ones, no priors is today's computation exactly,
an uncovered choice is refused naming it, and a row's label does not depend on its batch."""
import json
import math
import random

import pytest

from ensemble import Single
from ensemble.fusers.deepen import DeePEn
from ensemble.fusers.specfuse import SpecFuse
from ensemble.labeling import ChoiceScores, LabelParams, best, gated_pool, label_posterior, log_scores, posterior, temper
from ensemble.priors import ChoicePriors, UncoveredChoice, correct_log, estimate, keying, row_prior

PROMPTS = ["Is fire hot? Answer yes or no.", "What is the capital of France?", "Tell me about the cat."]
CHOICES = [["yes", "no", "maybe so"], ["Paris", "Rome", "a big house near the river"], ["The cat", "a dog"]]


def _scores(logprobs):
    return ChoiceScores(logprob=tuple(logprobs), tokens=(1,) * len(logprobs), chars=(1,) * len(logprobs))


def _priors(members, tables, **kw):
    return ChoicePriors(keyed_by=kw.pop("keyed_by", "position"), norm=kw.pop("norm", "token"), members=members,
                        tables=tables, **kw)


# ---- the math ------------------------------------------------------------------------------------
def test_a_uniform_prior_changes_nothing_and_a_prior_divides_out():
    s = _scores([-1.0, -2.5, -0.3])
    params = LabelParams(norm="sum", temperature=1.7)
    assert label_posterior(s, params) == posterior(s, "sum", 1.7)  # no prior: the same computation
    assert label_posterior(s, params, [1 / 3] * 3) == pytest.approx(posterior(s, "sum", 1.7), abs=1e-15)
    prior = [0.7, 0.2, 0.1]
    p = posterior(s, "sum")
    want = [q / r for q, r in zip(p, prior)]
    assert label_posterior(s, params.with_(temperature=1.0), prior) == pytest.approx([w / sum(want) for w in want])
    # a temperature applies after the correction: softmax((scores - log prior) / T)
    assert label_posterior(s, params, prior) == pytest.approx(temper(correct_log(log_scores(s, "sum"), prior), 1.7))
    with pytest.raises(ValueError, match="a prior per choice is needed: 3 scores, 2 priors"):
        correct_log([0.0, 1.0, 2.0], [0.5, 0.5])


def test_a_member_biased_toward_one_key_has_its_bias_removed():
    """The member multiplies 'yes' by 6 on every row; the gold label's evidence is a factor 3. Its own
    labels are always 'yes'; with its dev prior divided out they follow the evidence."""
    rng = random.Random(0)
    keys = ["no", "yes"]
    rows, golds = [], []
    for _ in range(400):
        gold = rng.randrange(2)
        order = keys[:] if rng.random() < 0.5 else keys[::-1]  # the same label set, shuffled
        ev = [3.0 if order[c] == keys[gold] else 1.0 for c in range(2)]
        raw = [e * (6.0 if order[c] == "yes" else 1.0) for c, e in enumerate(ev)]
        rows.append((order, [math.log(x) for x in raw]))
        golds.append(order.index(keys[gold]))
    sets = [o for o, _ in rows]
    keyed_by, label_set = keying(sets)
    assert (keyed_by, label_set) == ("text", ("no", "yes"))
    table = estimate([temper(x, 1.0) for _, x in rows], sets, label_set)
    assert table[1] > 0.75 and table[0] + table[1] == pytest.approx(1.0)
    raw_acc = sum(best(x) == g for (_, x), g in zip(rows, golds)) / len(rows)
    fixed = [correct_log(x, row_prior(table, label_set, o)) for o, x in rows]
    acc = sum(best(x) == g for x, g in zip(fixed, golds)) / len(rows)
    assert all(o[best(x)] == "yes" for o, x in rows)  # uncorrected, always 'yes'
    assert acc == 1.0 and raw_acc < 0.6


def test_keying_and_estimate_by_position():
    assert keying([["a", "b"], ["b", "a"]]) == ("text", ("a", "b"))
    assert keying([["a", "b"], ["a", "c"]]) == ("position", None)
    assert keying([["a", "b"], ["a", "b", "c"]]) == ("position", None)
    # ragged rows: a position's prior is the mean over the rows that have it
    table = estimate([[0.5, 0.5], [0.2, 0.3, 0.5]], [["a", "b"], ["c", "d", "e"]], None)
    assert table == pytest.approx((0.35, 0.4, 0.5))
    assert estimate([[1.0, 0.0]], [["a", "b"]], None)[1] == 5e-324  # a prior is never 0


def test_an_uncovered_choice_names_its_value():
    with pytest.raises(UncoveredChoice, match=r"choice 'maybe' has no prior: the priors cover the dev label set "
                                              r"\['no', 'yes'\]"):
        row_prior([0.4, 0.6], ("no", "yes"), ["yes", "maybe"])
    with pytest.raises(UncoveredChoice, match="a row of 3 choices has no prior for position 3: the dev rows had "
                                              "at most 2 choices"):
        row_prior([0.4, 0.6], None, ["a", "b", "c"])
    assert row_prior([0.4, 0.6], ("no", "yes"), ["yes", "no"]) == [0.6, 0.4]
    assert row_prior([0.5, 0.3, 0.2], None, ["a", "b"]) == [0.5, 0.3]
    pri = _priors(["m"], [[0.4, 0.6]], keyed_by="text", keys=["no", "yes"])
    with pytest.raises(UncoveredChoice, match=r"row 1: choice 'maybe' has no prior"):
        pri.check([["yes", "no"], ["maybe", "no"]], 1)
    with pytest.raises(ValueError, match="the priors have 1 member tables for 2 members"):
        pri.check([["yes", "no"]], 2)
    assert pri.uncovered(["maybe", "no"]).startswith("choice 'maybe' has no prior") and pri.uncovered(["no"]) is None


# ---- the priors object -----------------------------------------------------------------------------
def test_priors_are_validated_and_round_trip_through_json(tmp_path):
    pri = _priors(["a", "b"], [[0.5, 0.3, 0.2], [0.2, 0.8]], fused=[0.4, 0.3, 0.3], rows=12)
    assert ChoicePriors.from_mapping(json.loads(json.dumps(pri.to_dict()))) == pri
    assert repr(pri) == "ChoicePriors(keyed_by='position', norm='token', members=['a', 'b'], 3 keys, fused=yes, rows=12)"
    (tmp_path / "p.json").write_text(json.dumps(pri.to_dict()))
    assert ChoicePriors.from_arg(str(tmp_path / "p.json")) == pri
    (tmp_path / "prof.json").write_text(json.dumps({"method": "deepen", "priors": pri.to_dict()}))
    assert ChoicePriors.from_arg(str(tmp_path / "prof.json")) == pri
    (tmp_path / "none.json").write_text(json.dumps({"method": "deepen", "priors": None}))
    with pytest.raises(ValueError, match="has no priors"):
        ChoicePriors.from_arg(str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="does not exist"):
        ChoicePriors.from_arg(str(tmp_path / "nope.json"))
    for change, match in [({"keyed_by": "id"}, r"keyed_by must be one of \('text', 'position'\), got 'id'"),
                          ({"tables": [[0.5, 0.5]]}, "tables must be one per member \\(2\\), got 1"),
                          ({"tables": [[0.5, 0.0], [0.5, 0.5]]}, "must hold finite probabilities > 0, got 0.0"),
                          ({"keys": ["a", "b"]}, "keys must be None when keyed by position"),
                          ({"keyed_by": "text"}, "keys must be the distinct choice texts"),
                          ({"keyed_by": "text", "keys": ["x", "y"]}, r"every table must have 2 entries .*'a': 3"),
                          ({"members": []}, "members must be a non-empty list"),
                          ({"members": 5}, "members must be a non-empty list of member specs, got 5"),
                          ({"rows": -1}, "rows must be an integer >= 0")]:
        with pytest.raises(ValueError, match=match):
            ChoicePriors.from_mapping({**pri.to_dict(), **change})
    with pytest.raises(ValueError, match=r"priors has unknown keys \['extra'\]"):
        ChoicePriors.from_mapping({**pri.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match=r"priors: .*missing 1 required .* 'tables'"):
        ChoicePriors.from_mapping({k: v for k, v in pri.to_dict().items() if k != "tables"})
    # LabelParams takes the mapping, and refuses priors of another normalisation
    assert LabelParams(norm="token", priors=pri.to_dict()).priors == pri
    with pytest.raises(ValueError, match="priors were estimated under norm 'token', but norm is 'pmi'"):
        LabelParams(priors=pri)


# ---- the fusers ------------------------------------------------------------------------------------
PRI = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]  # by position, one table per member


def _params(n, **kw):
    pri = _priors([f"m{i}" for i in range(n)], PRI[:n], **kw)
    return LabelParams(norm="token", temperature=1.5, priors=pri)


def test_no_priors_is_todays_computation_exactly(bpe_member, sp_member):
    params = LabelParams(norm="token", temperature=1.5, gate=0.3)
    for out in Single(sp_member).label(PROMPTS, CHOICES, params=params):
        assert out.probs == out.member_stats[0].choice_probs
    spec = SpecFuse([sp_member, bpe_member], weights=(0.6, 0.4))
    for out in spec.label(PROMPTS, CHOICES, params=params):
        want, gated = gated_pool([s.choice_probs for s in out.member_stats], spec.weights, spec.config.label_pool, 0.3)
        assert out.probs == want and out.gated == gated


def test_single_and_specfuse_label_with_corrected_posteriors_and_report_raw_ones(bpe_member, sp_member):
    members = [sp_member, bpe_member]
    plain = LabelParams(norm="token", temperature=1.5)
    params = _params(2)
    for fuser, n in ((Single(sp_member), 1), (SpecFuse(members, weights=(0.6, 0.4)), 2)):
        p = params if n == 2 else _params(1)
        before, after = fuser.label(PROMPTS, CHOICES, params=plain), fuser.label(PROMPTS, CHOICES, params=p)
        for b, (x, y) in enumerate(zip(before, after)):
            raw = [s.choice_probs for s in y.member_stats]
            assert raw == [s.choice_probs for s in x.member_stats]  # statistics: uncorrected
            fixed = [temper(correct_log([math.log(q) for q in temper([math.log(q) * 1.5 for q in r], 1.0)],
                                        PRI[i][:len(CHOICES[b])]), 1.5) for i, r in enumerate(raw)]
            want = fixed[0] if n == 1 else gated_pool(fixed, fuser.weights, fuser.config.label_pool, None)[0]
            assert y.probs == pytest.approx(want, abs=1e-9)
        assert any(x.probs != pytest.approx(y.probs, abs=1e-3) for x, y in zip(before, after))


def test_deepen_corrects_the_gate_and_the_fused_posterior(bpe_member, sp_member):
    fuser = DeePEn([sp_member, bpe_member], main=1)
    fused = [0.2, 0.2, 0.6]
    plain = LabelParams(norm="token")
    params = _params(2, fused=fused).with_(temperature=1.0)
    before, after = fuser.label(PROMPTS, CHOICES, params=plain), fuser.label(PROMPTS, CHOICES, params=params)
    for b, (x, y) in enumerate(zip(before, after)):
        for s, t in zip(y.member_stats, x.member_stats):
            assert s.choice_probs == pytest.approx(t.choice_probs, abs=1e-9)
        want = temper(correct_log([math.log(q) for q in x.probs], fused[:len(CHOICES[b])]), 1.0)
        assert y.probs == pytest.approx(want, abs=1e-6) and not y.gated
    # the gate reads the main member's corrected posterior: gate 0 keeps it on every row
    kept = fuser.label(PROMPTS, CHOICES, params=params.with_(gate=0.0))
    for b, (k, x) in enumerate(zip(kept, before)):
        main = x.member_stats[1].choice_probs
        want = temper(correct_log([math.log(q) for q in main], PRI[1][:len(CHOICES[b])]), 1.0)
        assert k.gated and k.probs == pytest.approx(want, abs=1e-9)
    # without a fused table the fused posterior is left as it is
    plain_fused = fuser.label(PROMPTS, CHOICES, params=_params(2).with_(temperature=1.0))
    assert [o.probs for o in plain_fused] == [pytest.approx(o.probs, abs=1e-9) for o in before]


def test_an_uncovered_row_is_refused_before_any_model_call(bpe_member, sp_member, monkeypatch):
    params = LabelParams(norm="token", priors=_priors(["a", "b"], [[0.5, 0.5], [0.4, 0.6]]))
    for fuser in (SpecFuse([sp_member, bpe_member]), DeePEn([sp_member, bpe_member])):
        monkeypatch.setattr(sp_member, "score", lambda *a, **k: pytest.fail("a model call"))
        with pytest.raises(UncoveredChoice, match="row 0: a row of 3 choices has no prior for position 3"):
            fuser.label(PROMPTS, CHOICES, params=params)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="the priors have 2 member tables for 1 members"):
        Single(sp_member).label(PROMPTS, CHOICES, params=params)


def test_labels_with_priors_do_not_depend_on_the_batch(bpe_member, sp_member):
    params = _params(2, fused=[0.3, 0.3, 0.4]).with_(gate=0.2)
    for fuser in (SpecFuse([sp_member, bpe_member]), DeePEn([sp_member, bpe_member])):
        together = fuser.label(PROMPTS, CHOICES, params=params)
        reordered = fuser.label(PROMPTS[::-1], CHOICES[::-1], params=params)[::-1]
        for b, (t, r) in enumerate(zip(together, reordered)):
            alone = fuser.label([PROMPTS[b]], [CHOICES[b]], params=params)[0]
            for o in (r, alone):
                assert o.label == t.label and o.gated == t.gated and o.probs == pytest.approx(t.probs, abs=1e-4)
