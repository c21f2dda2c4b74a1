"""Grouping rows or candidates into batches that fit the library's memory bound
(``ensemble.config.MAX_BATCH_TOKENS``, the setting; this module, the arithmetic)."""
from __future__ import annotations

from typing import Sequence

LOGIT_SHARE = 64
"""Token slots per full-vocabulary logit vector in the memory bound: one logit vector of a 150k-260k
vocabulary costs about as much as 25-30 KV-cache slots of the packaged members, so logits stay within
about half of the KV cache's share."""


def logit_rows(max_batch_tokens: int) -> int:
    """Most (row, position) pairs whose full-vocabulary logits are held at once."""
    return max(1, max_batch_tokens // LOGIT_SHARE)


def pack(lengths: Sequence[int], max_batch_tokens: int, *, widths: Sequence[int] | None = None,
         logits: Sequence[int] | None = None) -> list[list[int]]:
    """Consecutive groups of item indices (rows, or candidates) that one batch holds together.

    Item ``i`` takes ``widths[i]`` batch rows (default 1) of padded length ``lengths[i]`` and needs
    ``logits[i]`` full-vocabulary logit vectors (default: its rows). A group keeps its rows times its
    longest length within ``max_batch_tokens`` and its logits within ``logit_rows(max_batch_tokens)``;
    an item over either bound forms a group alone. Order is kept, so outputs reassemble by index.
    """
    widths = [1] * len(lengths) if widths is None else widths
    logits = widths if logits is None else logits
    cap = logit_rows(max_batch_tokens)
    groups: list[list[int]] = []
    rows = longest = need = 0  # of the open group
    for i, (n, w, k) in enumerate(zip(lengths, widths, logits)):
        if not groups or (rows + w) * max(longest, n) > max_batch_tokens or need + k > cap:
            groups.append([])
            rows = longest = need = 0
        groups[-1].append(i)
        rows, longest, need = rows + w, max(longest, n), need + k
    return groups
