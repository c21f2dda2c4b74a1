"""ensemble.labeling: the scorer's arithmetic on hand-made numbers (no models, no torch)."""
import math
from dataclasses import fields

import pytest

from ensemble.labeling import (CHOICE_NORMS, POOLS, ChoiceScores, LabelParams, best, gate, log_scores, margin, pool,
                               posterior, softmax, temper)

S = ChoiceScores(logprob=(-2.0, -3.0, -6.0), tokens=(1, 2, 4), chars=(4, 5, 12), neutral=(-1.0, -4.0, -3.0))


@pytest.mark.parametrize("norm, want", [
    ("sum", [-2.0, -3.0, -6.0]),
    ("token", [-2.0, -1.5, -1.5]),
    ("char", [-0.5, -0.6, -0.5]),
    ("pmi", [-1.0, 1.0, -3.0]),
])
def test_log_scores_per_norm(norm, want):
    assert log_scores(S, norm) == pytest.approx(want)
    probs = posterior(S, norm)
    assert probs == pytest.approx([math.exp(x) / sum(math.exp(y) for y in want) for x in want])
    assert sum(probs) == pytest.approx(1.0)


def test_norms_pick_different_labels():
    assert [best(posterior(S, n)) for n in CHOICE_NORMS] == [0, 1, 0, 1]  # token: tie -> the lower index


def test_pmi_needs_the_neutral_scores_and_unknown_norms_are_refused():
    plain = ChoiceScores(logprob=(-1.0, -2.0), tokens=(1, 1), chars=(1, 1))
    with pytest.raises(ValueError, match="norm 'pmi' needs the choices' neutral log-probabilities"):
        log_scores(plain, "pmi")
    with pytest.raises(ValueError, match="norm must be one of .*got 'mean'"):
        log_scores(plain, "mean")


def test_choice_scores_are_checked():
    with pytest.raises(ValueError, match="one entry per choice"):
        ChoiceScores(logprob=(-1.0, -2.0), tokens=(1,), chars=(1, 1))
    with pytest.raises(ValueError, match="one entry per choice"):
        ChoiceScores(logprob=(-1.0,), tokens=(1,), chars=(1,), neutral=(0.0, 1.0))
    with pytest.raises(ValueError, match="counts must be >= 1"):
        ChoiceScores(logprob=(-1.0,), tokens=(0,), chars=(1,))


def test_posterior_is_stable_for_large_scores():
    s = ChoiceScores(logprob=(-1000.0, -1001.0), tokens=(1, 1), chars=(1, 1))
    assert posterior(s, "sum") == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])


@pytest.mark.parametrize("norm", CHOICE_NORMS)
@pytest.mark.parametrize("t", [0.25, 0.5, 2.0, 16.0])
def test_temperature_rescales_and_never_reorders(norm, t):
    want = softmax([x / t for x in log_scores(S, norm)])
    assert posterior(S, norm, t) == pytest.approx(want)
    assert posterior(S, norm, 1.0) == posterior(S, norm)  # 1.0: bitwise the untempered posterior
    assert best(posterior(S, norm, t)) == best(posterior(S, norm))
    # a posterior's logarithms temper to the same result as its scores (softmax ignores the shift)
    assert temper([math.log(q) for q in posterior(S, norm)], t) == pytest.approx(want)
    assert max(posterior(S, norm, 2 * t)) <= max(posterior(S, norm, t)) + 1e-12  # hotter: flatter


def test_temper_takes_a_zero_probability_and_refuses_bad_temperatures():
    out = temper([0.0, -math.inf], 2.0)
    assert out[0] == pytest.approx(1.0) and out[1] >= 0.0 and all(math.isfinite(q) for q in out)
    for bad in (0, -1.0, math.inf, math.nan, True, "2"):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0, got"):
            temper([0.0, 1.0], bad)


def test_linear_pool_is_the_weighted_mean():
    a, b = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    assert pool([a, b], [0.75, 0.25], "linear") == pytest.approx([0.55, 0.225, 0.225])
    assert pool([a, b], [3, 1], "linear") == pytest.approx([0.55, 0.225, 0.225])  # weights normalised
    assert pool([a], [1.0], "linear") == a  # one member: exactly its posterior


def test_loglinear_pool_is_the_normalised_weighted_geometric_mean():
    a, b = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    raw = [x ** 0.75 * y ** 0.25 for x, y in zip(a, b)]
    assert pool([a, b], [0.75, 0.25], "loglinear") == pytest.approx([r / sum(raw) for r in raw])
    assert pool([a], [1.0], "loglinear") == pytest.approx(a, abs=1e-12)
    # a member of weight 0 has no say, even with a zero probability
    assert pool([a, [0.0, 0.5, 0.5]], [1.0, 0.0], "loglinear") == pytest.approx(a)
    # a probability that underflowed to 0 vetoes its choice without making the pool undefined
    vetoed = pool([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]], [0.5, 0.5], "loglinear")
    assert vetoed == pytest.approx([0.0, 0.0, 1.0]) and all(math.isfinite(p) for p in vetoed)


def test_pool_errors_name_the_value():
    with pytest.raises(ValueError, match="pool kind must be one of .*got 'max'"):
        pool([[1.0]], [1.0], "max")
    with pytest.raises(ValueError, match="one weight per posterior, got 1 weights for 2"):
        pool([[1.0], [1.0]], [1.0], "linear")
    with pytest.raises(ValueError, match="posteriors must all have 2 choices"):
        pool([[0.5, 0.5], [1.0]], [0.5, 0.5], "linear")
    with pytest.raises(ValueError, match="non-negative with a positive sum, got \\[0.0, 0.0\\]"):
        pool([[1.0], [1.0]], [0.0, 0.0], "linear")
    assert POOLS == ("linear", "loglinear")


def test_margin_and_gate():
    assert margin([0.6, 0.3, 0.1]) == pytest.approx(0.3)
    assert margin([0.3, 0.6, 0.1]) == pytest.approx(0.3)
    assert margin([0.5, 0.5]) == 0.0
    assert margin([1.0]) == 1.0
    assert not gate([0.99, 0.01], None)  # never
    assert gate([0.5, 0.5], 0.0)  # always, even on a tie
    assert gate([0.6, 0.3, 0.1], 0.3) and not gate([0.6, 0.3, 0.1], 0.31)
    assert best([0.4, 0.4, 0.2]) == 0 and best([0.2, 0.4, 0.4]) == 1


def test_label_params_defaults_validation_and_flags():
    p = LabelParams()
    assert (p.norm, p.neutral_context, p.target_delimiter, p.gate, p.temperature) == ("pmi", "Answer:", " ", None, 1.0)
    assert LabelParams(gate=0).gate == 0.0 and isinstance(LabelParams(gate=1).gate, float)
    assert LabelParams(temperature=2).temperature == 2.0 and isinstance(LabelParams(temperature=2).temperature, float)
    assert p.with_(norm="pmi").norm == "pmi"
    for kwargs, message in [
        ({"norm": "mean"}, "norm must be one of ('sum', 'token', 'char', 'pmi'), got 'mean'"),
        ({"neutral_context": ""}, "neutral_context must be a non-empty string, got ''"),
        ({"target_delimiter": None}, "target_delimiter must be a string, got None"),
        ({"gate": 1.5}, "gate must be None or a number in [0, 1], got 1.5"),
        ({"gate": True}, "gate must be None or a number in [0, 1], got True"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -2}, "temperature must be a finite number > 0, got -2"),
        ({"temperature": math.inf}, "temperature must be a finite number > 0, got inf"),
        ({"temperature": None}, "temperature must be a finite number > 0, got None"),
        ({"member_temperatures": ()}, "member_temperatures must be None or one temperature per member, got ()"),
        ({"member_temperatures": "2"}, "member_temperatures must be None or one temperature per member, got '2'"),
        ({"member_temperatures": (1.0, 0)},
         "member_temperatures: temperature must be a finite number > 0, got 0 (in [1.0, 0])"),
    ]:
        with pytest.raises(ValueError, match=None) as e:
            LabelParams(**kwargs)
        assert str(e.value) == message
    flags = {f.name: f.metadata["flag"] for f in fields(LabelParams)}
    assert flags == {"norm": "--choice-norm", "neutral_context": "--neutral-context",
                     "target_delimiter": "--target-delimiter", "gate": "--label-gate",
                     "temperature": "--label-temperature", "member_temperatures": "--member-temperatures",
                     "priors": "--choice-priors"}
    assert dict(fields(LabelParams)[0].metadata)["choices"] == CHOICE_NORMS


def test_labeling_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ensemble.labeling; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
