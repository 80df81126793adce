"""Downstream evaluation that counts every sample exactly once across ranks.

Single-label datasets are scored with top-1/top-5 accuracy, the multi-label ``voc2007`` with the
VOC2007 11-point interpolated mean average precision (BiSSL, arXiv 2410.02387, Sec. 4).

torch's ``DistributedSampler`` pads the dataset to a multiple of the world size by repeating
samples, which biases every metric computed with it. :class:`ShardedEvalSampler` gives rank ``r``
the indices ``r, r + W, r + 2W, ...`` without padding; :func:`evaluate` then sums counts across
ranks (single-label) or gathers the per-sample scores of shards of unequal sizes (multi-label).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence, Sized

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from source.run.distributed import all_reduce_sum_, gather_no_grad, gather_uneven, get_rank, get_world_size

# Display names of the main score of each kind of dataset (the keys of :func:`evaluate`'s result; ap50: VOC
# detection AP50, source.stages.detection_evaluation.evaluate_detector x 100).
METRIC_LABELS = {"top1": "top-1 (%)", "map": "mAP (%)", "ap50": "AP50 (%)"}


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k``.

    ``correct_k = sum_i 1[y_i in top-k(logits_i)]``; ``k`` is clipped to the number of classes
    (top-5 of a 3-class problem is top-3, i.e. always correct).

    Args:
        logits: (N, C) scores.
        targets: (N,) class indices.
        ks: the values of k.

    Returns:
        (len(ks),) int64 counts on ``logits.device``.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"need logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got ks={tuple(ks)}")
    num_classes = logits.shape[1]
    max_k = min(max(ks), num_classes)
    top = logits.topk(max_k, dim=1).indices  # (N, max_k), best first
    hits = top.eq(targets.view(-1, 1))  # (N, max_k); at most one True per row
    return torch.stack([hits[:, : min(k, num_classes)].any(dim=1).sum() for k in ks])


def average_precision_11pt(scores: Tensor, labels: Tensor) -> float:
    """VOC2007 11-point interpolated average precision of one class.

    Rank the samples by decreasing score. At each distinct score threshold s, precision
    P(s) = TP(s) / (TP(s) + FP(s)) and recall R(s) = TP(s) / N_pos. Then

        AP = (1/11) * sum_{t in {0, 0.1, ..., 1}} max_{s : R(s) >= t} P(s)   (0 if no such s).

    Samples with equal scores enter at the same threshold, so the result does not depend on the
    order of the samples (the VOC devkit instead breaks ties by input order). The recall levels
    are compared exactly (t = j/10), where the devkit's ``np.arange(0, 1.1, 0.1)`` carries float
    noise (its 0.3 is 0.30000000000000004).

    Args:
        scores: (N,) real scores (logits or probabilities; only their order matters).
        labels: (N,) 1 for positives, 0 for negatives.
    """
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"need scores (N,) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    labels = labels.detach().to("cpu", torch.float64)
    num_positives = labels.sum()
    if num_positives <= 0:
        raise ValueError("average precision is undefined for a class without positive samples")
    sorted_scores, order = scores.detach().to("cpu", torch.float64).sort(descending=True)
    true_positives = labels[order].cumsum(0)  # (N,)
    # The last position of each run of equal scores is where that threshold's counts are complete.
    is_last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_positives = true_positives[is_last_of_tie]
    predicted = torch.arange(1, len(scores) + 1, dtype=torch.float64)[is_last_of_tie]
    precision = true_positives / predicted
    recall = true_positives / num_positives
    levels = torch.arange(11, dtype=torch.float64) / 10  # (11,)
    reached = recall.view(1, -1) >= levels.view(-1, 1)  # (11, T)
    interpolated = torch.where(reached, precision.view(1, -1), torch.zeros(())).amax(dim=1)  # (11,)
    return interpolated.mean().item()


def mean_average_precision_11pt(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes of :func:`average_precision_11pt`, as a fraction in [0, 1].

    Classes without any positive sample among the N have no defined AP and are left out of the
    mean (with the full VOC2007 test set every class has positives).

    Args:
        scores: (N, C) scores.
        targets: (N, C) 0/1 labels.
    """
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(f"need scores (N, C) and targets (N, C), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    present = [c for c in range(scores.shape[1]) if targets[:, c].sum() > 0]
    if not present:
        raise ValueError("mean average precision is undefined: no class has a positive sample")
    return sum(average_precision_11pt(scores[:, c], targets[:, c]) for c in present) / len(present)


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...`` of ``range(len(dataset))``, in order, no padding.

    Together the ranks visit every sample exactly once; shard sizes differ by at most one (a rank
    may get none when W > len(dataset)). Unlike ``DistributedSampler`` nothing is repeated, so
    metrics summed or gathered over ranks equal those of a single-process evaluation.
    """

    def __init__(self, dataset: Sized, rank: int | None = None, world_size: int | None = None) -> None:
        self.dataset_size = len(dataset)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.world_size))


def sharded_eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                        persistent_workers: bool = False, prefetch_factor: int | None = None) -> DataLoader:
    """A loader over this rank's :class:`ShardedEvalSampler` shard, in order; with worker processes,
    each keeps ``prefetch_factor`` batches in flight (``None``: PyTorch's default, 2).

    Its private generator matters: iterating a DataLoader draws a base seed from its generator,
    by default torch's global one, and a draw in the main thread while a training stream's
    prefetch thread reseeds that generator per sample (``source.data.loader``) would change that
    sample's augmentation, making runs irreproducible.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardedEvalSampler(dataset), num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None, generator=torch.Generator())


def _check_sampler(loader: DataLoader) -> None:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler) and sampler.total_size != len(sampler.dataset):
        raise ValueError(
            f"the evaluation loader uses a DistributedSampler, which pads or drops samples "
            f"({len(sampler.dataset)} samples -> {sampler.total_size} over {sampler.num_replicas} ranks) "
            f"and so biases the metrics; use source.stages.evaluation.ShardedEvalSampler"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    multilabel: bool,
    amp_dtype: torch.dtype | None = None,
    distributed: bool = True,
    layout: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Score ``model`` (``model(x) -> logits (B, C)``) on every sample of ``loader`` across ranks.

    Single-label (targets (B,) class indices): ``{"loss": mean cross-entropy, "top1": %,
    "top5": %, "num_samples": N}``, the sums all-reduced across ranks.

    Multi-label (targets (B, C) in {0, 1}): ``{"loss": mean binary cross-entropy with logits over
    all N * C entries, "map": 11-point mAP in %, "num_samples": N}``; the scores and targets of
    all ranks are gathered (shards may differ in size) and every rank computes the same mAP.

    Each rank's loader must visit its own share of the samples, e.g. with
    :class:`ShardedEvalSampler`; a padding ``DistributedSampler`` is refused. Every module is put
    in eval mode and afterwards given back its own previous mode, so a backbone frozen in eval mode
    inside a model in train mode stays that way. Autocast is used only if ``amp_dtype`` is given;
    losses and scores are accumulated in float32/float64 regardless.

    ``distributed=False`` scores only this process's loader and communicates nothing, for
    processes that each evaluate their own model (one fine-tuning trial per process); the loader
    must then visit the whole evaluation set. ``layout``: memory format of the input batches
    (``--channels-last``).
    """
    _check_sampler(loader)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    # [loss sum, number of loss terms, num samples, top-1 hits, top-5 hits]; float64 keeps the
    # counts exact and the loss sum free of accumulation error over large test sets.
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    all_scores, all_targets = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=layout)
            targets = targets.to(device, non_blocking=True)
            with autocast:
                logits = model(images)
            logits = logits.float()
            if multilabel:
                targets = targets.float()
                totals[0] += F.binary_cross_entropy_with_logits(logits, targets, reduction="sum").double()
                totals[1] += targets.numel()
                all_scores.append(logits)
                all_targets.append(targets)
            else:
                totals[0] += F.cross_entropy(logits, targets, reduction="sum").double()
                totals[1] += targets.shape[0]
                totals[3:] += topk_correct(logits, targets, (1, 5)).double()
            totals[2] += targets.shape[0]
    finally:
        # modules() lists parents before children, so a child's own mode is set after its parent's
        # train() call has overwritten it; going through train() keeps any override of it working.
        for module, training in modes.items():
            module.train(training)

    if distributed:
        all_reduce_sum_(totals)
    loss_sum, loss_terms, num_samples, top1, top5 = totals.tolist()
    if num_samples == 0:
        raise ValueError("the evaluation loader yielded no samples on any rank")
    metrics = {"loss": loss_sum / loss_terms, "num_samples": int(num_samples)}
    if multilabel:
        scores, targets = _gather_multilabel(all_scores, all_targets, device, distributed)
        metrics["map"] = 100.0 * mean_average_precision_11pt(scores, targets)
    else:
        metrics["top1"] = 100.0 * top1 / num_samples
        metrics["top5"] = 100.0 * top5 / num_samples
    return metrics


def _gather_multilabel(
    scores: list[Tensor], targets: list[Tensor], device: torch.device, distributed: bool = True
) -> tuple[Tensor, Tensor]:
    """Concatenate this rank's (B, C) batches and gather all ranks' -> two (N, C) CPU tensors.

    A rank that saw no batch does not know C; the class count is agreed on first (max over
    ranks) so that it can still take part in the gathers with an empty (0, C) shard. With
    ``distributed=False`` only this process's batches are concatenated.
    """
    if not distributed:
        return torch.cat(scores).cpu(), torch.cat(targets).cpu()  # evaluate() checked N > 0
    num_classes = torch.tensor([scores[0].shape[1] if scores else 0], device=device)
    if get_world_size() > 1:
        num_classes = gather_no_grad(num_classes).max().view(1)
    width = int(num_classes.item())
    local_scores = torch.cat(scores) if scores else torch.zeros((0, width), device=device)
    local_targets = torch.cat(targets) if targets else torch.zeros((0, width), device=device)
    return gather_uneven(local_scores).cpu(), gather_uneven(local_targets).cpu()
