"""Decoded-image cache: every image of a downstream split decoded and pre-resized once per sweep.

A fine-tuning sweep trains 100+ trials for hundreds of epochs on the same few thousand images;
decoding a JPEG every time a sample is drawn is most of the loader's cost (issue 20). The cache
decodes each image of a split once, into one memory-mapped uint8 file that every trial, every
rank and every DataLoader worker of the machine maps (the operating system keeps one copy in its
page cache), so each epoch only crops, flips and normalises.

What is stored (a :class:`Prepare`):

* **train split** (:class:`ShortSideAtMost`): RGB, the short side reduced to ``side`` (LANCZOS, the
  aspect ratio kept) when it is longer; smaller images are stored as they are. The random resized
  crop is drawn on the ORIGINAL image size (recorded per image), so the crop choices have exactly
  the distribution they have without the cache, and the crop is resampled from the stored copy
  (:meth:`source.data.transforms.DownstreamView.apply_array`). ``side`` defaults to
  :func:`train_side`, the smallest side at which every crop the view can draw still has at least
  ``img_size`` stored pixels along each axis: then every crop is a reduction, from the copy as from
  the original, and the two differ by a second resampling only (measured on a noisy 500x375 image
  at the default 96 px / scale 0.5: 0.45 grey levels of 255 on average). An image not reduced
  (FashionMNIST, CIFAR, anything at most ``side`` on its short side) gives the same pixels as
  decoding it each time, bit for bit. A larger ``side`` is closer and costs memory quadratically.
* **val / test splits** (:class:`ResizeCenterCrop`): the evaluation transform's deterministic part
  (resize to ``img_size / 0.875``, centre crop), so only the normalisation is left per epoch and the
  tensors equal the uncached ones bit for bit.

Layout: images of different sizes go one after another into a flat ``pixels.u8`` file, with an index
``(N, 5)`` of (offset, height, width, source height, source width) (no padding: a dataset of mixed
aspect ratios would waste up to half a padded box); targets in ``targets.npy``.

Identity and staleness. A cache folder's name is a hash of what it holds: the dataset name, its
folder, the items (the split's indices into the dataset) and the :class:`Prepare`. Its manifest
records a fingerprint of the dataset's source files: every file under the dataset's folder with
its path, size and modification time (not a content hash: hashing 100k JPEGs would cost minutes
each sweep; a file rewritten with the same size and the same mtime goes unnoticed, a copy that
does not keep mtimes is refused, the safe side). A cache whose source files changed since it was
built is refused with a :class:`StaleCacheError` naming the changed files, rather than silently
building a second multi-gigabyte copy next to the stale one.

Building is safe for concurrent processes (ranks, sweeps run side by side): the first process to
take the folder's lock file builds into a temporary folder and renames it into place (atomic);
the others wait on the lock and map the result.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from source.data.splits import SplitSubset
from source.data.transforms import (
    CENTER_CROP_FRACTION,
    DownstreamView,
    ToNormalizedTensor,
    ToRGB,
)
from source.run.checkpoint import DiskFullError
from source.run.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

# Bumped whenever the stored format or a Prepare's output changes: old caches are then not found.
CACHE_VERSION = 1
# Default cache folder inside --data-dir: hidden, so image-folder datasets never take it for a class.
DEFAULT_FOLDER_NAME = ".decoded_cache"
# Folders of a dataset's tree that are not its source files (split files are inputs of the split,
# not of the pixels; hidden folders include the cache itself).
NOT_SOURCE_FOLDERS = ("tv_splits",)
# Images decoded to estimate a split's cached size before deciding to build it.
ESTIMATE_SAMPLES = 64
MODES = ("auto", "on", "off")


class StaleCacheError(UserError):
    """A decoded-image cache was built from other source files than the dataset's folder holds now."""


# --------------------------------------------------------------------------------------------
# What is stored per image
# --------------------------------------------------------------------------------------------


class Prepare:
    """How an image is stored: ``prepare(RGB PIL image) -> uint8 (H, W, 3)``; ``key`` names it in the cache's hash."""

    key: str

    def shape(self, width: int, height: int) -> tuple[int, int]:
        """``(height, width)`` of the stored image of a ``width`` x ``height`` source."""
        raise NotImplementedError

    def __call__(self, img: Image.Image) -> np.ndarray:
        raise NotImplementedError


class ShortSideAtMost(Prepare):
    """Reduce the short side to ``side`` (LANCZOS, aspect kept, long side rounded) if it is longer; else keep the image."""

    def __init__(self, side: int) -> None:
        if side < 1:
            raise ValueError(f"side must be >= 1, got {side}")
        self.side = side
        self.key = f"short-side-at-most-{side}-lanczos"

    def shape(self, width: int, height: int) -> tuple[int, int]:
        short = min(width, height)
        if short <= self.side:
            return height, width
        return max(1, round(height * self.side / short)), max(1, round(width * self.side / short))

    def __call__(self, img: Image.Image) -> np.ndarray:
        height, width = self.shape(*img.size)
        if (width, height) != img.size:
            img = img.resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(img)


class ResizeCenterCrop(Prepare):
    """The geometric part of :func:`source.data.transforms.downstream_test_transform`, with
    torchvision's own ops: resize the short side to ``int(img_size / 0.875)``, centre crop ``img_size``."""

    def __init__(self, img_size: int) -> None:
        self.img_size = img_size
        self.ops = T.Compose([T.Resize(int(img_size / CENTER_CROP_FRACTION)), T.CenterCrop(img_size)])
        self.key = f"resize-{int(img_size / CENTER_CROP_FRACTION)}-center-crop-{img_size}"

    def shape(self, width: int, height: int) -> tuple[int, int]:
        return self.img_size, self.img_size

    def __call__(self, img: Image.Image) -> np.ndarray:
        return np.asarray(self.ops(img))


def train_side(img_size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> int:
    """The smallest stored short side S at which every crop of ``RandomResizedCrop(img_size, scale, ratio)``
    keeps at least ``img_size`` stored pixels per axis.

    A crop of area fraction s and aspect r has sides ``sqrt(s A r)`` and ``sqrt(s A / r)`` with
    ``A >= S^2``, so both are at least ``S sqrt(scale_min min(ratio_min, 1 / ratio_max))``; hence
    ``S = ceil(img_size / sqrt(scale_min min(ratio_min, 1 / ratio_max)))`` (157 at 96 px with scale
    0.5 and torchvision's (3/4, 4/3); 480 with the original's crop, scale 0.08 and ratio (0.5, 1)).
    """
    return math.ceil(img_size / math.sqrt(scale[0] * min(ratio[0], 1.0 / ratio[1])) - 1e-9)


# --------------------------------------------------------------------------------------------
# Source files and the cache's name
# --------------------------------------------------------------------------------------------


def source_files(folder: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every file under ``folder``, sorted; hidden entries and
    :data:`NOT_SOURCE_FOLDERS` are skipped (the cache and the split files live there)."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in NOT_SOURCE_FOLDERS)
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            stat = path.stat()
            found.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cache_identity(dataset_name: str, source_folder: Path, indices: Sequence[int], prepare: Prepare) -> dict[str, Any]:
    """What a cache holds (its folder name is a hash of this): the items of a dataset, stored by ``prepare``."""
    return {"version": CACHE_VERSION, "dataset": dataset_name, "source_folder": str(Path(source_folder).resolve()),
            "items": hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest(), "count": len(indices),
            "prepare": prepare.key}


def cache_folder(root: Path, identity: dict[str, Any]) -> Path:
    """``<root>/<dataset>-<count>-<prepare>-<hash>``: readable, and unique per identity."""
    return Path(root) / f"{identity['dataset']}-{identity['count']}-{identity['prepare']}-{_hash(identity)[:16]}"


def _stale_message(folder: Path, source_folder: Path, built: list, now: list) -> str:
    before = {path: (size, mtime) for path, size, mtime in built}
    after = {path: (size, mtime) for path, size, mtime in now}
    changed = sorted(path for path in before.keys() & after.keys() if before[path] != after[path])
    removed, added = sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())
    parts = [f"{len(files)} {what} (e.g. {files[0]})" for what, files in
             (("changed", changed), ("removed", removed), ("added", added)) if files]
    return (f"the decoded-image cache {folder} was built from other source files than {source_folder} holds now: "
            f"{', '.join(parts)} (compared by size and modification time). Delete {folder} to rebuild it from the "
            "current files, or pass --decode-cache off")


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class DecodedCache:
    """A built cache, read-only: :meth:`image` is a view into the memory-mapped pixels.

    Picklable without its mapping (DataLoader workers started by spawn or forkserver map the file
    themselves instead of receiving a copy of every image).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.index = np.load(self.folder / "index.npy")  # (N, 5): offset, height, width, source height, source width
        self.targets = np.load(self.folder / "targets.npy")
        self._pixels: np.ndarray | None = None

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            size = (self.folder / "pixels.u8").stat().st_size
            # np.memmap refuses an empty file; an empty split has nothing to map.
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        return self._pixels

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return int(self.manifest["bytes"])

    def image(self, i: int) -> np.ndarray:
        """Stored pixels of item ``i``: uint8 ``(H, W, 3)``."""
        offset, height, width = (int(v) for v in self.index[i, :3])
        return self.pixels[offset:offset + height * width * 3].reshape(height, width, 3)

    def source_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of item ``i``'s original image."""
        return int(self.index[i, 4]), int(self.index[i, 3])

    def target(self, i: int) -> Any:
        """Item ``i``'s target as the dataset gave it: an int, or a float tensor (multi-hot)."""
        target = self.targets[i]
        return int(target) if target.ndim == 0 else torch.from_numpy(np.array(target))

    def check_sources(self, files: list[tuple[str, int, int]], source_folder: Path) -> None:
        """Raise :class:`StaleCacheError` unless ``files`` is the fingerprint the cache was built from."""
        if self.manifest["sources_sha256"] != _hash(files):
            built = [tuple(entry) for entry in json.loads((self.folder / "sources.json").read_text())]
            raise StaleCacheError(_stale_message(self.folder, source_folder, built, files))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None}


class _Raw(Dataset):
    """Item ``i`` of a SplitSubset without its transform: ``(prepare(RGB image), target)`` (used to build in parallel)."""

    def __init__(self, split: SplitSubset, prepare: Prepare) -> None:
        self.base, self.indices, self.prepare = split.dataset, split.indices, prepare

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, tuple[int, int], Any]:
        image, target = self.base[self.indices[i]]
        image = ToRGB()(image)
        return self.prepare(image), image.size, np.asarray(target)


def _unbatched(item: Any) -> Any:
    return item


def _write(folder: Path, split: SplitSubset, prepare: Prepare, identity: dict, files: list, num_workers: int) -> None:
    """Decode every item of ``split`` once into ``folder`` (which must not exist yet)."""
    folder.mkdir(parents=True)
    index = np.zeros((len(split), 5), dtype=np.int64)
    targets: list[np.ndarray] = []
    offset = 0
    # A DataLoader only to decode in parallel, in order; batch_size=None hands items over one by one.
    loader = DataLoader(_Raw(split, prepare), batch_size=None, num_workers=num_workers, collate_fn=_unbatched)
    started = time.perf_counter()
    with open(folder / "pixels.u8", "wb") as out:
        for i, (pixels, (width, height), target) in enumerate(loader):
            pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
            assert pixels.ndim == 3 and pixels.shape[2] == 3, pixels.shape
            out.write(pixels.tobytes())
            index[i] = (offset, pixels.shape[0], pixels.shape[1], height, width)
            offset += pixels.size
            targets.append(target)
    np.save(folder / "index.npy", index)
    np.save(folder / "targets.npy", np.stack(targets) if targets else np.zeros(0, np.int64))
    (folder / "sources.json").write_text(json.dumps(files))
    manifest = {**identity, "bytes": offset, "sources_sha256": _hash(files), "source_files": len(files),
                "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_s": round(time.perf_counter() - started, 1)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), held while the block runs."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish building %s", path.with_suffix(""))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_or_build(split: SplitSubset, prepare: Prepare, root: Path, dataset_name: str, source_folder: Path, *,
                  num_workers: int = 0) -> DecodedCache:
    """The cache of ``split`` (a transform-free view of its base dataset is decoded), built on first use.

    The first process to take ``<folder>.lock`` builds into ``<folder>.tmp-<pid>`` and renames it into
    place; the others wait and map it. Raises :class:`StaleCacheError` if an existing cache was built
    from other source files than ``source_folder`` holds now.
    """
    if not isinstance(split, SplitSubset):
        raise TypeError(f"a decoded-image cache is built from a SplitSubset view, got {type(split).__name__}")
    files = source_files(source_folder)
    identity = cache_identity(dataset_name, source_folder, split.indices, prepare)
    folder = cache_folder(root, identity)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_name(folder.name + ".lock")):
        if not (folder / "manifest.json").is_file():
            temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
            shutil.rmtree(temporary, ignore_errors=True)
            logger.info("decoding %d %s images once into %s", len(split), dataset_name, folder)
            try:
                _write(temporary, split, prepare, identity, files, num_workers)
                os.replace(temporary, folder)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise DiskFullError(error.errno, f"the disk under {root} filled up while building the decoded-image cache "
                                    f"{folder.name}; free space, pass --decode-cache-dir elsewhere, or --decode-cache off") from error
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
    cache = DecodedCache(folder)
    cache.check_sources(files, source_folder)
    if len(cache) != len(split):  # the identity hash covers the indices: only a foreign folder gets here
        raise StaleCacheError(f"the decoded-image cache {folder} holds {len(cache)} images, the split {len(split)}; delete it")
    return cache


# --------------------------------------------------------------------------------------------
# Serving it, and deciding whether to use it
# --------------------------------------------------------------------------------------------


class CachedImages(Dataset):
    """A split served from its cache: item ``i`` is ``(view(image i), target i)``.

    ``view``: a :class:`DownstreamView` (train: random crop drawn on the original size, flip,
    normalise), or ``None`` for the stored image normalised as it is (val / test, stored already
    resized and centre-cropped). ``labels`` are the int targets (``None`` for multi-hot ones), so
    stratification reads them without touching pixels.
    """

    def __init__(self, cache: DecodedCache, view: DownstreamView | None) -> None:
        self.cache, self.view = cache, view
        self.normalize = view.normalize if view is not None else ToNormalizedTensor()
        self.labels = [int(t) for t in cache.targets] if cache.targets.ndim == 1 else None

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        pixels = self.cache.image(i)
        if self.view is None:
            image = self.normalize.from_array(pixels)
        else:
            image = self.view.from_array(pixels, self.cache.source_size(i))
        return image, self.cache.target(i)


def estimate_bytes(split: SplitSubset, prepare: Prepare, samples: int = ESTIMATE_SAMPLES) -> int:
    """The cached size of ``split`` from the stored size of up to ``samples`` evenly spaced images (decoded)."""
    n = len(split)
    if n == 0:
        return 0
    positions = np.unique(np.linspace(0, n - 1, min(n, samples)).round().astype(np.int64))
    per_image = [3 * math.prod(prepare.shape(*ToRGB()(split.dataset[split.indices[int(p)]][0]).size)) for p in positions]
    return int(round(n * float(np.mean(per_image))))


def _free_bytes(folder: Path) -> int:
    existing = next(parent for parent in (Path(folder), *Path(folder).parents) if parent.exists())
    return shutil.disk_usage(existing).free


def use_cache(mode: str, estimated_bytes: int, max_gb: float, root: Path) -> bool:
    """Whether to decode into a cache: ``off`` never; ``on`` always (a full disk is a user error);
    ``auto`` when the estimate fits ``max_gb`` and the disk under ``root``."""
    if mode not in MODES:
        raise ConfigError(f"--decode-cache must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return False
    free = _free_bytes(root)
    if estimated_bytes > free:
        message = f"the decoded-image cache needs about {estimated_bytes / 1e9:.2f} GB, {root} has {free / 1e9:.2f} GB free"
        if mode == "on":
            raise ConfigError(message + "; free space, pass --decode-cache-dir elsewhere, or --decode-cache off")
        logger.info("%s: decoding each image every epoch instead", message)
        return False
    if mode == "auto" and estimated_bytes > max_gb * 1e9:
        logger.info("decoded-image cache off: about %.2f GB > --decode-cache-max-gb %g", estimated_bytes / 1e9, max_gb)
        return False
    return True


@dataclass
class CacheSettings:
    """Where and how a sweep caches its splits (from the ``--decode-cache*`` flags)."""

    mode: str  # auto | on | off
    max_gb: float  # budget of auto, for all cached splits together
    root: Path  # folder of the caches
    dataset_name: str
    source_folder: Path  # the dataset's files: the cache's staleness check
    train_side: int  # stored short side of train images (0 = train_side() of the view)
    num_workers: int = 0  # decoding processes while building


def cached_splits(settings: CacheSettings, train: Dataset, val: Dataset, test: Dataset, view: DownstreamView,
                  eval_img_size: int, agree: Callable[[bool], bool] | None = None) -> tuple[Dataset, Dataset, Dataset] | None:
    """The three splits served from decoded caches, or None when the settings decide against one
    (``off``, over the budget or the free disk, a folder that cannot be written, not SplitSubset
    views). Train items get ``view``; val/test the evaluation transform of ``eval_img_size`` (the
    same tensors as without the cache). ``agree(decision) -> decision``: makes every process of a
    run take rank 0's decision (the free disk it sees changes while another process builds)."""
    splits = (train, val, test)
    use = settings.mode != "off"
    if use and not all(isinstance(split, SplitSubset) for split in splits):
        if settings.mode == "on":
            raise ConfigError("--decode-cache on: this dataset's splits cannot be cached (not index views of one dataset)")
        use = False
    if use:
        try:
            settings.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if settings.mode == "on":
                raise ConfigError(f"--decode-cache on: cannot create {settings.root} ({error}); pass --decode-cache-dir "
                                  "a writable folder") from error
            logger.warning("decoded-image cache off: cannot create %s (%s); --decode-cache-dir names another folder",
                           settings.root, error)
            use = False
    side = settings.train_side or train_side(view.img_size, view.scale, view.ratio)
    prepares = (ShortSideAtMost(side), ResizeCenterCrop(eval_img_size), ResizeCenterCrop(eval_img_size))
    if use:
        estimate = sum(estimate_bytes(split, prepare) for split, prepare in zip(splits, prepares))
        use = use_cache(settings.mode, estimate, settings.max_gb, settings.root)
    if agree is not None:
        use = agree(use)
    if not use:
        return None
    caches = [open_or_build(split, prepare, settings.root, settings.dataset_name, settings.source_folder,
                            num_workers=settings.num_workers) for split, prepare in zip(splits, prepares)]
    logger.info("decoded-image caches: %s (%.2f GB, train short side <= %d px)",
                ", ".join(cache.folder.name for cache in caches), sum(cache.nbytes for cache in caches) / 1e9, side)
    return CachedImages(caches[0], view), CachedImages(caches[1], None), CachedImages(caches[2], None)
