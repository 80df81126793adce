"""Self-supervised losses (NT-Xent for SimCLR, the BYOL regression loss) and the downstream criterion."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from source.run.distributed import gather_with_grad, get_rank, get_world_size


def nt_xent_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather_across_ranks: bool = True
) -> torch.Tensor:
    """NT-Xent (Chen et al., 2020) with negatives from all ranks.

    z1, z2: (N, D) un-normalised projections of the two views on this rank. With the global
    batch of M = N * world_size pairs and u = normalised [z1_all; z2_all] (2M, D),

        loss = 1/(2M) * sum_i -log( exp(u_i . u_p(i) / t) / sum_{k != i} exp(u_i . u_k / t) )

    where p(i) is i's other view. The returned VALUE is this global mean, identical to the
    single-process loss on the concatenated global batch. Its GRADIENT is that of this rank's
    2N anchors' share (against all 2M candidates, with gradients flowing back through the
    gather), scaled so that DDP's averaging of parameter gradients over ranks yields exactly
    the gradient of the global mean. ``gather_across_ranks=False`` uses this rank's batch only.
    """
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    world = get_world_size() if gather_across_ranks else 1
    rank = get_rank() if gather_across_ranks else 0
    if world > 1:
        z1_all, z2_all = gather_with_grad(z1), gather_with_grad(z2)
    else:
        z1_all, z2_all = z1, z2
    n, m = z1.shape[0], z1_all.shape[0]
    candidates = torch.cat([z1_all, z2_all], dim=0)  # (2M, D)
    anchors = torch.cat([z1, z2], dim=0)  # (2N, D): this rank's anchors
    logits = anchors @ candidates.T / temperature  # (2N, 2M)
    local = torch.arange(n, device=z1.device) + rank * n  # global row of each local pair
    self_index = torch.cat([local, local + m])
    positive_index = torch.cat([local + m, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=z1.device, dtype=logits.dtype))
    local_mean = F.cross_entropy(logits, positive_index)
    if world == 1:
        return local_mean
    # Through the gather, every rank's loss sends gradient to every rank's projections, so the
    # per-rank gradients already sum to world * d(global mean); DDP then averages them.
    global_mean = local_mean.detach().clone()
    torch.distributed.all_reduce(global_mean)
    global_mean /= world
    return local_mean + (global_mean - local_mean.detach())


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss 2 - 2 cos(p, z) averaged over the batch. p, z: (N, D)."""
    cos = F.cosine_similarity(prediction, target.detach(), dim=1)
    return (2 - 2 * cos).mean()


MULTILABEL_LOSSES = ("bce", "ce")


def downstream_criterion(multilabel: bool, multilabel_loss: str = "bce") -> nn.Module:
    """The downstream loss ``criterion(logits (B, C), targets) -> scalar``.

    Single-label (targets (B,) class indices): cross-entropy. Multi-label (targets (B, C)
    multi-hot floats, VOC2007): ``"bce"`` = binary cross-entropy with logits, mean over the
    B * C entries (each class an independent yes/no); ``"ce"`` = the original code's softmax
    cross-entropy on the multi-hot targets, ``-1/B sum_b sum_c y_bc log softmax(z_b)_c``, which
    treats the positives of an image as competing for one unit of probability.
    """
    if multilabel_loss not in MULTILABEL_LOSSES:
        raise ValueError(f"unknown multi-label loss {multilabel_loss!r}; valid: {MULTILABEL_LOSSES}")
    if multilabel and multilabel_loss == "bce":
        return nn.BCEWithLogitsLoss()
    return nn.CrossEntropyLoss()
