"""DeePEn math as pure functions and small stateful helpers: anchors, relative rows, transform,
aggregate, inverse search. No members, no tokenisation of text, no decoding loop.

Contract (shared/design/algorithms.md, DeePEn steps 1-5):
- :func:`find_anchors`: canonical token strings shared by every tokenizer (``text.canonical_strings``:
  byte-level BPE, SentencePiece and byte-fallback pieces canonicalised in one place, special and added
  tokens and incomplete UTF-8 excluded), in one order, as one id array per member.
- :class:`RowSource`: the relative row ``r(t) = softmax(tau * unit(cos(E[t], E[a])))`` of any token,
  computed on demand from L2-normalised input embeddings (on CPU oneDNN's linear with the anchors
  packed once, the fastest measured here; elsewhere the product ``(A, d) @ (d, n)``) and kept in an
  LRU cache; never the dense ``(V, A)`` matrix, except through :meth:`RowSource.dense` (tests, small
  vocabularies).
  A row is bitwise the same whatever it was computed with, so cached and fresh rows agree exactly and
  a row never depends on the rest of a batch: oneDNN's rows are bit-identical for any block size
  (checked for 1-256 rows); the fallback pads short blocks (measured, MKL in torch 2.13: a column of
  an ``(A, d) @ (d, M)`` product is bit-identical for every M >= 12 at any position, and differs for
  some M < 12: padded to ``min_block`` on CPU, to the full ``chunk`` on other devices).
  Rows may be *stored* (cache and returned rows) as float16 scaled by ``A`` (``store="float16"``):
  half the bytes per cached row, relative error <= 2^-11, every row rounded the same way whether fresh
  or cached; :meth:`RowSource.compute` and :meth:`RowSource.dense` stay exact.
- :func:`top_candidates`: the top-k tokens of each row (optionally cut at a cumulative mass), sorted by
  id so that ties break like ``argmax``; the searched distribution lives on them.
- :func:`inverse_search`: batched AdamW with a cosine schedule over ``z (B, k)`` minimising
  ``KL(q || softmax(z) R_m)``, with the analytic gradient (checked against autograd and torch.optim by
  :func:`inverse_search_reference`). Rows whose initial loss is exactly zero (the aggregate equals the
  main member's own relative distribution) are at the optimum and are left as they are.
  :func:`search_radius` bounds how far it moves any logit, so :func:`decided_rows` knows when the
  greedy choice cannot change and the search can be skipped.
- :class:`IndexedRows`: a batch's candidate rows as one table of its distinct tokens plus an index,
  never the gathered ``(B, k, A)`` tensor (the gathered form stays as the tests' reference).
- :class:`RelativeEnsemble`: one fusion step for a batch: candidates, transform, aggregate, search.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ensemble.text import canonical_strings

log = logging.getLogger(__name__)

_TINY = 1e-30  # floor for probabilities inside logs and divisions
_FINISH_ROWS = 16  # rows transposed and finished together (16 x ~38k anchors x 4 bytes stays in cache)
_SCRATCH: dict[torch.device, torch.Tensor] = {}  # per device: the transposed row products, reused


def _scratch(device: torch.device, rows: int, cols: int) -> torch.Tensor:
    """A contiguous float32 ``(rows, cols)`` work buffer shared by every RowSource on ``device`` (reused:
    a fresh tensor of this size is a fresh mmap whose page faults cost about as much as filling it)."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < rows * cols:
        buf = _SCRATCH[device] = torch.empty(rows * cols, device=device)
    return buf[: rows * cols].view(rows, cols)


def _pack(anchors: torch.Tensor) -> torch.Tensor | None:
    """``anchors (A, d)`` packed for oneDNN's linear, or None where this torch build has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(anchors, 128)
    except (RuntimeError, AttributeError) as exc:  # an op missing from this build: the MKL path
        log.warning("oneDNN packing unavailable (%s); relative rows use the plain product", exc)
        return None


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


class RowSource:
    """Relative rows of one member on demand, with an LRU cache of ``cache_rows`` rows."""

    STORES = ("float32", "float16")

    def __init__(self, embeddings: torch.Tensor, anchor_ids: torch.Tensor, *, tau: float,
                 cache_rows: int, chunk: int = 128, min_block: int = 16, store: str = "float32"):
        if store not in self.STORES:
            raise ValueError(f"store must be one of {self.STORES}, got {store!r}")
        emb = embeddings.detach()
        self.emb = emb  # (V, d): the model's own weight, not copied
        self.device = emb.device
        self.tau = float(tau)
        self.chunk = int(chunk)
        # blocks are padded to this many rows; the full chunk off-CPU (see the module docstring)
        self.min_block = min(int(min_block), self.chunk) if self.device.type == "cpu" else self.chunk
        self.vocab_size = int(emb.shape[0])
        norms = torch.cat([torch.linalg.vector_norm(emb[i : i + 65536].float(), dim=-1)
                           for i in range(0, emb.shape[0], 65536)])  # (V,)
        self.inv_norm = 1.0 / norms.clamp_min(1e-12)  # (V,)
        ids = anchor_ids.to(self.device)
        # (A, d): unit anchor embeddings
        self.anchors = emb[ids].float().mul_(self.inv_norm[ids, None])
        self.n_anchors = int(ids.numel())
        # On CPU the anchors are packed once for oneDNN's linear (``x @ anchors.T -> (c, A)``, rows in
        # row layout): measured on this AVX2 CPU, d = 896, A = 38k, against MKL's transposed product
        # ``anchors @ x.T`` (which repacks the anchors on every call): 16 rows 16 vs 28 ms, 64 rows 39
        # vs 64 ms, 128 rows 79 vs 94 ms; and a row's values are bit-identical whatever the number of
        # rows and their position (checked for 1..256 rows), so no padding is needed.
        self._packed = _pack(self.anchors) if self.device.type == "cpu" else None
        if self._packed is not None:
            self.anchors = None  # the packed copy replaces it
            self.min_block = 1
        self._eye = torch.eye(_FINISH_ROWS, device=self.device)
        self.capacity = int(cache_rows)
        self.store_dtype = getattr(torch, store)
        self._cache = torch.empty(0, self.n_anchors, device=self.device, dtype=self.store_dtype)  # (<= C, A)
        self._slot: OrderedDict[int, int] = OrderedDict()  # token -> cache row, least recent first
        self._dense: torch.Tensor | None = None
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held: normalised anchors, inverse norms, row cache (and the dense matrix if built)."""
        dense = self._dense.numel() * 4 if self._dense is not None else 0
        held = self._packed if self._packed is not None else self.anchors
        return ((held.numel() + self.inv_norm.numel()) * 4
                + self._cache.numel() * self._cache.element_size() + dense)

    def compute(self, ids: torch.Tensor, out: torch.Tensor | None = None, *, rounded: bool = False) -> torch.Tensor:
        """Exact fresh rows ``(n, A)`` (float32) for token ids ``(n,)``, written into ``out`` when given
        (a contiguous float32 ``(n, A)``, e.g. rows of a step's table: no temporary of that size), in
        blocks of at most ``chunk`` rows, each padded by repetition to at least ``min_block`` rows.
        ``rounded``: the stored form instead (times ``A``, rounded through the store dtype, see
        :attr:`scale`), done while each row is hot in cache."""
        ids = ids.to(self.device)
        if out is None:
            out = torch.empty(ids.numel(), self.n_anchors, device=self.device)
        for i in range(0, ids.numel(), self.chunk):
            part = ids[i : i + self.chunk]  # (c,)
            n = part.numel()
            if n < self.min_block:
                part = torch.cat([part, part[-1:].expand(self.min_block - n)])  # (min_block,)
            x = self.emb[part].float() * self.inv_norm[part, None]  # (c, d)
            if self._packed is not None:
                cos = torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")  # (c, A)
                for r in range(0, n, _FINISH_ROWS):  # finish a few rows at a time, while they are in cache
                    blk = out[i + r : i + min(n, r + _FINISH_ROWS)]
                    self._finish(blk.copy_(cos[r : r + blk.shape[0]]), rounded)
                continue
            cos_t = torch.matmul(self.anchors, x.T, out=_scratch(self.device, self.n_anchors, part.numel()))  # (A, c)
            for r in range(0, n, _FINISH_ROWS):  # transpose a few rows at a time and finish them in cache
                blk = out[i + r : i + min(n, r + _FINISH_ROWS)]  # (m <= _FINISH_ROWS, A)
                m = blk.shape[0]
                # an exact transposing copy: identity @ cos_t[:, r:r+m].T (x * 1 plus exact zeros; the
                # cos values are finite). Measured 2-3x faster than copy_ of the transposed view,
                # which takes torch's generic strided path
                torch.mm(self._eye[:m, :m], cos_t[:, r : r + m].T, out=blk)
                self._finish(blk, rounded)
        return out

    def _finish(self, cos: torch.Tensor, rounded: bool = False) -> torch.Tensor:
        """``softmax(tau * unit(cos))`` per row, in place on ``cos (c, A)`` (per-row results do not
        depend on how many rows ``cos`` holds). ``rounded``: then times ``A``, rounded through the store
        dtype."""
        cos.mul_(self.tau / torch.linalg.vector_norm(cos, dim=-1, keepdim=True).clamp_min(1e-12))
        cos.sub_(cos.amax(dim=-1, keepdim=True)).exp_()
        cos.div_(cos.sum(dim=-1, keepdim=True))
        if rounded and self.store_dtype != torch.float32:
            cos.copy_(cos.mul_(self.n_anchors).to(self.store_dtype))
        return cos

    @property
    def scale(self) -> float:
        """Stored row values times this are probabilities (1/A for float16 rows, else 1)."""
        return 1.0 if self.store_dtype == torch.float32 else 1.0 / self.n_anchors

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``(n, A)`` (float32 probabilities, in the stored precision) for distinct ids ``(n,)``."""
        out = torch.empty(ids.numel(), self.n_anchors, device=self.device)
        rows = out[self.rows_into(ids, out)]
        return rows.mul_(self.scale) if self.scale != 1.0 else rows

    def rows_into(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the stored form of the rows of distinct ids ``(n,)`` into float32 ``out[:n]`` (times
        :attr:`scale` they are probabilities): cached rows first, then fresh ones, each group one
        contiguous block. Returns ``where (n,)``: ``out[where[i]]`` is the row of ``ids[i]``."""
        toks = ids.tolist()
        hit_pos, hit_slot, miss_pos = [], [], []
        for i, t in enumerate(toks):
            slot = self._slot.get(t)
            if slot is None:
                miss_pos.append(i)
            else:
                hit_pos.append(i)
                hit_slot.append(slot)
                self._slot.move_to_end(t)
        h, n = len(hit_pos), len(toks)
        self.hits += h
        self.misses += n - h
        where = torch.empty(n, dtype=torch.long)
        where[hit_pos + miss_pos] = torch.arange(n)
        if hit_pos:
            out[:h].copy_(self._cache.index_select(0, torch.tensor(hit_slot, device=self.device)))
        if miss_pos:
            # fresh rows in the stored form, rounded exactly as cached ones are
            fresh = self.compute(ids[miss_pos], out=out[h:n], rounded=True)  # (m, A) float32, in place
            room = self.capacity - h  # never evict a row this call uses
            keep = list(range(max(0, len(miss_pos) - room), len(miss_pos)))
            if keep:
                slots = torch.tensor([self._claim(toks[miss_pos[j]]) for j in keep], device=self.device)
                # one copy for all new rows (exact: the values are already representable)
                self._cache.index_copy_(0, slots, fresh[keep[0]:].to(self.store_dtype))
        return where.to(self.device)

    def _claim(self, tok: int) -> int:
        """A cache slot for ``tok``: a free one (growing the slab up to the capacity) or the LRU one."""
        if len(self._slot) < self.capacity:
            slot = len(self._slot)
            if slot >= self._cache.shape[0]:  # grow the slab geometrically up to the capacity
                grow = min(self.capacity, max(64, 2 * self._cache.shape[0]))
                slab = torch.empty(grow, self.n_anchors, device=self.device, dtype=self.store_dtype)
                slab[: self._cache.shape[0]] = self._cache
                self._cache = slab
        else:
            _, slot = self._slot.popitem(last=False)
        self._slot[tok] = slot
        return slot

    def dense(self, max_bytes: int = 1 << 30) -> torch.Tensor:
        """The whole ``(V, A)`` matrix (the reference path; small vocabularies only)."""
        if self._dense is None:
            need = self.vocab_size * self.n_anchors * 4
            if need > max_bytes:
                raise ValueError(f"dense relative matrix needs {need / 2**30:.1f} GiB (> {max_bytes / 2**30:.1f}); "
                                 "use the sparse path (dense=False)")
            self._dense = self.compute(torch.arange(self.vocab_size, device=self.device))  # (V, A)
        return self._dense


def top_candidates(logits: torch.Tensor, k: int, top_mass: float | None = None,
                   extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate ids ``(B, k')`` and validity ``(B, k')``: each row's top-k tokens, cut to the smallest
    prefix holding ``top_mass`` of the probability when given, plus ``extra[b]`` if given; valid ids
    first in ascending order (so a tie resolves to the lowest id, like argmax)."""
    V = logits.shape[-1]
    vals, idx = torch.topk(logits, min(k, V), dim=-1)  # (B, k), sorted descending
    valid = torch.ones_like(idx, dtype=torch.bool)  # (B, k)
    if top_mass is not None:
        probs = torch.exp(vals - torch.logsumexp(logits, dim=-1, keepdim=True))  # (B, k)
        valid = (torch.cumsum(probs, dim=-1) - probs) < top_mass
    if extra is not None:
        extra = extra.to(idx.device)[:, None]  # (B, 1)
        present = ((idx == extra) & valid).any(dim=-1, keepdim=True)  # (B, 1)
        idx, valid = torch.cat([idx, extra], dim=1), torch.cat([valid, ~present], dim=1)
    key = torch.where(valid, idx, idx + V)  # invalid entries sort after the valid ones
    order = torch.argsort(key, dim=-1)
    idx, valid = idx.gather(1, order), valid.gather(1, order)
    width = int(valid.sum(dim=-1).max())
    idx, valid = idx[:, :width], valid[:, :width]
    idx = torch.where(valid, idx, idx[:, :1])  # masked slots repeat a valid id (no extra rows)
    return idx, valid


def masked_softmax(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z.masked_fill(~valid, float("-inf")), dim=-1)


@dataclass(frozen=True)
class IndexedRows:
    """Candidate rows of a batch without materialising ``(B, k, A)``: row ``b``'s candidate ``j`` is
    ``table[index[b, j]]``. The batch's distinct candidates share one ``(U, A)`` table, so a step
    holds ``U * A`` floats instead of ``B * k * A``.

    Mixing and pulling touch only the (row, table row) pairs that occur, as sparse products (a COO
    ``(B, U) @ (U, A)`` and a sampled ``(B, A) @ (A, U)``): measured ~2x faster than the dense
    ``(B, U)`` products with MKL here (B = 8, U = 300, A = 38k: 5.0 vs 11 ms and 3.1 vs 6.4 ms).
    Each output row sums only its own pairs, in table order, so a row's result does not depend on the
    other rows or on table rows it does not use."""

    table: torch.Tensor  # (U, A)
    index: torch.Tensor  # (B, k) long
    scale: float = 1.0  # table values times scale are the rows (see RowSource.scale)

    def __post_init__(self):
        B, U = self.index.shape[0], self.table.shape[0]
        keys = (torch.arange(B, device=self.index.device)[:, None] * U + self.index).flatten()  # (B*k,)
        pairs, where = torch.unique(keys, return_inverse=True)  # sorted: row-major, like CSR
        rows, cols = pairs // U, pairs % U
        crow = torch.zeros(B + 1, dtype=torch.long, device=pairs.device)
        crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta" (sampled_addmm needs CSR)
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cols, self.table.new_zeros(cols.numel()), (B, U))
        object.__setattr__(self, "_pairs", (torch.stack([rows, cols]), pattern, where))  # where: (B*k,)

    def gathered(self) -> torch.Tensor:
        """The explicit ``(B, k, A)`` rows (tests and the reference computation)."""
        return self.table[self.index] * self.scale

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs (B, k)`` -> ``(B, A)``: each row's probability-weighted sum of its candidate rows."""
        idx, _, where = self._pairs
        vals = probs.new_zeros(idx.shape[1]).index_add_(0, where, probs.flatten())  # (nnz,)
        w = torch.sparse_coo_tensor(idx, vals, (self.index.shape[0], self.table.shape[0]), is_coalesced=True)
        out = torch.sparse.mm(w, self.table)  # (B, A)
        return out.mul_(self.scale) if self.scale != 1.0 else out

    def pull(self, vec: torch.Tensor) -> torch.Tensor:
        """``vec (B, A)`` -> ``(B, k)``: each candidate row's dot product with its row's ``vec``."""
        _, pattern, where = self._pairs
        dots = torch.sparse.sampled_addmm(pattern, vec, self.table.T, beta=0.0).values()  # (nnz,)
        out = dots[where].view(self.index.shape)  # (B, k)
        return out.mul_(self.scale) if self.scale != 1.0 else out

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


Rows = torch.Tensor | IndexedRows  # what mix / pull / inverse_search take


def mix(probs: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``probs (B, k)`` through ``rows``: ``(B, k, A)`` per row, ``(k, A)`` shared or
    :class:`IndexedRows` -> ``(B, A)``."""
    if isinstance(rows, IndexedRows):
        return rows.mix(probs)
    if rows.dim() == 2:
        return probs @ rows  # (B, A)
    return torch.bmm(probs[:, None, :], rows)[:, 0]  # (B, A)


def pull(rows: Rows, vec: torch.Tensor) -> torch.Tensor:
    """``rows @ vec`` per row: ``(B, k, A)``, ``(k, A)`` or :class:`IndexedRows` with ``vec (B, A)``
    -> ``(B, k)``."""
    if isinstance(rows, IndexedRows):
        return rows.pull(vec)
    if rows.dim() == 2:
        return vec @ rows.T  # (B, k)
    return torch.bmm(rows, vec[:, :, None])[:, :, 0]  # (B, k)


def aggregate(qs: Sequence[torch.Tensor], weights: Sequence[float], main: int) -> torch.Tensor:
    """``q = sum_i w_i q_i`` written as ``q_m + sum_{i != m} w_i (q_i - q_m)`` (equal when the weights
    sum to 1), so that copies of the main member or weights (1, 0, ...) give ``q_m`` bit for bit."""
    q = qs[main].clone()  # (B, A)
    for i, (qi, w) in enumerate(zip(qs, weights)):
        if i != main and w != 0.0:
            q += w * (qi - qs[main])
    return q.clamp_min_(0.0)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row ``(B,)``."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(_TINY))).sum(dim=-1)


@dataclass(frozen=True)
class SearchParams:
    """Inverse-transformation settings (reference: AdamW, cosine schedule T_max 10, eta_min lr/4)."""

    lr: float = 0.15
    steps: int = 5
    weight_decay: float = 0.01
    t_max: int = 10
    eta_min_ratio: float = 0.25
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def lr_at(self, t: int) -> float:
        eta_min = self.lr * self.eta_min_ratio
        return eta_min + (self.lr - eta_min) * (1 + math.cos(math.pi * t / self.t_max)) / 2


def inverse_search(z0: torch.Tensor, valid: torch.Tensor, rows: Rows, target: torch.Tensor,
                   params: SearchParams, pred0: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise ``KL(target || softmax(z) R)`` over ``z (B, k)`` from ``z0`` with batched AdamW;
    AdamW is elementwise, so each row's result does not depend on the others. ``pred0 (B, A)``: the
    first step's ``softmax(z0) R`` when the caller has it already (the main member's own relative
    distribution), saving one pass over the rows."""
    z = z0.clone()  # (B, k)
    if params.lr == 0.0 or params.steps == 0:
        return z
    b1, b2 = params.betas
    m = torch.zeros_like(z)  # (B, k)
    v = torch.zeros_like(z)  # (B, k)
    active = None
    for t in range(params.steps):
        s = masked_softmax(z, valid)  # (B, k)
        pred = pred0 if t == 0 and pred0 is not None else mix(s, rows)  # (B, A)
        if active is None:  # an exactly zero loss is the optimum: leave the row alone
            active = valid & ~(pred == target).all(dim=-1, keepdim=True)  # (B, k)
        ratio = (pred - target) / pred.clamp_min(_TINY)  # (B, A): dKL/dpred up to a constant
        g = pull(rows, ratio)  # (B, k)
        grad = s * (g - (s * g).sum(dim=-1, keepdim=True))  # (B, k): through the softmax
        lr_t = params.lr_at(t)
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = v.sqrt() / math.sqrt(1 - b2 ** (t + 1)) + params.eps  # (B, k)
        step = z * (1 - lr_t * params.weight_decay) - (lr_t / (1 - b1 ** (t + 1))) * m / denom
        z = torch.where(active, step, z)  # masked candidates keep their place
    return z


def search_radius(params: SearchParams) -> float:
    """An upper bound on how far the search moves any one logit, apart from the weight decay's common
    factor: AdamW's bias-corrected step is ``lr_t * m_t / sqrt(v_t)`` with ``m_t, v_t`` weighted sums
    of the same gradients, and Cauchy-Schwarz bounds ``|m_t| / sqrt(v_t)`` by
    ``C_t = sqrt(sum_s w_s^2 / u_s)`` (``w, u`` the normalised EMA weights of ``m`` and ``v``); so
    ``|z_T - z_0 * decay| <= sum_t lr_t C_t`` (0.68 for the reference settings)."""
    b1, b2 = params.betas
    total = 0.0
    for t in range(1, params.steps + 1):
        c = sum(((1 - b1) * b1 ** (t - s) / (1 - b1 ** t)) ** 2 / ((1 - b2) * b2 ** (t - s) / (1 - b2 ** t))
                for s in range(1, t + 1))
        total += params.lr_at(t - 1) * math.sqrt(c)
    return total


def decided_rows(z0: torch.Tensor, valid: torch.Tensor, params: SearchParams) -> torch.Tensor:
    """Rows ``(B,)`` whose greedy choice the search cannot change: the lead of the best valid
    candidate of ``z0 (B, k)`` over the second, shrunk by the weight decay, exceeds twice
    :func:`search_radius` (every logit moves at most that far). A row with one valid candidate is
    decided. The bound is exact arithmetic plus a margin of 1e-3 for rounding."""
    if params.lr == 0.0 or params.steps == 0:
        return torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    decay = math.prod(1 - params.lr_at(t) * params.weight_decay for t in range(params.steps))
    return top_lead(z0.masked_fill(~valid, float("-inf"))) * decay > 2 * search_radius(params) + 1e-3


def top_lead(z: torch.Tensor) -> torch.Tensor:
    """How far each row's best entry of ``z (B, k)`` leads its second ``(B,)``; inf with one finite entry."""
    if z.shape[1] < 2:
        return torch.full((z.shape[0],), float("inf"), device=z.device)
    top = z.topk(2, dim=-1).values  # (B, 2)
    return top[:, 0] - top[:, 1]


def inverse_search_reference(z0: torch.Tensor, rows: torch.Tensor, target: torch.Tensor,
                             params: SearchParams) -> torch.Tensor:
    """The same search for one row ``z0 (k,)`` with autograd, ``torch.optim.AdamW`` and
    ``CosineAnnealingLR`` (the reference code's structure, with a summed KL): the test oracle."""
    z = z0.detach().clone().requires_grad_(True)  # (k,)
    opt = torch.optim.AdamW([z], lr=params.lr, betas=params.betas, eps=params.eps,
                            weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.t_max,
                                                       eta_min=params.lr * params.eta_min_ratio)
    with torch.enable_grad():
        for _ in range(params.steps):
            pred = torch.softmax(z, dim=-1) @ rows  # (A,)
            loss = torch.nn.functional.kl_div(pred.clamp_min(_TINY).log(), target, reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return z.detach()


@dataclass
class FuseResult:
    """One fusion step for B rows. The fused distribution is ``softmax(z)`` over the main member's
    candidates ``cand`` plus, in the sparse path, a last "tail" column standing for every other token
    (it takes probability mass but is never chosen)."""

    cand: torch.Tensor  # (B, k) candidate token ids of the main member
    valid: torch.Tensor  # (B, k + tail) bool
    z: torch.Tensor  # (B, k + tail) searched logits
    q_members: list[torch.Tensor]  # per member (B, A): relative distributions
    q: torch.Tensor  # (B, A): their aggregate

    def token_logits(self) -> torch.Tensor:
        """Searched logits of the candidate tokens ``(B, k)``, ``-inf`` where masked."""
        k = self.cand.shape[1]
        return self.z[:, :k].masked_fill(~self.valid[:, :k], float("-inf"))

    def logprobs(self) -> torch.Tensor:
        """Fused log-probabilities of the candidates ``(B, k)`` (normalised with the tail's mass)."""
        full = torch.log_softmax(self.z.masked_fill(~self.valid, float("-inf")), dim=-1)  # (B, k + tail)
        return full[:, : self.cand.shape[1]]

    def greedy(self) -> torch.Tensor:
        pos = self.token_logits().argmax(dim=-1, keepdim=True)  # (B, 1)
        return self.cand.gather(1, pos)[:, 0]  # (B,)

    def _widened(self, k: int) -> "FuseResult":
        """The same result with ``k >= self.cand.shape[1]`` candidate slots (masked ones added)."""
        b, pad = self.cand.shape[0], k - self.cand.shape[1]
        if pad == 0:
            return self
        z = torch.cat([self.z[:, :-1], self.z.new_zeros(b, pad), self.z[:, -1:]], dim=1)
        valid = torch.cat([self.valid[:, :-1], self.valid.new_zeros(b, pad), self.valid[:, -1:]], dim=1)
        cand = torch.cat([self.cand, self.cand[:, :1].expand(b, pad)], dim=1)
        return FuseResult(cand=cand, valid=valid, z=z, q_members=self.q_members, q=self.q)

    def splice(self, rows: torch.Tensor, sub: "FuseResult") -> "FuseResult":
        """This result with ``rows (r,)`` taken from ``sub`` (a result for those rows only)."""
        k = max(self.cand.shape[1], sub.cand.shape[1])
        a, b = self._widened(k), sub._widened(k)
        out = []
        for x, y in [(a.cand, b.cand), (a.valid, b.valid), (a.z, b.z), (a.q, b.q)] + list(zip(a.q_members, b.q_members)):
            x = x.clone()
            x[rows] = y
            out.append(x)
        return FuseResult(cand=out[0], valid=out[1], z=out[2], q=out[3], q_members=out[4:])

    def member_kl(self) -> list[torch.Tensor]:
        """Per member ``KL(q_i || q)`` per row ``(B,)``."""
        return [kl_rows(qi, self.q) for qi in self.q_members]


class RelativeEnsemble:
    """The DeePEn step over members' next-token logits: candidates, transform, aggregate, search.

    Sparse path (default): each member contributes its top-k tokens (optionally cut at a cumulative
    mass: ``top_mass``, and ``main_top_mass`` for the main member, whose candidates are the tokens the
    search can choose) through rows computed on demand, plus one tail pseudo-token holding the exact
    remaining probability mass (logsumexp of the other logits) with the uniform relative row (tail
    rows are diffuse). The search runs over the main member's candidates and its tail; the tail moves
    as one block, as the many small tail logits of the dense search do under Adam's per-coordinate
    normalisation. Measured on tiny models against the dense path: same greedy token in 87% of steps
    at k=64 without the tail, 100% with it.

    ``refine_margin``: rows whose two best searched candidates are closer than this (in logits) are
    fused again with every member's full top-k (no mass cuts) and take that result, so the cuts do not
    decide close calls. A row the main member's cut leaves with one candidate (its top token holds at
    least ``main_top_mass``) is not refined. Measured on the packaged trio (bench/deepen_mass_sweep.py):
    cuts 0.9 / 0.99 refined below 0.3 agree with the exact dense step in 99.2% of row-steps (98.6%
    unrefined), the full top-64 of every member without cuts in 99.4%, at 2.2x the row computations.

    ``greedy_rows`` (in :meth:`fuse`): rows whose caller needs only the greedy token skip the search
    when :func:`decided_rows` proves it cannot change their argmax (their ``z`` stays the initial
    logits); the search then reads only the table rows of the undecided rows.

    ``dense=True`` is the reference path: full softmax, dense ``(V, A)`` matrices, search over the whole
    main vocabulary (small vocabularies only).
    """

    def __init__(self, sources: Sequence[RowSource], weights: Sequence[float], main: int, *, topk: int,
                 top_mass: float | None, main_top_mass: float | None, search: SearchParams, dense: bool = False,
                 refine_margin: float = 0.0):
        self.sources = list(sources)
        self.weights = tuple(weights)
        self.main = main
        self.topk = topk
        self.top_mass = top_mass
        self.main_top_mass = main_top_mass  # the main member's cut (its candidates are what the search picks)
        self.search = search
        self.dense = dense
        self.refine_margin = float(refine_margin)
        self.refined = 0  # rows fused again (see refine_margin)
        self.decided = 0  # rows whose search was skipped (see greedy_rows)
        self.peak_step_bytes = 0  # largest transient working set of one step (rows and (B, A) tensors)
        self._tables: dict[bool, torch.Tensor] = {}  # work tables by "is main" (see _table)

    @property
    def nbytes(self) -> int:
        """Bytes held between steps: the sources (anchors, row caches) and the reused work tables."""
        return sum(s.nbytes for s in self.sources) + sum(t.numel() * 4 for t in self._tables.values())

    def _sparse(self, src: RowSource, lg: torch.Tensor, extra: torch.Tensor | None, is_main: bool,
                masses: tuple[float | None, float | None], greedy_rows: torch.Tensor | None = None,
                shared: tuple[torch.Tensor, IndexedRows] | None = None):
        """Candidates + tail of one member: ids (B, k), z (B, k+1), valid (B, k+1), rows (B, k+1) of a
        (U+1, A) table (row 0 the tail's uniform row, then the batch's distinct candidates), and the
        with ``greedy_rows`` (main member only) the rows to search and the table rows they need
        (``1 + U'``: the candidates of undecided rows come first, see :func:`decided_rows`), else None. A member with the main member's rows
        and the same candidates takes the main member's table ``shared`` (so a copy of the main member
        mixes bit for bit like it)."""
        # the main member's cut for every member with the main member's rows (copies of it stay exact copies)
        mass = masses[1] if src is self.sources[self.main] else masses[0]
        ids, ok = top_candidates(lg, self.topk, mass, extra)  # (B, k)
        tail = torch.logsumexp(lg.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)  # (B, 1)
        z = torch.cat([lg.gather(1, ids), tail], dim=1)  # (B, k+1)
        ok = torch.cat([ok, torch.isfinite(tail)], dim=1)  # (B, k+1)
        z = z.masked_fill(~ok, 0.0)  # no -inf inside the search state
        if shared is not None and src is self.sources[self.main] and torch.equal(ids, shared[0]):
            return ids, z, ok, shared[1], None  # a copy of the main member: its table, bit for bit
        uniq, inv = torch.unique(ids, return_inverse=True)  # (u,), (B, k)
        u = uniq.numel()
        first = torch.ones(u, dtype=torch.bool, device=uniq.device)  # table rows the search reads
        search = None
        if is_main and greedy_rows is not None:
            open_ = self._open(z, ok, greedy_rows)  # (B,)
            first = torch.zeros_like(first)
            first[inv[open_].flatten()] = True
        table = self._table(is_main, u + 1, src)  # (U+1, A), stored form
        table[0] = 1.0 / (src.n_anchors * src.scale)  # the tail's uniform row
        slot = torch.empty(u, dtype=torch.long, device=uniq.device)  # table row of each distinct id
        start = 1
        for pos in (first.nonzero()[:, 0], (~first).nonzero()[:, 0]):  # the search's rows first
            if pos.numel():
                slot[pos] = start + src.rows_into(uniq[pos], table[start : start + pos.numel()]).to(slot.device)
                start += pos.numel()
        index = torch.cat([slot[inv], torch.zeros_like(inv[:, :1])], dim=1)  # (B, k+1): tail -> row 0
        rows = IndexedRows(table, index, src.scale)
        if is_main and greedy_rows is not None:  # the open rows on the table prefix they use
            search = (open_.nonzero()[:, 0], 1 + int(first.sum()))
        return ids, z, ok, rows, search

    def _open(self, z: torch.Tensor, ok: torch.Tensor, greedy_rows: torch.Tensor) -> torch.Tensor:
        """Rows ``(B,)`` the search must run on: all but greedy rows it provably cannot change."""
        return ~(greedy_rows.to(z.device) & decided_rows(z[:, :-1], ok[:, :-1], self.search))

    def _table(self, is_main: bool, rows: int, src: RowSource) -> torch.Tensor:
        """A ``(rows, A)`` float32 work table, reused across steps: one for the main member (kept for
        the search) and one the other members take in turn. Reuse matters on CPU: a fresh tensor of
        tens of MB is a fresh mmap whose page faults cost as much as filling it."""
        buf = self._tables.get(is_main)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != src.n_anchors or buf.device != src.device:
            buf = torch.empty(max(rows, 64 * math.ceil(rows / 64)), src.n_anchors, device=src.device)
            self._tables[is_main] = buf
        return buf[:rows]

    def fuse(self, logits: Sequence[torch.Tensor], extra: torch.Tensor | None = None,
             greedy_rows: torch.Tensor | None = None) -> FuseResult:
        """``logits[i] (B, V_i)`` -> :class:`FuseResult`. ``extra (B,)`` forces a main-vocabulary token
        into the candidates (teacher forcing). ``greedy_rows (B,)`` bool: rows that need only
        :meth:`FuseResult.greedy` (their search may be skipped when it cannot change the argmax)."""
        masses = (self.top_mass, self.main_top_mass)
        res = self._fuse(logits, extra, masses, greedy_rows)
        if self.dense or self.refine_margin <= 0.0 or masses == (None, None):
            return res
        rows = (top_lead(res.token_logits()) < self.refine_margin).nonzero()[:, 0]  # (r,)
        if rows.numel() == 0:
            return res
        self.refined += rows.numel()
        sub = self._fuse([lg[rows] for lg in logits], None if extra is None else extra[rows], (None, None),
                         None if greedy_rows is None else greedy_rows[rows])
        return res.splice(rows, sub)

    def _fuse(self, logits, extra, masses, greedy_rows) -> FuseResult:
        dev = self.sources[self.main].device
        qs: list[torch.Tensor | None] = [None] * len(self.sources)
        main_rows = cand = valid = z0 = None
        peak, search = 0, None
        order = [self.main] + [i for i in range(len(self.sources)) if i != self.main]  # main first
        for i in order:
            src, lg = self.sources[i], logits[i].float()
            is_main = i == self.main
            if self.dense:
                rows = src.dense()  # (V, A)
                ids = torch.arange(lg.shape[-1], device=lg.device).expand(lg.shape[0], -1)  # (B, V)
                zi, ok = lg, torch.ones_like(ids, dtype=torch.bool)  # (B, V)
            else:
                ids, zi, ok, rows, part = self._sparse(src, lg, extra if is_main else None, is_main, masses,
                                                       greedy_rows, None if is_main else (cand, main_rows))
                search = part if is_main else search
            qs[i] = mix(masked_softmax(zi, ok), rows).to(dev)  # (B, A)
            if isinstance(rows, IndexedRows):  # transient: the table's rows gathered from / rounded for the cache
                peak = max(peak, rows.table.numel() * src.store_dtype.itemsize)
            if is_main:
                main_rows, cand, valid, z0 = rows, ids, ok, zi
        q = aggregate(qs, self.weights, self.main)  # (B, A)
        if search is not None:
            # undecided rows only, on the table rows they use (a prefix): the others keep z0
            z = z0.clone()
            rows_open, n_search = search
            self.decided += z0.shape[0] - rows_open.numel()
            if rows_open.numel():
                sub = IndexedRows(main_rows.table[:n_search], main_rows.index[rows_open], main_rows.scale)
                z[rows_open] = inverse_search(z0[rows_open], valid[rows_open], sub, q[rows_open], self.search,
                                              pred0=qs[self.main][rows_open])
        else:
            z = inverse_search(z0, valid, main_rows, q, self.search, pred0=qs[self.main])  # (B, k+1)
        self.peak_step_bytes = max(self.peak_step_bytes, peak + (len(qs) + 6) * q.numel() * 4)
        return FuseResult(cand=cand, valid=valid, z=z, q_members=qs, q=q)
