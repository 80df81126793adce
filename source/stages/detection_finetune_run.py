"""``fine-tuning.py`` on a detection dataset (``--dset voc0712det`` or ``fmnistdet``): data, one trial, the sweep.

The classification sweep runs whole trials side by side, one per process
(:mod:`source.stages.finetune_run`). A detection trial is too large for that: every trial runs on
all ranks together, data-parallel with the global ``--batch-size``
(:func:`source.stages.detection_finetune.fine_tune_detector`), and the trials run one after the
other. The sweep's other rules are the classification ones: trial ``i`` is
``make_trial(i, --seed, ...)``, rank 0 appends its row to ``results.jsonl`` when it ends, a rerun
of the same command runs only the trials without a row, and the summary and ``source.tools.compare``
read the rows (score ``ap50``: VOC2007 AP50 in %; ``best_val`` on val, ``test_final`` /
``test_best`` on the VOC2007 test set). A detection trial also writes a checkpoint after every
epoch (``trials/trial-<i>/checkpoint.pth``, removed once its row is written), so a killed sweep
continues the trial it was in from its last epoch instead of starting it over.

The paper's detection grid is the default for these datasets (the ``detection=`` defaults of
``config_default.FinetuneConfig``, filled in by the parser when a flag is not given).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from source.data import DatasetNotFoundError, subsample
from source.data.detection import DetectionSplits, build_detection_splits
from source.run import checkpoint as ckpt
from source.run.distributed import DistEnv, barrier, broadcast_object, seed_everything
from source.run.errors import ConfigError, MissingInputError
from source.run.tracking import MetricsWriter
from source.stages.detection_finetune import (
    DETECTION_SCORE,
    DetectorSettings,
    build_detector,
    fine_tune_detector,
    parse_anchor_sizes,
)
from source.stages.finetune_run import log_trial, missing_backbone_file, trial_weights_prefix
from source.stages.hpo import ResultsFile, Trial, make_trial, pending_trials

logger = logging.getLogger("fine-tuning")

__all__ = [
    "DetectionData", "load_detection_data", "detector_settings", "trial_checkpoint_path", "run_detection_trial",
    "run_detection_sweep",
]


@dataclass
class DetectionData:
    """The detection splits and the (capped) sets every trial trains and scores on (as ``FinetuneData``)."""

    splits: DetectionSplits
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset


def load_detection_data(args: argparse.Namespace) -> DetectionData:
    """train / val / test of ``--dset`` under ``--data-dir``, capped by ``--max-train-samples`` /
    ``--max-eval-samples`` (a seeded choice of images); a missing dataset and a missing backbone
    file are reported together."""
    problems = missing_backbone_file(args)
    splits = None
    try:
        splits = build_detection_splits(args.dset, Path(args.data_dir), flip_probability=args.det_flip,
                                        download=bool(args.download_dataset))
    except DatasetNotFoundError as error:
        problems.append(str(error))
    if problems:
        raise MissingInputError("fine-tuning cannot start:\n  - " + "\n  - ".join(problems))
    train_set = subsample(splits.train, args.max_train_samples or None, seed=args.seed, stratify=False)
    val_set = subsample(splits.val, args.max_eval_samples or None, seed=args.seed, stratify=False)
    test_set = subsample(splits.test, args.max_eval_samples or None, seed=args.seed, stratify=False)
    if len(train_set) < args.batch_size:
        raise ConfigError(f"the train split has {len(train_set)} images, fewer than one batch (--batch-size {args.batch_size})")
    return DetectionData(splits, train_set, val_set, test_set)


def detector_settings(args: argparse.Namespace) -> DetectorSettings:
    """The detector of a trial: the backbone's architecture from ``--pretrain-arch`` /
    ``--pretrain-cifar-stem``, head, image sizes, anchors and BN from the ``--det-*`` flags."""
    return DetectorSettings(arch=args.pretrain_arch, cifar_stem=bool(args.pretrain_cifar_stem), head=args.det_head,
                            min_size=args.det_min_size, max_size=args.det_max_size,
                            anchor_sizes=parse_anchor_sizes(args.det_anchor_sizes), frozen_batch_norm=bool(args.det_frozen_bn),
                            extra={"box_batch_size_per_image": args.det_rois_per_image,
                                   "rpn_post_nms_top_n_test": args.det_test_proposals})


def trial_checkpoint_path(run_dir: Path, index: int) -> Path:
    """Where trial ``index`` keeps its per-epoch checkpoint."""
    return Path(run_dir) / "trials" / f"trial-{index:04d}" / "checkpoint.pth"


def run_detection_trial(
    args: argparse.Namespace, env: DistEnv, trial: Trial, pretrained: dict[str, Tensor], data: DetectionData,
    dtype: torch.dtype | None, run_dir: Path, settings: DetectorSettings,
) -> dict:
    """Train and score one trial on every rank together; returns its results row (the same on every rank)."""
    started = time.perf_counter()
    # The heads start from the trial seed on every rank (DDP would copy rank 0's anyway), so a
    # trial's result does not depend on the world size's seeding.
    seed_everything(trial.seed)
    model = build_detector(pretrained, data.splits.num_classes, settings, env.device, env.distributed)
    checkpoint = trial_checkpoint_path(run_dir, trial.index)
    trial_dir = checkpoint.parent
    if env.is_main and not checkpoint.is_file():
        # A trial killed before its first checkpoint starts over: its old per-epoch log and wandb run go.
        for stale in ("metrics.jsonl", "wandb_id.txt"):
            (trial_dir / stale).unlink(missing_ok=True)
    barrier()
    writer = MetricsWriter(trial_dir, env.is_main, {**vars(args), "trial": trial.index, "trial_seed": trial.seed,
                                                    "trial_lr": trial.lr, "trial_wd": trial.wd},
                           args.wandb_project, args.wandb_mode)

    def save_final(final_model: nn.Module) -> None:
        if env.is_main:
            path = Path(args.model_dir) / f"{trial_weights_prefix(args)}{trial.index}_detector.pth"
            ckpt.save_atomic(final_model.state_dict(), path)

    try:
        result = fine_tune_detector(
            model, data.train_set, data.val_set, data.test_set, num_classes=data.splits.num_classes, lr=trial.lr,
            wd=trial.wd, momentum=args.optimizer_momentum, epochs=args.epochs, batch_size=args.batch_size,
            seed=trial.seed, device=env.device, amp_dtype=dtype, checkpoint_path=checkpoint,
            num_workers=args.num_workers, prefetch_factor=args.prefetch_factor, show_progress=env.is_main,
            description=f"trial {trial.index} (lr {trial.lr:g}, wd {trial.wd:g})",
            on_epoch=lambda metrics: writer.log(metrics, step=int(metrics["epoch"])),
            on_final_model=save_final if args.save_model else None,
        )
    finally:
        writer.close()
    return {"trial": trial.index, "seed": trial.seed, "lr": trial.lr, "wd": trial.wd, **result.row(),
            "time_s": round(time.perf_counter() - started, 2), "metric": DETECTION_SCORE, "epochs": args.epochs,
            "world_size": env.world_size}


def run_detection_sweep(
    args: argparse.Namespace, env: DistEnv, results: ResultsFile, run_dir: Path, pretrained: dict[str, Tensor],
    data: DetectionData, dtype: torch.dtype | None, settings: DetectorSettings | None = None,
) -> None:
    """Run every trial of ``range(--num-runs)`` that has no results row, one after the other on all
    ranks; rank 0 appends each row and then removes the trial's checkpoint."""
    settings = settings or detector_settings(args)
    # Rank 0 reads the finished trials and sends them to all, so every rank runs the same list.
    finished = broadcast_object(results.finished_trials() if env.is_main else None)
    pending = pending_trials(args.num_runs, finished)
    logger.info("%s: %d of %d trials already done; %d to run, each on all %d processes", run_dir,
                args.num_runs - len(pending), args.num_runs, len(pending), env.world_size)
    for index in pending:
        trial = make_trial(index, args.seed, bool(args.use_hpo), args.lr, args.wd,
                           (args.hpo_lr_min, args.hpo_lr_max), (args.hpo_wd_min, args.hpo_wd_max))
        row = run_detection_trial(args, env, trial, pretrained, data, dtype, run_dir, settings)
        if env.is_main:
            results.append(row)
            # Only after the row: a kill in between leaves a stale checkpoint, never a trial without row or checkpoint.
            trial_checkpoint_path(run_dir, index).unlink(missing_ok=True)
            log_trial(env, trial, row, DETECTION_SCORE)
        barrier()
