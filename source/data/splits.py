"""Train/val/test index splits, split files, dataset views and seeded (stratified) subsampling.

Split files live in ``<data_dir>/tv_splits/<dset>_<split>_split.txt`` with one integer per line:
an index into the dataset's *official training split* (``split`` = ``train`` or ``val``), or, for
datasets that ship no test split, ``<dset>_test_split.txt`` indexes the whole dataset. Files
that exist are used as they are, so the paper's split files can be dropped in; otherwise a
seeded, stratified split is generated, written atomically (temp file + ``os.replace``, so any
number of ranks writing the same deterministic content is safe) and reused on later runs.
Delete the files to regenerate them (e.g. after changing ``--seed`` or the val fraction).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from source.run.checkpoint import write_text_atomic
from source.run.errors import ConfigError

logger = logging.getLogger(__name__)

SPLIT_DIR_NAME = "tv_splits"
# The paper's released split files use these older dataset names.
SPLIT_FILE_ALIASES = {"cub2011": ("cub200",), "voc2007": ("voc07",)}


class SplitSubset(Subset):
    """A view of ``indices`` of a base dataset with its own image transform and cheap labels.

    Item ``i`` is ``(transform(image), target)`` for ``base[indices[i]] = (image, target)``, so
    the train, val and test views can share one base dataset (one decoding of the metadata)
    while using different transforms. ``labels`` (one int per item, or ``None`` when unknown,
    e.g. multi-label targets) lets stratification read the classes without decoding images.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        transform: Callable | None = None,
        labels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dataset, list(indices))
        if labels is not None and len(labels) != len(self.indices):
            raise ValueError(f"got {len(labels)} labels for {len(self.indices)} indices")
        self.transform = transform
        self.labels = None if labels is None else [int(label) for label in labels]

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[idx]]
        if self.transform is not None:
            image = self.transform(image)
        # Targets read from numpy arrays can be numpy integers; label checks and batches want ints.
        if isinstance(target, np.integer):
            target = int(target)
        return image, target

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        # torch's Subset.__getitems__ would bypass our transform; fetch item by item instead.
        return [self[idx] for idx in indices]


def _as_int_list(values: Any) -> list[int] | None:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            return None
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return None
    if not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in values):
        return None
    return [int(value) for value in values]


def dataset_labels(dataset: Dataset) -> list[int] | None:
    """Class index of every item, read without decoding images; ``None`` when not available.

    Understands our :class:`SplitSubset`, ``torch.utils.data.Subset`` and ``ConcatDataset``,
    and the label attributes of torchvision's datasets (``targets``, ``_labels``, ``labels``,
    ``y``, ``_samples``). Multi-label or non-integer targets give ``None``.
    """
    if isinstance(dataset, SplitSubset) and dataset.labels is not None:
        return list(dataset.labels)
    if isinstance(dataset, Subset):
        base = dataset_labels(dataset.dataset)
        return None if base is None else [base[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else [label for part in parts for label in part]
    for attribute in ("targets", "_labels", "labels", "y"):
        if hasattr(dataset, attribute):
            labels = _as_int_list(getattr(dataset, attribute))
            if labels is not None and len(labels) == len(dataset):
                return labels
    if hasattr(dataset, "_samples"):  # StanfordCars: list of (path, label)
        return _as_int_list([label for _, label in dataset._samples])
    return None


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(
    labels: Sequence[int] | None,
    seed: int,
    *,
    held_fraction: float | None = None,
    keep_per_class: int | None = None,
    candidates: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Split ``candidates`` (default: all positions of ``labels``) into ``(kept, held_out)``.

    Per class ``c`` with ``n_c`` candidates, a seeded permutation picks the held-out items:
    either ``round(held_fraction * n_c)`` of them (at least 1 and at most ``n_c - 1`` when
    ``n_c >= 2``; a single-item class stays in ``kept``), or everything beyond the first
    ``keep_per_class``. Exactly one of ``held_fraction`` / ``keep_per_class`` must be given.
    ``labels=None`` treats all candidates as one class (a plain seeded random split).
    Both returned lists are sorted ascending; the result depends only on the inputs.
    """
    if (held_fraction is None) == (keep_per_class is None):
        raise ValueError("give exactly one of held_fraction and keep_per_class")
    if held_fraction is not None and not 0.0 <= held_fraction < 1.0:
        raise ValueError(f"held_fraction must be in [0, 1), got {held_fraction}")
    if keep_per_class is not None and keep_per_class < 0:
        raise ValueError(f"keep_per_class must be >= 0, got {keep_per_class}")
    if candidates is None:
        if labels is None:
            raise ValueError("stratified_split needs labels or candidates")
        candidates = range(len(labels))
    candidates = np.asarray(list(candidates), dtype=np.int64)
    groups = np.zeros(len(candidates), dtype=np.int64) if labels is None else np.asarray(labels)[candidates]
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for group in np.unique(groups):
        members = rng.permutation(candidates[groups == group])
        n = len(members)
        if keep_per_class is not None:
            n_held = max(0, n - keep_per_class)
        elif n < 2 or held_fraction == 0.0:
            n_held = 0
        else:
            n_held = min(max(_round_half_up(held_fraction * n), 1), n - 1)
        held.extend(members[:n_held].tolist())
    held_set = set(held)
    kept = [int(i) for i in candidates if int(i) not in held_set]
    return sorted(kept), sorted(held)


def stratified_choice(labels: Sequence[int] | None, num_items: int, k: int, seed: int) -> list[int]:
    """Seeded choice of ``k`` of ``num_items`` positions, proportionally stratified by ``labels``.

    Item ``j`` (0-based) of class ``c`` in a seeded per-class order gets the key
    ``(j + u_c) / n_c`` with ``u_c ~ U(0, 1)``; the ``k`` smallest keys win. Class ``c`` then
    receives ``floor`` or ``ceil`` of ``k * n_c / num_items`` items, so with balanced classes
    ``k = K * num_classes`` gives exactly ``K`` per class. Returns sorted positions.
    """
    if not 0 <= k <= num_items:
        raise ValueError(f"cannot choose {k} of {num_items} items")
    rng = np.random.default_rng(seed)
    groups = np.zeros(num_items, dtype=np.int64) if labels is None else np.asarray(labels)
    keys = np.empty(num_items, dtype=np.float64)
    for group in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == group))
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return sorted(np.argsort(keys, kind="stable")[:k].tolist())


def subsample(dataset: Dataset, max_samples: int | None, seed: int, stratify: bool = True) -> Dataset:
    """Seeded choice of at most ``max_samples`` items of ``dataset`` (``None``/0: no cap).

    With ``stratify`` and labels readable cheaply (:func:`dataset_labels`), each class keeps
    its share (see :func:`stratified_choice`), so "K labels per class" runs work. Returns the
    dataset itself when no cap applies, else a :class:`SplitSubset` (a ``Subset``) that keeps
    the dataset's transform and labels.
    """
    if not max_samples:
        return dataset
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 (0 or None = no cap), got {max_samples}")
    if max_samples >= len(dataset):
        return dataset
    labels = dataset_labels(dataset) if stratify else None
    chosen = stratified_choice(labels, len(dataset), max_samples, seed)
    chosen_labels = None if labels is None else [labels[i] for i in chosen]
    if isinstance(dataset, SplitSubset):  # flatten views of views
        return SplitSubset(dataset.dataset, [dataset.indices[i] for i in chosen], dataset.transform, chosen_labels)
    return SplitSubset(dataset, chosen, None, chosen_labels)


# --- split files -------------------------------------------------------------------------


def split_file_path(data_dir: Path, name: str, split: str) -> Path:
    """``<data_dir>/tv_splits/<name>_<split>_split.txt``."""
    return Path(data_dir) / SPLIT_DIR_NAME / f"{name}_{split}_split.txt"


def _existing_split_file(data_dir: Path, name: str, split: str) -> Path | None:
    for candidate in (name, *SPLIT_FILE_ALIASES.get(name, ())):
        path = split_file_path(data_dir, candidate, split)
        if path.is_file():
            return path
    return None


def read_split_file(path: Path, num_items: int) -> list[int]:
    """Read one index per line; every index must lie in ``[0, num_items)`` and appear once."""
    try:
        indices = [int(line) for line in Path(path).read_text().split()]
    except ValueError as error:
        raise ConfigError(f"split file {path} must hold one integer per line: {error}") from None
    bad = [i for i in indices if not 0 <= i < num_items]
    if bad:
        raise ConfigError(
            f"split file {path} has indices outside [0, {num_items}) (the size of the split it indexes), "
            f"e.g. {bad[:5]}; it was probably made for another version of the dataset"
        )
    if len(set(indices)) != len(indices):
        raise ConfigError(f"split file {path} lists some indices more than once")
    return indices


def write_split_file(path: Path, indices: Sequence[int]) -> None:
    """Write one index per line atomically (temp file in the same folder, then ``os.replace``).

    A folder that cannot be written (read-only dataset share) only costs a warning: the split
    is a deterministic function of the seed and is regenerated identically next time.
    """
    try:
        write_text_atomic("".join(f"{int(i)}\n" for i in indices), path)
    except OSError as error:
        logger.warning("could not write split file %s (%s); the split is regenerated from the seed each run", path, error)


def resolve_train_val_split(
    data_dir: Path,
    name: str,
    pool_size: int,
    labels: Sequence[int] | None,
    val_fraction: float,
    seed: int,
    official_val_start: int | None = None,
    candidates: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Positions ``(train, val)`` within the official training split ("pool") of ``pool_size`` items.

    Order of precedence: (1) the split files ``<name>_train_split.txt`` and
    ``<name>_val_split.txt`` when both exist; (2) an official validation split, when the pool
    is the official train split followed by the official val split starting at position
    ``official_val_start`` (nothing is written in this case); (3) a generated split,
    ``stratified_split(labels, seed, held_fraction=val_fraction, candidates=candidates)``,
    written to the two files. ``candidates`` restricts (3) to the pool positions allowed in
    train/val (e.g. those not held out as test) and is checked against dropped-in files.
    """
    train_path = _existing_split_file(data_dir, name, "train")
    val_path = _existing_split_file(data_dir, name, "val")
    allowed = None if candidates is None else set(int(i) for i in candidates)
    if train_path is not None and val_path is not None:
        train, val = read_split_file(train_path, pool_size), read_split_file(val_path, pool_size)
        if set(train) & set(val):
            raise ConfigError(f"split files {train_path} and {val_path} share {len(set(train) & set(val))} indices")
        if allowed is not None and not set(train + val) <= allowed:
            raise ConfigError(f"split files {train_path} / {val_path} contain indices of the held-out test split")
        logger.info("%s: train/val split from %s and %s", name, train_path, val_path)
        return train, val
    if official_val_start is not None and train_path is None and val_path is None:
        logger.info("%s: using the official train/val split (no split files in %s)", name, data_dir / SPLIT_DIR_NAME)
        return list(range(official_val_start)), list(range(official_val_start, pool_size))
    if candidates is None:
        candidates = range(pool_size)
    train, val = stratified_split(labels, seed, held_fraction=val_fraction, candidates=candidates)
    for split, existing, generated in (("train", train_path, train), ("val", val_path, val)):
        if existing is None:
            continue
        # One file present: either another rank is between its two writes (same content), or
        # a user dropped in only one file, which we refuse rather than silently mixing splits.
        if read_split_file(existing, pool_size) != generated:
            other = "val" if split == "train" else "train"
            raise ConfigError(
                f"found {existing} but not its {other} counterpart {split_file_path(data_dir, name, other)}; "
                "provide both split files or delete this one to regenerate both"
            )
    for split, path, indices in (("train", train_path, train), ("val", val_path, val)):
        if path is None:
            write_split_file(split_file_path(data_dir, name, split), indices)
    logger.info(
        "%s: generated a seeded stratified train/val split (%d/%d, seed %d) in %s",
        name, len(train), len(val), seed, data_dir / SPLIT_DIR_NAME,
    )
    return train, val


def resolve_test_holdout(
    data_dir: Path,
    name: str,
    labels: Sequence[int],
    seed: int,
    *,
    held_fraction: float | None = None,
    keep_per_class: int | None = None,
) -> tuple[list[int], list[int]]:
    """``(rest, test)`` positions for a dataset that ships no test split.

    Uses ``<name>_test_split.txt`` (indices into the whole dataset) when present, else a
    seeded stratified hold-out (``held_fraction`` of each class, or all but
    ``keep_per_class`` per class), written to that file.
    """
    path = _existing_split_file(data_dir, name, "test")
    if path is not None:
        test = read_split_file(path, len(labels))
        logger.info("%s: test split from %s", name, path)
    else:
        _, test = stratified_split(labels, seed, held_fraction=held_fraction, keep_per_class=keep_per_class)
        write_split_file(split_file_path(data_dir, name, "test"), test)
        logger.info("%s: generated a seeded stratified test hold-out of %d items", name, len(test))
    test_set = set(test)
    return [i for i in range(len(labels)) if i not in test_set], sorted(test)
