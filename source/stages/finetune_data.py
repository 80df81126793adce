"""Fine-tuning's data path: the splits served from decoded-image caches when the flags allow it, and
each trial's seeded train loader.

``--decode-cache auto|on|off`` (``source.data.decoded_cache``): every image of the train, val and
test splits is decoded once per sweep into a memory-mapped file under ``--decode-cache-dir``
(default ``<data-dir>/.decoded_cache``) that all trials, ranks and workers share; ``auto`` does so
when the estimated size fits ``--decode-cache-max-gb`` and the disk. Val/test tensors are the
same as without the cache; train crops have the same distribution and the same pixels for images
stored unreduced (see the module for the train images reduced to ``--decode-cache-side``).

The train loader (:func:`trial_train_loader`) shuffles and augments from ``(trial seed, epoch,
index)`` alone (``source.data.loader.SeededEpochs``), so a trial gives the same batches with any
``--num-workers`` and a rerun of a trial repeats it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from source.data.datasets import dataset_folder
from source.data.decoded_cache import DEFAULT_FOLDER_NAME, CacheSettings, cached_splits
from source.data.loader import PrefetchedLoader, epoch_loader
from source.data.splits import SplitSubset
from source.data.transforms import DownstreamView
from source.run.distributed import DistEnv, broadcast_object


def cache_settings(args: argparse.Namespace, num_workers: int) -> CacheSettings:
    """The ``--decode-cache*`` flags; ``num_workers`` processes decode while a cache is built."""
    root = Path(args.decode_cache_dir) if args.decode_cache_dir else Path(args.data_dir) / DEFAULT_FOLDER_NAME
    return CacheSettings(mode=args.decode_cache, max_gb=args.decode_cache_max_gb, root=root, dataset_name=args.dset,
                         source_folder=dataset_folder(args.dset, Path(args.data_dir)), train_side=args.decode_cache_side,
                         num_workers=num_workers)


def serve_splits(args: argparse.Namespace, train: Dataset, val: Dataset, test: Dataset) -> tuple[Dataset, Dataset, Dataset]:
    """``(train, val, test)`` from decoded-image caches when ``--decode-cache`` decides so (every rank
    takes rank 0's decision), else unchanged. ``train``'s transform must be a :class:`DownstreamView`."""
    view = train.transform if isinstance(train, SplitSubset) else None
    if not isinstance(view, DownstreamView):
        raise TypeError(f"the train split's transform must be a DownstreamView, got {type(view).__name__}")
    served = cached_splits(cache_settings(args, args.num_workers), train, val, test, view, args.pretrain_img_size,
                           agree=broadcast_object)
    return (train, val, test) if served is None else served


def trial_train_loader(args: argparse.Namespace, env: DistEnv, train_set: Dataset, seed: int) -> DataLoader | PrefetchedLoader:
    """The shuffled train loader of one trial: batches of ``--batch-size`` (the last partial one
    dropped), order and augmentations from ``(seed, epoch, index)``; with ``--num-workers 0`` a
    background thread loads ``--prefetch-factor`` batches ahead."""
    return epoch_loader(train_set, args.batch_size, seed=seed, num_workers=args.num_workers,
                        pin_memory=env.device.type == "cuda", prefetch_factor=args.prefetch_factor,
                        nice_workers=env.device.type == "cpu")
