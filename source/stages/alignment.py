"""Measurements of ``bissl.py`` that read the models and change nothing (docs/evidence.md).

- :class:`KnnAlignment` (``--lower-knn-every N``): how well each backbone's frozen features
  separate the downstream classes -- kNN top-1 of a fixed, seeded query set of the val split
  against a fixed, seeded bank of the downstream train split, both with the deterministic test
  transform, scored by the probe's rule (:func:`source.stages.features.knn_scores`). For the
  lower backbone θ_P (the one BiSSL outputs) it says whether the upper level has moved it
  towards the downstream task; θ_D's is the reference it is pulled to.
- :func:`recalibrated_copy` (``--eval-bn-recalibrate-batches K``): the downstream model with its
  BatchNorm running statistics re-estimated over K fixed train batches, for the val evaluation.

Both draw their samples with their own seeded generators (numpy's in
:func:`source.data.subsample`, a ``torch.Generator`` here) and iterate loaders with private
generators, so the training streams and the global RNG are untouched; BatchNorm layers of the
trained models run in eval mode (running statistics, no updates), and every module gets its
train/eval mode back.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import config_default as cfg
from source.data import SplitSubset, downstream_test_transform, subsample
from source.run.distributed import DistEnv
from source.run.errors import ConfigError
from source.stages.evaluation import sharded_eval_loader
from source.stages.features import extract_features, knn_scores, recalibrate_batchnorm, top1


@dataclass
class KnnAlignment:
    """kNN top-1 (%) of both backbones on one fixed bank and query set, every ``every`` alternations.

    bank_loader, query_loader: :func:`~source.stages.evaluation.sharded_eval_loader`s (each sample
    embedded once across ranks, the features gathered, so every rank computes the same score).
    """

    bank_loader: DataLoader
    query_loader: DataLoader
    num_classes: int
    every: int
    alternations: int
    layout: torch.memory_format = torch.contiguous_format

    def due(self, done: int) -> bool:
        """Whether to measure after ``done`` alternations: every ``every``-th and after the last."""
        return done % self.every == 0 or done == self.alternations

    def measure(self, lower_backbone: nn.Module, upper_backbone: nn.Module, device: torch.device,
                dtype: torch.dtype | None = None) -> dict[str, float]:
        """``{"align/lower_knn_top1": θ_P's, "align/upper_knn_top1": θ_D's}`` (collective)."""
        return {"align/lower_knn_top1": self.knn_top1(lower_backbone, device, dtype),
                "align/upper_knn_top1": self.knn_top1(upper_backbone, device, dtype)}

    def knn_top1(self, backbone: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> float:
        """kNN top-1 (%) of ``backbone``'s eval-mode features: queries scored against the bank."""
        bank, bank_labels = extract_features(backbone, self.bank_loader, device, dtype, self.layout)
        queries, labels = extract_features(backbone, self.query_loader, device, dtype, self.layout)
        return top1(knn_scores(bank, bank_labels, queries, self.num_classes, cfg.KNN_K, cfg.KNN_TEMPERATURE), labels)


def with_test_transform(dataset: Dataset, img_size: int) -> SplitSubset:
    """The same images (a :class:`SplitSubset` of the downstream splits) with the deterministic test transform."""
    if not isinstance(dataset, SplitSubset):
        raise TypeError(f"expected a SplitSubset view of a downstream split, got {type(dataset).__name__}")
    return SplitSubset(dataset.dataset, dataset.indices, downstream_test_transform(img_size), dataset.labels)


def build_knn_alignment(args: argparse.Namespace, env: DistEnv, train_set: Dataset, val_set: Dataset,
                        num_classes: int, multilabel: bool, layout: torch.memory_format) -> KnnAlignment | None:
    """``--lower-knn-every``'s bank (``--align-bank-size`` of ``train_set``) and queries
    (``--align-query-size`` of ``val_set``), stratified and seeded with ``--seed``; None when off."""
    if not args.lower_knn_every:
        return None
    if multilabel:
        raise ConfigError(f"--lower-knn-every scores single-label top-1, but --d-dset {args.d_dset} is multi-label; "
                          "pass --lower-knn-every 0")
    bank = subsample(with_test_transform(train_set, args.img_size), args.align_bank_size, seed=args.seed, stratify=True)
    queries = subsample(val_set, args.align_query_size, seed=args.seed, stratify=True)
    batch_size = args.d_batch_size // env.world_size

    def loader(dataset: Dataset) -> DataLoader:
        return sharded_eval_loader(dataset, batch_size, num_workers=args.num_workers, pin_memory=env.device.type == "cuda",
                                   prefetch_factor=args.prefetch_factor)

    return KnnAlignment(loader(bank), loader(queries), num_classes, args.lower_knn_every, args.epochs, layout)


def recalibration_loader(dataset: Dataset, batches: int, global_batch: int, seed: int, rank: int, world_size: int,
                         num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This rank's share of ``batches`` fixed global batches of ``dataset``, in order.

    The samples are a seeded random order of ``dataset`` (further orders appended when it holds
    fewer than ``batches * global_batch``); global batch b is positions [b·G, (b+1)·G) of it and
    rank r takes its slice [r·G/W, (r+1)·G/W), as a training batch is split over the ranks, so
    every BatchNorm statistic is a per-rank batch's, as in training.
    """
    generator = torch.Generator().manual_seed(seed)
    needed, per_rank = batches * global_batch, global_batch // world_size
    orders = [torch.randperm(len(dataset), generator=generator) for _ in range(-(-needed // len(dataset)))]
    mine = torch.cat(orders)[:needed].view(batches, world_size, per_rank)[:, rank].flatten().tolist()
    # A private generator: iterating a loader otherwise draws its base seed from the global RNG.
    return DataLoader(Subset(dataset, mine), batch_size=per_rank, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=torch.Generator())


def build_recalibration_loader(args: argparse.Namespace, env: DistEnv, train_set: Dataset) -> DataLoader | None:
    """``--eval-bn-recalibrate-batches`` K global batches (``--d-batch-size``) of ``train_set`` with the
    test transform, seeded with ``--seed``; None when off."""
    if not args.eval_bn_recalibrate_batches:
        return None
    return recalibration_loader(with_test_transform(train_set, args.img_size), args.eval_bn_recalibrate_batches,
                                args.d_batch_size, args.seed, env.rank, env.world_size, args.num_workers,
                                env.device.type == "cuda")


def recalibrated_copy(model: nn.Module, loader: DataLoader, device: torch.device) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the equal-weight averages of the
    per-batch statistics over ``loader`` (all ranks; :func:`source.stages.features.recalibrate_batchnorm`).
    ``model`` itself is not touched."""
    recalibrated = copy.deepcopy(model)
    recalibrate_batchnorm(recalibrated, loader, device)
    return recalibrated
