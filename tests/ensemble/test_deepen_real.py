"""DeePEn on two packaged real members with different vocabularies: SmolLM2-135M-Instruct (byte-level
BPE, 49,152) and Gemma-3-270M (SentencePiece with byte fallback, 262,144 tokens; dense relative rows
would need ~40 GB). Few and short: the logic is covered on tiny members in test_deepen.py."""
import logging
import re

import pytest

from ensemble import DecodeParams, Single, load_member
from ensemble.fusers.deepen import DeePEn

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]


@pytest.fixture(scope="module")
def pair():
    return [load_member("smollm2-135m-instruct"), load_member("gemma3-270m")]


def test_fused_text_is_coherent_with_a_262k_vocabulary(pair, caplog):
    with caplog.at_level(logging.INFO, logger="ensemble.relative"):
        fuser = DeePEn(pair)
    found = [m for r in caplog.records if (m := re.search(r"DeePEn anchors: (\d+) .*; using (\d+)", r.message))]
    assert found and int(found[0].group(1)) > 30_000  # tens of thousands of shared canonical tokens
    assert int(found[0].group(2)) == int(found[0].group(1)) == fuser.engine.sources[0].n_anchors  # all of them
    outs = fuser.generate(PROMPTS, DecodeParams(max_new_tokens=16))
    assert "Paris" in outs[0].text
    for out in outs:
        words = re.findall(r"[A-Za-z]{2,}", out.text)
        assert len(words) >= 3 and "<0x" not in out.text and "\ufffd" not in out.text
        main, gemma = out.member_stats
        assert gemma.calls >= 2 and gemma.tokens_out > 0 and gemma.agreement > 0.2 and gemma.mean_kl < 1.0
    assert fuser.engine.nbytes < 2**30  # anchors + row caches, nowhere near the dense 40 GB


def test_gemma_as_main_at_zero_lr_reproduces_gemma(pair):
    gemma, smol = pair[1], pair[0]
    params = DecodeParams(max_new_tokens=8)
    want = Single(gemma).generate(PROMPTS[:1], params)[0]
    got = DeePEn([gemma, smol], lr=0.0).generate(PROMPTS[:1], params)[0]
    assert (got.text, got.token_count) == (want.text, want.token_count) and want.token_count > 0
