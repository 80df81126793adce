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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

import config_default as cfg
from source.data.loader import PrefetchedLoader, SeededEpochs
from source.maths.losses import downstream_criterion
from source.maths.optim import warmup_cosine_scheduler
from source.run.checkpoint import CheckpointError, load_checkpoint, save_atomic, unhealthy_tensors
from source.run.errors import ConfigError
from source.stages.engine import Throughput, make_grad_scaler
from source.stages.evaluation import evaluate

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_FAILED = "failed"


class TrialDiverged(RuntimeError):
    """The training or validation loss of a trial became NaN or infinite."""


class TrialStopped(Exception):
    """A stop signal ended the trial at a step boundary (``fine_tune``'s ``stop()`` said so).
    ``checkpointed``: whether the trial's checkpoint was written there (else it reruns from its start)."""

    def __init__(self, epoch: int, steps: int, loss_total: float) -> None:
        super().__init__(f"epoch {epoch}, step {steps}")
        self.epoch, self.steps, self.loss_total, self.checkpointed = epoch, steps, loss_total, False


# What a trial checkpoint must hold to be continued.
TRIAL_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "steps", "loss_total", "lr_at_start",
                         "history", "best_val", "best_epoch", "best_state", "identity")


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


def _seeded_epochs(loader: DataLoader | PrefetchedLoader) -> SeededEpochs | None:
    """The :class:`SeededEpochs` sampler of a train loader, if it has one (its position is resumable)."""
    inner = loader.loader if isinstance(loader, PrefetchedLoader) else loader
    sampler = getattr(inner, "sampler", None)
    return sampler if isinstance(sampler, SeededEpochs) else None


def _batch_size(loader: DataLoader | PrefetchedLoader) -> int:
    return (loader.loader if isinstance(loader, PrefetchedLoader) else loader).batch_size


@dataclass
class TrialTraining:
    """What one trial's training step needs besides the model: the loss, the optimizer, its
    per-iteration schedule and the (fp16-only) gradient scaler."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler


def trial_training(model: nn.Module, *, lr: float, wd: float, momentum: float, total_steps: int, device: torch.device,
                   amp_dtype: torch.dtype | None, multilabel: bool, multilabel_loss: str = "bce") -> TrialTraining:
    """The trial's :class:`TrialTraining` (see :func:`fine_tune`); ``bench/bench_finetune_throughput.py``
    times its bare step with the same objects."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    return TrialTraining(downstream_criterion(multilabel, multilabel_loss), optimizer,
                         cosine_to_zero_scheduler(optimizer, total_steps), make_grad_scaler(device, amp_dtype))


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
    done: tuple[int, float] = (0, 0.0),
    throughput: Throughput | None = None,
) -> float:
    """One pass over ``loader`` (images (B, 3, H, W) moved to ``device`` in memory format ``layout``,
    targets (B,) or (B, C)); returns the mean loss.

    The scheduler steps after every optimizer step. Raises :class:`TrialDiverged` on the first
    non-finite loss, before that loss is back-propagated, and :class:`TrialStopped` after the
    first step after which ``stop()`` is True. ``done``: (steps, loss sum) of the epoch before a
    resume, whose loader starts after those steps. ``throughput``, if given, counts every step's
    images and the time spent waiting for its batch.
    """
    model.train()
    steps, total = done
    ready = time.perf_counter()
    for images, targets in loader:
        fetched = time.perf_counter()
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
        if throughput is not None:
            throughput.add(images.shape[0], fetched - ready)
        progress.update(1)
        progress.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", refresh=False)
        if stop is not None and stop():
            raise TrialStopped(epoch, steps, total)
        ready = time.perf_counter()
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
    checkpoint_path: Path | None = None,
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
    "val/<metric>", ...}`` and its training throughput (``train/images_per_s``, ``train/data_wait_frac``:
    the training loop alone, without the val pass), which ``history`` leaves out (a resumed trial's
    history equals the uninterrupted one's); ``on_final_model(model)`` is called with the final model of a trial
    that did not diverge (to save it) before the best-epoch weights are loaded into ``model``,
    which is therefore left holding the best-epoch weights.

    A non-finite training or validation loss ends the trial with ``status = "failed"``.
    ``layout``: memory format of the input batches (``--channels-last``; the model's is the caller's).
    ``stop()``, asked after every training step, ends the trial with :class:`TrialStopped` when True;
    with a ``checkpoint_path`` and a train loader over :class:`~source.data.loader.SeededEpochs`
    (whose position is (epoch, batches done)) the trial is checkpointed there first, a later call
    with the same path continues from it and ends as an uninterrupted trial, and the file is
    removed once the trial has finished.
    """
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    score = score_name(multilabel)
    training = trial_training(model, lr=lr, wd=wd, momentum=momentum, total_steps=epochs * len(train_loader), device=device,
                              amp_dtype=amp_dtype, multilabel=multilabel, multilabel_loss=multilabel_loss)
    criterion, optimizer, scheduler, scaler = training.criterion, training.optimizer, training.scheduler, training.scaler
    result = TrialResult(status=STATUS_OK)
    val_scores: dict[str, float] = {}
    progress = tqdm(total=epochs * len(train_loader), desc=description, disable=not show_progress,
                    dynamic_ncols=True, leave=False)
    epochs_sampler = _seeded_epochs(train_loader)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None and epochs_sampler is not None else None
    identity = {"lr": lr, "wd": wd, "momentum": momentum, "epochs": epochs, "steps_per_epoch": len(train_loader)}
    first_epoch, done, lr_at_start = 1, (0, 0.0), None
    if checkpoint_path is not None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, TRIAL_CHECKPOINT_KEYS)
        if state["identity"] != identity:
            raise CheckpointError(f"{checkpoint_path} belongs to another trial ({state['identity']}, not {identity}); "
                                  "remove it to run this trial from its start")
        for target, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            target.load_state_dict(state[key])
        first_epoch, done, lr_at_start = state["epoch"], (state["steps"], state["loss_total"]), state["lr_at_start"]
        result.history, result.best_val, result.best_epoch = state["history"], state["best_val"], state["best_epoch"]
        result.best_state = state["best_state"]
        epochs_sampler.set_epoch(epochs_sampler.epoch + first_epoch - 1, skip=done[0] * _batch_size(train_loader))
        progress.update((first_epoch - 1) * len(train_loader) + done[0])
        logger.info("%s: continuing at epoch %d, step %d from %s", description, first_epoch, done[0], checkpoint_path)
    try:
        for epoch in range(first_epoch, epochs + 1):
            if lr_at_start is None:
                lr_at_start = optimizer.param_groups[0]["lr"]
            throughput = Throughput()
            try:
                train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion,
                                             device, amp_dtype, epoch, progress, layout, stop, done, throughput)
            except TrialStopped as stopped:
                if checkpoint_path is not None:
                    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                 "epoch": epoch, "steps": stopped.steps, "loss_total": stopped.loss_total,
                                 "lr_at_start": lr_at_start, "history": result.history, "best_val": result.best_val,
                                 "best_epoch": result.best_epoch, "best_state": result.best_state,
                                 "identity": identity}, checkpoint_path)
                    stopped.checkpointed = True
                raise
            train_rates = throughput.overall("train/")  # before the val pass
            done, lr_at_start_of_epoch, lr_at_start = (0, 0.0), lr_at_start, None
            val_scores = evaluate(model, val_loader, device, multilabel, amp_dtype, distributed=False, layout=layout)
            if not math.isfinite(val_scores["loss"]):
                raise TrialDiverged(f"non-finite validation loss ({val_scores['loss']}) after epoch {epoch}")
            # Weights can explode while BatchNorm keeps the loss finite: that is a divergence too.
            if problems := unhealthy_tensors({"model": model}, cfg.MAX_TENSOR_RMS, cfg.MAX_BUFFER_RMS):
                raise TrialDiverged(f"diverged weights after epoch {epoch}: {'; '.join(problems[:3])}")
            metrics = {"epoch": epoch, "train/loss": train_loss, "train/lr": lr_at_start_of_epoch,
                       **{f"val/{key}": value for key, value in val_scores.items()}}
            result.history.append(metrics)
            if result.best_val is None or val_scores[score] > result.best_val:
                result.best_val, result.best_epoch = val_scores[score], epoch
                result.best_state = _copy_state(model)
            if on_epoch is not None:
                on_epoch({**metrics, **train_rates})
            progress.set_postfix(epoch=epoch, val=f"{val_scores[score]:.2f}", best=f"{result.best_val:.2f}")
    except TrialDiverged as error:
        result.status, result.error = STATUS_FAILED, f"{error} (lr {lr:g}, wd {wd:g})"
        logger.error("trial diverged and is marked failed: %s", result.error)
    finally:
        progress.close()
    if checkpoint_path is not None:  # finished (or failed): nothing left to continue
        checkpoint_path.unlink(missing_ok=True)

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
