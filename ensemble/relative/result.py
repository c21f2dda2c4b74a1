"""The result of one DeePEn step (docs/algorithms.md, DeePEn): the searched logits over the main
member's candidates, the members' relative distributions and their aggregate, with the views the
fuser reads (greedy token, log-probabilities, a forced token's log-probability over the whole main
vocabulary, per-member KL) and the splice that merges a refined sub-batch back in."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ensemble.relative.mixing import kl_rows


@dataclass
class FuseResult:
    """One fusion step for B rows. The fused distribution is ``softmax(z)`` over the main member's
    candidates ``cand`` plus, in the sparse path, a last "tail" column standing for every other token
    (it takes probability mass but is never chosen).

    ``rest`` (sparse path with forced tokens; None in the dense path, which has no other tokens, and in
    a step without forced tokens, i.e. generation, which never reads it): per row, the log of the
    fused mass the main member's non-candidate tokens carry *as the exact dense search leaves them*:
    ``logsumexp`` over those tokens of the main member's own logits, times the search's weight-decay
    factor when the row was searched. Under the reference's mean reduction their gradients are far
    below Adam's ``eps``, so the dense search moves them by that factor and little else; the tail
    column is the search's one stand-in for them and moves as a block, so :meth:`forced_logprobs`
    normalises with ``rest`` instead (docs/algorithms.md, DeePEn: labeling)."""

    cand: torch.Tensor  # (B, k) candidate token ids of the main member
    valid: torch.Tensor  # (B, k + tail) bool
    z: torch.Tensor  # (B, k + tail) searched logits
    q_members: list[torch.Tensor]  # per member (B, A): relative distributions
    q: torch.Tensor  # (B, A): their aggregate
    rest: torch.Tensor | None = None  # (B,) log-mass of the non-candidate tokens (sparse path, forced tokens given), see above

    def token_logits(self) -> torch.Tensor:
        """Searched logits of the candidate tokens ``(B, k)``, ``-inf`` where masked."""
        k = self.cand.shape[1]
        return self.z[:, :k].masked_fill(~self.valid[:, :k], float("-inf"))

    def logprobs(self) -> torch.Tensor:
        """Fused log-probabilities of the candidates ``(B, k)`` (normalised with the tail's mass)."""
        full = torch.log_softmax(self.z.masked_fill(~self.valid, float("-inf")), dim=-1)  # (B, k + tail)
        return full[:, : self.cand.shape[1]]

    def forced_logprobs(self, extra: torch.Tensor) -> torch.Tensor:
        """Log-probability ``(B,)`` of the forced token ``extra[b]`` (a main-vocabulary id, which the
        step took among the candidates) under the fused distribution normalised over the FULL main
        vocabulary: the candidates carry their searched logits, every other token what :attr:`rest`
        says. With the members all equal (the search does not move) it is the main member's own
        ``log_softmax(logits)[extra]``. ValueError when some row's forced token is not a valid
        candidate (never a silent column)."""
        k = self.cand.shape[1]
        extra = extra.to(self.cand.device)
        hit = (self.cand == extra[:, None]) & self.valid[:, :k]  # (B, k)
        missing = (~hit.any(dim=-1)).nonzero()[:, 0].tolist()
        if missing:
            raise ValueError(f"forced tokens {[int(extra[b]) for b in missing]} of rows {missing} are not among "
                             "the fused candidates; pass them as fuse(..., extra=...)")
        z = self.token_logits()  # (B, k)
        if self.rest is not None:
            z = torch.cat([z, self.rest[:, None].to(z)], dim=1)  # (B, k + 1)
        at = hit.to(torch.int8).argmax(dim=-1, keepdim=True)  # (B, 1): the forced token's column
        return z.gather(1, at)[:, 0] - torch.logsumexp(z, dim=-1)

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
        return FuseResult(cand=cand, valid=valid, z=z, q_members=self.q_members, q=self.q, rest=self.rest)

    def splice(self, rows: torch.Tensor, sub: "FuseResult") -> "FuseResult":
        """This result with ``rows (r,)`` taken from ``sub`` (a result for those rows only)."""
        k = max(self.cand.shape[1], sub.cand.shape[1])
        a, b = self._widened(k), sub._widened(k)
        if (a.rest is None) != (b.rest is None):
            raise ValueError("cannot splice a dense result with a sparse one (only one carries rest)")
        pairs = [(a.cand, b.cand), (a.valid, b.valid), (a.z, b.z), (a.q, b.q)] + list(zip(a.q_members, b.q_members))
        if a.rest is not None:
            pairs.append((a.rest, b.rest))
        out = []
        for x, y in pairs:
            x = x.clone()
            x[rows] = y
            out.append(x)
        rest = out.pop() if a.rest is not None else None
        return FuseResult(cand=out[0], valid=out[1], z=out[2], q=out[3], q_members=out[4:], rest=rest)

    def member_kl(self) -> list[torch.Tensor]:
        """Per member ``KL(q_i || q)`` per row ``(B,)``."""
        return [kl_rows(qi, self.q) for qi in self.q_members]
