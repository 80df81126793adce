"""One object-detection fine-tuning trial: Faster R-CNN R-C4 around a pre-trained backbone, trained
end to end on a detection train split, selected on val AP50, reported on test.

The detection analogue of :func:`source.stages.finetune.fine_tune` (BiSSL, arXiv 2410.02387 v3/v4,
detection protocol of the authors' NeurIPS-version code): SGD with momentum and weight decay on
every trainable parameter, a cosine learning-rate schedule without warmup decaying to 0 over all
iterations (:func:`source.stages.finetune.cosine_to_zero_scheduler`), the loss the sum of
torchvision's four Faster R-CNN losses (RPN objectness + RPN box + classifier + box regression),
the VOC2007 AP50 on the val split after every epoch (the selection score, as the original), and
at the end the test AP50 / AP75 / AP and the original code's AP50 of the final model and of the
model of the best validation epoch. Scores are percentages, like the classification trial's.

Unlike a classification trial (one per process), a detection trial is data-parallel over all
ranks: each rank trains on ``batch_size / world_size`` images of every step under
DistributedDataParallel (SyncBatchNorm on CUDA, where it exists; on CPU each rank normalises with
its own batch and rank 0's running statistics are kept, as DDP's buffer broadcast does), and
the evaluation shards the images over the ranks and scores each once
(:func:`source.stages.detection_evaluation.evaluate_detector`).

Repeatability and resume. Batch order and flips are pure functions of ``(seed, epoch, index)``
(``DistributedSampler`` seeded with the trial seed, :class:`source.data.loader.SeededDataset`
reseeding torch's CPU generator per sample). torchvision's detector also draws random numbers
while training (the positive/negative sampling of anchors and proposals uses ``torch.randperm`` on
the global generator), so torch is reseeded before every step with
``sample_seed(seed, epoch, MODEL_DRAW_INDEX + step * world_size + rank)``. For that the training
loader never loads in a background thread of the training process (which reseeds the same global
generator, see :mod:`source.data.loader`): ``num_workers = 0`` loads in the loop itself (the
``data_wait_frac`` metric shows what that costs), ``num_workers > 0`` in worker processes.
After every epoch a checkpoint (model, optimizer, scheduler, scaler, epochs done, best epoch and
its weights, history, every rank's RNG state) is written atomically, and a trial started again
with the same checkpoint path continues from it and ends where an uninterrupted trial would.

A non-finite loss or exploding weights end the trial as ``"failed"`` (the classification trial's
:class:`source.stages.finetune.TrialDiverged` handling), on every rank at once.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import config_default as cfg
from source.data.detection import DETECTION_DATASETS, detection_collate
from source.data.loader import SeededDataset, SeededSampler, sample_seed, worker_init_fn
from source.maths.detection_model import DEFAULT_ANCHOR_SIZES, DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, build_faster_rcnn_c4
from source.maths.models import build_backbone
from source.run import checkpoint as ckpt
from source.run.cli import number_list
from source.run.distributed import (
    all_reduce_mean_,
    barrier,
    broadcast_module_,
    get_rank,
    get_world_size,
)
from source.run.errors import ConfigError
from source.run.runtime import per_rank_batch_size
from source.stages.detection_evaluation import detection_eval_loader, evaluate_detector
from source.stages.engine import Throughput, make_grad_scaler, peak_memory_metrics
from source.stages.finetune import STATUS_FAILED, STATUS_OK, TrialDiverged, TrialResult, cosine_to_zero_scheduler

logger = logging.getLogger(__name__)

__all__ = [
    "DETECTION_SCORE", "DetectorSettings", "DetectionTrialResult", "build_detector", "train_detection_epoch",
    "fine_tune_detector", "is_detection_dataset", "parse_anchor_sizes",
]

# Key of the selection score in evaluate_detector's output, and the results rows' "metric".
DETECTION_SCORE = "ap50"
# The scores every test evaluation records (evaluate_detector's keys).
TEST_SCORES = ("ap50", "ap75", "ap", "ap50_original")
# The "index" whose sample_seed seeds the detector's own draws at a step: beyond any dataset's
# indices and below source.data.loader.SHUFFLE_INDEX, so unrelated to every sample's seed.
MODEL_DRAW_INDEX = 1 << 62
# The four losses of torchvision's FasterRCNN in train mode, in the order they are logged.
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
# What a checkpoint must hold to be continued.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "trial", "history", "rng")


def is_detection_dataset(dset: str) -> bool:
    """Whether ``--dset`` names a detection dataset (:data:`source.data.detection.DETECTION_DATASETS`)."""
    return dset in DETECTION_DATASETS


def parse_anchor_sizes(text: str) -> tuple[int, ...]:
    """``--det-anchor-sizes``: ``"16,32,64"`` -> (16, 32, 64); anything else is a ConfigError naming the value."""
    return tuple(number_list(text, "--det-anchor-sizes", int, minimum=1))


@dataclass(frozen=True)
class DetectorSettings:
    """How the detector is built around the backbone (:func:`source.maths.detection_model.build_faster_rcnn_c4`)."""

    arch: str = "resnet50"
    cifar_stem: bool = False
    head: str = "res5"
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES[0]
    frozen_batch_norm: bool = False
    # Further FasterRCNN keyword arguments (e.g. smaller RPN/RoI sample counts for tests).
    extra: Mapping[str, Any] = field(default_factory=dict)


def build_detector(pretrained: Mapping[str, Tensor], num_classes: int, settings: DetectorSettings,
                   device: torch.device, distributed: bool) -> nn.Module:
    """Faster R-CNN R-C4 around a ``settings.arch`` backbone holding ``pretrained`` (a ResNet
    state_dict, loaded strictly), on ``device``. Its heads are initialised from torch's global
    generator, so seed it the same on every rank. SyncBatchNorm when ``distributed`` on CUDA
    (torch's SyncBatchNorm has no CPU kernel)."""
    backbone, _ = build_backbone(settings.arch, cifar_stem=settings.cifar_stem)
    backbone.load_state_dict(dict(pretrained), strict=True)
    sync = distributed and device.type == "cuda" and not settings.frozen_batch_norm
    model = build_faster_rcnn_c4(backbone, num_classes, head=settings.head, min_size=settings.min_size,
                                 max_size=settings.max_size, anchor_sizes=(tuple(settings.anchor_sizes),), sync_batch_norm=sync,
                                 frozen_batch_norm=settings.frozen_batch_norm, **dict(settings.extra))
    return model.to(device)


@dataclass
class DetectionTrialResult(TrialResult):
    """:class:`source.stages.finetune.TrialResult` with scores in AP50 % (``best_val``, ``final_val``,
    ``test_final``, ``test_best``), plus every test score of both models and the loader's
    throughput (``images_per_s``, ``data_wait_frac``: share of the training time spent waiting for data)."""

    test_final_scores: dict[str, float] = field(default_factory=dict)
    test_best_scores: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        row = super().row()
        for model, scores in (("test_final", self.test_final_scores), ("test_best", self.test_best_scores)):
            row.update({f"{model}_{name}": value for name, value in scores.items() if name != DETECTION_SCORE})
        row.update(self.throughput)
        return row


def _percent(scores: Mapping[str, float]) -> dict[str, float]:
    return {key: 100.0 * float(value) for key, value in scores.items()}


def _train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int, prefetch_factor: int,
                  device: torch.device) -> DataLoader:
    """This rank's shuffled share of ``dataset`` in batches of ``batch_size`` (image, target) lists.

    ``DistributedSampler`` (seeded, ``drop_last``: every rank takes the same number of steps) inside
    :class:`SeededSampler`, so order and flips depend on ``(seed, epoch, index)`` only; no
    background thread (see the module docstring)."""
    workers = num_workers > 0
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=SeededSampler(sampler, seed), drop_last=True,
                      collate_fn=detection_collate, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers, prefetch_factor=prefetch_factor if workers else None,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init_fn(device.type == "cpu"))


def train_detection_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler, *, device: torch.device, amp_dtype: torch.dtype | None, seed: int, epoch: int,
    progress: tqdm,
) -> dict[str, float]:
    """One pass over ``loader`` (lists of images (3, H, W) and targets); returns the epoch's mean
    losses (``train/loss`` = the sum of the four, and each of them, averaged over ranks and steps)
    and its throughput (``train/images_per_s`` over all ranks, ``train/data_wait_frac``).

    ``model(images, targets)`` (DDP-wrapped or not) returns torchvision's loss dict. Before each
    step torch is seeded from ``(seed, epoch, step, rank)``. Raises :class:`TrialDiverged` on every
    rank at the first non-finite loss (the losses are all-reduced each step), before back-propagating it.
    """
    model.train()
    world_size, rank = get_world_size(), get_rank()
    sums = torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.float64)
    steps = 0
    throughput = Throughput()
    ready = time.perf_counter()
    for images, targets in loader:
        fetched = time.perf_counter()
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]
        torch.manual_seed(sample_seed(seed, epoch, MODEL_DRAW_INDEX + steps * world_size + rank))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(images, targets)
        loss = sum(losses[name].float() for name in LOSS_NAMES)
        values = all_reduce_mean_(torch.stack([loss.detach(), *(losses[name].detach().float() for name in LOSS_NAMES)]).double()).cpu()
        lr = optimizer.param_groups[0]["lr"]
        if not torch.isfinite(values[0]):
            raise TrialDiverged(f"non-finite training loss ({values[0].item()}) at epoch {epoch}, step {steps + 1}, lr {lr:.4g}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        sums += values
        steps += 1
        throughput.add(len(images) * world_size, fetched - ready)
        progress.update(1)
        progress.set_postfix(epoch=epoch, loss=f"{values[0].item():.4f}", lr=f"{lr:.3g}", refresh=False)
        ready = time.perf_counter()
    if steps == 0:
        raise ConfigError("the detection training loader produced no batch: the train split is smaller than one global batch")
    means = (sums / steps).tolist()
    # Every rank reports the same numbers: images/s and the waiting share averaged over the ranks.
    rates = throughput.overall("train/")
    averaged = all_reduce_mean_(torch.tensor(list(rates.values()), dtype=torch.float64, device=device)).cpu()
    return {"train/loss": means[0], **{f"train/{name}": value for name, value in zip(LOSS_NAMES, means[1:])},
            **dict(zip(rates, averaged.tolist()))}


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    # On the CPU, cloned: state_dict() returns views of the live tensors, which later steps overwrite.
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def fine_tune_detector(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset,
    *,
    num_classes: int,
    lr: float,
    wd: float,
    momentum: float,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    checkpoint_path: Path | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    show_progress: bool = False,
    description: str = "detection fine-tuning",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_final_model: Callable[[nn.Module], None] | None = None,
) -> DetectionTrialResult:
    """Train the detector ``model`` (from :func:`build_detector`, on ``device``, not DDP-wrapped)
    for ``epochs`` on ``train_set`` with the GLOBAL batch ``batch_size`` and score it.

    Call on every rank with the same arguments (and the same model weights). Scores are AP50 in %
    (``evaluate_detector`` x 100). ``checkpoint_path``: written after every epoch (rank 0) and, when
    it exists at the start, continued from (it must belong to the same trial: lr, wd, seed, epochs,
    batch size); None trains without checkpoints. ``on_epoch(metrics)`` receives each epoch's
    ``{"epoch", "train/...", "val/ap50", ...}`` after its checkpoint is written; ``on_final_model``
    gets the final model of a trial that did not diverge, before the best-epoch weights are loaded
    into ``model`` (which is left holding them).
    """
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    world_size = get_world_size()
    per_rank = per_rank_batch_size(batch_size, world_size)
    train_loader = _train_loader(train_set, per_rank, seed, num_workers, prefetch_factor, device)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"the train split has {len(train_set)} images, fewer than one global batch (--batch-size {batch_size})")
    val_loader = detection_eval_loader(val_set, per_rank, num_workers=num_workers, pin_memory=device.type == "cuda")
    test_loader = detection_eval_loader(test_set, per_rank, num_workers=num_workers, pin_memory=device.type == "cuda")
    sampler = train_loader.sampler
    assert isinstance(sampler, SeededSampler)

    trained = model
    if world_size > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum, weight_decay=wd)
    scheduler = cosine_to_zero_scheduler(optimizer, epochs * steps_per_epoch)
    scaler = make_grad_scaler(device, amp_dtype)
    identity = {"lr": lr, "wd": wd, "seed": seed, "epochs": epochs, "batch_size": batch_size}
    result = DetectionTrialResult(status=STATUS_OK)
    autocast = amp_dtype is not None

    done = 0
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        done = _resume(Path(checkpoint_path), identity, model, optimizer, scheduler, scaler, result)
        logger.info("%s: continuing after epoch %d of %d from %s", description, done, epochs, checkpoint_path)

    progress = tqdm(total=epochs * steps_per_epoch, initial=done * steps_per_epoch, desc=description,
                    disable=not show_progress, dynamic_ncols=True, leave=False)
    try:
        for epoch in range(done + 1, epochs + 1):
            sampler.set_epoch(epoch)
            lr_at_start = optimizer.param_groups[0]["lr"]
            train_metrics = train_detection_epoch(trained, train_loader, optimizer, scheduler, scaler, device=device,
                                                  amp_dtype=amp_dtype, seed=seed, epoch=epoch, progress=progress)
            broadcast_module_(model)  # rank 0's BN running statistics everywhere, as DDP's next forward would
            if problems := ckpt.unhealthy_tensors({"model": model}, cfg.MAX_TENSOR_RMS, cfg.MAX_BUFFER_RMS):
                raise TrialDiverged(f"diverged weights after epoch {epoch}: {'; '.join(problems[:3])}")
            val_scores = _percent(evaluate_detector(model, val_loader, device, num_classes, autocast=autocast))
            metrics = {"epoch": epoch, **train_metrics, "train/lr": lr_at_start,
                       **{f"val/{key}": value for key, value in val_scores.items()}, **peak_memory_metrics(device, "epoch/")}
            result.history.append(metrics)
            result.throughput = {"images_per_s": train_metrics["train/images_per_s"],
                                 "data_wait_frac": train_metrics["train/data_wait_frac"]}
            if result.best_val is None or val_scores[DETECTION_SCORE] > result.best_val:
                result.best_val, result.best_epoch = val_scores[DETECTION_SCORE], epoch
                result.best_state = _copy_state(model)
            if checkpoint_path is not None:
                _save(Path(checkpoint_path), identity, epoch, model, optimizer, scheduler, scaler, result)
            if on_epoch is not None:
                on_epoch(metrics)
            progress.set_postfix(epoch=epoch, val_ap50=f"{val_scores[DETECTION_SCORE]:.2f}", best=f"{result.best_val:.2f}")
    except TrialDiverged as error:
        result.status, result.error = STATUS_FAILED, f"{error} (lr {lr:g}, wd {wd:g})"
        logger.error("trial diverged and is marked failed: %s", result.error)
    finally:
        progress.close()

    if result.status == STATUS_OK:
        result.final_val = result.history[-1][f"val/{DETECTION_SCORE}"]
        result.test_final_scores = _percent(evaluate_detector(model, test_loader, device, num_classes, autocast=autocast))
        result.test_final = result.test_final_scores[DETECTION_SCORE]
        if on_final_model is not None:
            on_final_model(model)
    if result.best_state is not None:
        if result.status == STATUS_OK and result.best_epoch == epochs:
            result.test_best_scores = dict(result.test_final_scores)  # the final model is the best one
        else:
            model.load_state_dict(result.best_state)
            result.test_best_scores = _percent(evaluate_detector(model, test_loader, device, num_classes, autocast=autocast))
        result.test_best = result.test_best_scores[DETECTION_SCORE]
    return result


def _save(path: Path, identity: dict[str, Any], epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, result: DetectionTrialResult) -> None:
    """Rank 0 writes everything needed to continue after ``epoch`` (atomically); all ranks wait for it."""
    rng = ckpt.all_rank_rng_states()  # a collective: every rank takes part
    if get_rank() == 0:
        ckpt.save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "trial": identity, "history": result.history,
            "best_val": result.best_val, "best_epoch": result.best_epoch, "best_state": result.best_state,
            "throughput": result.throughput, "rng": rng,
        }, path)
    barrier()


def _resume(path: Path, identity: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, result: DetectionTrialResult) -> int:
    """Load the checkpoint at ``path`` into the trial's objects (strictly); returns the epochs it had done."""
    state = ckpt.load_checkpoint(path, CHECKPOINT_KEYS)
    if state["trial"] != identity:
        raise ckpt.CheckpointError(f"cannot resume from {path}: it belongs to another trial ({state['trial']}, this one is "
                                   f"{identity}). Remove it, or pass --resume 0 to start the run over.")
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    result.history = list(state["history"])
    result.best_val, result.best_epoch, result.best_state = state["best_val"], state["best_epoch"], state["best_state"]
    result.throughput = dict(state["throughput"])
    ckpt.restore_rank_rng_state(state["rng"], get_rank(), get_world_size())
    return int(state["epoch"])

