"""DeePEn's math as pure functions and small stateful helpers: anchors, relative rows, transform,
aggregate, inverse search. No members, no tokenisation of text, no decoding loop. The algorithm and
its notation are in docs/algorithms.md (DeePEn, steps 1-5); the measured figures behind the choices
made here are in docs/results.md.

One concern per module (each imports only those above it):

- :mod:`~ensemble.relative.anchors`: :func:`find_anchors`, the canonical token strings every
  tokenizer shares, as one id array per member.
- :mod:`~ensemble.relative.onednn`: the private ``torch.ops.mkldnn`` calls of the CPU row kernel,
  with their fallback to the plain product logged once.
- :mod:`~ensemble.relative.cache`: :class:`RowCache`, the LRU cache of one member's rows.
- :mod:`~ensemble.relative.rows`: :class:`RowSource`, the relative row
  ``r(t) = softmax(tau * unit(cos(E[t], E[a])))`` of any token on demand, bitwise the same whatever it
  is computed with; :meth:`RowSource.dense` is the reference (small vocabularies only).
- :mod:`~ensemble.relative.mixing`: :class:`IndexedRows` (a batch's candidate rows as one table of
  its distinct tokens plus an index, never the gathered ``(B, k, A)`` tensor, which stays as the
  tests' reference), :func:`mix`, :func:`pull`, :func:`aggregate`, :func:`kl_rows`.
- :mod:`~ensemble.relative.search`: :func:`inverse_search` (batched AdamW, analytic gradient) with its
  oracle :func:`inverse_search_reference` (the KL reduced by its mean over the anchors, as the
  reference code does, or by its sum), :func:`search_radius` / :func:`decided_rows`, which tell when
  the search cannot change the greedy token, and :func:`moving_rows`, the rows it moves.
- :mod:`~ensemble.relative.result`: :class:`FuseResult`, one step's outcome, with
  :meth:`FuseResult.forced_logprobs`, a forced token's fused log-probability over the whole main
  vocabulary (labeling).
- :mod:`~ensemble.relative.step`: :func:`top_candidates` and :class:`RelativeEnsemble`, one fusion
  step for a batch (candidates, transform, aggregate, search), with ``dense=True`` as its reference.
"""
from ensemble.relative.anchors import find_anchors
from ensemble.relative.cache import RowCache
from ensemble.relative.mixing import IndexedRows, Rows, aggregate, kl_rows, masked_softmax, mix, pull
from ensemble.relative.result import FuseResult
from ensemble.relative.rows import RowSource
from ensemble.relative.search import (
    SearchParams,
    decided_rows,
    inverse_search,
    inverse_search_reference,
    moving_rows,
    search_radius,
    top_lead,
)
from ensemble.relative.step import MemberCandidates, RelativeEnsemble, top_candidates

__all__ = [
    "FuseResult",
    "IndexedRows",
    "MemberCandidates",
    "RelativeEnsemble",
    "RowCache",
    "RowSource",
    "Rows",
    "SearchParams",
    "aggregate",
    "decided_rows",
    "find_anchors",
    "inverse_search",
    "inverse_search_reference",
    "kl_rows",
    "masked_softmax",
    "mix",
    "moving_rows",
    "pull",
    "search_radius",
    "top_candidates",
    "top_lead",
]
