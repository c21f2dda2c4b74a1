"""DeePEn labeling, sparse against the exact dense computation, on tiny heterogeneous members through
the fuser (issue 16; docs/algorithms.md, DeePEn: labeling).

The sparse step is run with every main-vocabulary token a candidate (``topk`` >= every vocabulary, no
mass cuts, hence no refinement): what is left to differ from ``dense=True`` is the sparse machinery the
label reads (forced tokens joined to the candidates, the tail column, ``FuseResult.rest``,
``forced_logprobs``' normalisation over the full main vocabulary, the search on gathered rows), which
must then give the dense numbers up to float rounding. Each run records, at every teacher-forced step,
the forced tokens and their fused log-probabilities (a spy on the fuser's engine); both runs force the
same tokens, so the steps line up one to one. Checked: chosen labels, per-step forced-token
log-probabilities, and each choice's log-posterior (for norm ``sum`` a choice's log-posterior is its
fused sum minus the row's logsumexp, so this compares the sums).

The default sparse config (top-64 and mass cuts) is not compared here: the tiny random members are flat
(their top 64 tokens carry about 0.55-0.67 of the mass, over 320-525 tokens), so the truncation is a
real approximation on them, of the same size as switching the search off; the sparse-vs-dense measure
under the default config is bench/bench_label_dense.py's, on the packaged members.
"""
import math

import pytest

from ensemble.fusers.deepen import DeePEn
from ensemble.labeling import LabelParams

PROMPTS = ["Is fire hot? Answer yes or no.", "What is the capital of France?", "Tell me about the cat.",
           "What is two plus two?", "Once upon a time there was"]
CHOICES = [["yes", "no", "maybe so"], ["Paris", "Rome", "a big house near the river", "Berlin"],
           ["The cat", "東京 🙂"], ["four", "nine", "two"],
           ["a small cat", "a dog who lived near the river", "the moon", "Tokyo"]]
NORMS = ("sum", "token", "pmi")
REDUCTIONS = ("mean", "sum")

# Tolerances (nats) from measured differences, sparse-with-every-token vs dense, over the 42-66
# teacher-forced steps of these rows, both mains, both reductions, every norm:
# - row_store float32: per step <= 9.5e-7, log-posteriors <= 1.2e-6 (float32 summation order only);
#   1e-5 leaves a 10x margin;
# - row_store float16 (the default): <= 1.3e-3 per step, <= 1.2e-3 on log-posteriors; the two paths
#   round the relative rows differently (relative error <= 2^-11 each, ensemble.config) and the search
#   amplifies it; 1e-2 leaves a ~8x margin.
# The search switched off (lr 0) moves the same numbers by >= 0.9 per step (max) and >= 1.8 on the
# log-posteriors, far beyond either tolerance: the comparison has power.
TOL = {"float32": 1e-5, "float16": 1e-2}
SEARCH_OFF_AT_LEAST = 0.3


@pytest.fixture(scope="module", params=["completion-main", "chat-main"])
def members(request, bpe_member, bpe_member_qwen, sp_member):
    """Three members with three tokenizers; the main is a completion member (SentencePiece, target
    delimiter) or a chat member (byte-level BPE with a template)."""
    return {"completion-main": [sp_member, bpe_member, bpe_member_qwen],
            "chat-main": [bpe_member_qwen, sp_member, bpe_member]}[request.param]


_RUNS: dict = {}  # (member names, norm, config) -> run: each configuration is labelled once per module


def _label(members, norm: str, **config):
    """``DeePEn.label`` on the rows; returns the outputs and, per teacher-forced step, the forced ids
    and their fused log-probabilities over the full main vocabulary."""
    key = (tuple(m.name for m in members), norm, tuple(sorted(config.items())))
    if key in _RUNS:
        return _RUNS[key]
    fuser = DeePEn(members, **config)
    steps = []
    fuse = fuser.engine.fuse

    def spy(logits, extra=None, greedy_rows=None):
        res = fuse(logits, extra=extra, greedy_rows=greedy_rows)
        steps.append((extra.tolist(), res.forced_logprobs(extra).tolist()))
        return res

    fuser.engine.fuse = spy
    _RUNS[key] = fuser.label(PROMPTS, CHOICES, params=LabelParams(norm=norm)), steps
    return _RUNS[key]


def _every_token(members, **config) -> dict:
    return dict(topk=max(len(m.tokenizer) for m in members), top_mass=None, main_top_mass=None, **config)


def _step_diff(a, b) -> float:
    assert len(a) == len(b) and all(ea == eb for (ea, _), (eb, _) in zip(a, b)), "runs forced different tokens"
    return max(abs(x - y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))


def _logpost_diff(a, b) -> float:
    return max(abs(math.log(x) - math.log(y)) for oa, ob in zip(a, b) for x, y in zip(oa.probs, ob.probs))


CASES = ([("sum", reduction, "float32") for reduction in REDUCTIONS] + [(norm, "mean", "float32") for norm in NORMS[1:]]
         + [("token", "mean", "float16")])


@pytest.mark.parametrize("norm, reduction, row_store", CASES)
def test_sparse_labels_are_the_dense_labels(members, norm, reduction, row_store):
    """Exact rows: every norm, and both reductions (norm sum: the fused sums themselves; the other norms
    read the same sums, pmi also a second fused pass). The default float16 rows with the default norm
    and reduction."""
    cfg = dict(kl_reduction=reduction, row_store=row_store)
    dense, dense_steps = _label(members, norm, dense=True, **cfg)
    sparse, sparse_steps = _label(members, norm, **_every_token(members, **cfg))
    assert sum(len(lps) for _, lps in dense_steps) >= 40  # every token of every choice was fused
    assert [o.label for o in sparse] == [o.label for o in dense]
    assert not any(o.gated for o in sparse + dense)
    tol = TOL[row_store]
    assert _step_diff(sparse_steps, dense_steps) <= tol
    assert _logpost_diff(sparse, dense) <= tol
    for s, d in zip(sparse, dense):  # each member's own scores do not depend on the fused path
        assert [m.choice_probs for m in s.member_stats] == [m.choice_probs for m in d.member_stats]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_the_comparison_sees_the_search_switched_off(members, reduction):
    """The same comparison between the dense search and the sparse path with lr 0 (the main member's own
    distribution) fails both tolerances by far, per step and on the log-posteriors."""
    cfg = dict(kl_reduction=reduction, row_store="float32")
    dense, dense_steps = _label(members, "sum", dense=True, **cfg)
    off, off_steps = _label(members, "sum", **_every_token(members, lr=0.0, **cfg))
    assert _step_diff(off_steps, dense_steps) > SEARCH_OFF_AT_LEAST > max(TOL.values())
    assert _logpost_diff(off, dense) > SEARCH_OFF_AT_LEAST
