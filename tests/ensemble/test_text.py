"""Canonicalisation and incremental re-tokenisation on tiny tokenizers of both families."""
import random

import pytest

from ensemble.text import (
    Codec,
    TokenTrack,
    canonical_strings,
    is_byte_level,
    token_bytes_table,
)
from ensemble.utf8 import complete_utf8_prefix
from tests import tiny

TEXTS = [
    "The capital of France is Paris.\nThe capital of Italy is Rome.",
    "Café naïve 東京 🙂 done.\n\n  indented\tcode: def add(a, b): return a + b",
    "yes no yes no, maybe. Once upon a time!",
]


@pytest.fixture(scope="module", params=["bpe", "sp"])
def tokenizer(request):
    return tiny.bpe_tokenizer() if request.param == "bpe" else tiny.sp_tokenizer()


def test_byte_level_detection():
    assert is_byte_level(tiny.bpe_tokenizer())
    assert not is_byte_level(tiny.sp_tokenizer())


def test_token_bytes_spell_the_text(tokenizer):
    table = token_bytes_table(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids).decode("utf-8") == text


def test_specials_excluded_and_byte_pieces_mapped():
    sp = tiny.sp_tokenizer()
    table = token_bytes_table(sp)
    assert table[sp.bos_token_id] is None and table[sp.eos_token_id] is None
    assert table[sp.convert_tokens_to_ids("<0x0A>")] == b"\n"
    canon = canonical_strings(sp)
    newline_pieces = [sp.convert_tokens_to_ids("<0x0A>")] + [i for t, i in sp.get_vocab().items() if t == "\n"]
    assert "<0x0A>" not in canon and canon["\n"] == min(newline_pieces)  # the lowest id spelling it wins
    bpe = tiny.bpe_tokenizer()
    canon_bpe = canonical_strings(bpe)
    assert "<|im_end|>" not in canon_bpe
    assert all("Ġ" not in s for s in canon_bpe)
    # the space markers of both families canonicalise to a space: Ġ (byte-level) and ▁ (SentencePiece)
    for tok, c, marker in ((bpe, canon_bpe, "Ġ"), (sp, canon, "▁")):
        words = {t: i for t, i in tok.get_vocab().items() if t[:1] == marker and t[1:].isascii() and t[1:].isalpha()}
        assert words, marker
        assert all(c[" " + t[1:]] == i for t, i in words.items())


def test_incremental_sync_equals_full_encoding(tokenizer):
    """Growing the text piece by piece (random cut points, splitting multi-byte characters) gives the
    same ids as encoding the whole text at once, and the rollbacks replay to those ids."""
    codec = Codec(tokenizer)
    rng = random.Random(0)
    for text in TEXTS:
        data = text.encode()
        track = TokenTrack(codec)
        replay: list[int] = []
        pos = 0
        while pos < len(data):
            pos = min(len(data), pos + rng.randint(1, 6))
            rollback, new = track.sync(data[:pos])
            if rollback:
                del replay[-rollback:]
            replay.extend(new)
            assert replay == track.ids
            assert track.data == complete_utf8_prefix(data[:pos])
        assert track.ids == tokenizer.encode(text, add_special_tokens=False)


def test_push_tokens_then_sync(tokenizer):
    codec = Codec(tokenizer)
    track = TokenTrack(codec)
    ids = tokenizer.encode("The capital of", add_special_tokens=False)
    track.push_tokens(ids)
    assert track.data == b"The capital of"
    rollback, new = track.sync(b"The capital of France")
    full = tokenizer.encode("The capital of France", add_special_tokens=False)
    assert track.ids == full and ids[: len(ids) - rollback] + new == full  # the feed replays to the ids
    assert rollback <= 2 and new


def test_added_newline_tokens_spell_their_text_and_keep_the_track_stable():
    """Gemma-3 stores '\\n' and '\\n\\n' as non-special added tokens. They must spell their content, or
    a track loses the newline and re-feeds everything after it at every step (found on the packaged
    trio: Gemma re-fed ~4 tokens per fused step); they are still not anchors."""
    sp = tiny.sp_tokenizer()
    sp.add_tokens(["\n\n", "\n"])
    nn, n = sp.convert_tokens_to_ids("\n\n"), sp.convert_tokens_to_ids("\n")
    table = token_bytes_table(sp)
    assert table[nn] == b"\n\n" and table[n] == b"\n"
    assert token_bytes_table(sp, added=False)[nn] is None
    assert canonical_strings(sp).get("\n\n") is None
    text = "The capital of France is Paris.\n\nThe capital of Italy is Rome.\nDone, done and done."
    ids = sp.encode(text, add_special_tokens=False)
    assert nn in ids and n in ids
    track, replay, rollbacks = TokenTrack(Codec(sp)), [], []
    data = text.encode()
    for pos in range(1, len(data) + 1):
        rollback, new = track.sync(data[:pos])
        if rollback:
            del replay[-rollback:]
        replay.extend(new)
        rollbacks.append(rollback)
    assert replay == track.ids == ids
    longest_word = max(len(sp.encode(" " + w, add_special_tokens=False)) for w in text.split())
    assert max(rollbacks) <= longest_word + 2  # the unstable tail only, never all text since a newline
