"""UTF-8 byte facts (ensemble/utf8.py): character starts, incomplete tails, repairing invalid bytes."""
import random

import pytest

from ensemble.utf8 import (
    char_length,
    complete_utf8_prefix,
    ends_inside_char,
    incomplete_tail,
    is_char_start,
    valid_utf8,
)

# 'é' = C3 A9, '東' = E6 9D B1, '🙂' = F0 9F 99 82; A1/80 are continuation bytes, FF starts nothing
BYTES = [0x41, 0x20, 0xC3, 0xA9, 0xE6, 0x9D, 0xB1, 0xF0, 0x9F, 0x99, 0x82, 0xA1, 0x80, 0xFF, 0xE0]


@pytest.mark.parametrize("byte, n", [(0x41, 1), (0x7F, 1), (0xC3, 2), (0xE6, 3), (0xF0, 4), (0x80, 1),
                                     (0xBF, 1), (0xF8, 1), (0xFF, 1)])
def test_char_length(byte, n):
    assert char_length(byte) == n


def test_complete_utf8_prefix():
    s = "a東🙂".encode()
    assert complete_utf8_prefix(s) == s
    assert complete_utf8_prefix(s[:-1]) == "a東".encode()
    assert complete_utf8_prefix(s[:2]) == b"a"
    assert complete_utf8_prefix(b"") == b""
    assert [incomplete_tail(s[:k]) for k in range(len(s) + 1)] == [0, 0, 1, 2, 0, 1, 2, 3, 0]


def test_ends_inside_char():
    assert ends_inside_char(b"ab\xe6\x9d") and not ends_inside_char("ab東".encode())
    assert not ends_inside_char(b"") and not ends_inside_char(b"a")
    # stray continuation bytes count as inside a character; the complete prefix keeps them
    assert ends_inside_char(b"\x80\x80\x80\x80") and complete_utf8_prefix(b"\x80\x80\x80\x80") == b"\x80\x80\x80\x80"


def test_is_char_start():
    s = "a東".encode()
    assert [is_char_start(s, k) for k in range(len(s) + 1)] == [True, True, False, False, True]


def test_valid_utf8():
    assert valid_utf8("café 東京".encode()) == "café 東京".encode()
    assert valid_utf8(b"a\xa1b") == "a\ufffdb".encode()
    assert valid_utf8(b"ab\xe6\x9d") == b"ab\xe6\x9d"  # incomplete tail kept raw
    whole = b"x\xa1y \xe6\x9d\xb1z"
    for cut in range(len(whole) + 1):  # stable under extension, up to an incomplete tail
        assert valid_utf8(whole).startswith(valid_utf8(complete_utf8_prefix(whole[:cut])))


def test_decoding_the_complete_prefix_then_the_rest_equals_one_decode():
    """What the stop checker and broadcast rely on: a complete prefix decodes on its own."""
    rng = random.Random(5)
    for _ in range(20000):
        data = bytes(rng.choice(BYTES) for _ in range(rng.randrange(12)))
        for k in range(len(data) + 1):
            head = complete_utf8_prefix(data[:k])
            assert len(data[:k]) - len(head) == incomplete_tail(data[:k]) <= 3
            assert head.decode("utf-8", "replace") + data[len(head):].decode("utf-8", "replace") == \
                data.decode("utf-8", "replace")
