"""Faster R-CNN with a ResNet C4 backbone, assembled from torchvision parts around our ResNet backbones.

Faster R-CNN (Ren et al., NeurIPS 2015) on the "C4" design of He et al. (ResNet, CVPR 2016,
Sec. "Object detection" / appendix): the trunk is the ResNet up to ``layer3`` (stride 16; 256
channels for ResNet-18, 1024 for ResNet-50), whose single feature map feeds torchvision's
``RegionProposalNetwork`` and a ``MultiScaleRoIAlign`` over that one map; the box head is

* ``head="res5"`` (default, the standard C4 head used by the MoCo / solo-learn detection
  protocol through detectron2's R50-C4): the backbone's pre-trained ``layer4`` applied to each
  RoI feature, then global average pooling (512 / 2048 features) and torchvision's
  ``FastRCNNPredictor``; the whole backbone is shared with the detector;
* ``head="original"`` (the original BiSSL code, arXiv 2410.02387 v3/v4): ``layer4`` discarded,
  torchvision's ``TwoMLPHead`` (two 1024-wide FC layers) on the flattened RoI feature, then the
  predictor; only conv1 ... ``layer3`` are shared.

Defaults are the paper's (read from the authors' code): images resized by torchvision's
``GeneralizedRCNNTransform`` to a short side of 196 and a long side of at most 320 (the backbones
were pre-trained on 96 px images), one anchor per size 16, 32, 64, 128, 256 and aspect ratio 0.5,
1, 2 at each position, 7x7 RoIAlign (sampling ratio 2) and torchvision's RPN/RoI settings.
detectron2's C4 pools RoIs to 14x14, so that ``layer4``'s stride 2 gives 7x7; ``roi_output_size=14``
gives that. Normalisation is torchvision's ImageNet mean / std, the project's pre-training one.

BatchNorm: plain BN in one process; ``sync_batch_norm=True`` converts every BN layer to
``SyncBatchNorm`` (the paper's setting under DDP); ``frozen_batch_norm=True`` replaces them with
torchvision's ``FrozenBatchNorm2d`` (running statistics and affine parameters fixed, as
detectron2's default ``FrozenBN``). The detector is built *around* the given backbone, not a copy
of it: its trunk and res5 head are the backbone's own modules, so the backbone's parameters are
the detector's, and both conversions replace BN layers inside the backbone object too.

For BiSSL (the upper level uses the lower model's backbone): :func:`backbone_tensor_names` maps
the detector's backbone tensors to ResNet names, :func:`shared_backbone_parameters` lists the
parameters of a backbone the detector uses (the implicit gradient's unknowns),
:func:`head_parameters` the detector's own (RPN, box head, predictor), and
:func:`forward_with_backbone` runs the detector with another backbone's weights in place of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

__all__ = [
    "DETECTION_HEADS", "DEFAULT_MIN_SIZE", "DEFAULT_MAX_SIZE", "DEFAULT_ANCHOR_SIZES", "DEFAULT_ASPECT_RATIOS",
    "DEFAULT_ROI_OUTPUT_SIZE", "ResNetC4Trunk", "Res5BoxHead", "build_faster_rcnn_c4", "backbone_tensor_names",
    "shared_backbone_parameters", "head_parameters", "forward_with_backbone", "freeze_batch_norm",
]

DETECTION_HEADS = ("res5", "original")
# The paper's image sizes: short side 196, long side at most 320 (backbones pre-trained at 96 px).
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 196, 320
# The paper's anchors: sizes 16-256 on the single stride-16 map, aspect ratios 0.5 / 1 / 2.
DEFAULT_ANCHOR_SIZES = ((16, 32, 64, 128, 256),)
DEFAULT_ASPECT_RATIOS = ((0.5, 1.0, 2.0),)
# RoIAlign output (7x7, the paper's; detectron2's C4 uses 14) and its samples per bin (torchvision's default).
DEFAULT_ROI_OUTPUT_SIZE = 7
ROI_SAMPLING_RATIO = 2
# Width of the original head's two FC layers (torchvision's TwoMLPHead default in FasterRCNN).
ORIGINAL_HEAD_WIDTH = 1024
# The ResNet's stem and stages in forward order; layer4 is the res5 head, not the trunk.
_TRUNK_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
_TRUNK_PREFIX = "backbone."
_RES5_PREFIX = "roi_heads.box_head.layer4."


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last BN: bn3 for Bottleneck, bn2 for BasicBlock)."""
    last = stage[-1]
    norm = last.bn3 if hasattr(last, "bn3") else last.bn2
    return norm.weight.shape[0]  # BatchNorm2d, SyncBatchNorm and FrozenBatchNorm2d alike


class ResNetC4Trunk(nn.Module):
    """conv1 ... ``layer3`` of a torchvision ResNet (its own modules, shared, not copied).

    images (N, 3, H, W) -> features (N, C4, H/16, W/16) (H/4 with the CIFAR stem, which drops
    the stride-2 conv and the max-pool). ``out_channels`` = C4, as torchvision's detectors need.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        missing = [name for name in (*_TRUNK_MODULES, "layer4") if not hasattr(resnet, name)]
        if missing:
            raise ValueError(f"the backbone must be a torchvision-style ResNet (build_backbone); it lacks {missing}")
        for name in _TRUNK_MODULES:
            setattr(self, name, getattr(resnet, name))
        self.out_channels = _stage_channels(resnet.layer3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for name in _TRUNK_MODULES:
            x = getattr(self, name)(x)
        return x


class Res5BoxHead(nn.Module):
    """The C4 box head: the ResNet's ``layer4`` on each RoI, then global average pooling.

    RoI features (R, C4, S, S) -> (R, C5, ceil(S/2), ceil(S/2)) -> (R, C5).
    """

    def __init__(self, layer4: nn.Sequential) -> None:
        super().__init__()
        self.layer4 = layer4
        self.out_channels = _stage_channels(layer4)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(roi_features), 1), 1)


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` (in place) with a ``FrozenBatchNorm2d``
    holding its affine parameters and running statistics; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight if child.affine else torch.ones_like(frozen.weight))
                frozen.bias.copy_(child.bias if child.affine else torch.zeros_like(frozen.bias))
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen.to(child.running_mean.device))
        else:
            freeze_batch_norm(child)
    return module


def build_faster_rcnn_c4(
    backbone: nn.Module,
    num_classes: int,
    *,
    head: str = "res5",
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    anchor_sizes: Sequence[Sequence[int]] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
    roi_output_size: int = DEFAULT_ROI_OUTPUT_SIZE,
    sync_batch_norm: bool = False,
    frozen_batch_norm: bool = False,
    **faster_rcnn_kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN R-C4 around ``backbone`` (a ResNet from :func:`source.maths.models.build_backbone`).

    Args:
        backbone: the ResNet (its ``fc`` and ``avgpool`` are not used); its modules become the
            detector's (shared, not copied).
        num_classes: C, the number of object classes; the predictor scores C + 1 (0 = background)
            and labels come out in 1..C.
        head: ``"res5"`` (standard C4: ``layer4`` + average pooling) or ``"original"`` (``layer4``
            unused, ``TwoMLPHead``).
        min_size, max_size: the resize of ``GeneralizedRCNNTransform`` (short side, long-side cap).
        anchor_sizes, aspect_ratios: ``AnchorGenerator``'s, one tuple for the single feature map.
        roi_output_size: RoIAlign output side S.
        sync_batch_norm: convert BN to ``SyncBatchNorm`` (pass True under DDP with several processes).
        frozen_batch_norm: replace BN with ``FrozenBatchNorm2d`` (excludes ``sync_batch_norm``).
        **faster_rcnn_kwargs: passed on to torchvision's ``FasterRCNN`` (e.g. ``box_score_thresh``).

    Returns:
        torchvision's ``FasterRCNN``: in train mode ``model(images, targets)`` returns the four
        losses ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``;
        in eval mode ``model(images)`` returns per image ``boxes`` (K, 4) xyxy in the input
        image's pixels, ``scores`` (K,), ``labels`` (K,).
    """
    if head not in DETECTION_HEADS:
        raise ValueError(f"unknown detection head {head!r}; valid: {', '.join(DETECTION_HEADS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes (object classes, background excluded) must be >= 1, got {num_classes}")
    if sync_batch_norm and frozen_batch_norm:
        raise ValueError("sync_batch_norm and frozen_batch_norm exclude each other: frozen BN has no statistics to synchronise")
    if len(anchor_sizes) != 1 or len(aspect_ratios) != 1:
        raise ValueError(f"the C4 detector has one feature map: give one tuple of anchor sizes and one of aspect ratios, "
                         f"got {anchor_sizes} and {aspect_ratios}")
    # Convert the backbone's BN layers first (in place), so that trunk, res5 head and backbone keep
    # sharing the same modules (the heads below have no BN).
    if frozen_batch_norm:
        freeze_batch_norm(backbone)
    if sync_batch_norm:
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    trunk = ResNetC4Trunk(backbone)
    if head == "res5":
        box_head: nn.Module = Res5BoxHead(backbone.layer4)
        representation = box_head.out_channels
    else:
        box_head = TwoMLPHead(trunk.out_channels * roi_output_size**2, ORIGINAL_HEAD_WIDTH)
        representation = ORIGINAL_HEAD_WIDTH
    model = FasterRCNN(
        trunk,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(sizes=tuple(map(tuple, anchor_sizes)), aspect_ratios=tuple(map(tuple, aspect_ratios))),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=roi_output_size, sampling_ratio=ROI_SAMPLING_RATIO),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        **faster_rcnn_kwargs,
    )
    return model


def backbone_tensor_names(detector: nn.Module) -> dict[str, str]:
    """Detector parameter/buffer name -> the ResNet's name of the same tensor, for every backbone
    tensor the detector uses (``backbone.layer1.0.conv1.weight`` -> ``layer1.0.conv1.weight``,
    ``roi_heads.box_head.layer4.0.conv1.weight`` -> ``layer4.0.conv1.weight``), in the detector's order."""
    names = [name for name, _ in detector.named_parameters()] + [name for name, _ in detector.named_buffers()]
    mapping = {}
    for name in names:
        if name.startswith(_TRUNK_PREFIX):
            mapping[name] = name[len(_TRUNK_PREFIX):]
        elif name.startswith(_RES5_PREFIX):
            mapping[name] = "layer4." + name[len(_RES5_PREFIX):]
    return mapping


def shared_backbone_parameters(detector: nn.Module, backbone: nn.Module | None = None) -> list[nn.Parameter]:
    """The parameters of ``backbone`` that the detector uses as trainable weights, in the backbone's order.

    With ``backbone=None`` the detector's own (those of the backbone it was built around, the same
    objects). With another ResNet of the same architecture (e.g. BiSSL's lower backbone), its
    tensors in the same roles: the unknowns of the implicit gradient. res5 head: every backbone
    parameter; original head: conv1 ... ``layer3``. Frozen BN's affine terms are buffers, not
    parameters, so they are not listed.
    """
    detector_parameters = dict(detector.named_parameters())
    mapping = {d: r for d, r in backbone_tensor_names(detector).items() if d in detector_parameters}
    if backbone is None:
        return [detector_parameters[d] for d in mapping]  # trunk then layer4: the ResNet's order
    used = set(mapping.values())
    named = dict(backbone.named_parameters())
    missing = sorted(used - set(named))
    if missing:
        raise ValueError(f"the backbone lacks parameters the detector uses (another architecture?): {missing[:5]}")
    return [param for name, param in backbone.named_parameters() if name in used]


def head_parameters(detector: nn.Module) -> list[nn.Parameter]:
    """The detector's parameters that are not backbone weights: RPN, box head (``TwoMLPHead`` of the
    original head; none of the res5 head) and box predictor."""
    shared = backbone_tensor_names(detector)
    return [param for name, param in detector.named_parameters() if name not in shared]


def forward_with_backbone(
    detector: nn.Module, backbone: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
    update_batch_norm_statistics: bool = False,
) -> Any:
    """``detector(images, targets)`` computed with ``backbone``'s tensors in place of the detector's
    own backbone tensors (``torch.func.functional_call``); the detector's own weights, modes and
    heads are used as they are.

    Gradients flow to ``backbone``'s parameters (:func:`shared_backbone_parameters`), not to the
    detector's backbone. What the detector holds as buffers (BN running statistics; frozen BN's
    affine terms) is taken from ``backbone`` detached, and unless ``update_batch_norm_statistics``
    as copies, so a train-mode pass normalises with the batch's statistics and leaves the
    backbone's buffers unchanged. Pass the unwrapped detector, not a DDP wrapper.
    """
    backbone_tensors = dict(backbone.named_parameters()) | dict(backbone.named_buffers())
    detector_tensors = dict(detector.named_parameters()) | dict(detector.named_buffers())
    detector_parameters = {name for name, _ in detector.named_parameters()}
    replacement = {}
    for detector_name, resnet_name in backbone_tensor_names(detector).items():
        if resnet_name not in backbone_tensors:
            raise ValueError(f"the backbone has no tensor {resnet_name!r} (used by the detector as {detector_name!r}); another architecture?")
        tensor = backbone_tensors[resnet_name]
        if tensor.shape != detector_tensors[detector_name].shape:
            raise ValueError(f"the backbone's {resnet_name} has shape {tuple(tensor.shape)}, the detector's "
                             f"{tuple(detector_tensors[detector_name].shape)}; another architecture?")
        if detector_name in detector_parameters:
            replacement[detector_name] = tensor
        elif update_batch_norm_statistics:  # a buffer of the detector (BN statistics, frozen BN's affine terms)
            replacement[detector_name] = tensor.detach()
        else:
            replacement[detector_name] = tensor.detach().clone()
    return functional_call(detector, replacement, (images, targets))
