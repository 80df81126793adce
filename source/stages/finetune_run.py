"""The building blocks of ``fine-tuning.py``: inputs, data, one trial, the sweep's bookkeeping and report.

``fine-tuning.py``'s ``main`` wires these together (load the data and backbone, check the run
directory, run this rank's share of the pending trials, report); :func:`source.stages.finetune.fine_tune`
trains one model. Each trial seeds everything from its own seed, so its result does not depend on
the rank that runs it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from source.data import (
    DatasetNotFoundError,
    DownstreamSplits,
    build_downstream_splits,
    downstream_test_transform,
    subsample,
)
from source.data.transforms import downstream_train_view
from source.maths.models import Classifier, build_backbone
from source.run import checkpoint as ckpt
from source.run.distributed import DistEnv, broadcast_object, gather_objects, seed_everything
from source.run.errors import ConfigError, MissingInputError
from source.run.runtime import changed_settings, check_settings_unchanged
from source.run.signals import STOP
from source.run.state_dict import WeightsError
from source.run.tracking import MetricsWriter
from source.stages.engine import compile_modules, memory_format
from source.stages.evaluation import METRIC_LABELS
from source.stages.finetune import STATUS_OK, fine_tune, score_name
from source.stages.finetune_data import serve_splits, trial_train_loader
from source.stages.hpo import ResultsFile, Trial, pending_trials, plot_hpo_grid, shard_trials, summary_table

# The script's own logger names, so its messages read as before the code moved here.
logger = logging.getLogger("fine-tuning")
# One line per finished trial from EVERY rank: this logger is set to INFO on all ranks, while
# the other loggers of non-main ranks only show warnings.
trial_logger = logging.getLogger("fine-tuning.trials")

# Ranks that finish their share of trials early wait for the others, possibly for hours; the
# default process group would abort that wait after its 30-minute timeout.
END_OF_SWEEP_TIMEOUT = datetime.timedelta(days=7)

# Flags that may change between reruns of a sweep without changing any trial: --num-runs (a
# rerun with a larger value extends the sweep) and the (lr, wd) flags of the mode NOT in use.
# Every other flag (see source.run.runtime.RESULT_NEUTRAL_FLAGS) must match the results file's.
EXTENSIBLE_FLAGS = ("num_runs",)
HPO_FLAGS = ("hpo_lr_min", "hpo_lr_max", "hpo_wd_min", "hpo_wd_max")
SEED_RUN_FLAGS = ("lr", "wd")
BACKBONE_IDENTITY = "content of --pretrained-backbone-filename"
# A trial's checkpoint, written when a stop signal ends it mid-way, in its folder under trials/.
TRIAL_CHECKPOINT = "checkpoint.pth"


def backbone_stem(args: argparse.Namespace) -> str:
    """The backbone file's name without its suffix, part of every output name."""
    return Path(args.pretrained_backbone_filename).stem


def run_name(args: argparse.Namespace) -> str:
    """The run directory's name: origin, backbone, dataset and mode (HPO grid or seeds)."""
    mode = "hpo" if args.use_hpo else "seeds"
    return f"finetune_{args.backbone_origin}_{backbone_stem(args)}_dset-{args.dset}_{mode}"


def missing_backbone_file(args: argparse.Namespace) -> list[str]:
    """The problem with ``--pretrained-backbone-filename``, if its file is missing (a list, so a
    missing dataset can be reported in the same message)."""
    weights_path = Path(args.model_dir) / args.pretrained_backbone_filename
    if weights_path.is_file():
        return []
    return [f"backbone weights not found: {weights_path} (check --model-dir and --pretrained-backbone-filename)"]


def load_splits(args: argparse.Namespace) -> DownstreamSplits:
    """The downstream splits; a missing dataset and a missing backbone file are reported together."""
    problems = missing_backbone_file(args)
    splits = None
    try:
        splits = build_downstream_splits(
            args.dset, Path(args.data_dir), downstream_train_view(args.pretrain_img_size, args.pretrain_img_crop_min_ratio, bool(args.crop_as_original)),
            downstream_test_transform(args.pretrain_img_size), download=bool(args.download_dataset),
            split_seed=args.seed, val_fraction=args.val_fraction,
        )
    except DatasetNotFoundError as error:
        problems.append(str(error))
    if problems:
        raise MissingInputError("fine-tuning cannot start:\n  - " + "\n  - ".join(problems))
    return splits


def load_pretrained_backbone(args: argparse.Namespace) -> dict[str, Tensor]:
    """The backbone state_dict from ``--model-dir``, checked strictly against ``--pretrain-arch``/``--pretrain-cifar-stem``."""
    backbone, _ = build_backbone(args.pretrain_arch, cifar_stem=bool(args.pretrain_cifar_stem))
    ckpt.load_weights(backbone, Path(args.model_dir) / args.pretrained_backbone_filename, f"{args.backbone_origin} backbone",
                      flags="--pretrain-arch / --pretrain-cifar-stem")
    return backbone.state_dict()


def check_run_config(args: argparse.Namespace, run_dir: Path, inputs: dict[str, str],
                     parser: argparse.ArgumentParser) -> None:
    """Refuse to continue a results file whose trials were computed with other settings or from
    another backbone file (its content hash), so two backbones' trials never share a table."""
    path = run_dir / "config.json"
    if not args.resume or not path.is_file():
        return
    saved = json.loads(path.read_text())
    unused = SEED_RUN_FLAGS if args.use_hpo else HPO_FLAGS
    changes = changed_settings(saved, args, parser, may_change=EXTENSIBLE_FLAGS + unused,
                               saved_inputs=saved.get("inputs"), inputs=inputs)
    check_settings_unchanged(run_dir, changes)


def prepare_run_dir(args: argparse.Namespace, run_dir: Path, inputs: dict[str, str]) -> None:
    """Rank 0: record the settings and the backbone's identity (an earlier run was already moved
    aside by ``open_run_dir`` with ``--resume 0``)."""
    if not (run_dir / "config.json").is_file():
        ckpt.write_json_atomic({**vars(args), "inputs": inputs}, run_dir / "config.json")


def eval_loader(dataset: Dataset, args: argparse.Namespace, device: torch.device, persistent: bool) -> DataLoader:
    """An unshuffled loader of --batch-size over ``dataset`` (every sample once, in order)."""
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and args.num_workers > 0,
                      prefetch_factor=args.prefetch_factor if args.num_workers > 0 else None)


def trial_model(args: argparse.Namespace, device: torch.device, pretrained: dict[str, Tensor],
                num_classes: int) -> tuple[Classifier, torch.memory_format]:
    """A trial's classifier (the pretrained backbone + a fresh linear head from the global RNG) on
    ``device`` in the memory format of ``--channels-last``, compiled with ``--compile 1``; and that
    format, which the input batches take too."""
    backbone, feat_dim = build_backbone(args.pretrain_arch, cifar_stem=bool(args.pretrain_cifar_stem))
    backbone.load_state_dict(pretrained)
    layout = memory_format(args.channels_last, device)
    model = Classifier(backbone, feat_dim, num_classes).to(device, memory_format=layout)
    compile_modules(bool(args.compile), device, model)
    return model, layout


def run_trial(
    args: argparse.Namespace, env: DistEnv, trial: Trial, pretrained: dict[str, Tensor], train_set: Dataset,
    val_loader: DataLoader, test_loader: DataLoader, splits: DownstreamSplits, dtype: torch.dtype | None, run_dir: Path,
) -> dict:
    """Train and score one trial in this process; returns its results row."""
    started = time.perf_counter()
    # Everything random in the trial (head init, shuffling, augmentation) follows the trial seed
    # alone, so a trial gives the same result whichever rank runs it.
    seed_everything(trial.seed)
    model, layout = trial_model(args, env.device, pretrained, splits.num_classes)
    train_loader = trial_train_loader(args, env, train_set, trial.seed)

    # A rerun of a trial that was killed starts over: its old per-epoch log and wandb run go. One that
    # a stop signal checkpointed (fine_tune: with a SeededEpochs train loader) continues: they stay.
    trial_dir = run_dir / "trials" / f"trial-{trial.index:04d}"
    if not (trial_dir / TRIAL_CHECKPOINT).is_file():
        for stale in ("metrics.jsonl", "wandb_id.txt"):
            (trial_dir / stale).unlink(missing_ok=True)
    writer = MetricsWriter(trial_dir, True, {**vars(args), "trial": trial.index, "trial_seed": trial.seed,
                                             "trial_lr": trial.lr, "trial_wd": trial.wd},
                           args.wandb_project, args.wandb_mode)

    def save_final(final_model: nn.Module) -> None:
        prefix = f"{trial_weights_prefix(args)}{trial.index}"
        ckpt.save_atomic(final_model.backbone.state_dict(), Path(args.model_dir) / f"{prefix}_bb.pth")
        ckpt.save_atomic(final_model.head.state_dict(), Path(args.model_dir) / f"{prefix}_head.pth")

    STOP.watch_folders(trial_dir)  # a second signal during the trial checkpoint's save removes its temporary file
    try:
        result = fine_tune(
            model, train_loader, val_loader, test_loader, lr=trial.lr, wd=trial.wd, momentum=args.optimizer_momentum,
            epochs=args.epochs, device=env.device, amp_dtype=dtype, multilabel=splits.multilabel,
            multilabel_loss=args.multilabel_loss,
            show_progress=env.is_main, description=f"trial {trial.index} (lr {trial.lr:g}, wd {trial.wd:g})",
            on_epoch=lambda metrics: writer.log(metrics, step=int(metrics["epoch"])),
            on_final_model=save_final if args.save_model else None, layout=layout,
            stop=lambda: STOP.requested,  # trials do not communicate: each rank stops its own
            checkpoint_path=trial_dir / TRIAL_CHECKPOINT,
        )
    finally:
        writer.close()
    return {"trial": trial.index, "seed": trial.seed, "lr": trial.lr, "wd": trial.wd, **result.row(),
            "time_s": round(time.perf_counter() - started, 2), "metric": score_name(splits.multilabel),
            "epochs": args.epochs, "rank": env.rank}


def report(args: argparse.Namespace, run_dir: Path, rows: list[dict], metric: str) -> str:
    """The summary of this command's trials (``range(--num-runs)``); failed trials are listed apart."""
    rows = [row for row in rows if int(row["trial"]) < args.num_runs]
    succeeded = [row for row in rows if row.get("status", STATUS_OK) == STATUS_OK]
    failed = [row for row in rows if row.get("status", STATUS_OK) != STATUS_OK]
    label = METRIC_LABELS.get(metric, metric)
    lines = [f"{run_dir}: {len(rows)} of {args.num_runs} trials done, {len(failed)} failed",
             summary_table(succeeded, bool(args.use_hpo), label)]
    for row in sorted(failed, key=lambda row: row["trial"]):
        lines.append(f"failed: trial {row['trial']} (lr {row['lr']:g}, wd {row['wd']:g}): {row.get('error', 'unknown')}")
    if args.use_hpo and succeeded:
        plot_hpo_grid(succeeded, run_dir / "hpo_grid.png", label)
        lines.append(f"grid plot: {run_dir / 'hpo_grid.png'}")
    text = "\n".join(lines)
    ckpt.write_text_atomic(text + "\n", run_dir / "summary.txt")
    return text


def format_score(value: float | None) -> str:
    """A score with two decimals, '-' when there is none."""
    return "-" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------------------------
# Inputs of the sweep
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneData:
    """The downstream splits and the (capped) sets every trial trains and scores on."""

    splits: DownstreamSplits
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset


def load_data(args: argparse.Namespace) -> FinetuneData:
    """The splits (before the weights, so a missing dataset and missing weights are named together),
    capped by --max-train-samples / --max-eval-samples."""
    splits = load_splits(args)
    train_set = subsample(splits.train, args.max_train_samples or None, seed=args.seed, stratify=True)
    val_set = subsample(splits.val, args.max_eval_samples or None, seed=args.seed, stratify=True)
    test_set = subsample(splits.test, args.max_eval_samples or None, seed=args.seed, stratify=True)
    train_set, val_set, test_set = serve_splits(args, train_set, val_set, test_set)  # --decode-cache
    if len(train_set) < args.batch_size:
        raise ConfigError(f"the train split has {len(train_set)} images, fewer than one batch (--batch-size {args.batch_size})")
    return FinetuneData(splits, train_set, val_set, test_set)


def backbone_identity(args: argparse.Namespace) -> dict[str, str]:
    """The content hash of the backbone file, the same on every rank (else the ranks disagree)."""
    inputs = {BACKBONE_IDENTITY: ckpt.file_sha256(Path(args.model_dir) / args.pretrained_backbone_filename)}
    if len(set(gather_objects(inputs[BACKBONE_IDENTITY]))) > 1:  # e.g. nodes with different copies of the file
        raise WeightsError(f"the ranks read different {args.pretrained_backbone_filename} files (content differs); "
                           "every rank must fine-tune the same backbone")
    return inputs


def trial_weights_prefix(args: argparse.Namespace) -> str:
    """Start of the names of the fine-tuned weights ``--save-model 1`` writes to --model-dir."""
    return f"finetuned_{args.backbone_origin}_{backbone_stem(args)}_dset-{args.dset}_trial-"


def my_pending_trials(args: argparse.Namespace, env: DistEnv, results: ResultsFile, run_dir: Path) -> list[int]:
    """The trials without a results row that this rank runs.

    Rank 0 reads the finished trials and sends them to all, so every rank shards the same list
    (and no rank can see a row that another one appended in the meantime).
    """
    finished = broadcast_object(results.finished_trials() if env.is_main else None)
    pending = pending_trials(args.num_runs, finished)
    mine = shard_trials(pending, env.rank, env.world_size)
    logger.info("%s: %d of %d trials already done; %d to run over %d processes",
                run_dir, args.num_runs - len(pending), args.num_runs, len(pending), env.world_size)
    return mine


def log_trial(env: DistEnv, trial: Trial, row: dict, metric: str) -> None:
    """One line per finished trial, from the rank that ran it."""
    trial_logger.info(
        "[rank %d] trial %d (lr %g, wd %g, seed %d) %s in %.0fs: best val %s %s at epoch %s, test %s (final) / %s (best)%s",
        env.rank, trial.index, trial.lr, trial.wd, trial.seed, row["status"], row["time_s"], metric,
        format_score(row["best_val"]), row["best_epoch"] or "-", format_score(row["test_final"]),
        format_score(row["test_best"]), f": {row['error']}" if "error" in row else "",
    )


def finish_sweep(args: argparse.Namespace, env: DistEnv, run_dir: Path, results: ResultsFile, metric: str) -> str | None:
    """Rank 0 prints and writes the report; returns why the sweep failed (every trial failed), or None."""
    if not env.is_main:
        return None
    rows = [row for row in results.rows() if int(row["trial"]) < args.num_runs]
    print(report(args, run_dir, rows, metric), flush=True)
    if rows and all(row.get("status", STATUS_OK) != STATUS_OK for row in rows):
        return (f"every one of the {len(rows)} finished trials failed (see {run_dir / 'summary.txt'}); "
                "no result to report")
    return None
