"""How strongly BiSSL's two backbones are coupled (logged by ``bissl.py``; docs/evidence.md).

The lower problem is  min_θP  L_P(θ_P, ψ) + (λ/2)‖θ_P − θ_D‖²  (BiSSL, arXiv 2410.02387); the
downstream task reaches θ_P only through the proximity term. Two numbers say how much it can:

- the relative distance ‖θ_P − θ_D‖ / ‖θ_P‖ (how far apart the backbones are), and
- the proximity-gradient ratio ‖λ(θ_P − θ_D)‖ / ‖∇_θP L_P‖ at a lower step (how strongly the
  upper level pulls against the pretext task; ≪ 1: θ_P hardly feels θ_D).

Both run over the backbone parameters only (not the pretext head ψ), under no_grad, and change
nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def relative_distance(lower: Sequence[torch.Tensor], upper: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖θ_P − θ_D‖ / ‖θ_P‖ over matching parameter lists (0-dim float64 tensor)."""
    difference = sum(((p.double() - u.double()) ** 2).sum() for p, u in zip(lower, upper, strict=True))
    return torch.sqrt(difference) / torch.sqrt(sum((p.double() ** 2).sum() for p in lower))


@torch.no_grad()
def proximity_gradient_ratio(lower: Sequence[torch.Tensor], upper: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """‖λ(θ_P − θ_D)‖ / ‖∇_θP L_P‖ from the total gradient already in ``lower``'s ``.grad``.

    After the backward pass of L_P + (λ/2)‖θ_P − θ_D‖², each ``p.grad`` holds
    g = ∇L_P + λ(θ_P − θ_D) (averaged over ranks, before clipping; the proximity part is the same
    on every rank). Its proximity part is known in closed form, so the pretext part is
    g − λ(θ_P − θ_D): no second backward pass, and the gradients are only read. A parameter
    without a gradient counts as ∇L_P = 0 there. 0-dim float64 tensor; inf when ∇L_P = 0.
    """
    proximity_sq = torch.zeros((), dtype=torch.float64, device=lower[0].device)
    pretext_sq = torch.zeros_like(proximity_sq)
    for p, u in zip(lower, upper, strict=True):
        proximity = lam * (p.double() - u.double())
        total = p.grad.double() if p.grad is not None else proximity
        proximity_sq += (proximity ** 2).sum()
        pretext_sq += ((total - proximity) ** 2).sum()
    return torch.sqrt(proximity_sq) / torch.sqrt(pretext_sq)
