"""Distributions in the anchor space (docs/algorithms.md, DeePEn: transform and aggregate): a batch's
candidate rows as one table plus an index (:class:`IndexedRows`), mixing a distribution over
candidates into the anchor space (:func:`mix`) and its adjoint (:func:`pull`), the members' weighted
aggregate and the KL divergence between rows.

:class:`IndexedRows` never gathers the ``(B, k, A)`` tensor; the gathered form,
:meth:`IndexedRows.gathered`, is the tests' reference and :func:`mix` / :func:`pull` accept it too.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

TINY = 1e-30  # floor for probabilities inside logs and divisions


def masked_softmax(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``softmax(z)`` over the ``valid`` entries of each row (the others get 0)."""
    return torch.softmax(z.masked_fill(~valid, float("-inf")), dim=-1)


@dataclass(frozen=True)
class IndexedRows:
    """Candidate rows of a batch without materialising ``(B, k, A)``: row ``b``'s candidate ``j`` is
    ``table[index[b, j]]``. The batch's distinct candidates share one ``(U, A)`` table, so a step
    holds ``U * A`` floats instead of ``B * k * A``.

    Mixing and pulling touch only the (row, table row) pairs that occur, as sparse products (a COO
    ``(B, U) @ (U, A)`` and a sampled ``(B, A) @ (A, U)``), faster than the dense ``(B, U)`` products
    with MKL (docs/results.md). Each output row sums only its own pairs, in table order, so a row's
    result does not depend on the other rows or on table rows it does not use."""

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
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(TINY))).sum(dim=-1)
