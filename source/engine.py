"""Training loops shared by the entry scripts."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from source.distributed import all_reduce_mean_, get_world_size
from source.tracking import MetricsWriter

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised (on every rank at once) when a loss is NaN or infinite."""


def check_finite(loss_value: float, where: str) -> None:
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"non-finite loss ({loss_value}) {where}; stopping. The last checkpoint is intact: rerun with "
            "--amp none to continue it in full precision, or start over with a lower learning rate (--resume 0 or "
            "another --run-dir; a run never continues with a changed learning rate)."
        )


def make_grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 do not need loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def train_pretext_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int,
    global_step: int,
    after_step: Callable[[int], None] | None,
    writer: MetricsWriter,
    log_every: int,
    show_progress: bool,
) -> tuple[float, int]:
    """One epoch of self-supervised training; returns (mean loss, global step after the epoch).

    ``model(view1, view2)`` returns the loss. ``after_step(step)`` runs after every optimizer step
    (the BYOL target update). The loss is averaged over ranks every step so that a non-finite
    value stops all ranks together.
    """
    model.train()
    total_loss, num_steps = 0.0, 0
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    for (view1, view2), _ in progress:
        view1 = view1.to(device, non_blocking=True)
        view2 = view2.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(view1, view2)
        loss_value = all_reduce_mean_(loss.detach().float().clone()).item()
        check_finite(loss_value, f"at epoch {epoch}, step {global_step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        global_step += 1
        if after_step is not None:
            after_step(global_step)
        total_loss += loss_value
        num_steps += 1
        images_per_s = num_steps * view1.shape[0] * get_world_size() / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}")
        if global_step % log_every == 0:
            writer.log({"train/loss": loss_value, "train/lr": lr, "train/images_per_s": images_per_s, "epoch": epoch}, global_step)
    if num_steps == 0:
        raise ValueError("the training loader produced no batch: the dataset is smaller than one global batch")
    return total_loss / num_steps, global_step

