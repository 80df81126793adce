"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("lars", "sgd")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017), as used by SimCLR/BYOL/BiSSL.

    For each parameter p with gradient g (torch has no LARS, hence this class):
        u = g + wd * p
        u = u * eta * ||p|| / ||u||      (trust ratio; skipped if either norm is 0)
        m = momentum * m + u
        p = p - lr * m
    Parameter groups with ``lars_exclude=True`` (biases/BN when asked) skip both the weight
    decay and the trust ratio.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, momentum: float,
    eta: float = 0.001, exclude_bias_bn: bool = False,
) -> torch.optim.Optimizer:
    """LARS or SGD. ``exclude_bias_bn`` puts 1-D parameters (biases, BN) in a group without weight
    decay (and, for LARS, without adaptation)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {OPTIMIZERS}")
    params = [p for p in params if p.requires_grad]
    if exclude_bias_bn:
        groups = [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True},
        ]
    else:
        groups = [{"params": params}]
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta)
    for group in groups:
        group.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=momentum)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup: (step + 1) / warmup_steps for step < warmup_steps, so the very first step already
    uses the warmed-up LR (the original ran step 0 at the full LR). Then cosine from 1 down to
    ``final_factor``, reached exactly at the last step (step = total_steps - 1).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min((step - warmup_steps) / decay_steps, 1.0)
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_factor: float
) -> LambdaLR:
    """``LambdaLR`` stepping once per optimizer step with :func:`warmup_cosine_factor`."""
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, final_factor))
