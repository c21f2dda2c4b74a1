"""The one choice scorer on packaged real members (slow): SmolLM2 (chat template) and Gemma-3 base
(completion-style, the choice after the target delimiter). SpecFuse with one member and DeePEn with two
copies of one member label exactly like Single, for every normalisation."""
import pytest

from ensemble import Single, load_member
from ensemble.fusers.deepen import DeePEn
from ensemble.fusers.specfuse import SpecFuse
from ensemble.labeling import CHOICE_NORMS, LabelParams
from ensemble.members import Member
from ensemble.reference import logprobs_uncached
from ensemble.scoring import continuation_ids

pytestmark = pytest.mark.slow

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Question: Is fire hot or cold?\nAnswer:"]
CHOICES = [["Paris", "Berlin", "a green banana"], ["hot", "cold"]]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def member(request):
    return load_member(request.param)


def test_real_scorer_and_invariants(member):
    chat = member.has_chat_template
    assert continuation_ids(member, "Paris", LabelParams()) == member.encode_text("Paris" if chat else " Paris")
    copy = Member(member.model, member.tokenizer, name="copy")
    for norm in CHOICE_NORMS:
        params = LabelParams(norm=norm)
        want = Single(member).label(PROMPTS, CHOICES, params=params)
        assert want[0].label == "Paris", (member.name, norm, want[0].probs)
        one = SpecFuse([member]).label(PROMPTS, CHOICES, params=params)
        two = DeePEn([member, copy]).label(PROMPTS, CHOICES, params=params)
        for w, s, d in zip(want, one, two):
            assert s.label == w.label and s.probs == pytest.approx(w.probs, abs=1e-6), (member.name, norm)
            assert d.label == w.label and d.probs == pytest.approx(w.probs, abs=1e-5), (member.name, norm)
    # the summed log-probs are those of one clean forward of prompt + continuation
    scored = Single(member).label(PROMPTS[:1], CHOICES[:1], params=LabelParams(norm="sum"))[0].member_stats[0]
    for c, lp in zip(CHOICES[0], scored.choice_logprobs):
        ids = continuation_ids(member, c, LabelParams())
        assert lp == pytest.approx(float(logprobs_uncached(member, member.encode_prompt(PROMPTS[0]), ids).sum()), abs=2e-3)
