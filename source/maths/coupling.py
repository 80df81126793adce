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

    It runs at every lower step, so it works in the parameters' dtype with one temporary per
    tensor (no float64 copy of the model): g was summed in that dtype by autograd, so a wider
    subtraction would not recover the digits the sum lost. Only the per-tensor norms are combined
    in float64.
    """
    proximity_norms, pretext_norms = [], []
    for p, u in zip(lower, upper, strict=True):
        proximity = (p - u).mul_(lam)
        proximity_norms.append(torch.linalg.vector_norm(proximity))
        pretext_norms.append(torch.linalg.vector_norm(p.grad - proximity) if p.grad is not None else proximity.new_zeros(()))
    return (torch.linalg.vector_norm(torch.stack(proximity_norms).double())
            / torch.linalg.vector_norm(torch.stack(pretext_norms).double()))
