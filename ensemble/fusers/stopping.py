"""When a row stops: EOS, stop strings and the token budget, one checker for every fuser.

Stop strings are matched in the response text ``data.decode("utf-8", errors="replace")`` of the
response bytes: the bytes of the main member's tokens (for byte-level BPE and SentencePiece
byte-fallback vocabularies, the text the tokenizer's own decode gives, up to how many U+FFFD an
invalid byte sequence becomes). The match is incremental: the checker keeps only the last
``longest stop - 1`` characters of the text seen so far, so a token costs its own length, not the
response's. Stop strings that span tokens are found because that tail is kept; a character split
over tokens is held back until the next token completes it (for the search its bytes read as U+FFFD,
as a full decode shows them).

Contract (``tests/ensemble/test_stopping.py`` checks it against :func:`first_stop` over a full re-decode):

- :meth:`StopChecker.token` (Single, DeePEn): one chosen token. An EOS id (or ``eos=True``, the
  caller's own EOS rule) stops the row without adding the token: ``Stop('stop', eos=True)``.
  Otherwise the token counts; a stop string now in the text gives ``Stop('stop', cut)``; else
  reaching ``max_new_tokens`` gives ``Stop('length')``; else None.
- :meth:`StopChecker.segment` (SpecFuse): the whole response after a round (it usually extends the
  previous one; when it does not, the text is matched again from its start), the main member's token
  count and whether the round ended with EOS; checked in the order stop string, EOS, budget.
- ``cut`` is the index in the response text of the earliest occurrence of any stop string: the text
  to return is ``text[:cut]``. Single and DeePEn return the member's decode of their tokens, cut
  with :func:`cut_at_stop` once at the end (the same cut, counted in that text's characters).
  Once a row has stopped its checker is done with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Sequence

from ensemble.fusers.base import FinishReason
from ensemble.utf8 import complete_utf8_prefix


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, or None (the slow path:
    the tests' oracle, and the cut of a text decoded once at the end)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` before its first stop string (all of it when there is none)."""
    cut = first_stop(text, stops) if stops else None
    return text if cut is None else text[:cut]


class StopMatcher:
    """Stop strings matched in a growing byte stream (see the module docstring)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.keep = max((len(s) for s in self.stops), default=1) - 1  # chars a match can reach back
        self.reset()

    def reset(self) -> None:
        self.data: bytes | None = b""  # the bytes given to follow() (a reference, not a copy)
        self.pending = b""  # an incomplete character at the end, not yet part of the text
        self.tail = ""  # the last `keep` characters of the complete text
        self.offset = 0  # characters of the complete text before `tail`

    def push(self, piece: bytes) -> int | None:
        """Append ``piece``; return the cut (earliest stop in the whole text) or None. A matcher is
        fed by push() or by follow(), not both."""
        self.data = None  # push() keeps no copy of the stream: follow() cannot compare with it
        return self._scan(piece)

    def follow(self, data: bytes) -> int | None:
        """The stream is now ``data``: match only what was added when it extends the bytes seen so
        far, otherwise start again from ``data``'s first byte. Returns the cut or None."""
        if not self.stops:
            return None
        if self.data is None:
            raise ValueError("follow() on a matcher fed by push(): use one of them per matcher")
        if data.startswith(self.data):
            piece = data[len(self.data):]
        else:
            self.reset()
            piece = data
        self.data = data
        return self._scan(piece)

    def _scan(self, piece: bytes) -> int | None:
        if not self.stops:
            return None
        buf = self.pending + piece
        done = complete_utf8_prefix(buf)
        self.pending = buf[len(done):]
        text = self.tail + done.decode("utf-8", errors="replace")
        # no stop was in the text before this piece, so a match ends in the new characters and
        # starts at most `keep` characters before them: `text` holds every such start
        hit = first_stop(text + self.pending.decode("utf-8", errors="replace"), self.stops)
        if hit is not None:
            return self.offset + hit
        drop = max(0, len(text) - self.keep)
        self.offset += drop
        self.tail = text[drop:]
        return None


@dataclass(frozen=True)
class Stop:
    """Why a row stops, and where its text is cut (None: not cut)."""

    reason: FinishReason
    cut: int | None = None
    eos: bool = False
    """The row ended on an EOS token, which is not part of the output."""


class StopChecker:
    """One row's stop rules: EOS ids, stop strings (incremental) and the token budget."""

    def __init__(self, stops: Sequence[str], max_new_tokens: int, eos_ids: Collection[int] = (),
                 token_bytes: Callable[[int], bytes] | None = None):
        """``token_bytes``: the bytes of a token id (needed by :meth:`token` when there are stop
        strings; only called then, so a member's byte table is not built for rows without stops)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.eos_ids = frozenset(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.matcher = StopMatcher(stops)
        self.token_bytes = token_bytes
        self.count = 0  # tokens accepted by token()

    def token(self, tok: int, *, eos: bool = False) -> Stop | None:
        """One chosen token; ``eos`` adds the caller's own EOS rule to the EOS ids."""
        if eos or tok in self.eos_ids:
            return Stop(FinishReason.STOP, eos=True)
        self.count += 1
        if self.matcher.stops:
            if self.token_bytes is None:
                raise ValueError("StopChecker.token needs token_bytes to match stop strings")
            cut = self.matcher.push(self.token_bytes(tok))
            if cut is not None:
                return Stop(FinishReason.STOP, cut)
        if self.count >= self.max_new_tokens:
            return Stop(FinishReason.LENGTH)
        return None

    def segment(self, data: bytes, count: int, *, eos: bool) -> Stop | None:
        """The response after a round (``data``), its length in the main member's tokens, and
        whether the round ended with EOS."""
        cut = self.matcher.follow(data)
        if cut is not None:
            return Stop(FinishReason.STOP, cut)
        if eos:
            return Stop(FinishReason.STOP, eos=True)
        if count >= self.max_new_tokens:
            return Stop(FinishReason.LENGTH)
        return None
