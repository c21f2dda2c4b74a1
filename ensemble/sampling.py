"""Next-token selection shared by every fuser: greedy, or temperature / top-k / top-p sampling
with one ``torch.Generator`` per row, so a row's draws never depend on the rest of its batch."""
from __future__ import annotations

import torch

from ensemble.config import DecodeParams


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator for one row, seeded from that row's seed only."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def filtered_logprobs(logits: torch.Tensor, params: DecodeParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to one row of logits ``(V,)``; return log-probs ``(V,)``
    with filtered-out entries at ``-inf``. Only meaningful for ``temperature > 0``."""
    z = logits.float() / params.temperature  # (V,)
    if params.top_k is not None and params.top_k < z.numel():
        kth = torch.topk(z, params.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True)  # (V,), (V,)
        probs = torch.softmax(sorted_z, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        z = z.scatter(0, order[drop], float("-inf"))
    return torch.log_softmax(z, dim=-1)


def choose(logits: torch.Tensor, params: DecodeParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits ``(V,)``."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = filtered_logprobs(logits, params).exp()
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_batch(
    logits: torch.Tensor, params: list[DecodeParams], generators: list[torch.Generator | None]
) -> list[int]:
    """``logits (B, V)`` -> one token id per row (greedy rows in one argmax)."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # (B,)
    return [
        g if p.temperature == 0.0 else choose(logits[b], p, generators[b])
        for b, (g, p) in enumerate(zip(greedy, params))
    ]
