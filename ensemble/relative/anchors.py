"""DeePEn's anchors: the canonical token strings every member's tokenizer shares, as one id array per
member in one common order (docs/algorithms.md, DeePEn: anchors).

Strings come from ``text.canonical_strings``, where byte-level BPE, SentencePiece and byte-fallback
pieces are canonicalised in one place, and special tokens, added tokens and incomplete UTF-8 are left
out.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ensemble.text import canonical_strings

log = logging.getLogger(__name__)


def find_anchors(
    tokenizers: Sequence, names: Sequence[str], *, min_anchors: int, subset: int | None = None
) -> tuple[list[str], list[torch.Tensor]]:
    """Anchor strings and, per member, their ids ``(A,)`` in that member's vocabulary (same order).

    ``subset`` keeps the ``subset`` anchors whose largest id over the members is smallest (BPE ids
    follow merge order, so these are the most frequent pieces). Raises ``ValueError`` when fewer than
    ``min_anchors`` remain.
    """
    canon = [canonical_strings(t) for t in tokenizers]
    common = sorted(set(canon[0]).intersection(*canon[1:]))
    shared = len(common)
    if subset is not None and subset < len(common):
        common = sorted(sorted(common, key=lambda s: (max(c[s] for c in canon), s))[:subset])
    if len(common) < min_anchors:
        raise ValueError(
            f"only {len(common)} anchor tokens are shared by members {list(names)} after canonicalisation; "
            f"need at least min_anchors={min_anchors}"
        )
    log.info("DeePEn anchors: %d canonical tokens shared by %s; using %d", shared, list(names), len(common))
    return common, [torch.tensor([c[s] for s in common], dtype=torch.long) for c in canon]
