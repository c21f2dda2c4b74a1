"""Slow, obviously-correct reference paths kept as test oracles for the fast paths.

No KV cache, no batching: every step re-encodes the whole sequence of one row.
"""
from __future__ import annotations

import torch

from ensemble.members import Member


@torch.inference_mode()
def next_logits_uncached(member: Member, ids: list[int]) -> torch.Tensor:
    """Next-token logits ``(V,)`` after ``ids``, from a clean forward over the whole sequence."""
    x = torch.tensor([ids], device=member.device)
    return member.model(input_ids=x, use_cache=False).logits[0, -1].float()


def greedy_uncached(member: Member, prompt: str, max_new_tokens: int, system: str | None = None) -> list[int]:
    """Greedy decoding of one prompt, re-encoding everything each step; stops on EOS (excluded)."""
    ids = member.encode_prompt(prompt, system)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(next_logits_uncached(member, ids + out)))
        if tok in member.eos_ids:
            break
        out.append(tok)
    return out


@torch.inference_mode()
def logprobs_uncached(member: Member, prefix: list[int], cont: list[int]) -> torch.Tensor:
    """Per-token log-probs ``(len(cont),)`` of ``cont`` after ``prefix`` from one clean forward."""
    x = torch.tensor([prefix + cont], device=member.device)
    logits = member.model(input_ids=x, use_cache=False).logits[0].float()  # (n, V)
    logp = torch.log_softmax(logits[len(prefix) - 1 : -1], dim=-1)  # (len(cont), V)
    return logp.gather(1, torch.tensor(cont, device=member.device)[:, None]).squeeze(1)
