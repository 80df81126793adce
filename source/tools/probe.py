"""Probe a frozen backbone in minutes: weighted kNN and a linear classifier on its features.

    python -m source.tools.probe --arch resnet50 --backbone-filename pretext_simclr_arch-resnet50_bb.pth --dset pets
    torchrun --nproc-per-node 4 -m source.tools.probe --arch resnet50 --backbone-filename ... --dset pets --recalibrate-bn 1

The backbone embeds the downstream train, val and test splits (deterministic resize + centre
crop, the fine-tuning evaluation transform; no augmentation). Then, on those features:

- kNN (Wu et al., 2018; the protocol of DINO and solo-learn): cosine similarity to the train
  features, the k = 20 nearest vote for their class with weight exp(cos / T), T = 0.07;
- linear probe: multinomial logistic regression on standardised features, fitted full-batch with
  L-BFGS for each ``--linear-wd``; the penalty with the best val top-1 is reported on test.

Both report top-1 on val and test. Under torchrun the images are split over the processes
(each sample embedded exactly once, :class:`~source.stages.evaluation.ShardedEvalSampler`) and the
features gathered; the classifiers then run on rank 0 (they take seconds). Features are cached
under ``--cache-dir``, keyed by the SHA-256 of the backbone file and every data setting, so a
second probe of the same backbone (other k, other penalties) skips the forward passes.

``--recalibrate-bn 1`` first re-estimates every BatchNorm's running mean and variance on the
train split (equal-weight average over batches, then over ranks). Nothing else changes. The
published weights need it: their statistics belong to the original code's pretext inputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import config_default as cfg
from source.data import MULTILABEL_DATASETS, build_downstream_splits, downstream_test_transform, subsample
from source.maths.models import build_backbone
from source.run import checkpoint as ckpt
from source.run.cli import build_parser, number_list
from source.run.distributed import broadcast_object, cleanup_distributed
from source.run.errors import ConfigError, MissingInputError, run_entry_point
from source.run.runtime import amp_dtype, run_directory, start
from source.stages.engine import memory_format
from source.stages.evaluation import sharded_eval_loader
from source.stages.features import extract_features, knn_scores, recalibrate_batchnorm, top1

logger = logging.getLogger("probe")

# Bump when what the cached features mean changes (transform, extraction), so old caches are not reused.
FEATURE_CACHE_VERSION = 1
SPLITS = ("train", "val", "test")


# General flags the probe has no use for: it logs no training steps and has nothing to resume.
UNUSED_GENERAL_FLAGS = ("log_every", "wandb_project", "wandb_mode", "resume", "compile")


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(__doc__, [(cfg.GeneralConfig, "general"), (cfg.ProbeConfig, "probe")],
                        exclude=UNUSED_GENERAL_FLAGS)


# --- classifiers -------------------------------------------------------------------------


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, wd: float, max_iter: int = 300) -> nn.Module:
    """Multinomial logistic regression on frozen features (N, D): minimise
    mean CE(W z + b, y) + (wd / 2) ||W||^2 with z = (x - mean) / std of the train features,
    full batch with L-BFGS from W = 0 (so the result is deterministic). Returns x -> logits (N, C)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    linear = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    inputs = (features - mean) / std
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(inputs), labels) + 0.5 * wd * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return nn.Sequential(_Standardize(mean, std), linear).requires_grad_(False)


class _Standardize(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def probe_features(features: dict[str, tuple[Tensor, Tensor]], num_classes: int, k: int, temperature: float,
                   penalties: list[float], max_iter: int) -> dict[str, float]:
    """kNN and linear-probe top-1 (%) on val and test from cached ``{split: (features, labels)}``."""
    train_x, train_y = features["train"]
    results: dict[str, float] = {}
    for split in ("val", "test"):
        x, y = features[split]
        results[f"knn_{split}_top1"] = top1(knn_scores(train_x, train_y, x, num_classes, k, temperature), y)
    best = None
    for wd in penalties:
        probe = fit_linear_probe(train_x, train_y, num_classes, wd, max_iter)
        val = top1(probe(features["val"][0]), features["val"][1])
        logger.info("linear probe wd %g: val top-1 %.2f", wd, val)
        if best is None or val > best[0]:
            best = (val, wd, probe)
    val, wd, probe = best
    results.update(linear_val_top1=val, linear_wd=wd, linear_test_top1=top1(probe(features["test"][0]), features["test"][1]))
    return results


# --- cache -------------------------------------------------------------------------------


def cache_settings(args: argparse.Namespace, weights_hash: str, world_size: int) -> dict:
    """Everything the cached features depend on."""
    settings = {
        "version": FEATURE_CACHE_VERSION, "weights_sha256": weights_hash, "arch": args.arch, "cifar_stem": args.cifar_stem,
        "img_size": args.img_size, "dset": args.dset, "data_dir": str(Path(args.data_dir).resolve()), "seed": args.seed,
        "val_fraction": args.val_fraction, "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples, "recalibrate_bn": args.recalibrate_bn,
    }
    if args.recalibrate_bn:  # BN batches (so the statistics) depend on how the split is sharded
        settings.update(world_size=world_size, batch_size=args.batch_size)
    return settings


def cache_path(args: argparse.Namespace, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(args.cache_dir) if args.cache_dir else Path(args.model_dir) / "probe_cache"
    return folder / f"{Path(args.backbone_filename).stem}_dset-{args.dset}_{key}.pth"


# --- script ------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> list[float]:
    """What the parser's per-flag bounds cannot check; returns the linear probe's penalties."""
    if args.dset in MULTILABEL_DATASETS:
        raise ConfigError(f"--dset {args.dset} is multi-label; the probe scores single-label top-1 only")
    return number_list(args.linear_wd, "--linear-wd")


def main(args: argparse.Namespace) -> dict[str, float] | None:
    penalties = check_args(args)
    env = start(args)
    started = time.perf_counter()
    transform = downstream_test_transform(args.img_size)
    splits = build_downstream_splits(args.dset, Path(args.data_dir), transform, transform, download=bool(args.download_dataset),
                                     split_seed=args.seed, val_fraction=args.val_fraction)
    datasets: dict[str, Dataset] = {
        "train": subsample(splits.train, args.max_train_samples or None, seed=args.seed, stratify=True),
        "val": subsample(splits.val, args.max_eval_samples or None, seed=args.seed, stratify=True),
        "test": subsample(splits.test, args.max_eval_samples or None, seed=args.seed, stratify=True),
    }
    weights_path = Path(args.model_dir) / args.backbone_filename
    if not weights_path.is_file():
        raise MissingInputError(f"backbone weights not found: {weights_path} (check --model-dir and --backbone-filename)")
    settings = broadcast_object(cache_settings(args, ckpt.file_sha256(weights_path), env.world_size) if env.is_main else None)
    cache = cache_path(args, settings)
    cached = broadcast_object(cache.is_file() if env.is_main else None)

    if cached:
        logger.info("features from the cache %s", cache)
        stored = ckpt.load_file(cache) if env.is_main else {}
        features = {split: (stored[f"{split}_features"], stored[f"{split}_labels"]) for split in SPLITS} if env.is_main else {}
    else:
        backbone, _ = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem))
        ckpt.load_weights(backbone, weights_path, "probe backbone", flags="--arch / --cifar-stem")
        layout = memory_format(args.channels_last, env.device)  # conv outputs follow the weights' layout
        backbone.to(env.device, memory_format=layout)

        def loader(dataset: Dataset) -> DataLoader:
            return sharded_eval_loader(dataset, args.batch_size, num_workers=args.num_workers,
                                       pin_memory=env.device.type == "cuda", prefetch_factor=args.prefetch_factor)

        if args.recalibrate_bn:
            batches = recalibrate_batchnorm(backbone, loader(datasets["train"]), env.device, layout)
            logger.info("BatchNorm statistics re-estimated on %d train batches", batches)
        dtype = amp_dtype(args.amp, env.device)
        features = {split: extract_features(backbone, loader(datasets[split]), env.device, dtype, layout)
                    for split in SPLITS}
        if env.is_main:
            stored = {f"{split}_{kind}": tensor for split, pair in features.items() for kind, tensor in zip(("features", "labels"), pair)}
            ckpt.save_atomic({**stored, "settings": json.dumps(settings, sort_keys=True)}, cache)
            logger.info("features cached in %s", cache)

    results = None
    if env.is_main:
        results = probe_features(features, splits.num_classes, args.knn_k, args.knn_temperature, penalties, args.linear_max_iter)
        sizes = {split: len(datasets[split]) for split in SPLITS}
        results.update({f"num_{split}": size for split, size in sizes.items()}, time_s=round(time.perf_counter() - started, 1))
        run_dir = run_directory(args, f"probe_{Path(args.backbone_filename).stem}_dset-{args.dset}")
        ckpt.write_json_atomic({"args": vars(args), "results": results, "feature_cache": str(cache)}, run_dir / "probe.json")
        knn_label, linear_label = f"kNN (k={args.knn_k}, T={args.knn_temperature:g})", f"linear (wd={results['linear_wd']:g})"
        width = max(len(knn_label), len(linear_label))
        print(
            f"{args.backbone_filename} on {args.dset} ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test, "
            f"{splits.num_classes} classes; BN recalibrated: {'yes' if args.recalibrate_bn else 'no'})\n"
            f"  {knn_label:<{width}}  val top-1 {results['knn_val_top1']:6.2f}  test top-1 {results['knn_test_top1']:6.2f}\n"
            f"  {linear_label:<{width}}  val top-1 {results['linear_val_top1']:6.2f}  test top-1 {results['linear_test_top1']:6.2f}\n"
            f"  results: {run_dir / 'probe.json'}",
            flush=True,
        )
    cleanup_distributed()
    return results


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
