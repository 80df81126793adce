"""Stage 1: conventional self-supervised pre-training (SimCLR or BYOL) of a ResNet backbone.

    torchrun --nproc-per-node 4 ssl_pre-training.py --pretext-type 'simclr'

Writes ``<model-dir>/pretext_<type>_arch-<arch>_{bb,proj[,pred]}.pth`` (plain state_dicts) and
``..._config.json``. Rerunning the same command after an interruption resumes from the run
directory's last per-epoch checkpoint.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

import config_default as cfg
from source.data import build_pretext_dataset, pretext_transform, subsample
from source.data import loader as loading
from source.maths.models import build_backbone
from source.maths.optim import build_optimizer, warmup_cosine_scheduler
from source.run import checkpoint as ckpt
from source.run.cli import build_parser
from source.run.distributed import DistEnv, barrier, check_ranks_identical, cleanup_distributed, parameter_fingerprints
from source.run.runtime import (
    amp_dtype,
    changed_settings,
    check_settings_unchanged,
    open_run_dir,
    per_rank_batch_size,
    run_directory,
    start,
)
from source.run.tracking import MetricsWriter
from source.stages.engine import make_grad_scaler, memory_format, train_pretext_epoch
from source.stages.pretext import BYOL, build_pretext_model, byol_decay, pretext_head_modules

logger = logging.getLogger("ssl_pre-training")


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(
        __doc__, [(cfg.GeneralConfig, "general"), (cfg.PretrainConfig, "pre-training")]
    )


def output_stem(args: argparse.Namespace) -> str:
    return f"pretext_{args.pretext_type}_arch-{args.arch}"


def build_loader(args: argparse.Namespace, env: DistEnv) -> tuple[DataLoader | loading.PrefetchedLoader, loading.SeededSampler]:
    dataset = build_pretext_dataset(
        args.dset, Path(args.data_dir), pretext_transform(args.img_size, args.img_crop_min_ratio, bool(args.crop_as_original)),
        download=bool(args.download_dataset),
    )
    dataset = subsample(dataset, args.max_train_samples or None, seed=args.seed, stratify=False)
    if len(dataset) < args.batch_size:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one global batch ({args.batch_size})")
    # One sampler for every world size (also 1): its shuffle depends only on (seed, epoch).
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    # Augmentations are seeded per (seed, epoch, image): the same views with any --num-workers.
    loader = loading.build_loader(
        dataset, per_rank_batch_size(args.batch_size, env.world_size), sampler, seed=args.seed,
        num_workers=args.num_workers, pin_memory=env.device.type == "cuda", prefetch_factor=args.prefetch_factor,
        nice_workers=env.device.type == "cpu",
    )
    return loader, loading.loader_sampler(loader)


def main(args: argparse.Namespace) -> None:
    env = start(args)
    per_rank_batch_size(args.batch_size, env.world_size)  # fail before touching data
    run_dir = run_directory(args, f"{output_stem(args)}_dset-{args.dset}")
    run_lock = open_run_dir(args, env, run_dir, output_prefixes=(f"{output_stem(args)}_",))
    loader, sampler = build_loader(args, env)
    backbone, feat_dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem), zero_init_residual=bool(args.zero_init_residual))
    layout = memory_format(args.channels_last, env.device)
    model = build_pretext_model(args.pretext_type, backbone, feat_dim, args.mlp, args.temperature).to(
        env.device, memory_format=layout)
    if env.distributed and env.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif env.distributed:
        logger.info("SyncBatchNorm needs CUDA; on CPU each rank normalises with its own batch statistics")
    optimizer = build_optimizer(
        args.optimizer, list(model.parameters()), args.lr, args.wd, args.momentum,
        eta=cfg.LARS_ETA, exclude_bias_bn=bool(args.lars_exclude_bias_bn),
    )
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    scheduler = warmup_cosine_scheduler(optimizer, args.warmup_epochs * steps_per_epoch, total_steps, cfg.FINAL_LR_FACTOR)
    dtype = amp_dtype(args.amp, env.device)
    scaler = make_grad_scaler(env.device, dtype)

    start_epoch = 0
    checkpoint_path = run_dir / "checkpoint.pth"
    if args.resume and checkpoint_path.is_file():
        state = ckpt.load_checkpoint(checkpoint_path, ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "args"))
        check_settings_unchanged(run_dir, changed_settings(state["args"], args, get_args_parser()))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        ckpt.restore_rank_rng_state(state["rng"], env.rank, env.world_size)
        logger.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)

    ddp_model = model
    if env.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    # DDP copied rank 0's weights to every rank; a resumed model came from one file.
    check_ranks_identical({"model": model}, "at the start")
    after_step = None
    if isinstance(model, BYOL):
        def after_step(step: int) -> None:
            model.update_target(byol_decay(step, total_steps, args.ma_decay, bool(args.ma_use_scheduler)))

    writer = MetricsWriter(run_dir, env.is_main, vars(args), args.wandb_project, args.wandb_mode)
    if env.is_main:
        ckpt.write_json_atomic(vars(args), run_dir / "config.json")
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        mean_loss, global_step = train_pretext_epoch(
            ddp_model, loader, optimizer, scheduler, scaler, device=env.device, amp_dtype=dtype,
            epoch=epoch, global_step=global_step, after_step=after_step, writer=writer,
            log_every=args.log_every, show_progress=env.is_main, memory_format=layout,
        )
        writer.log({"epoch/loss": mean_loss, "epoch": epoch}, global_step)
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, args.epochs, mean_loss)
        # Never checkpoint a diverged model; BN statistics are per rank under DDP on CPU, so only
        # the parameters must agree.
        ckpt.check_healthy({"model": model}, f"in epoch {epoch + 1}", cfg.MAX_TENSOR_RMS, cfg.MAX_BUFFER_RMS)
        check_ranks_identical({"model": model}, f"after epoch {epoch + 1}", include_buffers=False)
        rng_states = ckpt.all_rank_rng_states()
        if env.is_main:
            ckpt.save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "rng": rng_states, "args": vars(args),
            }, checkpoint_path)
        barrier()

    fingerprints = parameter_fingerprints(model)
    if env.is_main:
        ckpt.write_json_atomic({"epochs_done": args.epochs, "rank_fingerprints": fingerprints}, run_dir / "final_state.json")
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"ranks ended with different weights (fingerprints {fingerprints}); please report this")
    if env.is_main and args.save_model:
        model_dir = Path(args.model_dir)
        stem = output_stem(args)
        ckpt.save_atomic(model.backbone.state_dict(), model_dir / f"{stem}_bb.pth")
        for suffix, module in pretext_head_modules(model).items():
            ckpt.save_atomic(module.state_dict(), model_dir / f"{stem}_{suffix}.pth")
        ckpt.write_json_atomic(vars(args), model_dir / f"{stem}_config.json")
        logger.info("wrote %s", ", ".join(str(p) for p in sorted(model_dir.glob(f"{stem}_*"))))
    writer.close()
    barrier()
    if run_lock is not None:
        run_lock.release()
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
