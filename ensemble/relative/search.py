"""DeePEn's inverse transformation (docs/algorithms.md, DeePEn: inverse transformation): batched AdamW
with a cosine schedule over the main member's candidate logits ``z (B, k)``, minimising
``KL(q || softmax(z) R_m)`` with the analytic gradient.

The KL is reduced over the ``A`` anchors as :attr:`SearchParams.kl_reduction` says: ``"mean"`` (the
reference code's ``nn.KLDivLoss()``, whose default reduction divides by the number of elements, ``A``
for one row) or ``"sum"``. Adam's step ``m / (sqrt(v) + eps)`` is invariant to the gradient's scale
except through ``eps``: under the mean a candidate whose gradient is well below ``eps`` (a token of
small probability) barely moves, where under the sum every candidate moves by about a full
learning-rate step.

:func:`inverse_search_reference` is its slow oracle (autograd, ``torch.optim.AdamW`` and
``CosineAnnealingLR``, one row at a time), kept for the tests. Rows whose initial loss is exactly zero
(the aggregate equals the main member's own relative distribution) are at the optimum and are left as
they are. :func:`search_radius` bounds how far the search moves any logit, so :func:`decided_rows`
knows when the greedy choice cannot change and the search can be skipped.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ensemble.config import KL_REDUCTIONS
from ensemble.relative.mixing import TINY, Rows, masked_softmax, mix, pull


@dataclass(frozen=True)
class SearchParams:
    """Inverse-transformation settings (reference: AdamW with torch's defaults, cosine schedule T_max
    10, eta_min lr/4, the KL reduced by its mean over the anchors)."""

    lr: float = 0.15
    steps: int = 5
    weight_decay: float = 0.01
    t_max: int = 10
    eta_min_ratio: float = 0.25
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    kl_reduction: str = "mean"  # one of KL_REDUCTIONS: "mean" over the anchors (the reference) or "sum"

    def __post_init__(self) -> None:
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")

    def lr_at(self, t: int) -> float:
        eta_min = self.lr * self.eta_min_ratio
        return eta_min + (self.lr - eta_min) * (1 + math.cos(math.pi * t / self.t_max)) / 2

    @property
    def moves(self) -> bool:
        """Whether the search takes any step (lr and steps both non-zero)."""
        return self.lr != 0.0 and self.steps != 0

    def decay(self) -> float:
        """The weight decay's common factor on every logit of a searched row after all steps."""
        return math.prod(1 - self.lr_at(t) * self.weight_decay for t in range(self.steps))


def moving_rows(pred0: torch.Tensor, target: torch.Tensor, params: SearchParams) -> torch.Tensor:
    """Rows ``(B,)`` the search moves: it takes steps and the initial loss is not exactly zero (a row
    whose ``pred0 (B, A)`` equals its ``target`` is at the optimum and keeps its logits)."""
    if not params.moves:
        return torch.zeros(pred0.shape[0], dtype=torch.bool, device=pred0.device)
    return ~(pred0 == target).all(dim=-1)


def inverse_search(z0: torch.Tensor, valid: torch.Tensor, rows: Rows, target: torch.Tensor,
                   params: SearchParams, pred0: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise ``KL(target || softmax(z) R)`` over ``z (B, k)`` from ``z0`` with batched AdamW;
    AdamW is elementwise, so each row's result does not depend on the others. ``pred0 (B, A)``: the
    first step's ``softmax(z0) R`` when the caller has it already (the main member's own relative
    distribution), saving one pass over the rows."""
    z = z0.clone()  # (B, k)
    if not params.moves:
        return z
    b1, b2 = params.betas
    per_anchor = 1.0 / target.shape[-1] if params.kl_reduction == "mean" else 1.0  # the loss's reduction
    m = torch.zeros_like(z)  # (B, k)
    v = torch.zeros_like(z)  # (B, k)
    active = None
    for t in range(params.steps):
        s = masked_softmax(z, valid)  # (B, k)
        pred = pred0 if t == 0 and pred0 is not None else mix(s, rows)  # (B, A)
        if active is None:  # an exactly zero loss is the optimum: leave the row alone
            active = valid & moving_rows(pred, target, params)[:, None]  # (B, k)
        ratio = (pred - target) / pred.clamp_min(TINY)  # (B, A): dKL/dpred up to a constant
        g = pull(rows, ratio)  # (B, k)
        grad = s * (g - (s * g).sum(dim=-1, keepdim=True))  # (B, k): through the softmax
        if per_anchor != 1.0:
            grad.mul_(per_anchor)
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
    ``|z_T - z_0 * decay| <= sum_t lr_t C_t`` (0.68 for the reference settings). The bound holds for
    gradients of any scale (Adam's ``eps`` only shortens steps), so for either ``kl_reduction``."""
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
    if not params.moves:
        return torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    return top_lead(z0.masked_fill(~valid, float("-inf"))) * params.decay() > 2 * search_radius(params) + 1e-3


def top_lead(z: torch.Tensor) -> torch.Tensor:
    """How far each row's best entry of ``z (B, k)`` leads its second ``(B,)``; inf with one finite entry."""
    if z.shape[1] < 2:
        return torch.full((z.shape[0],), float("inf"), device=z.device)
    top = z.topk(2, dim=-1).values  # (B, 2)
    return top[:, 0] - top[:, 1]


def inverse_search_reference(z0: torch.Tensor, rows: torch.Tensor, target: torch.Tensor,
                             params: SearchParams) -> torch.Tensor:
    """The same search for one row ``z0 (k,)`` with autograd, ``torch.optim.AdamW`` and
    ``CosineAnnealingLR`` (the reference code's structure; ``nn.KLDivLoss`` with the reduction of
    ``params.kl_reduction``, the reference's default "mean" dividing by the ``A`` anchors): the test
    oracle."""
    z = z0.detach().clone().requires_grad_(True)  # (k,)
    opt = torch.optim.AdamW([z], lr=params.lr, betas=params.betas, eps=params.eps,
                            weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.t_max,
                                                       eta_min=params.lr * params.eta_min_ratio)
    with torch.enable_grad():
        for _ in range(params.steps):
            pred = torch.softmax(z, dim=-1) @ rows  # (A,)
            with warnings.catch_warnings():  # "'mean' divides the total loss by ... the support size"
                warnings.simplefilter("ignore", UserWarning)
                loss = torch.nn.functional.kl_div(pred.clamp_min(TINY).log(), target,
                                                  reduction=params.kl_reduction)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return z.detach()
