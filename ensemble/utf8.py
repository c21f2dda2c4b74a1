"""UTF-8 byte facts shared by broadcast, stop matching and SpecFuse's word trimming.

A response grows one token's bytes at a time, and a token may end inside a multi-byte character
(byte-level BPE, SentencePiece byte fallback). Everything that turns response bytes into text goes
through this module, so "where does a character start" and "is the tail complete" have one answer:

- :func:`char_length`: bytes of the character a lead byte starts (1 for ASCII, for continuation bytes
  and for bytes that cannot start a character);
- :func:`is_char_start`: does offset ``off`` of ``data`` start a character;
- :func:`complete_utf8_prefix`: ``data`` without an incomplete character at its end (held back until
  the next token completes it);
- :func:`ends_inside_char`: does ``data`` end inside a multi-byte character;
- :func:`valid_utf8`: the complete prefix with invalid sequences replaced by U+FFFD, the incomplete
  tail kept raw: the response as other vocabularies see it.

Only the last four bytes decide whether the tail is complete (a character spans at most four), so
every function here is O(1) in the length of ``data`` except :func:`valid_utf8`, which decodes.
"""
from __future__ import annotations

_MAX_CHAR = 4


def char_length(byte: int) -> int:
    """Bytes of the character that ``byte`` starts: 1 (ASCII ``0xxxxxxx``), 2 (``110xxxxx``),
    3 (``1110xxxx``), 4 (``11110xxx``); 1 for a continuation byte or one that cannot start a character."""
    if byte < 0x80:
        return 1
    if byte >> 5 == 0b110:
        return 2
    if byte >> 4 == 0b1110:
        return 3
    if byte >> 3 == 0b11110:
        return 4
    return 1


def is_continuation(byte: int) -> bool:
    """True for ``10xxxxxx``, a byte inside a multi-byte character."""
    return byte & 0xC0 == 0x80


def is_char_start(data: bytes, off: int) -> bool:
    """True when offset ``off`` of ``data`` is not inside a character (0 and the end count as starts)."""
    return off == 0 or off >= len(data) or not is_continuation(data[off])


def _last_lead(data: bytes) -> tuple[int, int] | None:
    """``(back, need)`` for the last byte among the final four that is not a continuation byte:
    it sits ``back`` bytes from the end and starts a character of ``need`` bytes. None when the final
    ``min(4, len(data))`` bytes are all continuation bytes (or ``data`` is empty)."""
    n = len(data)
    for back in range(1, min(_MAX_CHAR, n) + 1):
        byte = data[n - back]
        if not is_continuation(byte):
            return back, char_length(byte)
    return None


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` belong to a character that is not complete yet (0-3)."""
    lead = _last_lead(data)
    if lead is None:
        return 0
    back, need = lead
    return back if need > back else 0


def complete_utf8_prefix(data: bytes) -> bytes:
    """The longest prefix of ``data`` that does not end inside a multi-byte UTF-8 character."""
    cut = incomplete_tail(data)
    return data[: len(data) - cut] if cut else data


def ends_inside_char(data: bytes) -> bool:
    """True when ``data`` ends inside a multi-byte character: an incomplete tail, or final bytes that
    are all continuation bytes with no lead byte among the last four (stray bytes)."""
    lead = _last_lead(data)
    if lead is None:
        return len(data) > 0
    back, need = lead
    return need > back


def valid_utf8(data: bytes) -> bytes:
    """``data`` with invalid UTF-8 replaced by U+FFFD, keeping an incomplete character at the end as
    raw bytes (it may still complete). Stable under extension: ``valid_utf8(a + b)`` starts with
    ``valid_utf8(a)`` up to that raw tail. Identity on valid text."""
    head = complete_utf8_prefix(data)
    return head.decode("utf-8", errors="replace").encode("utf-8") + data[len(head):]
