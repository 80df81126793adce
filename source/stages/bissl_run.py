"""The building blocks of ``bissl.py``: its inputs and outputs, data, models, checkpoint and reports.

``bissl.py``'s ``main`` wires these together in order (build the data, build the trainer, resume or
warm the head up, run the alternations, save); :class:`~source.stages.bissl_trainer.BisslTrainer`
performs the steps themselves. Everything that draws random numbers (model initialisation, the
streams' seeds) runs in the order the script calls it, so a run and its resumption consume the
global RNG identically.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import config_default as cfg
from source.data import (
    build_downstream_splits,
    build_pretext_dataset,
    downstream_test_transform,
    downstream_train_transform,
    pretext_transform,
    subsample,
)
from source.data.datasets import DownstreamSplits
from source.data.stream import BatchStream
from source.maths.curvature import probe_next_batch
from source.maths.losses import downstream_criterion
from source.maths.models import build_backbone
from source.maths.optim import build_optimizer, warmup_cosine_scheduler
from source.run import checkpoint as ckpt
from source.run.distributed import DistEnv, barrier, broadcast_module_, check_ranks_identical
from source.run.errors import ConfigError
from source.run.runtime import changed_settings, check_settings_unchanged, per_rank_batch_size
from source.run.tracking import MetricsWriter
from source.stages.alignment import KnnAlignment, build_knn_alignment, build_recalibration_loader, recalibrated_copy
from source.stages.bissl_detection import (
    build_detection_task,
    detection_upper_stream,
    detection_val_loader,
    load_detection_splits,
)
from source.stages.bissl_trainer import BilevelSettings, BisslTrainer
from source.stages.detection_finetune import is_detection_dataset
from source.stages.engine import compile_modules, memory_format, peak_memory_metrics
from source.stages.evaluation import evaluate, sharded_eval_loader
from source.stages.pretext import BYOL, build_pretext_model

# The script's own logger name, so its messages read as before the code moved here.
logger = logging.getLogger("bissl")

# The files a run writes to --model-dir (keys of output_names), guarded against a concurrent run.
OUTPUT_FILES = ("lower_backbone", "upper_backbone", "head", "config")


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def output_names(args: argparse.Namespace) -> dict[str, str]:
    """File names of the run's outputs in --model-dir (and its run-directory name, ``run``)."""
    tag = f"{args.p_pretext_type}_arch-{args.arch}_dset-{args.d_dset}"
    return {
        "lower_backbone": f"BiSSL-backbone_{tag}.pth",
        "upper_backbone": f"BiSSL-upper-backbone_{tag}.pth",
        "head": f"BiSSL-upper-head_{tag}.pth",
        "config": f"BiSSL_{tag}_config.json",
        "run": f"BiSSL_{tag}",
    }


def resolve_upper_lr_wd(args: argparse.Namespace) -> None:
    """Fill --d-lr/--d-wd from the paper's per-dataset table when not given."""
    lr, wd = cfg.UPPER_LR_WD[args.p_pretext_type].get(args.d_dset, cfg.UPPER_LR_WD_FALLBACK)
    args.d_lr = lr if args.d_lr is None else args.d_lr
    args.d_wd = wd if args.d_wd is None else args.d_wd


def upper_steps_per_alternation(upper_num_iter: int, batches_per_pass: int, whole_passes: bool) -> int:
    """Upper steps per alternation: ``--upper-num-iter`` N_U, or with ``whole_passes`` the ICML code's
    rule: a downstream train split of L <= N_U batches is run as floor(N_U / L) whole passes
    (floor(N_U / L) * L steps; e.g. L = 3, N_U = 8 -> 6). With L > N_U both give N_U."""
    if whole_passes and batches_per_pass <= upper_num_iter:
        return upper_num_iter // batches_per_pass * batches_per_pass
    return upper_num_iter


def pretext_weight_files(args: argparse.Namespace) -> dict[str, Path]:
    """The pretext weight files this run starts from, by the flag that names each."""
    model_dir = Path(args.model_dir)
    files = {"--p-pretrained-backbone-filename": model_dir / args.p_pretrained_backbone_filename,
             "--p-pretrained-proj-filename": model_dir / args.p_pretrained_proj_filename}
    if args.p_pretext_type == "byol":
        files["--p-pretrained-pred-filename"] = model_dir / (args.p_pretrained_pred_filename or f"pretext_byol_arch-{args.arch}_pred.pth")
    return files


def load_lower_model(args: argparse.Namespace) -> nn.Module:
    """The pretext model (SimCLR/BYOL) with the pre-trained backbone and head of --model-dir loaded."""
    backbone, feat_dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem))
    model = build_pretext_model(args.p_pretext_type, backbone, feat_dim, args.p_mlp, args.p_temperature)
    model_dir = Path(args.model_dir)
    ckpt.load_weights(model.backbone, model_dir / args.p_pretrained_backbone_filename, "pretext backbone", flags="--arch / --cifar-stem")
    ckpt.load_weights(model.projector, model_dir / args.p_pretrained_proj_filename, "pretext projector", flags="--p-mlp (and --arch)")
    if isinstance(model, BYOL):
        pred = args.p_pretrained_pred_filename or f"pretext_byol_arch-{args.arch}_pred.pth"
        ckpt.load_weights(model.predictor, model_dir / pred, "BYOL predictor", flags="--p-mlp")
        model.reset_target()  # the target starts equal to the loaded online network
    return model


def save_outputs(args: argparse.Namespace, trainer: BisslTrainer, names: dict[str, str], history: list[dict]) -> None:
    """Write the lower backbone (the one to fine-tune), the upper backbone and head, and the config."""
    model_dir = Path(args.model_dir)
    ckpt.save_atomic(trainer.lower_model.backbone.state_dict(), model_dir / names["lower_backbone"])
    ckpt.save_atomic(trainer.upper_backbone.state_dict(), model_dir / names["upper_backbone"])
    ckpt.save_atomic(trainer.head.state_dict(), model_dir / names["head"])
    ckpt.write_json_atomic({**vars(args), "history": history}, model_dir / names["config"])
    logger.info("wrote %s", model_dir / names["lower_backbone"])


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class BisslData:
    """The downstream splits and the streams of batches both levels (and the probe) read."""

    splits: DownstreamSplits
    lower_stream: BatchStream
    upper_stream: BatchStream
    probe_stream: BatchStream | None  # the curvature probe's own batches (--curvature-every)
    val_loader: DataLoader
    knn_alignment: KnnAlignment | None = None  # --lower-knn-every's bank and queries
    recalibration_loader: DataLoader | None = None  # --eval-bn-recalibrate-batches' batches

    @property
    def training_streams(self) -> tuple[BatchStream, BatchStream]:
        return self.lower_stream, self.upper_stream


def stream_options(args: argparse.Namespace, env: DistEnv) -> dict[str, Any]:
    """The BatchStream settings both levels share (rank, loaders)."""
    return dict(rank=env.rank, world_size=env.world_size, num_workers=args.num_workers,
                pin_memory=env.device.type == "cuda", prefetch_factor=args.prefetch_factor,
                nice_workers=env.device.type == "cpu")


def pretext_streams(args: argparse.Namespace, env: DistEnv, lower_batch: int
                    ) -> tuple[Dataset, BatchStream, BatchStream | None]:
    """The (capped) pretext set, the lower level's stream of it and the curvature probe's own
    stream (with --curvature-every; so probing leaves the training batches as they were)."""
    pretext_set = build_pretext_dataset(args.p_dset, Path(args.data_dir),
                                        pretext_transform(args.img_size, args.img_crop_min_ratio, bool(args.crop_as_original)),
                                        download=bool(args.download_dataset))
    pretext_set = subsample(pretext_set, args.max_train_samples or None, seed=args.seed, stratify=False)
    options = stream_options(args, env)
    lower_stream = BatchStream(pretext_set, lower_batch, seed=args.seed, **options)
    probe_stream = BatchStream(pretext_set, lower_batch, seed=args.seed + 2, **options) if args.curvature_every else None
    return pretext_set, lower_stream, probe_stream


def build_detection_data(args: argparse.Namespace, env: DistEnv, lower_batch: int, upper_batch: int) -> BisslData:
    """build_data for a detection --d-dset (source.stages.bissl_detection): the VOC-layout splits,
    an upper stream of (images, targets) lists, and the val shard scored by AP50 after every alternation."""
    unavailable = [flag for flag, value in (("--lower-knn-every", args.lower_knn_every),
                                            ("--eval-bn-recalibrate-batches", args.eval_bn_recalibrate_batches)) if value]
    if unavailable:
        raise ConfigError(f"{' and '.join(unavailable)}: classification measurements, not available with the detection "
                          f"--d-dset {args.d_dset}; leave them at 0")
    splits = load_detection_splits(args)
    pretext_set, lower_stream, probe_stream = pretext_streams(args, env, lower_batch)
    upper_stream = detection_upper_stream(args, splits, upper_batch, stream_options(args, env))
    val_loader = detection_val_loader(args, splits, upper_batch, env.device)
    logger.info("downstream %s (detection): %d train / %d val images, %d classes; pretext %s: %d images", args.d_dset,
                len(upper_stream.dataset), len(val_loader.dataset), splits.num_classes, args.p_dset, len(pretext_set))
    return BisslData(splits, lower_stream, upper_stream, probe_stream, val_loader)


def build_data(args: argparse.Namespace, env: DistEnv) -> BisslData:
    """Datasets (capped by --max-*-samples) and per-rank streams of GLOBAL batches split over ranks."""
    lower_batch = per_rank_batch_size(args.p_batch_size, env.world_size, "--p-batch-size")
    upper_batch = per_rank_batch_size(args.d_batch_size, env.world_size, "--d-batch-size")
    data_dir = Path(args.data_dir)
    if is_detection_dataset(args.d_dset):
        return build_detection_data(args, env, lower_batch, upper_batch)
    splits = build_downstream_splits(
        args.d_dset, data_dir, downstream_train_transform(args.img_size, args.img_crop_min_ratio, bool(args.crop_as_original)),
        downstream_test_transform(args.img_size), download=bool(args.download_dataset),
        split_seed=args.seed, val_fraction=args.val_fraction,
    )
    pretext_set, lower_stream, probe_stream = pretext_streams(args, env, lower_batch)
    cap = args.max_train_samples or None
    upper_train = subsample(splits.train, args.d_max_train_samples or cap, seed=args.seed, stratify=True)
    val_set = subsample(splits.val, args.max_eval_samples or None, seed=args.seed, stratify=True)
    upper_stream = BatchStream(upper_train, upper_batch, seed=args.seed + 1, **stream_options(args, env))
    val_loader = sharded_eval_loader(val_set, upper_batch, num_workers=args.num_workers, pin_memory=env.device.type == "cuda",
                                     persistent_workers=True)  # evaluated after every alternation
    logger.info("downstream %s: %d train / %d val, %d classes; pretext %s: %d images",
                args.d_dset, len(upper_train), len(val_set), splits.num_classes, args.p_dset, len(pretext_set))
    # Measurements only: their own seeded samples and loaders, nothing drawn from the training streams.
    knn_alignment = build_knn_alignment(args, env, upper_train, val_set, splits.num_classes, splits.multilabel,
                                        memory_format(args.channels_last, env.device))
    return BisslData(splits, lower_stream, upper_stream, probe_stream, val_loader, knn_alignment,
                     build_recalibration_loader(args, env, upper_train))


# --------------------------------------------------------------------------------------------
# Models, optimisers, trainer
# --------------------------------------------------------------------------------------------


def build_trainer(args: argparse.Namespace, env: DistEnv, data: BisslData, dtype: torch.dtype | None) -> BisslTrainer:
    """Both levels from the pretext weights (θ_D starts as a copy of θ_P), their optimisers and schedules."""
    layout = memory_format(args.channels_last, env.device)  # conv outputs follow the weights' layout
    lower_model = load_lower_model(args).to(env.device, memory_format=layout)
    upper_backbone, feat_dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem))
    upper_backbone.load_state_dict(lower_model.backbone.state_dict())
    upper_backbone.to(env.device, memory_format=layout)
    # A detection --d-dset: Faster R-CNN around θ_D, the upper loss its four losses (source.stages.bissl_detection).
    upper_task = build_detection_task(args, env, data.splits.num_classes, upper_backbone) if is_detection_dataset(args.d_dset) else None
    head = nn.Linear(feat_dim, data.splits.num_classes).to(env.device) if upper_task is None else upper_task.head
    # --compile: the upper backbone only (see its help); a detection upper level stays eager.
    compile_modules(bool(args.compile) and upper_task is None, env.device, upper_backbone)
    # Ranks seed with seed + rank; the head must nevertheless start identical on every rank (and as
    # in a one-process run), so rank 0's initialisation is sent to all.
    broadcast_module_(head)
    criterion = downstream_criterion(data.splits.multilabel, args.multilabel_loss) if upper_task is None else None
    upper_params = (list(upper_backbone.parameters()) + list(head.parameters()) if upper_task is None
                    else upper_task.shared_parameters(upper_backbone) + upper_task.head_parameters())
    batches = data.upper_stream.batches_per_pass
    upper_steps = upper_steps_per_alternation(args.upper_num_iter, batches, bool(args.upper_steps_whole_passes))
    if upper_steps != args.upper_num_iter:
        logger.info("--upper-steps-whole-passes 1: %d upper steps per alternation (%d whole passes of %d batches) instead of %d",
                    upper_steps, upper_steps // batches, batches, args.upper_num_iter)

    lower_optimizer = build_optimizer(args.p_optimizer, list(lower_model.parameters()), args.p_lr, args.p_wd,
                                      args.p_momentum, eta=cfg.LARS_ETA, exclude_bias_bn=bool(args.p_lars_exclude_bias_bn))
    lower_scheduler = warmup_cosine_scheduler(lower_optimizer, args.lower_warmup_alternations * args.lower_num_iter,
                                              args.epochs * args.lower_num_iter, cfg.FINAL_LR_FACTOR)
    upper_optimizer = build_optimizer(args.d_optimizer, upper_params, args.d_lr, args.d_wd, args.d_momentum)
    upper_scheduler = warmup_cosine_scheduler(upper_optimizer, 0, args.epochs * upper_steps, cfg.FINAL_LR_FACTOR)
    settings = BilevelSettings(
        lam=args.lam, cg_damping=args.cg_lam_dampening, cg_iters=args.cg_iter_num,
        cg_solver=args.cg_solver, upper_plain_grad_scale=args.upper_plain_grad_scale,
        grad_clip=args.grad_clip, lower_steps_per_alternation=args.lower_num_iter,
        upper_steps_per_alternation=upper_steps, alternations=args.epochs,
        ma_decay=args.p_ma_decay, ma_use_scheduler=bool(args.p_ma_use_scheduler), cg_verbose=bool(args.cg_verbose),
        upper_level=bool(args.upper_level), hvp_precision=args.hvp_precision,
    )
    return BisslTrainer(lower_model, upper_backbone, head, criterion, lower_optimizer, lower_scheduler,
                        upper_optimizer, upper_scheduler, settings, env.device, dtype, upper_task=upper_task)


def warm_up_head(args: argparse.Namespace, env: DistEnv, trainer: BisslTrainer, data: BisslData,
                 writer: MetricsWriter) -> None:
    """--d-linear-warmup-epochs passes of SGD on the head alone (none without an upper level)."""
    warmup_steps = args.d_linear_warmup_epochs * data.upper_stream.batches_per_pass
    warmup_optimizer = torch.optim.SGD(trainer.head_params, lr=args.d_linear_warmup_lr or args.d_lr,
                                       momentum=args.d_momentum, weight_decay=args.d_wd)
    if args.upper_level:
        trainer.warmup_head(data.upper_stream, warmup_steps, warmup_optimizer, writer, env.is_main,
                            update_bn_statistics=bool(args.d_linear_warmup_update_bn))


# --------------------------------------------------------------------------------------------
# Checkpoint: save after every alternation, resume from the last
# --------------------------------------------------------------------------------------------


class BisslCheckpoint:
    """``<run dir>/checkpoint.pth``: the trainer, both streams' positions, every rank's RNG state,
    the history, the args and the content hashes of the input weight files."""

    REQUIRED_KEYS = ("trainer", "alternation", "history", "lower_stream", "upper_stream", "rng", "args")

    def __init__(self, path: Path, args: argparse.Namespace, env: DistEnv, trainer: BisslTrainer, data: BisslData) -> None:
        self.path, self.args, self.env, self.trainer, self.data = path, args, env, trainer, data
        # What a resumed run must have started from: the content of every input weights file.
        self.inputs = {f"content of {flag}": ckpt.file_sha256(path) for flag, path in pretext_weight_files(args).items()}
        self.models = {"lower model": trainer.lower_model, "upper backbone": trainer.upper_backbone, "head": trainer.head}

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, alternation: int, history: list[dict]) -> None:
        """Collective: every rank stops together if any model diverged or the ranks drifted apart."""
        ckpt.check_healthy(self.models, f"by alternation {alternation}", cfg.MAX_TENSOR_RMS, cfg.MAX_BUFFER_RMS)
        check_ranks_identical(self.models, f"after alternation {alternation}")
        rng_states = ckpt.all_rank_rng_states()
        if self.env.is_main:
            ckpt.save_atomic({"trainer": self.trainer.state_dict(), "alternation": alternation, "history": history,
                              "lower_stream": self.data.lower_stream.state_dict(),
                              "upper_stream": self.data.upper_stream.state_dict(),
                              "rng": rng_states, "args": vars(self.args), "inputs": self.inputs}, self.path)
        barrier()

    def resume(self, parser: argparse.ArgumentParser) -> tuple[int, list[dict]]:
        """Restore everything saved, refusing changed settings; returns (alternations done, history)."""
        state = ckpt.load_checkpoint(self.path, self.REQUIRED_KEYS)
        check_settings_unchanged(self.path.parent, changed_settings(state["args"], self.args, parser,
                                                                    saved_inputs=state.get("inputs"), inputs=self.inputs))
        self.trainer.load_state_dict(state["trainer"])
        self.data.lower_stream.load_state_dict(state["lower_stream"])
        self.data.upper_stream.load_state_dict(state["upper_stream"])
        ckpt.restore_rank_rng_state(state["rng"], self.env.rank, self.env.world_size)
        logger.info("resumed from %s after %d alternations", self.path, state["alternation"])
        check_ranks_identical(self.models, "after resuming")
        return state["alternation"], state["history"]


# --------------------------------------------------------------------------------------------
# One alternation with its measurements
# --------------------------------------------------------------------------------------------


def run_alternation(args: argparse.Namespace, env: DistEnv, trainer: BisslTrainer, data: BisslData, alternation: int,
                    dtype: torch.dtype | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Alternation ``alternation`` (0-based) with the curvature probe, kNN alignment and val evaluation when due.

    Returns (metrics for the history, throughput metrics that are logged only): samples of both
    levels (all ranks) per second of lower + upper steps, and the share of that time spent waiting
    for data.
    """
    streams = data.training_streams
    started, read, waited = time.perf_counter(), sum(s.samples_read for s in streams), sum(s.wait_s for s in streams)
    metrics = trainer.alternation(data.lower_stream, data.upper_stream)
    elapsed = time.perf_counter() - started
    throughput = {"throughput/images_per_s": (sum(s.samples_read for s in streams) - read) * env.world_size / elapsed,
                  "throughput/data_wait_frac": (sum(s.wait_s for s in streams) - waited) / elapsed,
                  **peak_memory_metrics(env.device, "throughput/")}
    if data.probe_stream is not None and (alternation + 1) % args.curvature_every == 0:
        report = probe_next_batch(trainer.lower_model, data.probe_stream, args.curvature_iters,
                                  args.lam + args.cg_lam_dampening, env.device, seed=args.seed + alternation)
        metrics.update(report.metrics())
    if data.knn_alignment is not None and data.knn_alignment.due(alternation + 1):
        metrics.update(data.knn_alignment.measure(trainer.lower_model.backbone, trainer.upper_backbone, env.device, dtype))
    if args.upper_level and trainer.upper_task is not None:  # detection: AP50 (%) of θ_D with φ
        metrics.update({f"val/{key}": value for key, value in trainer.upper_task.evaluate(data.val_loader, env.device, dtype).items()})
    elif args.upper_level:  # without one the downstream model never changes: nothing to evaluate
        downstream_model = nn.Sequential(trainer.upper_backbone, trainer.head)
        if data.recalibration_loader is not None:  # evaluate a copy with re-estimated BN statistics
            downstream_model = recalibrated_copy(downstream_model, data.recalibration_loader, env.device)
        scores = evaluate(downstream_model, data.val_loader, env.device, data.splits.multilabel, dtype)
        metrics.update({f"val/{key}": value for key, value in scores.items()})
    return metrics, throughput


def log_start_alignment(env: DistEnv, trainer: BisslTrainer, data: BisslData, writer: MetricsWriter,
                        dtype: torch.dtype | None) -> None:
    """With --lower-knn-every: both backbones' kNN top-1 before the first alternation (the pre-trained
    backbone's), logged as alternation 0 (metrics file only; the history holds alternations 1..T)."""
    if data.knn_alignment is not None:
        scores = data.knn_alignment.measure(trainer.lower_model.backbone, trainer.upper_backbone, env.device, dtype)
        writer.log({**scores, "alternation": 0}, 0)


def progress_postfix(metrics: dict[str, Any], throughput: dict[str, float], multilabel: bool) -> dict[str, str]:
    """The numbers the progress bar shows after an alternation."""
    main_score = "val/ap50" if "val/ap50" in metrics else "val/map" if multilabel else "val/top1"
    return dict(lower=f"{metrics['lower/loss']:.3f}", upper=f"{metrics.get('upper/loss', math.nan):.3f}",
                val=f"{metrics.get(main_score, math.nan):.1f}", dist=f"{metrics['distance']:.3g}",
                img_s=f"{throughput['throughput/images_per_s']:.0f}")
