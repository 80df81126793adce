"""What a frozen backbone's features tell: extraction across ranks, the weighted kNN classifier and
BatchNorm re-estimation.

Shared by the probe (``python -m source.tools.probe``) and ``bissl.py``'s alignment metrics
(:mod:`source.stages.alignment`), so both score a backbone with the same rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from source.run.distributed import all_reduce_sum_, broadcast_object, gather_uneven, get_world_size
from source.stages.evaluation import ShardedEvalSampler, topk_correct


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device,
                     dtype: torch.dtype | None = None,
                     layout: torch.memory_format = torch.contiguous_format) -> tuple[Tensor, Tensor]:
    """Features (N, D) float32 and labels (N,) of every sample of ``loader.dataset``, in dataset order,
    on every rank. Each rank embeds the share of its :class:`ShardedEvalSampler` (sample i on rank
    i mod W); the shares are gathered and put back in order. ``layout``: the memory format of the
    input batches (``--channels-last``), the backbone's own. The backbone runs in eval mode
    (BatchNorm with its running statistics, which stay untouched); every module gets its own mode
    back afterwards."""
    sampler = loader.sampler
    if not isinstance(sampler, ShardedEvalSampler):
        raise ValueError("extract_features needs a loader with a ShardedEvalSampler (each sample exactly once)")
    modes = {module: module.training for module in backbone.modules()}
    backbone.eval()
    features, labels = [], []
    try:
        for images, targets in loader:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                features.append(backbone(images.to(device, non_blocking=True, memory_format=layout)).float())
            labels.append(targets.to(device))
    finally:
        for module, training in modes.items():
            module.train(training)
    width = int(broadcast_object(features[0].shape[1] if features else None))  # rank 0 always has a batch
    local = torch.cat(features) if features else torch.zeros((0, width), device=device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    positions = torch.tensor(list(iter(sampler)), dtype=torch.long, device=device)
    if get_world_size() > 1:
        local, local_labels, positions = gather_uneven(local), gather_uneven(local_labels), gather_uneven(positions)
    order = torch.empty_like(positions)
    order[positions] = torch.arange(len(positions), device=device)
    return local[order].cpu(), local_labels[order].cpu()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, device: torch.device,
                          layout: torch.memory_format = torch.contiguous_format) -> int:
    """Re-estimate the running mean and variance of every BatchNorm of ``model`` on ``loader``'s images.

    Each BN's statistics are reset and then set to the equal-weight average of the per-batch
    mean / unbiased variance (``momentum=None``); across ranks the averages are combined weighted
    by each rank's batch count. Parameters, other buffers, the momentum and every module's
    train/eval mode are left as they were. Batches of one image are skipped. Returns the number of
    batches used (all ranks).
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    batches = 0
    try:
        for images, _ in loader:
            if images.shape[0] < 2:  # a last single image has no batch variance (and BN refuses it)
                continue
            model(images.to(device, non_blocking=True, memory_format=layout))
            batches += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    count = torch.tensor([float(batches)], dtype=torch.float64, device=device)
    all_reduce_sum_(count)
    if count.item() == 0:
        raise ValueError("BatchNorm recalibration got no batch: the train split is empty")
    if get_world_size() > 1:
        for norm in norms:
            for stats in (norm.running_mean, norm.running_var):
                weighted = stats.double() * batches
                all_reduce_sum_(weighted)
                stats.copy_(weighted / count)
    return int(count.item())


@torch.no_grad()
def knn_scores(train_features: Tensor, train_labels: Tensor, features: Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> Tensor:
    """Weighted kNN class scores (M, C) of ``features`` (M, D) against the bank (N, D) with labels (N,).

    With unit vectors f, score_c(x) = sum over the k nearest train features f_j (cosine) with
    y_j = c of exp(cos(x, f_j) / T)  (Wu et al., 2018). The prediction is the argmax over c.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need --knn-k >= 1 and --knn-temperature > 0, got {k} and {temperature}")
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for first in range(0, features.shape[0], chunk_size):
        queries = F.normalize(features[first:first + chunk_size].float(), dim=1)
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(queries.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def top1(scores: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (%) of scores (N, C) against labels (N,)."""
    return 100.0 * topk_correct(scores, labels, (1,))[0].item() / max(len(labels), 1)
