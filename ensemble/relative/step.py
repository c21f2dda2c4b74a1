"""One DeePEn fusion step for a batch (docs/algorithms.md, DeePEn steps 1-5): each member's candidates
(:func:`top_candidates`) and their relative rows, the transform into the anchor space, the aggregate,
and the inverse search over the main member's candidates (:class:`RelativeEnsemble`).

The sparse path (default) holds each member's candidate rows as one table of the batch's distinct
tokens plus an index (:class:`~ensemble.relative.mixing.IndexedRows`); ``dense=True`` is the reference
path (full softmax, dense ``(V, A)`` matrices, search over the whole main vocabulary) that the tests
compare it with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ensemble.relative.mixing import IndexedRows, aggregate, masked_softmax, mix
from ensemble.relative.result import FuseResult
from ensemble.relative.rows import RowSource
from ensemble.relative.search import SearchParams, decided_rows, inverse_search, moving_rows, top_lead


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


def _take(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """``x[rows]`` for an optional per-row tensor, which may live on another device than the row
    indices (callers pass CPU masks and token ids alongside device logits)."""
    return None if x is None else x[rows.to(x.device)]


@dataclass(frozen=True)
class MemberCandidates:
    """One member's part of a sparse step: its candidates plus one tail pseudo-token (the rest of the
    vocabulary), their logits and their rows."""

    ids: torch.Tensor  # (B, k) candidate token ids
    z: torch.Tensor  # (B, k+1) their logits, then the tail's; 0 where not valid (no -inf in the search)
    valid: torch.Tensor  # (B, k+1) bool
    rows: IndexedRows  # (B, k+1) rows of a (U+1, A) table: row 0 the tail's uniform row, then the candidates
    open_rows: torch.Tensor | None = None  # (b,) the rows to search (main member with greedy_rows), else None
    table_prefix: int = 0  # with open_rows: the table rows those rows read (a prefix, 1 + their candidates)


class RelativeEnsemble:
    """The DeePEn step over members' next-token logits: candidates, transform, aggregate, search.

    Sparse path (default): each member contributes its top-k tokens (optionally cut at a cumulative
    mass: ``top_mass``, and ``main_top_mass`` for the main member, whose candidates are the tokens the
    search can choose) through rows computed on demand, plus one tail pseudo-token holding the exact
    remaining probability mass (logsumexp of the other logits) with the uniform relative row (tail
    rows are diffuse). The search runs over the main member's candidates and its tail; the tail moves
    as one block, as the many small tail logits of the dense search do under Adam's per-coordinate
    normalisation. Without the tail the sparse step picks the dense step's token markedly less often
    (the agreement measured with and without it is in docs/results.md).

    ``refine_margin``: rows whose two best searched candidates are closer than this (in logits) are
    fused again with every member's full top-k (no mass cuts) and take that result, so the cuts do not
    decide close calls. A row the main member's cut leaves with one candidate (its top token holds at
    least ``main_top_mass``) is not refined. The agreement with the exact dense step and the extra row
    computations this costs, measured by ``bench/deepen_mass_sweep.py``, are in docs/results.md.

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
                shared: MemberCandidates | None = None) -> MemberCandidates:
        """Candidates + tail of one member, their rows in one ``(U+1, A)`` table (row 0 the tail's
        uniform row, then the batch's distinct candidates). With ``greedy_rows`` (main member only) also
        the rows to search and the table prefix they need (the candidates of undecided rows come first,
        see :func:`decided_rows`). A member with the main member's rows and the same candidates takes
        the main member's table from ``shared`` (so a copy of the main member mixes bit for bit like it)."""
        # the main member's cut for every member with the main member's rows (copies of it stay exact copies)
        mass = masses[1] if src is self.sources[self.main] else masses[0]
        ids, ok = top_candidates(lg, self.topk, mass, extra)  # (B, k)
        tail = torch.logsumexp(lg.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)  # (B, 1)
        z = torch.cat([lg.gather(1, ids), tail], dim=1)  # (B, k+1)
        ok = torch.cat([ok, torch.isfinite(tail)], dim=1)  # (B, k+1)
        z = z.masked_fill(~ok, 0.0)  # no -inf inside the search state
        if shared is not None and src is self.sources[self.main] and torch.equal(ids, shared.ids):
            return MemberCandidates(ids, z, ok, shared.rows)  # a copy of the main member: its table, bit for bit
        uniq, inv = torch.unique(ids, return_inverse=True)  # (u,), (B, k)
        u = uniq.numel()
        first = torch.ones(u, dtype=torch.bool, device=uniq.device)  # table rows the search reads
        searching = is_main and greedy_rows is not None
        if searching:
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
        if not searching:
            return MemberCandidates(ids, z, ok, rows)
        # the open rows on the table prefix they use
        return MemberCandidates(ids, z, ok, rows, open_rows=open_.nonzero()[:, 0], table_prefix=1 + int(first.sum()))

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
        into the candidates (teacher forcing) on every path, refinement included; read its fused
        log-probability with :meth:`FuseResult.forced_logprobs`. ``greedy_rows (B,)`` bool: rows that need only
        :meth:`FuseResult.greedy` (their search may be skipped when it cannot change the argmax)."""
        masses = (self.top_mass, self.main_top_mass)
        res = self._fuse(logits, extra, masses, greedy_rows)
        if self.dense or self.refine_margin <= 0.0 or masses == (None, None):
            return res
        rows = (top_lead(res.token_logits()) < self.refine_margin).nonzero()[:, 0]  # (r,)
        if rows.numel() == 0:
            return res
        self.refined += rows.numel()
        sub = self._fuse([lg[rows] for lg in logits], _take(extra, rows), (None, None), _take(greedy_rows, rows))
        return res.splice(rows, sub)

    def _fuse(self, logits, extra, masses, greedy_rows) -> FuseResult:
        dev = self.sources[self.main].device
        qs: list[torch.Tensor | None] = [None] * len(self.sources)
        main_rows = cand = valid = z0 = main_lg = None
        main_part: MemberCandidates | None = None
        peak = 0
        order = [self.main] + [i for i in range(len(self.sources)) if i != self.main]  # main first
        for i in order:
            src, lg = self.sources[i], logits[i].float()
            is_main = i == self.main
            if self.dense:
                rows = src.dense()  # (V, A)
                ids = torch.arange(lg.shape[-1], device=lg.device).expand(lg.shape[0], -1)  # (B, V)
                zi, ok = lg, torch.ones_like(ids, dtype=torch.bool)  # (B, V)
            else:
                # the forced token joins the candidates of every member with the main member's rows, so
                # that a copy of the main member keeps the same candidates (and table) under teacher forcing
                forced = extra if src is self.sources[self.main] else None
                part = self._sparse(src, lg, forced, is_main, masses, greedy_rows, main_part)
                ids, zi, ok, rows = part.ids, part.z, part.valid, part.rows
                main_part = part if is_main else main_part
            qs[i] = mix(masked_softmax(zi, ok), rows).to(dev)  # (B, A)
            if isinstance(rows, IndexedRows):  # transient: the table's rows gathered from / rounded for the cache
                peak = max(peak, rows.table.numel() * src.store_dtype.itemsize)
            if is_main:
                main_rows, cand, valid, z0, main_lg = rows, ids, ok, zi, lg
        q = aggregate(qs, self.weights, self.main)  # (B, A)
        # rows the search changes: only labeling (forced tokens) reads them, through ``rest``
        moved = None if self.dense or extra is None else moving_rows(qs[self.main], q, self.search)  # (B,)
        if main_part is not None and main_part.open_rows is not None:
            # undecided rows only, on the table rows they use (a prefix): the others keep z0
            z = z0.clone()
            rows_open, n_search = main_part.open_rows, main_part.table_prefix
            self.decided += z0.shape[0] - rows_open.numel()
            if rows_open.numel():
                sub = IndexedRows(main_rows.table[:n_search], main_rows.index[rows_open], main_rows.scale)
                z[rows_open] = inverse_search(z0[rows_open], valid[rows_open], sub, q[rows_open], self.search,
                                              pred0=qs[self.main][rows_open])
            if moved is not None:
                moved &= torch.zeros_like(moved).index_fill_(0, rows_open, True)
        else:
            z = inverse_search(z0, valid, main_rows, q, self.search, pred0=qs[self.main])  # (B, k+1)
        self.peak_step_bytes = max(self.peak_step_bytes, peak + (len(qs) + 6) * q.numel() * 4)
        rest = None if moved is None else self._rest(
            main_lg, cand, z0[:, -1].masked_fill(~valid[:, -1], float("-inf")), moved)
        return FuseResult(cand=cand, valid=valid, z=z, q_members=qs, q=q, rest=rest)

    def _rest(self, lg: torch.Tensor, cand: torch.Tensor, tail: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        """:attr:`FuseResult.rest` ``(B,)``: the main member's log-mass outside its candidates ``cand``
        (``tail``, the logsumexp of its other logits ``lg (B, V)``), recomputed with the logits times
        the search's weight-decay factor on the rows it ``moved``, as the dense search leaves them."""
        if not moved.any():
            return tail
        rows = moved.nonzero()[:, 0]
        other = lg[rows].scatter(1, cand[rows], float("-inf")) * self.search.decay()  # (r, V)
        return tail.index_put((rows,), torch.logsumexp(other, dim=-1))
