"""The CPU row kernel through oneDNN's packed linear: the only module that calls torch's private
``torch.ops.mkldnn`` ops (they can change or vanish between torch releases).

The unit anchors are packed once per member for oneDNN's linear, ``x @ anchors.T -> (c, A)``, which
gives the rows in row layout and reuses the packed weight on every call, where MKL's transposed
product ``anchors @ x.T`` repacks the anchors each time (docs/algorithms.md, DeePEn: relative rows;
the timings are in docs/results.md). A row's values do not depend on how many rows are computed
together or where a row sits among them, so blocks need no padding.

Fallback: where this torch build has no oneDNN, or lacks one of the two private ops, :func:`pack`
returns None and the caller (:class:`~ensemble.relative.rows.RowSource`) uses the plain product. The
fallback is logged once per process as a warning (later occurrences at debug level), not once per
member or per call.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_PACK_BATCH = 128  # the batch size oneDNN is told to expect when choosing the packed layout
_warned = False  # whether the fallback has been logged as a warning in this process


def _fallback(reason: str) -> None:
    """Log that the plain product replaces oneDNN: a warning the first time, debug afterwards."""
    global _warned
    if _warned:
        log.debug("oneDNN rows unavailable (%s); relative rows use the plain product", reason)
        return
    _warned = True
    log.warning("oneDNN rows unavailable (%s); relative rows use the plain product "
                "(slower on CPU; logged once per process)", reason)


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight (A, d)`` packed for :func:`linear`, or None (logged once) where oneDNN or its ops are
    missing from this torch build. The linear op is probed on one row, so a build that packs but
    cannot multiply falls back here rather than in the middle of a step."""
    if not torch.backends.mkldnn.is_available():
        _fallback("this torch build has no oneDNN")
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH)
        linear(weight[:1], packed)  # (1, A): the probe
    except (RuntimeError, AttributeError) as exc:  # an op missing from this build
        _fallback(f"{type(exc).__name__}: {exc}")
        return None
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x (c, d) @ weight.T -> (c, A)`` for a ``weight`` packed by :func:`pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
