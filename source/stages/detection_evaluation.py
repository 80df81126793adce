"""Score a detector on a split: every rank predicts its shard, the predictions are gathered, and
every image is scored exactly once (the standard VOC2007 metrics plus the original code's AP50).

The loader must visit each image once over all ranks, in a known order: :func:`detection_eval_loader`
(``source.stages.evaluation.ShardedEvalSampler``: rank r gets images r, r + W, r + 2W, ...).
The original BiSSL code scored each GPU's shard separately and averaged the per-GPU AP50; its
number is reproduced by ``ap50_original`` with the same shards (see
:func:`source.stages.detection_metrics.original_ap50`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from source.data.detection import detection_collate
from source.run.distributed import get_world_size
from source.stages.detection_metrics import gather_detection_results, original_ap50, voc_detection_metrics
from source.stages.evaluation import ShardedEvalSampler

__all__ = ["detection_eval_loader", "evaluate_detector"]


def detection_eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This rank's shard of ``dataset`` (no padding, in order), batched as lists of images and targets."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardedEvalSampler(dataset), num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=detection_collate, generator=torch.Generator())


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                      autocast: bool = False) -> dict[str, float]:
    """``{"ap50", "ap75", "ap", "ap50_original"}`` of ``model`` on ``loader``'s dataset, as fractions.

    ``model`` is a torchvision detector (eval mode returns per image ``boxes``, ``scores``,
    ``labels``); it runs in eval mode and gets its previous mode back. ``loader`` yields
    ``(images, targets)`` lists (:func:`detection_eval_loader`); targets carry ``boxes``, ``labels``
    and ``difficult``. Call on every rank: the result is the same everywhere.
    """
    sampler = loader.sampler
    if not isinstance(sampler, (ShardedEvalSampler, SequentialSampler)):
        raise ValueError(f"evaluate with a loader that visits each image once in order (detection_eval_loader), not {type(sampler).__name__}")
    if isinstance(sampler, SequentialSampler) and get_world_size() > 1:
        raise ValueError("a SequentialSampler makes every rank score every image; use detection_eval_loader")
    indices = list(iter(sampler))
    was_training = model.training
    model.eval()
    detections, annotations = [], []
    try:
        for images, targets in loader:
            with torch.autocast(device.type, enabled=autocast):
                outputs = model([image.to(device, non_blocking=True) for image in images])
            detections += [{key: value.float().cpu() if value.is_floating_point() else value.cpu() for key, value in out.items()} for out in outputs]
            annotations += [{key: target[key] for key in ("boxes", "labels", "difficult")} for target in targets]
    finally:
        model.train(was_training)
    if len(detections) != len(indices):
        raise RuntimeError(f"the loader gave {len(detections)} images for {len(indices)} sampler indices (drop_last?)")
    detections, annotations = gather_detection_results(indices, detections, annotations, num_images=len(loader.dataset))
    metrics = voc_detection_metrics(detections, annotations, num_classes)
    world_size = get_world_size()
    shards = [list(range(rank, len(detections), world_size)) for rank in range(world_size)]
    metrics["ap50_original"] = original_ap50(detections, annotations, shards=shards)
    return metrics
