"""Gated DeePEn generation (docs/algorithms.md): which steps are fused, and how the members that
were not run catch up.

The gate reads the main member's own next-token distribution at temperature 1 (whatever the
sampling temperature): its top-1 probability (``gate_on='top1'``) or its top-1 minus top-2
probability (``'margin'``). A row whose score is ``>= fuse_below`` is *confident*: the main member's
token is emitted and no other member runs. The rule is strict at the top: ``fuse_below=1`` fuses
every step, even a degenerate top-1 probability of exactly 1, so it is DeePEn as published;
``fuse_below=0`` fuses none, so it is the main member alone.

Lazy catch-up: a member that was not run keeps its KV state at its last forward; its backlog is the
response text since then, held by the row's :class:`~ensemble.text.TokenTrack` (the main member's
new ids for a member with the same vocabulary). When the member is next needed, at a step where some
row is fused, the whole backlog is fed in one forward (``TokenTrack.sync`` re-tokenises the tail and
rolls back what changed): one batched :meth:`~ensemble.members.Member.feed` of per-row lists for
every live row, the confident ones included. A batched forward computes every row of its chunk,
padding or not, so a confident row caught up there costs nothing extra, and it keeps every row's
backlog (the chunk's width, and the KV slots it adds) to the steps since the last fused step of any
row, as short as it can be; with one row, a fused step after k confident ones is one forward of
k + 1 tokens' worth (its re-tokenised tail).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ensemble.utf8 import valid_utf8


def confident_rows(logits: torch.Tensor, fuse_below: float, gate_on: str) -> list[bool]:
    """Per row of the main member's next-token logits ``(B, V)``: True where the main member's own
    token is emitted without fusing (see the module docstring)."""
    if fuse_below >= 1.0:  # strict: 1 always fuses
        return [False] * logits.shape[0]
    if fuse_below <= 0.0:  # every score is >= 0: never fuse, and no softmax to pay for
        return [True] * logits.shape[0]
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # (B, 2)
    if gate_on == "top1" or top.shape[-1] < 2:
        score = top[:, 0]
    elif gate_on == "margin":
        score = top[:, 0] - top[:, 1]
    else:
        raise ValueError(f"gate_on must be 'top1' or 'margin', got {gate_on!r}")
    return (score >= fuse_below).tolist()


def catch_up(members: Sequence, main: int, same_ids: Sequence[bool], tracks: list[list], out: list[list[int]],
             resp: list[bytes], states: list, live: list[int]) -> None:
    """Feed every member but ``main``, at every state row (``live[j]``: the original row of state row
    j), all of the response since its last forward: for a member of the main member's vocabulary
    (``same_ids``) the ids of ``out[r]`` its track does not hold yet, otherwise its track synced to
    ``resp[r]``. One batched forward per member, none when no row has anything pending; a row with
    nothing pending counts no call."""
    for i, (m, s) in enumerate(zip(members, states)):
        if i == main:
            continue
        feeds: list[list[int]] = []
        rbs: list[int] = []
        for r in live:
            tr = tracks[i][r]
            if same_ids[i]:
                rb, new = 0, out[r][len(tr.ids):]
                tr.push_tokens(new)
            else:
                rb, new = tr.sync(valid_utf8(resp[r]))
            feeds.append(new)
            rbs.append(rb)
        m.feed(s, feeds, rollback=rbs)
