"""Pretext models: SimCLR and BYOL, each ``forward(view1, view2) -> loss``.

``forward`` only computes the loss; the BYOL target network changes only through the explicit
``update_target`` call made after each optimizer step.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from source.maths.losses import byol_loss, nt_xent_loss
from source.maths.models import Projector

PRETEXT_TYPES = ("simclr", "byol")


class SimCLR(nn.Module):
    """Backbone + projector trained with NT-Xent (Chen et al., 2020)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, mlp: str, temperature: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = Projector(feat_dim, mlp)
        self.temperature = temperature

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, gather_across_ranks: bool = True) -> torch.Tensor:
        """views: (N, 3, H, W) -> scalar loss (negatives from all ranks unless told otherwise)."""
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        return nt_xent_loss(z1, z2, self.temperature, gather_across_ranks=gather_across_ranks)


class BYOL(nn.Module):
    """Online backbone+projector+predictor regressing an EMA target (Grill et al., 2020).

    The target (``target_backbone``, ``target_projector``) starts as a copy of the online network,
    receives no gradients, and is updated by ``update_target(decay)``:
    xi <- decay * xi + (1 - decay) * theta. Its outputs are identical on every rank because the
    online weights it averages are (DDP keeps them in sync, and DDP broadcasts its buffers).
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, mlp: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = Projector(feat_dim, mlp)
        self.predictor = Projector(self.projector.out_dim, mlp)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for param in self.target_parameters():
            param.requires_grad_(False)

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def reset_target(self) -> None:
        """Make the target equal to the online network (weights and BN statistics)."""
        self.target_backbone.load_state_dict(self.backbone.state_dict())
        self.target_projector.load_state_dict(self.projector.state_dict())

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, gather_across_ranks: bool = True) -> torch.Tensor:
        """Symmetric loss: byol(q(z1), z'2) + byol(q(z2), z'1). views: (N, 3, H, W).

        ``gather_across_ranks`` is accepted for interface parity with SimCLR: the BYOL loss is
        per sample, so DDP's gradient averaging already gives the global-batch gradient.
        """
        p1 = self.predictor(self.projector(self.backbone(view1)))
        p2 = self.predictor(self.projector(self.backbone(view2)))
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(view1))
            t2 = self.target_projector(self.target_backbone(view2))
        return byol_loss(p1, t2) + byol_loss(p2, t1)

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """EMA step xi <- decay * xi + (1 - decay) * theta for every target parameter."""
        for target, online in zip(self.target_parameters(), self.online_parameters()):
            target.mul_(decay).add_(online.detach(), alpha=1 - decay)


def byol_decay(step: int, total_steps: int, base_decay: float, use_schedule: bool) -> float:
    """EMA decay at ``step``: constant ``base_decay``, or BYOL's cosine schedule

        tau(k) = 1 - (1 - base_decay) * (cos(pi * k / K) + 1) / 2,

    rising from ``base_decay`` at k = 0 to 1 at k = K = ``total_steps``. (The original code
    computed this schedule but never applied it; here it really changes the decay.)
    """
    if not use_schedule:
        return base_decay
    progress = min(step / max(total_steps, 1), 1.0)
    return 1 - (1 - base_decay) * (math.cos(math.pi * progress) + 1) / 2


def build_pretext_model(pretext_type: str, backbone: nn.Module, feat_dim: int, mlp: str, temperature: float) -> nn.Module:
    if pretext_type == "simclr":
        return SimCLR(backbone, feat_dim, mlp, temperature)
    if pretext_type == "byol":
        return BYOL(backbone, feat_dim, mlp)
    raise ValueError(f"unknown pretext type {pretext_type!r}; valid: {PRETEXT_TYPES}")


def pretext_head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules saved beside the backbone: ``proj`` (and ``pred`` for BYOL)."""
    heads = {"proj": model.projector}
    if isinstance(model, BYOL):
        heads["pred"] = model.predictor
    return heads
