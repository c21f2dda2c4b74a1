"""The row cache of one member: an LRU map from token id to a row of one slab ``(<= capacity, A)``
in the store dtype, grown geometrically up to its capacity (docs/algorithms.md, DeePEn: relative
representation). It holds rows; computing them is :class:`~ensemble.relative.rows.RowSource`'s job."""
from __future__ import annotations

from collections import OrderedDict

import torch


class RowCache:
    """Up to ``capacity`` rows of width ``width``; ``hits`` and ``misses`` count lookups."""

    def __init__(self, capacity: int, width: int, device: torch.device, dtype: torch.dtype):
        self.capacity = int(capacity)
        self.slab = torch.empty(0, width, device=device, dtype=dtype)  # (<= capacity, A)
        self._slot: OrderedDict[int, int] = OrderedDict()  # token -> slab row, least recent first
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        return self.slab.numel() * self.slab.element_size()

    def lookup(self, toks: list[int]) -> tuple[list[int], list[int], list[int]]:
        """For distinct tokens: the positions of cached ones, their slab rows, and the positions of the
        others. Cached tokens become the most recently used; hits and misses are counted."""
        hit_pos, hit_slot, miss_pos = [], [], []
        for i, t in enumerate(toks):
            slot = self._slot.get(t)
            if slot is None:
                miss_pos.append(i)
            else:
                hit_pos.append(i)
                hit_slot.append(slot)
                self._slot.move_to_end(t)
        self.hits += len(hit_pos)
        self.misses += len(miss_pos)
        return hit_pos, hit_slot, miss_pos

    def read(self, slots: list[int], out: torch.Tensor) -> None:
        """Copy the slab rows ``slots`` into ``out (len(slots), A)`` (converted to its dtype)."""
        out.copy_(self.slab.index_select(0, torch.tensor(slots, device=self.slab.device)))

    def store(self, toks: list[int], rows: torch.Tensor, room: int) -> None:
        """Cache the last ``room`` of the new tokens ``toks`` with their ``rows (len(toks), A)``, whose
        values are already representable in the store dtype (so the copy is exact). ``room`` is what the
        caller may evict: rows its own call uses are never evicted."""
        first = max(0, len(toks) - room)
        if first < len(toks):
            slots = torch.tensor([self._claim(t) for t in toks[first:]], device=self.slab.device)
            self.slab.index_copy_(0, slots, rows[first:].to(self.slab.dtype))  # one copy for all new rows

    def _claim(self, tok: int) -> int:
        """A slab row for ``tok``: a free one (growing the slab up to the capacity) or the LRU one."""
        if len(self._slot) < self.capacity:
            slot = len(self._slot)
            if slot >= self.slab.shape[0]:  # grow the slab geometrically up to the capacity
                grow = min(self.capacity, max(64, 2 * self.slab.shape[0]))
                slab = torch.empty(grow, self.slab.shape[1], device=self.slab.device, dtype=self.slab.dtype)
                slab[: self.slab.shape[0]] = self.slab
                self.slab = slab
        else:
            _, slot = self._slot.popitem(last=False)
        self._slot[tok] = slot
        return slot
