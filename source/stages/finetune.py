"""One fine-tuning trial: backbone + linear head trained end to end on a downstream train split.

BiSSL (arXiv 2410.02387, Sec. 4) fine-tunes every backbone the same way: SGD with momentum, a
cosine learning-rate schedule without warmup that decays to 0 over all iterations, cross-entropy
(binary cross-entropy with logits for the multi-label VOC2007), evaluation on the validation
split after every epoch, and test scores of both the final model and the model of the best
validation epoch. :func:`fine_tune` runs one such trial in the calling process, on one device,
without any communication: ``fine-tuning.py`` runs several trials side by side, one per process.

A trial whose loss becomes NaN or infinite (a learning rate too large for the random grid) does
not raise: it stops, and its :class:`TrialResult` is marked ``"failed"`` with the reason, so one
diverging (lr, wd) pair does not end a sweep of a hundred.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

import config_default as cfg
from source.maths.losses import downstream_criterion
from source.maths.optim import warmup_cosine_scheduler
from source.run.checkpoint import unhealthy_tensors
from source.run.errors import ConfigError
from source.stages.engine import make_grad_scaler
from source.stages.evaluation import evaluate

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_FAILED = "failed"


class TrialDiverged(RuntimeError):
    """The training or validation loss of a trial became NaN or infinite."""


class TrialStopped(Exception):
    """A stop signal ended the trial at a step boundary (``fine_tune``'s ``stop()`` said so)."""


def score_name(multilabel: bool) -> str:
    """Key of the model-selection score in :func:`source.stages.evaluation.evaluate`'s output:
    11-point mAP (%) for multi-label data, top-1 accuracy (%) otherwise."""
    return "map" if multilabel else "top1"


def cosine_to_zero_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """Cosine decay without warmup, stepped once per iteration.

    Step ``t`` in ``0 .. T-1`` (``T = total_steps``) uses ``lr_t = lr * (1 + cos(pi * t / T)) / 2``:
    the first step uses the full lr and the lr reaches 0 exactly after the last step (as
    ``CosineAnnealingLR(T_max=T)``), so no step is wasted at lr 0. This is
    :func:`source.maths.optim.warmup_cosine_factor` over ``T + 1`` steps with final factor 0.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return warmup_cosine_scheduler(optimizer, warmup_steps=0, total_steps=total_steps + 1, final_factor=0.0)


@dataclass
class TrialResult:
    """Scores of one trial. Epochs count from 1; scores are percentages (top-1 or mAP).

    ``best_*`` refer to the epoch with the highest validation score (the first one on ties).
    For a failed (diverged) trial ``final_val`` and ``test_final`` are ``None``, and the best-epoch
    scores cover only the epochs completed before the divergence (``None`` if there were none).
    """

    status: str
    best_val: float | None = None
    best_epoch: int | None = None
    final_val: float | None = None
    test_final: float | None = None
    test_best: float | None = None
    error: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        """The fields that go into a results row (no weights, no per-epoch history)."""
        row: dict[str, Any] = {
            "status": self.status, "best_val": self.best_val, "best_epoch": self.best_epoch,
            "final_val": self.final_val, "test_final": self.test_final, "test_best": self.test_best,
        }
        if self.error is not None:
            row["error"] = self.error
        return row


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    # clone(): state_dict() returns views of the live parameters, which later steps overwrite.
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int,
    progress: tqdm,
    layout: torch.memory_format = torch.contiguous_format,
    stop: Callable[[], bool] | None = None,
) -> float:
    """One pass over ``loader`` (images (B, 3, H, W) moved to ``device`` in memory format ``layout``,
    targets (B,) or (B, C)); returns the mean loss.

    The scheduler steps after every optimizer step. Raises :class:`TrialDiverged` on the first
    non-finite loss, before that loss is back-propagated, and :class:`TrialStopped` after the
    first step after which ``stop()`` is True.
    """
    model.train()
    total, steps = 0.0, 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True, memory_format=layout)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        # The loss in float32: BCE/CE of low-precision logits loses accuracy for no speed gain.
        loss = criterion(logits.float(), targets)
        loss_value = loss.item()
        lr = optimizer.param_groups[0]["lr"]
        if not math.isfinite(loss_value):
            raise TrialDiverged(f"non-finite training loss ({loss_value}) at epoch {epoch}, step {steps + 1}, lr {lr:.4g}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss_value
        steps += 1
        progress.update(1)
        progress.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", refresh=False)
        if stop is not None and stop():
            raise TrialStopped(f"epoch {epoch}, step {steps}")
    if steps == 0:
        raise ConfigError("the training loader produced no batch: the train split is smaller than one batch")
    return total / steps


def fine_tune(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    test_loader: DataLoader,
    *,
    lr: float,
    wd: float,
    momentum: float,
    epochs: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    multilabel: bool,
    multilabel_loss: str = "bce",
    show_progress: bool = False,
    description: str = "fine-tuning",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_final_model: Callable[[nn.Module], None] | None = None,
    layout: torch.memory_format = torch.contiguous_format,
    stop: Callable[[], bool] | None = None,
) -> TrialResult:
    """Train ``model`` (images -> logits (B, C), already on ``device``) for ``epochs`` and score it.

    SGD(lr, momentum, weight decay ``wd`` on every parameter) with :func:`cosine_to_zero_scheduler`
    over ``epochs * len(train_loader)`` iterations; loss ``CE(logits, y)`` or, if ``multilabel``,
    ``BCEWithLogits(logits, y)`` averaged over the B * C entries (``multilabel_loss="ce"``: the
    original's softmax cross-entropy on the multi-hot targets). After each epoch the model is
    evaluated on ``val_loader`` (locally: no cross-process reduction) and a copy of the weights of
    the best validation epoch is kept in memory. At the end the final model and the best-epoch
    model are scored on ``test_loader``.

    ``on_epoch(metrics)`` receives each epoch's ``{"epoch", "train/loss", "train/lr",
    "val/<metric>", ...}``; ``on_final_model(model)`` is called with the final model of a trial
    that did not diverge (to save it) before the best-epoch weights are loaded into ``model``,
    which is therefore left holding the best-epoch weights.

    A non-finite training or validation loss ends the trial with ``status = "failed"``.
    ``layout``: memory format of the input batches (``--channels-last``; the model's is the caller's).
    ``stop()``, asked after every training step, ends the trial with :class:`TrialStopped` when True.
    """
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    score = score_name(multilabel)
    criterion = downstream_criterion(multilabel, multilabel_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    scheduler = cosine_to_zero_scheduler(optimizer, epochs * len(train_loader))
    scaler = make_grad_scaler(device, amp_dtype)
    result = TrialResult(status=STATUS_OK)
    val_scores: dict[str, float] = {}
    progress = tqdm(total=epochs * len(train_loader), desc=description, disable=not show_progress,
                    dynamic_ncols=True, leave=False)
    try:
        for epoch in range(1, epochs + 1):
            lr_at_start = optimizer.param_groups[0]["lr"]
            train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion,
                                         device, amp_dtype, epoch, progress, layout, stop)
            val_scores = evaluate(model, val_loader, device, multilabel, amp_dtype, distributed=False, layout=layout)
            if not math.isfinite(val_scores["loss"]):
                raise TrialDiverged(f"non-finite validation loss ({val_scores['loss']}) after epoch {epoch}")
            # Weights can explode while BatchNorm keeps the loss finite: that is a divergence too.
            if problems := unhealthy_tensors({"model": model}, cfg.MAX_TENSOR_RMS, cfg.MAX_BUFFER_RMS):
                raise TrialDiverged(f"diverged weights after epoch {epoch}: {'; '.join(problems[:3])}")
            metrics = {"epoch": epoch, "train/loss": train_loss, "train/lr": lr_at_start,
                       **{f"val/{key}": value for key, value in val_scores.items()}}
            result.history.append(metrics)
            if result.best_val is None or val_scores[score] > result.best_val:
                result.best_val, result.best_epoch = val_scores[score], epoch
                result.best_state = _copy_state(model)
            if on_epoch is not None:
                on_epoch(metrics)
            progress.set_postfix(epoch=epoch, val=f"{val_scores[score]:.2f}", best=f"{result.best_val:.2f}")
    except TrialDiverged as error:
        result.status, result.error = STATUS_FAILED, f"{error} (lr {lr:g}, wd {wd:g})"
        logger.error("trial diverged and is marked failed: %s", result.error)
    finally:
        progress.close()

    if result.status == STATUS_OK:
        result.final_val = val_scores[score]
        result.test_final = evaluate(model, test_loader, device, multilabel, amp_dtype, distributed=False, layout=layout)[score]
        if on_final_model is not None:
            on_final_model(model)
    if result.best_state is not None:
        if result.status == STATUS_OK and result.best_epoch == epochs:
            result.test_best = result.test_final  # the final model is the best one
        else:
            model.load_state_dict(result.best_state)
            result.test_best = evaluate(model, test_loader, device, multilabel, amp_dtype, distributed=False,
                                        layout=layout)[score]
    return result
