"""The building blocks of ``ssl_pre-training.py``: data, model, optimisation, checkpoint and outputs.

``ssl_pre-training.py``'s ``main`` wires these together in order (build, resume, train an epoch at
a time with :func:`source.stages.engine.train_pretext_epoch`, save); everything that draws random
numbers runs in the order the script calls it, so a run and its resumption consume the global RNG
identically.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import config_default as cfg
from source.data import build_pretext_dataset, pretext_transform, subsample
from source.data import loader as loading
from source.maths.models import build_backbone
from source.maths.optim import build_optimizer, warmup_cosine_scheduler
from source.run import checkpoint as ckpt
from source.run.distributed import DistEnv, barrier, check_ranks_identical, parameter_fingerprints
from source.run.errors import ConfigError
from source.run.runtime import changed_settings, check_settings_unchanged, per_rank_batch_size
from source.stages.engine import memory_format
from source.stages.pretext import BYOL, build_pretext_model, byol_decay, pretext_head_modules

# The script's own logger name, so its messages read as before the code moved here.
logger = logging.getLogger("ssl_pre-training")


def output_stem(args: argparse.Namespace) -> str:
    """Common start of the weight files the run writes: ``pretext_<type>_arch-<arch>``."""
    return f"pretext_{args.pretext_type}_arch-{args.arch}"


def build_loader(args: argparse.Namespace, env: DistEnv) -> tuple[DataLoader | loading.PrefetchedLoader, loading.SeededSampler]:
    """The pretext loader (pairs of views, per-rank batches of the GLOBAL --batch-size) and its sampler."""
    dataset = build_pretext_dataset(
        args.dset, Path(args.data_dir), pretext_transform(args.img_size, args.img_crop_min_ratio, bool(args.crop_as_original)),
        download=bool(args.download_dataset),
    )
    dataset = subsample(dataset, args.max_train_samples or None, seed=args.seed, stratify=False)
    if len(dataset) < args.batch_size:
        raise ConfigError(f"the training set has {len(dataset)} images, fewer than one global batch ({args.batch_size})")
    # One sampler for every world size (also 1): its shuffle depends only on (seed, epoch).
    sampler = ResumableDistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    # Augmentations are seeded per (seed, epoch, image): the same views with any --num-workers.
    loader = loading.build_loader(
        dataset, per_rank_batch_size(args.batch_size, env.world_size), sampler, seed=args.seed,
        num_workers=args.num_workers, pin_memory=env.device.type == "cuda", prefetch_factor=args.prefetch_factor,
        nice_workers=env.device.type == "cpu",
    )
    return loader, loading.loader_sampler(loader)


class ResumableDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose next pass can start after its first ``skip`` indices: a run
    stopped at a step boundary continues the epoch where it stopped (the epoch's order is a function
    of (seed, epoch) alone, so its position is just the number of batches done)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter(indices)


def start_epoch(sampler: loading.SeededSampler, epoch: int, batches_done: int, per_rank_batch: int) -> None:
    """Point the loader at epoch ``epoch`` after its first ``batches_done`` batches (0: from its start)."""
    sampler.set_epoch(epoch)
    assert isinstance(sampler.sampler, ResumableDistributedSampler)
    sampler.sampler.skip = batches_done * per_rank_batch


def build_model(args: argparse.Namespace, env: DistEnv) -> tuple[nn.Module, torch.memory_format]:
    """The SimCLR/BYOL model on the device in its memory layout (SyncBatchNorm under DDP on CUDA)."""
    backbone, feat_dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem), zero_init_residual=bool(args.zero_init_residual))
    layout = memory_format(args.channels_last, env.device)
    model = build_pretext_model(args.pretext_type, backbone, feat_dim, args.mlp, args.temperature).to(
        env.device, memory_format=layout)
    if env.distributed and env.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif env.distributed:
        logger.info("SyncBatchNorm needs CUDA; on CPU each rank normalises with its own batch statistics")
    return model, layout


def build_optimization(args: argparse.Namespace, model: nn.Module, steps_per_epoch: int
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser (LARS by default) and its warmup + cosine schedule over all steps."""
    optimizer = build_optimizer(
        args.optimizer, list(model.parameters()), args.lr, args.wd, args.momentum,
        eta=cfg.LARS_ETA, exclude_bias_bn=bool(args.lars_exclude_bias_bn),
    )
    total_steps = args.epochs * steps_per_epoch
    scheduler = warmup_cosine_scheduler(optimizer, args.warmup_epochs * steps_per_epoch, total_steps, cfg.FINAL_LR_FACTOR)
    return optimizer, scheduler


def wrap_distributed(model: nn.Module, env: DistEnv) -> nn.Module:
    """The model under DistributedDataParallel when distributed (the model itself otherwise)."""
    ddp_model = model
    if env.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    # DDP copied rank 0's weights to every rank; a resumed model came from one file.
    check_ranks_identical({"model": model}, "at the start")
    return ddp_model


def byol_target_update(args: argparse.Namespace, model: nn.Module, total_steps: int) -> Callable[[int], None] | None:
    """For BYOL, the EMA update of the target network to call after each step; None for SimCLR."""
    if not isinstance(model, BYOL):
        return None

    def after_step(step: int) -> None:
        model.update_target(byol_decay(step, total_steps, args.ma_decay, bool(args.ma_use_scheduler)))

    return after_step


class PretextCheckpoint:
    """``<run dir>/checkpoint.pth``: model, optimiser, scheduler, scaler, epochs done, the global step
    (beyond the epochs done when a stop signal ended the run mid-epoch), every rank's RNG state, args."""

    REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "args")

    def __init__(self, path: Path, args: argparse.Namespace, env: DistEnv, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scaler: torch.amp.GradScaler) -> None:
        self.path, self.args, self.env = path, args, env
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler

    def resume(self, parser: argparse.ArgumentParser, steps_per_epoch: int) -> tuple[int, int]:
        """Restore everything saved, refusing changed settings; returns (epochs done, global step)."""
        state = ckpt.load_checkpoint(self.path, self.REQUIRED_KEYS)
        check_settings_unchanged(self.path.parent, changed_settings(state["args"], self.args, parser))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rank_rng_state(state["rng"], self.env.rank, self.env.world_size)
        global_step = state.get("global_step", state["epoch"] * steps_per_epoch)  # (older checkpoints: per epoch)
        logger.info("resumed from %s at epoch %d, step %d", self.path, state["epoch"], global_step)
        return state["epoch"], global_step

    def save(self, epochs_done: int, global_step: int) -> None:
        """Collective. Never checkpoint a diverged model; BN statistics are per rank under DDP on
        CPU, so only the parameters must agree across ranks."""
        ckpt.check_healthy({"model": self.model}, f"in epoch {epochs_done}", cfg.MAX_TENSOR_RMS, cfg.MAX_BUFFER_RMS)
        check_ranks_identical({"model": self.model}, f"after epoch {epochs_done}", include_buffers=False)
        rng_states = ckpt.all_rank_rng_states()
        if self.env.is_main:
            ckpt.save_atomic({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epochs_done, "global_step": global_step, "rng": rng_states, "args": vars(self.args),
            }, self.path)
        barrier()


def record_final_state(args: argparse.Namespace, env: DistEnv, model: nn.Module, run_dir: Path) -> None:
    """Write every rank's parameter fingerprint to ``final_state.json``; they must all be equal."""
    fingerprints = parameter_fingerprints(model)
    if env.is_main:
        ckpt.write_json_atomic({"epochs_done": args.epochs, "rank_fingerprints": fingerprints}, run_dir / "final_state.json")
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"ranks ended with different weights (fingerprints {fingerprints}); please report this")


def save_outputs(args: argparse.Namespace, model: nn.Module) -> None:
    """Write the backbone, the head modules and the config to --model-dir."""
    model_dir = Path(args.model_dir)
    stem = output_stem(args)
    ckpt.save_atomic(model.backbone.state_dict(), model_dir / f"{stem}_bb.pth")
    for suffix, module in pretext_head_modules(model).items():
        ckpt.save_atomic(module.state_dict(), model_dir / f"{stem}_{suffix}.pth")
    ckpt.write_json_atomic(vars(args), model_dir / f"{stem}_config.json")
    logger.info("wrote %s", ", ".join(str(p) for p in sorted(model_dir.glob(f"{stem}_*"))))
