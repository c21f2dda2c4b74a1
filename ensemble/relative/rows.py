"""Relative rows of one member, computed on demand and cached (docs/algorithms.md, DeePEn: relative
representation). The row of token ``t`` is ``r(t) = softmax(tau * unit(cos(E[t], E[a])))`` over the
anchors ``a``, from L2-normalised input embeddings; never the dense ``(V, A)`` matrix, except through
:meth:`RowSource.dense` (the reference path: tests, small vocabularies).

Kernels: on CPU oneDNN's packed linear (:mod:`ensemble.relative.onednn`); on other devices, or where
oneDNN is missing, the product ``(A, d) @ (d, n)`` transposed back into row layout.

A row is bitwise the same whatever it was computed with, so cached and fresh rows agree exactly and a
row never depends on the rest of a batch. oneDNN's rows have that property for any block; the plain
product's columns are bit-stable only from some block width on (MKL on CPU; the width measured is in
docs/results.md), so that path pads short blocks by repetition to ``min_block`` rows on CPU and to the
full ``chunk`` on other devices.

Rows may be *stored* (cache and returned rows) as float16 scaled by ``A`` (``store="float16"``): half
the bytes per cached row, relative error <= 2^-11, every row rounded the same way whether fresh or
cached; :meth:`RowSource.compute` and :meth:`RowSource.dense` stay exact.
"""
from __future__ import annotations

import torch

from ensemble.relative import onednn
from ensemble.relative.cache import RowCache

_FINISH_ROWS = 16  # rows transposed and finished together (16 x ~38k anchors x 4 bytes stays in cache)
_SCRATCH: dict[torch.device, torch.Tensor] = {}  # per device: the transposed row products, reused


def _scratch(device: torch.device, rows: int, cols: int) -> torch.Tensor:
    """A contiguous float32 ``(rows, cols)`` work buffer shared by every RowSource on ``device`` (reused:
    a fresh tensor of this size is a fresh mmap whose page faults cost about as much as filling it)."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < rows * cols:
        buf = _SCRATCH[device] = torch.empty(rows * cols, device=device)
    return buf[: rows * cols].view(rows, cols)


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
        # on CPU the anchors are packed once for oneDNN's linear, whose rows need no padding
        self._packed = onednn.pack(self.anchors) if self.device.type == "cpu" else None
        if self._packed is not None:
            self.anchors = None  # the packed copy replaces it
            self.min_block = 1
        self._eye = torch.eye(_FINISH_ROWS, device=self.device)
        self.store_dtype = getattr(torch, store)
        self.cache = RowCache(cache_rows, self.n_anchors, self.device, self.store_dtype)
        self._dense: torch.Tensor | None = None

    @property
    def hits(self) -> int:
        """Rows served from the cache."""
        return self.cache.hits

    @property
    def misses(self) -> int:
        """Rows computed because the cache did not hold them."""
        return self.cache.misses

    @property
    def nbytes(self) -> int:
        """Bytes held: normalised anchors, inverse norms, row cache (and the dense matrix if built)."""
        dense = self._dense.numel() * 4 if self._dense is not None else 0
        held = self._packed if self._packed is not None else self.anchors
        return (held.numel() + self.inv_norm.numel()) * 4 + self.cache.nbytes + dense

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
                cos = onednn.linear(x, self._packed)  # (c, A)
                for r in range(0, n, _FINISH_ROWS):  # finish a few rows at a time, while they are in cache
                    blk = out[i + r : i + min(n, r + _FINISH_ROWS)]
                    self._finish(blk.copy_(cos[r : r + blk.shape[0]]), rounded)
                continue
            cos_t = torch.matmul(self.anchors, x.T, out=_scratch(self.device, self.n_anchors, part.numel()))  # (A, c)
            for r in range(0, n, _FINISH_ROWS):  # transpose a few rows at a time and finish them in cache
                blk = out[i + r : i + min(n, r + _FINISH_ROWS)]  # (m <= _FINISH_ROWS, A)
                m = blk.shape[0]
                # an exact transposing copy: identity @ cos_t[:, r:r+m].T (x * 1 plus exact zeros; the
                # cos values are finite), faster than copy_ of the transposed view, which takes torch's
                # generic strided path (docs/results.md)
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
        hit_pos, hit_slot, miss_pos = self.cache.lookup(toks)
        h, n = len(hit_pos), len(toks)
        where = torch.empty(n, dtype=torch.long)
        where[hit_pos + miss_pos] = torch.arange(n)
        if hit_pos:
            self.cache.read(hit_slot, out[:h])
        if miss_pos:
            # fresh rows in the stored form, rounded exactly as cached ones are
            fresh = self.compute(ids[miss_pos], out=out[h:n], rounded=True)  # (m, A) float32, in place
            self.cache.store([toks[i] for i in miss_pos], fresh, room=self.cache.capacity - h)
        return where.to(self.device)

    def dense(self, max_bytes: int = 1 << 30) -> torch.Tensor:
        """The whole ``(V, A)`` matrix (the reference path; small vocabularies only)."""
        if self._dense is None:
            need = self.vocab_size * self.n_anchors * 4
            if need > max_bytes:
                raise ValueError(f"dense relative matrix needs {need / 2**30:.1f} GiB (> {max_bytes / 2**30:.1f}); "
                                 "use the sparse path (dense=False)")
            self._dense = self.compute(torch.arange(self.vocab_size, device=self.device))  # (V, A)
        return self._dense
