"""Token canonicalisation and stable re-tokenisation of a growing response text.

Canonicalisation (one place for all members):
- byte-level BPE pieces are decoded from the GPT-2 byte-to-unicode alphabet (``Ġ`` space, ``Ċ`` newline);
- SentencePiece ``▁`` is a space; byte-fallback pieces ``<0xNN>`` are that single byte;
- special tokens have no bytes (``None``); non-special added tokens (Gemma-3's ``\n``, ``\n\n``,
  whitespace runs) spell their content when broadcasting, but are not anchors (``canonical_strings``).
Whether a tokenizer is byte-level is read from its decoder, never guessed from the model's name.

Broadcast: a :class:`TokenTrack` holds one member's response tokens for one row and their byte
offsets. ``sync(response_bytes)`` re-encodes only the unstable tail (from the start of the last word,
at least ``window`` tokens back, on a UTF-8 character boundary), keeps the common prefix with the old
tail and returns ``(rollback, new_ids)`` for :meth:`Member.feed`. Incomplete UTF-8 at the end of the
response is held back until it completes. ``push_tokens`` appends a member's own chosen tokens as is.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

from ensemble.utf8 import complete_utf8_prefix, is_char_start

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kinds(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    dec = json.loads(backend.to_str()).get("decoder") or {}
    kinds: set[str] = set()

    def walk(d):
        if isinstance(d, dict):
            if "type" in d:
                kinds.add(d["type"])
            for v in d.values():
                walk(v)
        elif isinstance(d, list):
            for v in d:
                walk(v)

    walk(dec)
    return kinds


def is_byte_level(tokenizer) -> bool:
    return "ByteLevel" in _decoder_kinds(tokenizer)


def token_bytes_table(tokenizer, *, added: bool = True) -> list[bytes | None]:
    """Raw bytes each token id stands for (may be an incomplete UTF-8 sequence); None for special
    tokens, which produce no text. A non-special added token spells its content (Gemma-3 encodes
    every newline as one: without its bytes a response track never matches its text again), or None
    with ``added=False``."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added_tokens = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, t in added_tokens.items() if t.special or not added}
    byte_level = is_byte_level(tokenizer)
    u2b = unicode_to_byte()
    table: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            table.append(None)
            continue
        if i in added_tokens:  # stored as plain text, not in the byte-level / SentencePiece alphabet
            table.append(added_tokens[i].content.encode("utf-8") or None)
            continue
        if byte_level:
            if all(ch in u2b for ch in piece):
                table.append(bytes(u2b[ch] for ch in piece))
            else:
                table.append(None)
            continue
        m = _BYTE_PIECE.match(piece)
        table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
    return table


def canonical_strings(tokenizer) -> dict[str, int]:
    """Canonical text -> token id for every ordinary token whose bytes are complete UTF-8 text
    (the lowest id wins when two pieces canonicalise to the same text). Added tokens are not anchors."""
    out: dict[str, int] = {}
    for i, b in enumerate(token_bytes_table(tokenizer, added=False)):
        if not b:
            continue
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.setdefault(s, i)
    return out


class Codec:
    """A member's tokenizer facts needed for broadcast: bytes of each token, continuation encoding."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.table = token_bytes_table(tokenizer)

    def token_bytes(self, tok: int) -> bytes:
        b = self.table[tok] if 0 <= tok < len(self.table) else None
        return b or b""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


class TokenTrack:
    """One member's tokenisation of one row's growing response."""

    def __init__(self, codec: Codec, window: int = 2):
        self.codec = codec
        self.window = window
        self.ids: list[int] = []
        self.offsets: list[int] = []  # byte offset where each token starts
        self.data = b""  # the response bytes these ids spell

    def push_tokens(self, ids: list[int]) -> None:
        """Append this member's own tokens exactly as chosen."""
        for t in ids:
            self.offsets.append(len(self.data))
            self.ids.append(t)
            self.data += self.codec.token_bytes(t)

    def _tail_start(self, target: bytes) -> int:
        """Index of the first token to re-encode."""
        j = max(0, len(self.ids) - self.window)
        # back to the start of the last word: a token starting with whitespace, or a byte boundary
        while j > 0 and not self.data[self.offsets[j] : self.offsets[j] + 1].isspace():
            j -= 1
        while j > 0 and not (is_char_start(self.data, self.offsets[j]) and self.offsets[j] <= len(target)
                             and target[: self.offsets[j]] == self.data[: self.offsets[j]]):
            j -= 1
        return j

    def sync(self, response: bytes) -> tuple[int, list[int]]:
        """Bring the tokens in line with ``response`` (its complete UTF-8 prefix); return
        ``(rollback, new_ids)``."""
        target = complete_utf8_prefix(response)
        if target == self.data:
            return 0, []
        j = self._tail_start(target)
        start = self.offsets[j] if j < len(self.ids) else len(self.data)
        tail_ids = self.codec.encode(target[start:].decode("utf-8")) if len(target) > start else []
        old_tail = self.ids[j:]
        k = 0
        while k < min(len(old_tail), len(tail_ids)) and old_tail[k] == tail_ids[k]:
            k += 1
        rollback = len(old_tail) - k
        new = tail_ids[k:]
        del self.ids[j + k :], self.offsets[j + k :]
        self.data = target[:start] + b"".join(self.codec.token_bytes(t) for t in tail_ids[:k])
        self.push_tokens(new)
        if self.data != target:
            # this tokenizer's encoding does not spell the tail back byte for byte (normalisation);
            # track the target bytes as given so the next sync starts from the truth
            self.data = target
        return rollback, new
