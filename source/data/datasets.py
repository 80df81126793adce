"""Pretext and downstream datasets, each read from ``--data-dir`` in its torchvision layout.

Every dataset with a torchvision class is loaded through that class, so folders people already
have can be reused; CUB-200-2011 (no torchvision class) gets a small reader of its official
files. Missing data raises :class:`DatasetNotFoundError` naming the expected path and how to get
it; nothing is downloaded unless ``download=True`` (``--download-dataset 1``).

Downstream splits (:func:`build_downstream_splits`):

* **test** is the official test split (CIFAR/STL-10/FashionMNIST ``test``, Food/Cars/DTD/...
  ``test``, VOC2007 ``test``, CUB ``is_training_img == 0``). Datasets without one get a seeded,
  stratified hold-out written to ``tv_splits/<dset>_test_split.txt`` (indices into the whole
  dataset): Caltech-101 keeps 30 images per class for training and tests on the rest (the
  usual protocol, e.g. SimCLR's transfer study); SUN397 uses the official partition files
  ``SUN397/Partitions/{Training,Testing}_01.txt`` when present, else holds out 50% of each class
  (the official partitions are 50/50 per class); an ``imagefolder`` without a test/val tree
  holds out 20% of each class.
* **train / val** come from the official training split (the "pool") by the rule of
  :func:`source.data.splits.resolve_train_val_split`: split files when present, else the
  official validation split for DTD, Flowers-102, FGVC-Aircraft and VOC2007 (the pool is then
  the official train split followed by the official val split, so split files for these index
  that concatenation), else a seeded stratified split with ``val_fraction`` of each class.
  For Caltech-101 and SUN397-without-partitions the pool is the whole dataset (the paper's
  Caltech-101 split files index the whole dataset) and only the non-test items are used.

The train view uses ``train_transform``; val and test use ``test_transform``. Labels are ints in
``[0, num_classes)``; VOC2007 targets are float multi-hot vectors of its 20 classes.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import default_loader

from source.data.splits import (
    SplitSubset,
    dataset_labels,
    resolve_test_holdout,
    resolve_train_val_split,
    subsample,
)
from source.run.errors import ConfigError, MissingInputError

__all__ = [
    "PRETEXT_DATASETS", "DOWNSTREAM_DATASETS", "MULTILABEL_DATASETS", "VOC_CLASSES",
    "DatasetNotFoundError", "DownstreamSplits", "Cub2011", "ImageTree", "VocMultiHot", "dataset_folder",
    "build_pretext_dataset", "build_downstream_splits", "subsample", "dataset_labels", "SplitSubset",
]

logger = logging.getLogger(__name__)

PRETEXT_DATASETS = ("imagenet", "stl10", "fashionmnist", "imagefolder")
DOWNSTREAM_DATASETS = (
    "food", "cars", "dtd", "pets", "flowers", "aircrafts", "cifar10", "cifar100",
    "caltech101", "sun397", "voc2007", "cub2011", "stl10", "fashionmnist", "imagefolder",
)
MULTILABEL_DATASETS = ("voc2007",)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# STL-10's class order, used when stl10_binary/class_names.txt is absent.
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
# Caltech-101 ships no split: 30 training images per class, the rest for testing (common protocol).
CALTECH101_TRAIN_PER_CLASS = 30
# SUN397 without the official partition files: hold out this share of each class for testing.
SUN397_TEST_FRACTION = 0.5
# An image-folder tree without a test/val tree: hold out this share of each class for testing.
IMAGEFOLDER_TEST_FRACTION = 0.2
# Folders inside an image-folder tree that are never classes (our split files live in tv_splits/).
IGNORED_FOLDERS = ("tv_splits",)


class DatasetNotFoundError(MissingInputError):
    """A dataset is missing (or incomplete) under ``--data-dir``.

    The message names the dataset, the path that was looked at, the layout expected there and
    how to obtain the data.
    """

    def __init__(self, name: str, path: Path, layout: str, how_to_get: str, detail: str | None = None) -> None:
        self.name = name
        self.path = Path(path)
        message = f"dataset '{name}' not found or incomplete at {path}. Expected layout under --data-dir: {layout}. {how_to_get}"
        if detail:
            message += f" [loader: {detail}]"
        super().__init__(message)


@dataclass(frozen=True)
class _Source:
    folder: str  # relative to data_dir; "" is data_dir itself
    layout: str
    how_to_get: str
    downloadable: bool  # torchvision can download it with download=True


_DOWNLOAD = "or pass --download-dataset 1 to let torchvision download it."
_SOURCES = {
    "imagenet": _Source(
        "imagenet",
        "imagenet/train/<wnid>/*.JPEG (plus imagenet/meta.bin or ILSVRC2012_devkit_t12.tar.gz to use torchvision's ImageNet class)",
        "Register at https://image-net.org/download.php, download ILSVRC2012 and extract the training images into class folders "
        "(torchvision cannot download ImageNet).",
        False,
    ),
    "stl10": _Source(
        "stl10_binary",
        "stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin and class_names.txt",
        f"Get stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ {_DOWNLOAD}",
        True,
    ),
    "fashionmnist": _Source(
        "FashionMNIST/raw",
        "FashionMNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte (uncompressed)",
        "Run `python -m source.data.fashion_mnist_setup --data-dir <data_dir>` (works offline with the Debian "
        f"package dataset-fashion-mnist) {_DOWNLOAD}",
        True,
    ),
    "imagefolder": _Source(
        "",
        "<data_dir>/<class>/<image> or <data_dir>/train/<class>/<image> with an optional <data_dir>/test (or val)/<class>/<image>",
        "Arrange your images in class folders as shown.",
        False,
    ),
    "food": _Source(
        "food-101",
        "food-101/meta/{train,test}.json and food-101/images/<class>/<id>.jpg",
        f"Get food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ {_DOWNLOAD}",
        True,
    ),
    "cars": _Source(
        "stanford_cars",
        "stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}, stanford_cars/cars_train/*.jpg, "
        "stanford_cars/cars_test/*.jpg and stanford_cars/cars_test_annos_withlabels.mat",
        "The original site (https://ai.stanford.edu/~jkrause/cars/car_dataset.html) is offline and torchvision cannot "
        "download it; place a copy of Stanford Cars in torchvision's StanfordCars layout.",
        False,
    ),
    "dtd": _Source(
        "dtd/dtd",
        "dtd/dtd/images/<class>/<image>.jpg and dtd/dtd/labels/{train,val,test}1.txt",
        f"Get dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and extract it into <data_dir>/dtd/ {_DOWNLOAD}",
        True,
    ),
    "pets": _Source(
        "oxford-iiit-pet",
        "oxford-iiit-pet/images/<id>.jpg and oxford-iiit-pet/annotations/{trainval,test}.txt",
        f"Get images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ {_DOWNLOAD}",
        True,
    ),
    "flowers": _Source(
        "flowers-102",
        "flowers-102/jpg/image_00001.jpg..., flowers-102/imagelabels.mat and flowers-102/setid.mat",
        f"Get 102flowers.tgz, imagelabels.mat and setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ {_DOWNLOAD}",
        True,
    ),
    "aircrafts": _Source(
        "fgvc-aircraft-2013b",
        "fgvc-aircraft-2013b/data/images/<id>.jpg, data/variants.txt and data/images_variant_{train,val,test}.txt",
        f"Get fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ {_DOWNLOAD}",
        True,
    ),
    "cifar10": _Source(
        "cifar-10-batches-py",
        "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        f"Get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html {_DOWNLOAD}",
        True,
    ),
    "cifar100": _Source(
        "cifar-100-python",
        "cifar-100-python/{train,test,meta}",
        f"Get cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html {_DOWNLOAD}",
        True,
    ),
    "caltech101": _Source(
        "caltech101/101_ObjectCategories",
        "caltech101/101_ObjectCategories/<category>/image_0001.jpg... (with the BACKGROUND_Google folder, which is skipped)",
        f"Get caltech-101.zip from https://data.caltech.edu/records/mzrjq-6wc02 {_DOWNLOAD}",
        True,
    ),
    "sun397": _Source(
        "SUN397",
        "SUN397/ClassName.txt and SUN397/<letter>/<class>/sun_*.jpg, optionally SUN397/Partitions/{Training,Testing}_01.txt",
        "Get SUN397.tar.gz (and Partitions.zip for the official split) from https://vision.princeton.edu/projects/2010/SUN/ "
        f"{_DOWNLOAD}",
        True,
    ),
    "voc2007": _Source(
        "VOCdevkit/VOC2007",
        "VOCdevkit/VOC2007/{JPEGImages,Annotations} and ImageSets/Main/{train,val,test}.txt (trainval and test archives "
        "extracted into the same folder)",
        "Get VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ "
        f"{_DOWNLOAD}",
        True,
    ),
    "cub2011": _Source(
        "CUB_200_2011",
        "CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt} and "
        "CUB_200_2011/images/<class>/<file>.jpg",
        "Get CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it "
        "(torchvision has no CUB class, so it cannot be downloaded automatically).",
        False,
    ),
}


def _check_name(name: str, valid: Sequence[str], kind: str) -> None:
    if name not in valid:
        raise ConfigError(f"unknown {kind} dataset {name!r}; valid: {', '.join(valid)}")


def _require(name: str, data_dir: Path, download: bool) -> Path:
    """The dataset's folder under ``data_dir``; raises DatasetNotFoundError if it must exist but does not."""
    source = _SOURCES[name]
    path = data_dir / source.folder
    if path.exists() or (download and source.downloadable):
        return path
    how = source.how_to_get
    if download:
        how += " (--download-dataset 1 cannot fetch this dataset.)"
    raise DatasetNotFoundError(name, path, source.layout, how)


def dataset_folder(name: str, data_dir: Path) -> Path:
    """The folder under ``data_dir`` holding dataset ``name``'s files (``data_dir`` itself for ``imagefolder``);
    what a decoded-image cache fingerprints."""
    _check_name(name, tuple(_SOURCES), "")
    return Path(data_dir) / _SOURCES[name].folder


@contextlib.contextmanager
def _loading(name: str, data_dir: Path) -> Iterator[None]:
    """Turn the loaders' 'not found or corrupted' errors into a DatasetNotFoundError with the layout."""
    try:
        yield
    except DatasetNotFoundError:
        raise
    except (RuntimeError, FileNotFoundError) as error:
        source = _SOURCES[name]
        raise DatasetNotFoundError(name, data_dir / source.folder, source.layout, source.how_to_get, str(error)) from error


class ImageTree(tv_datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` that never treats ``tv_splits/`` or hidden folders as classes."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_dir() and entry.name not in IGNORED_FOLDERS and not entry.name.startswith(".")
        )
        if not classes:
            raise MissingInputError(f"no class folders found in {directory}")
        return classes, {cls: index for index, cls in enumerate(classes)}


class VocMultiHot:
    """``target_transform`` for ``VOCDetection``: parsed XML annotation -> float multi-hot of shape (20,).

    A class is positive when any object of it is annotated in the image; objects marked
    ``difficult`` count like all others (kept simple, as in the original BiSSL code).
    """

    def __init__(self, classes: Sequence[str] = VOC_CLASSES) -> None:
        self.classes = tuple(classes)
        self.class_to_idx = {cls: index for index, cls in enumerate(self.classes)}

    def __call__(self, target: dict[str, Any]) -> torch.Tensor:
        multi_hot = torch.zeros(len(self.classes), dtype=torch.float32)
        for obj in target["annotation"].get("object", []):
            if obj["name"] not in self.class_to_idx:
                raise ValueError(f"VOC annotation names unknown class {obj['name']!r}; valid: {self.classes}")
            multi_hot[self.class_to_idx[obj["name"]]] = 1.0
        return multi_hot


def _read_id_table(path: Path) -> dict[int, str]:
    """CUB's ``<id> <value>`` files -> {id: value}."""
    table = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, value = line.split(maxsplit=1)
            table[int(key)] = value.strip()
    return table


class Cub2011(Dataset):
    """Caltech-UCSD Birds-200-2011 from its official files (torchvision has no class for it).

    Reads ``CUB_200_2011/images.txt``, ``image_class_labels.txt`` (1-based classes),
    ``train_test_split.txt`` (1 = training image) and ``classes.txt`` under ``root``; items are
    ``(PIL RGB image, class index in [0, 200))`` in image-id order, as in the paper's split files.
    """

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        base = Path(root) / "CUB_200_2011"
        paths = _read_id_table(base / "images.txt")
        classes = _read_id_table(base / "image_class_labels.txt")
        is_train = _read_id_table(base / "train_test_split.txt")
        names = _read_id_table(base / "classes.txt")
        # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
        self.classes = [names[key].split(".", 1)[-1] for key in sorted(names)]
        ids = sorted(key for key in paths if (is_train[key] == "1") == train)
        self.images = [base / "images" / paths[key] for key in ids]
        self.targets = [int(classes[key]) - 1 for key in ids]
        self.transform = transform
        missing = [path for path in self.images if not path.is_file()]
        if missing:
            raise MissingInputError(f"{len(missing)} CUB images listed in images.txt are missing, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = default_loader(str(self.images[index]))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


# --- pretext -----------------------------------------------------------------------------


def _imagefolder_train_root(data_dir: Path) -> Path:
    return data_dir / "train" if (data_dir / "train").is_dir() else data_dir


def build_pretext_dataset(name: str, data_dir: Path, transform: Callable, download: bool = False) -> Dataset:
    """The unlabelled pre-training set; items are ``(transform(image), label)`` (labels unused).

    * ``imagenet``: ``torchvision.datasets.ImageNet(data_dir/imagenet, "train")`` when its
      ``meta.bin`` or devkit archive is present, else ``ImageFolder(data_dir/imagenet/train)``.
    * ``stl10``: ``STL10(split="unlabeled")`` (100k images; labels are -1).
    * ``fashionmnist``: ``FashionMNIST(train=True)`` from ``data_dir/FashionMNIST/raw``.
    * ``imagefolder``: ``ImageFolder(data_dir/train)`` if that folder exists, else ``ImageFolder(data_dir)``.
    """
    _check_name(name, PRETEXT_DATASETS, "pretext")
    data_dir = Path(data_dir)
    root = _require(name, data_dir, download)
    with _loading(name, data_dir):
        if name == "imagenet":
            if (root / "meta.bin").is_file() or (root / "ILSVRC2012_devkit_t12.tar.gz").is_file():
                return tv_datasets.ImageNet(str(root), split="train", transform=transform)
            if not (root / "train").is_dir():
                source = _SOURCES[name]
                raise DatasetNotFoundError(name, root / "train", source.layout, source.how_to_get)
            return ImageTree(root / "train", transform=transform)
        if name == "stl10":
            return tv_datasets.STL10(str(data_dir), split="unlabeled", transform=transform, download=download)
        if name == "fashionmnist":
            return tv_datasets.FashionMNIST(str(data_dir), train=True, transform=transform, download=download)
        return ImageTree(_imagefolder_train_root(data_dir), transform=transform)


# --- downstream --------------------------------------------------------------------------


@dataclass
class DownstreamSplits:
    """The three downstream views. Items are ``(image tensor (3, H, W), target)`` with an int
    class target, or a float multi-hot ``(num_classes,)`` target when ``multilabel``."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    multilabel: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class _Official:
    """What a per-dataset loader returns, before the train/val rule is applied."""

    pool: Dataset  # the official training split: the index space of the train/val split files
    test: Dataset
    classes: list[str]
    official_val_start: int | None = None  # pool = official train + official val, val starting here
    candidates: list[int] | None = None  # pool positions allowed in train/val (the rest are test)


def _view(base: Dataset, positions: Sequence[int], transform: Callable | None, labels: Sequence[int] | None) -> SplitSubset:
    """``SplitSubset`` of ``base`` at ``positions``, flattening a transform-free SplitSubset base."""
    selected = None if labels is None else [labels[p] for p in positions]
    if isinstance(base, SplitSubset):
        assert base.transform is None, "pools are transform-free views"
        return SplitSubset(base.dataset, [base.indices[p] for p in positions], transform, selected)
    return SplitSubset(base, positions, transform, selected)


def _holdout(data_dir: Path, name: str, full: Dataset, seed: int, classes: list[str], **holdout: Any) -> _Official:
    """Pool = whole dataset, test = a seeded stratified hold-out (see resolve_test_holdout)."""
    labels = dataset_labels(full)
    assert labels is not None, f"{name}: labels must be readable to make a stratified test split"
    rest, test = resolve_test_holdout(data_dir, name, labels, seed, **holdout)
    return _Official(full, _view(full, test, None, labels), classes, candidates=rest)


def _with_official_val(train: Dataset, val: Dataset, test: Dataset, classes: list[str]) -> _Official:
    return _Official(ConcatDataset([train, val]), test, classes, official_val_start=len(train))


def _load_food(data_dir: Path, download: bool, seed: int) -> _Official:
    train = tv_datasets.Food101(str(data_dir), split="train", download=download)
    return _Official(train, tv_datasets.Food101(str(data_dir), split="test"), list(train.classes))


def _load_cars(data_dir: Path, download: bool, seed: int) -> _Official:
    train = tv_datasets.StanfordCars(str(data_dir), split="train")
    return _Official(train, tv_datasets.StanfordCars(str(data_dir), split="test"), list(train.classes))


def _load_dtd(data_dir: Path, download: bool, seed: int) -> _Official:
    train, val, test = (tv_datasets.DTD(str(data_dir), split=s, download=download and s == "train") for s in ("train", "val", "test"))
    # torchvision derives DTD's classes from each split's own files; they must agree.
    if not train.classes == val.classes == test.classes:
        raise ValueError(f"DTD splits in {data_dir / 'dtd'} list different classes; the label files are inconsistent")
    return _with_official_val(train, val, test, list(train.classes))


def _load_pets(data_dir: Path, download: bool, seed: int) -> _Official:
    trainval = tv_datasets.OxfordIIITPet(str(data_dir), split="trainval", download=download)
    return _Official(trainval, tv_datasets.OxfordIIITPet(str(data_dir), split="test"), list(trainval.classes))


def _load_flowers(data_dir: Path, download: bool, seed: int) -> _Official:
    train, val, test = (tv_datasets.Flowers102(str(data_dir), split=s, download=download and s == "train") for s in ("train", "val", "test"))
    return _with_official_val(train, val, test, list(tv_datasets.Flowers102.classes))


def _load_aircrafts(data_dir: Path, download: bool, seed: int) -> _Official:
    train, val, test = (
        tv_datasets.FGVCAircraft(str(data_dir), split=s, annotation_level="variant", download=download and s == "train")
        for s in ("train", "val", "test")
    )
    return _with_official_val(train, val, test, list(train.classes))


def _load_cifar(data_dir: Path, download: bool, seed: int, cls: type) -> _Official:
    train = cls(str(data_dir), train=True, download=download)
    return _Official(train, cls(str(data_dir), train=False), list(train.classes))


def _load_cifar10(data_dir: Path, download: bool, seed: int) -> _Official:
    return _load_cifar(data_dir, download, seed, tv_datasets.CIFAR10)


def _load_cifar100(data_dir: Path, download: bool, seed: int) -> _Official:
    return _load_cifar(data_dir, download, seed, tv_datasets.CIFAR100)


def _load_caltech101(data_dir: Path, download: bool, seed: int) -> _Official:
    full = tv_datasets.Caltech101(str(data_dir), target_type="category", download=download)
    return _holdout(data_dir, "caltech101", full, seed, list(full.categories), keep_per_class=CALTECH101_TRAIN_PER_CLASS)


def _load_sun397(data_dir: Path, download: bool, seed: int) -> _Official:
    full = tv_datasets.SUN397(str(data_dir), download=download)
    root = data_dir / "SUN397"
    labels = dataset_labels(full)
    # rglob order depends on the file system; sort by path so indices mean the same everywhere.
    by_path = {path.relative_to(root).as_posix(): index for index, path in enumerate(full._image_files)}
    for folder in (root / "Partitions", root):
        train_file, test_file = folder / "Training_01.txt", folder / "Testing_01.txt"
        if train_file.is_file() and test_file.is_file():
            logger.info("sun397: official partition 01 from %s", folder)

            def lookup(path: Path) -> list[int]:
                entries = [line.strip().lstrip("/") for line in path.read_text().splitlines() if line.strip()]
                missing = [entry for entry in entries if entry not in by_path]
                if missing:
                    raise MissingInputError(f"{len(missing)} images listed in {path} are missing under {root}, e.g. {missing[0]}")
                return [by_path[entry] for entry in entries]

            pool = _view(full, lookup(train_file), None, labels)
            return _Official(pool, _view(full, lookup(test_file), None, labels), list(full.classes))
    ordered = _view(full, [by_path[key] for key in sorted(by_path)], None, labels)
    return _holdout(data_dir, "sun397", ordered, seed, list(full.classes), held_fraction=SUN397_TEST_FRACTION)


def _load_voc2007(data_dir: Path, download: bool, seed: int) -> _Official:
    train, val, test = (
        tv_datasets.VOCDetection(
            str(data_dir), year="2007", image_set=s, download=download and s in ("train", "test"),
            target_transform=VocMultiHot(),
        )
        for s in ("train", "val", "test")
    )
    return _with_official_val(train, val, test, list(VOC_CLASSES))


def _load_cub2011(data_dir: Path, download: bool, seed: int) -> _Official:
    train = Cub2011(data_dir, train=True)
    return _Official(train, Cub2011(data_dir, train=False), list(train.classes))


def _load_stl10(data_dir: Path, download: bool, seed: int) -> _Official:
    train = tv_datasets.STL10(str(data_dir), split="train", download=download)
    test = tv_datasets.STL10(str(data_dir), split="test")
    return _Official(train, test, list(getattr(train, "classes", STL10_CLASSES)))


def _load_fashionmnist(data_dir: Path, download: bool, seed: int) -> _Official:
    train = tv_datasets.FashionMNIST(str(data_dir), train=True, download=download)
    return _Official(train, tv_datasets.FashionMNIST(str(data_dir), train=False), list(train.classes))


def _load_imagefolder(data_dir: Path, download: bool, seed: int) -> _Official:
    train_root = _imagefolder_train_root(data_dir)
    for test_root in (data_dir / "test", data_dir / "val"):
        if train_root != data_dir and test_root.is_dir():
            train, test = ImageTree(train_root), ImageTree(test_root)
            if train.classes != test.classes:
                raise ValueError(
                    f"class folders differ between {train_root} ({len(train.classes)}) and {test_root} ({len(test.classes)})"
                )
            return _Official(train, test, list(train.classes))
    full = ImageTree(train_root)
    return _holdout(data_dir, "imagefolder", full, seed, list(full.classes), held_fraction=IMAGEFOLDER_TEST_FRACTION)


_DOWNSTREAM_LOADERS: dict[str, Callable[[Path, bool, int], _Official]] = {
    "food": _load_food, "cars": _load_cars, "dtd": _load_dtd, "pets": _load_pets, "flowers": _load_flowers,
    "aircrafts": _load_aircrafts, "cifar10": _load_cifar10, "cifar100": _load_cifar100,
    "caltech101": _load_caltech101, "sun397": _load_sun397, "voc2007": _load_voc2007, "cub2011": _load_cub2011,
    "stl10": _load_stl10, "fashionmnist": _load_fashionmnist, "imagefolder": _load_imagefolder,
}


def _check_label_range(name: str, split: str, labels: Sequence[int] | None, num_classes: int) -> None:
    if labels and not 0 <= min(labels) <= max(labels) < num_classes:
        raise ValueError(f"{name} {split} labels span [{min(labels)}, {max(labels)}], outside [0, {num_classes})")


def build_downstream_splits(
    name: str,
    data_dir: Path,
    train_transform: Callable,
    test_transform: Callable,
    download: bool = False,
    split_seed: int = 0,
    val_fraction: float = 0.2,
) -> DownstreamSplits:
    """Train / val / test views of a downstream dataset (rules in the module docstring).

    Args:
        name: one of :data:`DOWNSTREAM_DATASETS`.
        data_dir: ``--data-dir``; split files are read from / written to ``data_dir/tv_splits``.
        train_transform: applied to training images (e.g. ``downstream_train_transform``).
        test_transform: applied to val and test images (e.g. ``downstream_test_transform``).
        download: let torchvision download a missing dataset where it can.
        split_seed: seed of generated (stratified) splits.
        val_fraction: share of each class held out for validation when neither a split file
            nor an official validation split exists.
    """
    _check_name(name, DOWNSTREAM_DATASETS, "downstream")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data_dir = Path(data_dir)
    _require(name, data_dir, download)
    with _loading(name, data_dir):
        official = _DOWNSTREAM_LOADERS[name](data_dir, download, split_seed)
    pool_labels = dataset_labels(official.pool)
    train, val = resolve_train_val_split(
        data_dir, name, len(official.pool), pool_labels, val_fraction, split_seed,
        official.official_val_start, official.candidates,
    )
    splits = DownstreamSplits(
        train=_view(official.pool, train, train_transform, pool_labels),
        val=_view(official.pool, val, test_transform, pool_labels),
        test=_view(official.test, range(len(official.test)), test_transform, dataset_labels(official.test)),
        classes=list(official.classes),
        multilabel=name in MULTILABEL_DATASETS,
    )
    for split in ("train", "val", "test"):
        _check_label_range(name, split, getattr(splits, split).labels, splits.num_classes)
    logger.info(
        "%s: %d train / %d val / %d test images, %d classes",
        name, len(splits.train), len(splits.val), len(splits.test), splits.num_classes,
    )
    return splits
