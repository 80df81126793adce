"""BiSSL with an object-detection upper level: Faster R-CNN R-C4 on a VOC-layout dataset.

The upper level of BiSSL (arXiv 2410.02387 v3/v4, detection protocol of the authors' NeurIPS-version
code) becomes torchvision's Faster R-CNN built around the upper backbone θ_D
(:func:`source.maths.detection_model.build_faster_rcnn_c4`); φ is the detector's own parameters
(RPN, box head, box predictor). The upper loss of a batch is the sum of torchvision's four losses
(RPN objectness + RPN box regression + classifier + box regression). Every upper pass runs the
detector with the weights of a given backbone in place of its own
(:func:`source.maths.detection_model.forward_with_backbone`): θ_D for the plain gradient, θ_P for
the right-hand side v = ∇_θP L_D(θ_P, φ) of the implicit gradient.

What the levels share, and so what the proximity term, the HVPs and the implicit gradient cover,
is the part of the backbone the detector uses (:func:`shared_backbone_parameters`): the whole
ResNet with the res5 head (default), conv1 ... ``layer3`` with the original head, where the
pretext model's ``layer4`` belongs to its head as in the original code (trained by the pretext
loss, without proximity term; the upper backbone's ``layer4`` is unused).

The detector samples anchors and proposals with torch's global generator; every pass does so
from a seed of (``--seed``, phase, step, rank) with the loaders' prefetch threads held off
(:func:`source.data.loader.seeded_global_draws`), so a run repeats and resumes exactly.
BatchNorm is per rank as in the classification upper level (SyncBatchNorm has no double
backward); its running statistics are averaged over the ranks after each alternation.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from source.data import DatasetNotFoundError, subsample
from source.data.detection import DetectionSplits, build_detection_splits, detection_collate
from source.data.loader import sample_seed, seeded_global_draws
from source.data.stream import BatchStream
from source.maths.detection_model import (
    build_faster_rcnn_c4,
    forward_with_backbone,
    head_parameters,
    shared_backbone_parameters,
)
from source.run.distributed import DistEnv
from source.run.errors import MissingInputError
from source.stages.detection_evaluation import detection_eval_loader, evaluate_detector
from source.stages.detection_finetune import LOSS_NAMES, parse_anchor_sizes

logger = logging.getLogger("bissl")

__all__ = ["DetectionUpperTask", "detector_options", "build_detection_task", "load_detection_splits",
           "detection_upper_stream", "detection_val_loader"]


def detector_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--det-*`` flags as keyword arguments of :func:`build_faster_rcnn_c4`."""
    return dict(head=args.det_head, min_size=args.det_min_size, max_size=args.det_max_size,
                anchor_sizes=(parse_anchor_sizes(args.det_anchor_sizes),), frozen_batch_norm=bool(args.det_frozen_bn),
                box_batch_size_per_image=args.det_rois_per_image, rpn_post_nms_top_n_test=args.det_test_proposals)


class DetectionUpperTask:
    """The detection upper level: the loss, φ, the shared backbone part, the warmup loss and the val scores.

    ``detector`` is built around the upper backbone (its trunk and res5 head are θ_D's own
    modules), so evaluating it scores θ_D with φ, and passes with θ_D update θ_D's BN running
    statistics as the classification upper level does; passes with another backbone (θ_P) leave
    that backbone's statistics alone.
    """

    def __init__(self, detector: nn.Module, upper_backbone: nn.Module, num_classes: int, seed: int, rank: int,
                 world_size: int) -> None:
        self.detector, self.head = detector, detector
        self.upper_backbone, self.num_classes = upper_backbone, num_classes
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def shared_parameters(self, backbone: nn.Module) -> list[nn.Parameter]:
        return shared_backbone_parameters(self.detector, backbone)

    def head_parameters(self) -> list[nn.Parameter]:
        return head_parameters(self.detector)

    def _draw_seed(self, draw: tuple[int, int]) -> int:
        phase, step = draw
        return sample_seed(self.seed, phase, step * self.world_size + self.rank)

    def loss(self, backbone: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]],
             draw: tuple[int, int]) -> torch.Tensor:
        """Σ of the four Faster R-CNN losses of the detector with ``backbone``'s weights (train mode).

        images: per image (3, H, W) in [0, 1]; targets: per image ``boxes`` (N, 4) xyxy and ``labels`` (N,).
        """
        self.detector.train()
        with seeded_global_draws(self._draw_seed(draw)):
            losses = forward_with_backbone(self.detector, backbone, list(images), list(targets),
                                           update_batch_norm_statistics=backbone is self.upper_backbone)
        return sum(losses[name].float() for name in LOSS_NAMES)

    def warmup_loss(self, backbone: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]],
                    update_bn_statistics: bool, draw: tuple[int, int]) -> torch.Tensor:
        """The loss with ``backbone`` frozen: its parameters enter detached (no gradient reaches
        them; the res5 head's ``layer4`` is part of the backbone, so frozen too), and its BN
        running statistics change only with ``update_bn_statistics``."""
        self.detector.train()
        frozen = [param for param in backbone.parameters() if param.requires_grad]
        for param in frozen:
            param.requires_grad_(False)
        try:
            with seeded_global_draws(self._draw_seed(draw)):
                losses = forward_with_backbone(self.detector, backbone, list(images), list(targets),
                                               update_batch_norm_statistics=update_bn_statistics)
        finally:
            for param in frozen:
                param.requires_grad_(True)
        return sum(losses[name].float() for name in LOSS_NAMES)

    def evaluate(self, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, float]:
        """VOC2007 ``ap50``, ``ap75``, ``ap`` and the original code's ``ap50_original`` of θ_D with φ on
        ``loader``'s images (every image once over the ranks), in %."""
        scores = evaluate_detector(self.detector, loader, device, self.num_classes, autocast=amp_dtype is not None)
        return {key: 100.0 * float(value) for key, value in scores.items()}


def build_detection_task(args: argparse.Namespace, env: DistEnv, num_classes: int, upper_backbone: nn.Module) -> DetectionUpperTask:
    """The detector around ``upper_backbone`` (on the device; with ``--det-frozen-bn 1`` its BN layers
    become frozen ones in place), its heads initialised from torch's global generator."""
    detector = build_faster_rcnn_c4(upper_backbone, num_classes, **detector_options(args)).to(env.device)
    return DetectionUpperTask(detector, upper_backbone, num_classes, args.seed, env.rank, env.world_size)


def load_detection_splits(args: argparse.Namespace) -> DetectionSplits:
    """train / val / test of ``--d-dset`` (train flipped with ``--det-flip``); a missing dataset is a user error."""
    try:
        return build_detection_splits(args.d_dset, Path(args.data_dir), flip_probability=args.det_flip,
                                      download=bool(args.download_dataset))
    except DatasetNotFoundError as error:
        raise MissingInputError(f"bissl.py cannot start: {error}") from None


def detection_upper_stream(args: argparse.Namespace, splits: DetectionSplits, per_rank_batch: int,
                           stream_options: dict[str, Any]) -> BatchStream:
    """The upper level's endless stream of (images, targets) lists from the (capped) train split."""
    cap = args.d_max_train_samples or args.max_train_samples or None
    train = subsample(splits.train, cap, seed=args.seed, stratify=False)
    return BatchStream(train, per_rank_batch, seed=args.seed + 1, collate_fn=detection_collate, **stream_options)


def detection_val_loader(args: argparse.Namespace, splits: DetectionSplits, per_rank_batch: int, device: torch.device) -> DataLoader:
    """This rank's shard of the val split, capped at ``--max-eval-samples`` images (scored after every alternation)."""
    val = subsample(splits.val, args.max_eval_samples or None, seed=args.seed, stratify=False)
    return detection_eval_loader(val, per_rank_batch, num_workers=max(args.num_workers, 0), pin_memory=device.type == "cuda")

