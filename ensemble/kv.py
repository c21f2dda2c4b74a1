"""KV-cache operations on a member's batched state beyond feeding it (docs/algorithms.md, SpecFuse:
"KV reuse and compaction"). ``ensemble.members.Member`` exposes them as ``score_shared``, ``revive``
and ``compact``; this module holds the tensor work.

Contracts (``state`` is an ``ensemble.members.RowBatch``; its cache is a ``DynamicCache`` of
``DynamicLayer`` s, one column per token slot, ``state.mask`` marks the live ones):

- :func:`score_shared` ``(member, state, conts, cap) -> (logps, slots)``: the per-token log-probs of
  candidate continuations ``conts[b][c]`` of each row's live prefix, computed by appending every
  candidate of every row to the state's own cache in one forward (as many as ``cap`` logit rows ask),
  with a 4-D attention mask under which each candidate token attends to its row's live prefix and to
  its own candidate's earlier tokens only. No copy of the prefix is made. The appended columns are
  left dead (the state's live tokens, positions and logits are unchanged); ``slots[b][c]`` describes
  them (:class:`Slots`) so that the winning candidate can later be made live without a forward.
  Sliding-window layers get their window in positions (a key at position p is seen from position q
  when p > q - window), as in a clean forward over the row's live tokens; ``transformers``' own masks,
  used by ``Member.feed``, count the window in cache slots, dead ones included, which agrees while a
  row's cache fits the window.
- :func:`revive` ``(state, b, slots)``: make the dead columns ``slots`` of row b live: the row's
  tokens, next position and next-token logits become those after ``slots.tokens``. Raises when the
  row has moved on since the slots were computed (another live prefix, or a compaction). Slots
  without logits (a part, :meth:`Slots.prefix`) leave the row's logits stale: feed the row next.
- :func:`reuse_plan` ``(slots, rollback, new)``: which slots a feed may revive instead of feeding.
- :func:`compact` ``(state) -> removed``: physically remove dead columns: each row's live columns are
  gathered to the right, in order, rows left-padded to the longest; returns the number of columns
  removed. Positions are explicit (``position_ids``) and rotary embeddings are applied before
  caching, so a moved column attends exactly as before: later forwards see the same keys, fewer
  dead ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ensemble.members import Member, RowBatch

SUPPORTED_ATTENTION = ("sdpa", "eager")
"""Attention implementations :func:`score_shared` builds 4-D masks for (boolean for sdpa, additive
float for eager)."""


@dataclass(frozen=True)
class Slots:
    """Dead cache columns of one row holding ``tokens`` as fed after the row's live prefix at the
    time (``next_pos``, cache ``layout``), and the next-token logits after the last of them."""

    cols: torch.Tensor  # (n,) long: cache column of each token, in order
    tokens: tuple[int, ...]
    next_pos: int
    layout: int
    logits: torch.Tensor | None  # (V,) float; None for a part (``prefix``): the caller feeds after it

    def __post_init__(self) -> None:
        if len(self.tokens) == 0 or len(self.tokens) != int(self.cols.numel()):
            raise ValueError(f"Slots need one column per token (>= 1), got {int(self.cols.numel())} columns "
                             f"for {len(self.tokens)} tokens")

    def prefix(self, k: int) -> "Slots":
        """The first ``k`` tokens' slots, without logits (the next-token logits after them are not stored)."""
        if not 0 < k < len(self.tokens):
            raise ValueError(f"prefix length must be in [1, {len(self.tokens) - 1}], got {k}")
        return Slots(self.cols[:k], self.tokens[:k], self.next_pos, self.layout, None)


def reuse_plan(slots: Slots | None, rollback: int, new: list[int]) -> tuple[Slots | None, list[int]]:
    """What of a feed ``(rollback, new)`` the dead ``slots`` already hold: ``(slots to revive or None,
    tokens left to feed)``. Nothing when the feed rolls back (the slots follow the current prefix);
    otherwise the longest common prefix of ``slots.tokens`` and ``new``; a part of the slots only when
    at least one token is left to feed (only the whole slots carry their next-token logits)."""
    if slots is None or rollback:
        return None, new
    k = 0
    for x, y in zip(slots.tokens, new):
        if x != y:
            break
        k += 1
    if k < len(slots.tokens):
        k = min(k, len(new) - 1)
        slots = slots.prefix(k) if k > 0 else None
    return (slots, new[k:]) if k > 0 else (None, new)


def revive(state: "RowBatch", b: int, slots: Slots) -> None:
    """Make row b's dead columns ``slots`` live (see the module docstring)."""
    if slots.layout != state.layout or int(state.next_pos[b]) != slots.next_pos:
        raise ValueError(f"row {b}: slots computed after position {slots.next_pos} (layout {slots.layout}) "
                         f"no longer fit the row (next position {int(state.next_pos[b])}, layout {state.layout})")
    if bool(state.mask[b, slots.cols].any()):
        raise ValueError(f"row {b}: columns {slots.cols.tolist()} are already live")
    n = len(slots.tokens)
    state.mask[b, slots.cols] = 1
    state.next_pos[b] += n
    state.ids[b].extend(slots.tokens)
    if slots.logits is not None:  # a part (Slots.prefix): the row's next feed computes them
        logits = state.logits.clone()  # (B, V): never write into a tensor a caller may still hold
        logits[b] = slots.logits.to(logits.dtype)
        state.logits = logits


def compact(state: "RowBatch") -> int:
    """Remove dead columns from the cache (see the module docstring); returns how many."""
    B, S = state.mask.shape
    width = int(state.mask.sum(1).max()) if B else 0
    if width == S:
        return 0
    # stable: dead columns first, then the live ones in their order; keep the last `width`
    order = torch.argsort(state.mask, dim=1, stable=True)[:, S - width:]  # (B, width)
    for i, layer in enumerate(state.cache.layers):
        for name in ("keys", "values"):
            t = getattr(layer, name)  # (B, H, S, D)
            if t.shape[2] != S:
                raise ValueError(f"cache layer {i} holds {t.shape[2]} columns, the mask {S}: "
                                 f"compaction needs one column per mask slot")
            setattr(layer, name, t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])))
    state.mask = state.mask.gather(1, order)
    state.layout += 1
    return S - width


def _pieces(conts: list[list[list[int]]], cap: int) -> list[list[tuple[int, int, int, int]]]:
    """Forwards of (row, candidate, first token, end token) pieces: every non-empty candidate in
    slices of at most ``cap`` tokens, consecutive slices packed while their tokens stay within ``cap``."""
    forwards: list[list[tuple[int, int, int, int]]] = []
    need = cap + 1
    for b, cs in enumerate(conts):
        for c, toks in enumerate(cs):
            for t0 in range(0, len(toks), cap):
                t1 = min(t0 + cap, len(toks))
                if need + (t1 - t0) > cap:
                    forwards.append([])
                    need = 0
                forwards[-1].append((b, c, t0, t1))
                need += t1 - t0
    return forwards


def _attention_mask(member: "Member", allowed: torch.Tensor, sliding: torch.Tensor | None):
    """The model's 4-D mask argument from boolean ``(B, T, S)`` masks (True: may attend)."""
    impl = member.model.config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"member {member.name}: shared scoring supports attention {SUPPORTED_ATTENTION}, "
                         f"got {impl!r} (turn kv_reuse off for this member)")

    def as_mask(x: torch.Tensor) -> torch.Tensor:
        x = x[:, None]  # (B, 1, T, S)
        if impl == "sdpa":
            return x
        dtype = member.model.dtype
        return torch.zeros(x.shape, dtype=dtype, device=x.device).masked_fill(~x, torch.finfo(dtype).min)

    if sliding is None:
        return as_mask(allowed)
    return {"full_attention": as_mask(allowed), "sliding_attention": as_mask(sliding)}


def sliding_window(member: "Member") -> int | None:
    """The window of the member's sliding-window layers, None when it has none."""
    cfg = member.model.config
    types = getattr(cfg, "layer_types", None) or ()
    window = getattr(cfg, "sliding_window", None)
    return int(window) if window and "sliding_attention" in types else None


@torch.inference_mode()
def score_shared(member: "Member", state: "RowBatch", conts: list[list[list[int]]],
                 cap: int) -> tuple[list[list[torch.Tensor]], list[list[Slots | None]]]:
    """Log-probs of ``conts[b][c]`` after row b's live prefix in the state's own cache (see the
    module docstring); ``cap``: the most logit rows per forward. An empty candidate scores an empty
    tensor and has no slots."""
    B, dev, window = state.size, member.device, sliding_window(member)
    S0 = state.mask.shape[1]
    prefix = state.mask.bool()  # (B, S0): the live prefix every candidate attends to
    prefix_pos = (state.mask.cumsum(1) - 1).cpu()  # (B, S0): a live column's position (live columns run 0, 1, ...)
    logps: list[list[torch.Tensor]] = [[torch.zeros(0, device=dev) for _ in cs] for cs in conts]
    cols: dict[tuple[int, int], list[torch.Tensor]] = {}
    last: dict[tuple[int, int], torch.Tensor] = {}
    for b, cs in enumerate(conts):  # the first token of each candidate: the row's saved logits
        if any(cs):
            first = torch.log_softmax(state.logits[b].float(), dim=-1)  # (V,)
            for c, toks in enumerate(cs):
                logps[b][c] = first.gather(0, torch.tensor(toks[:1], dtype=torch.long, device=dev))
    for pieces in _pieces(conts, cap):
        S = state.mask.shape[1]
        rows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(B)]
        for p in pieces:
            rows[p[0]].append(p)
        T = max(sum(t1 - t0 for _, _, t0, t1 in r) for r in rows)
        input_ids = torch.full((B, T), member.pad_id, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        fed = torch.zeros(B, T, dtype=torch.bool)
        allowed = torch.zeros(B, T, S + T, dtype=torch.bool)
        allowed[:, :, :S0] = prefix[:, None, :].cpu()
        k_pos = torch.zeros(B, S + T, dtype=torch.long)  # (B, S + T): position of each key column it may see
        k_pos[:, :S0] = prefix_pos
        placed = []
        for b, r in enumerate(rows):
            at = 0
            for _, c, t0, t1 in r:
                n = t1 - t0
                here = slice(at, at + n)
                input_ids[b, here] = torch.tensor(conts[b][c][t0:t1], dtype=torch.long)
                positions[b, here] = int(state.next_pos[b]) + torch.arange(t0, t1)
                fed[b, here] = True
                allowed[b, here, S + at:S + at + n] = torch.ones(n, n, dtype=torch.bool).tril()
                earlier = cols.get((b, c), [])
                if earlier:  # this candidate's tokens fed by earlier forwards (a long one, in slices)
                    seen = torch.cat(earlier).cpu()
                    allowed[b, here][:, seen] = True
                    k_pos[b, seen] = int(state.next_pos[b]) + torch.arange(len(seen))
                placed.append((b, c, t0, t1, S + at))
                at += n
            idle = torch.arange(at, T)  # padding queries: the prefix and themselves (never an empty row)
            allowed[b, idle, S + idle] = True
        k_pos[:, S:] = positions  # padding queries and keys sit at position 0: their diagonal stays
        slide = None if window is None else allowed & (k_pos[:, None, :] > positions[:, :, None] - window)
        out = member.model(
            input_ids=input_ids.to(dev), position_ids=positions.to(dev),
            attention_mask=_attention_mask(member, allowed.to(dev), None if slide is None else slide.to(dev)),
            cache=state.cache, use_cache=True, logits_to_keep=fed.to(dev),
        )
        state.mask = torch.cat([state.mask, torch.zeros(B, T, dtype=state.mask.dtype, device=dev)], dim=1)
        logits = out.logits.float()  # (sum of fed tokens, V), row-major: rows in order, pieces in order
        at = 0
        for b, c, t0, t1, col in sorted(placed, key=lambda p: (p[0], p[4])):
            lg, at = logits[at:at + t1 - t0], at + t1 - t0  # (n, V): after tokens t0..t1-1
            toks = conts[b][c]
            want = torch.tensor(toks[t0 + 1:t1 + 1], dtype=torch.long, device=dev)  # the next tokens
            if len(want):
                lp = torch.log_softmax(lg[:len(want)], dim=-1).gather(1, want[:, None]).squeeze(1)
                logps[b][c] = torch.cat([logps[b][c], lp])
            cols.setdefault((b, c), []).append(torch.arange(col, col + t1 - t0, device=dev))
            if t1 == len(toks):
                last[(b, c)] = lg[-1].clone()
        del out, logits
    slots: list[list[Slots | None]] = [[None] * len(cs) for cs in conts]
    for (b, c), parts in cols.items():
        slots[b][c] = Slots(torch.cat(parts), tuple(conts[b][c]), int(state.next_pos[b]), state.layout, last[(b, c)])
    for b, cs in enumerate(conts):
        if any(cs):
            state.calls[b] += 1
            state.tokens_in[b] += sum(len(t) for t in cs)
    return logps, slots
