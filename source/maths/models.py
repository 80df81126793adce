"""Backbones and heads.

Backbones are torchvision ResNets with ``fc`` removed, so their ``state_dict`` keys are those of
torchvision/timm ResNets without ``fc.*`` -- the format of the paper's published weights.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from source.run.errors import ConfigError  # a malformed --arch/--mlp reaches the user as one error line

ARCHS = ("resnet18", "resnet50")


def build_backbone(arch: str, cifar_stem: bool = False, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """A ResNet feature extractor: images (N, 3, H, W) -> features (N, feat_dim).

    ``cifar_stem`` swaps the 7x7/stride-2 conv and the max-pool for a 3x3/stride-1 conv, which
    keeps spatial resolution on small (<= 64 px) images. The keys stay the same; conv1's shape
    changes, so weights trained with one stem do not load into the other.

    ``zero_init_residual`` starts the last BatchNorm of every residual block with γ = 0 (each
    block begins as the identity), as timm's ResNets do by default (``zero_init_last``) and
    hence the original BiSSL pre-training; torchvision's default is γ = 1. Only training from
    scratch sees it: loaded weights overwrite it.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; valid: {ARCHS}")
    model = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model, feat_dim


def parse_mlp(mlp: str) -> list[int]:
    """``"256-256-256"`` -> ``[256, 256, 256]`` with a clear error for malformed specs."""
    try:
        widths = [int(part) for part in mlp.split("-")]
    except ValueError:
        raise ConfigError(f"--mlp {mlp!r} must be dash-separated integers such as '256-256-256'") from None
    if not widths or min(widths) <= 0:
        raise ConfigError(f"--mlp {mlp!r} must contain positive widths")
    return widths


class Projector(nn.Sequential):
    """MLP head ``in_dim -> w1 -> ... -> wk`` (SimCLR/BYOL projector, BYOL predictor).

    Hidden layers are Linear + BatchNorm1d + ReLU; the last Linear has no bias (as the paper).
    Output: (N, wk).
    """

    def __init__(self, in_dim: int, mlp: str) -> None:
        widths = [in_dim, *parse_mlp(mlp)]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 2):
            layers += [nn.Linear(widths[i], widths[i + 1]), nn.BatchNorm1d(widths[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
        super().__init__(*layers)
        self.out_dim = widths[-1]


class Classifier(nn.Module):
    """Backbone + linear head: images (N, 3, H, W) -> logits (N, num_classes)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))
