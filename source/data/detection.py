"""Object-detection datasets in the PASCAL VOC layout, read with torchvision's ``VOCDetection``.

Two datasets share the layout ``<root>/VOCdevkit/VOC2007`` and ``<root>/VOCdevkit/VOC2012``
(each with ``Annotations/*.xml``, ``JPEGImages/*.jpg`` and ``ImageSets/Main/<split>.txt``):

* ``voc0712det``: PASCAL VOC 2007 + 2012 with its 20 classes, ``<root>`` = ``--data-dir``
  (the folders the VOC tar files create, where torchvision's ``VOCDetection`` and the
  ``voc2007`` classification set look too);
* ``fmnistdet``: a small set generated in the same layout from real FashionMNIST items pasted
  on larger canvases (``python -m source.data.voc_demo_setup``), ``<root>`` =
  ``<data_dir>/fmnistdet``, with FashionMNIST's 10 classes.

Splits, the standard VOC07+12 protocol (Ren et al., Faster R-CNN, NeurIPS 2015; detectron2's
``voc_2007_test`` evaluation): **train** = VOC2007 ``train`` + VOC2012 ``train`` (or both
``trainval`` with ``train_image_set="trainval"``, the usual final-training set, which then holds
the val images too), **val** = VOC2007 ``val`` + VOC2012 ``val`` (for model selection),
**test** = VOC2007 ``test``. The original BiSSL code trained on the train splits, selected and
reported on val, and used no test split.

An item is ``(image, target)``: the image as a float tensor (3, H, W) in [0, 1] at its original
size (the detector's ``GeneralizedRCNNTransform`` resizes and normalises), and ``target`` a dict
with ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64 in 1..C (0 is the background) and
``difficult`` (N,) bool. VOC annotations are inclusive 1-based pixel indices; boxes are returned
in torchvision's continuous pixel coordinates (xmin - 1, ymin - 1, xmax, ymax), as detectron2's
VOC loader does, so a box spans exactly its pixels and the plain IoU of
:mod:`source.stages.detection_metrics` equals the VOC devkit's "+1" IoU. (The original BiSSL
code used (xmin, ymin, xmax, ymax) unchanged, a one-pixel shift of the top-left corner, and
dropped the difficult flag.) Difficult objects are ordinary training targets (torchvision's
detector ignores the ``difficult`` key; detectron2 trains on them too); only the evaluator treats
them apart. An optional horizontal flip (:class:`RandomHorizontalFlip`) flips
the image and its boxes (x -> W - x) with torch's CPU generator, so the per-sample seeds of
:mod:`source.data.loader` make it repeatable.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import parse as parse_xml

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import tv_tensors
from torchvision.datasets import VOCDetection
from torchvision.transforms.v2 import functional as F

from source.data.datasets import VOC_CLASSES, DatasetNotFoundError

__all__ = [
    "DETECTION_DATASETS", "DETECTION_CLASSES", "FASHION_MNIST_DETECTION_CLASSES", "FASHION_MNIST_DETECTION_FOLDER",
    "DEFAULT_FLIP_PROBABILITY", "DetectionSplits", "VocDetectionDataset", "RandomHorizontalFlip",
    "build_detection_splits", "detection_collate", "parse_voc_objects", "detection_root",
]

# FashionMNIST's classes in its label order, written as VOC writes names (lower case, no spaces).
FASHION_MNIST_DETECTION_CLASSES = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankleboot",
)
DETECTION_CLASSES: dict[str, tuple[str, ...]] = {"voc0712det": VOC_CLASSES, "fmnistdet": FASHION_MNIST_DETECTION_CLASSES}
DETECTION_DATASETS = tuple(DETECTION_CLASSES)
# The generated set's folder under --data-dir (it holds its own VOCdevkit/).
FASHION_MNIST_DETECTION_FOLDER = "fmnistdet"
# Chance of flipping a training image (detectron2's VOC recipes flip half; the original BiSSL code never did).
DEFAULT_FLIP_PROBABILITY = 0.5
TRAIN_IMAGE_SETS = ("train", "trainval")

_VOC_LAYOUT = (
    "VOCdevkit/VOC2007 and VOCdevkit/VOC2012, each with Annotations/*.xml, JPEGImages/*.jpg and "
    "ImageSets/Main/{train,val,trainval}.txt (VOC2007 also ImageSets/Main/test.txt)"
)
_HOW_TO_GET = {
    "voc0712det": (
        "Download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from "
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ and VOCtrainval_11-May-2012.tar from "
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and extract all three in --data-dir "
        "(they create VOCdevkit/VOC2007 and VOCdevkit/VOC2012), or pass --download-dataset 1 to let torchvision fetch them."
    ),
    "fmnistdet": (
        "Generate it with `python -m source.data.voc_demo_setup --data-dir <data_dir>` "
        "(needs FashionMNIST in <data_dir>/FashionMNIST/raw: `python -m source.data.fashion_mnist_setup --data-dir <data_dir>`)."
    ),
}
# (year, image set) of each split; the train split's image set is chosen by the caller.
_SPLIT_PARTS = {"val": (("2007", "val"), ("2012", "val")), "test": (("2007", "test"),)}


def detection_root(name: str, data_dir: str | Path) -> Path:
    """The folder holding ``VOCdevkit/`` for dataset ``name``."""
    if name not in DETECTION_CLASSES:
        raise ValueError(f"unknown detection dataset {name!r}; valid: {', '.join(DETECTION_DATASETS)}")
    return Path(data_dir) / FASHION_MNIST_DETECTION_FOLDER if name == "fmnistdet" else Path(data_dir)


def parse_voc_objects(annotation: dict[str, Any], class_to_label: dict[str, int], where: str = "annotation") -> dict[str, torch.Tensor]:
    """The objects of a parsed VOC XML (``VOCDetection.parse_voc_xml``) as a torchvision target.

    Returns ``boxes`` (N, 4) float32 in continuous coordinates (xmin - 1, ymin - 1, xmax, ymax),
    ``labels`` (N,) int64 from ``class_to_label`` and ``difficult`` (N,) bool (a missing
    ``<difficult>`` counts as 0, as in the devkit).
    """
    objects = annotation["annotation"].get("object", [])
    if isinstance(objects, dict):  # a hand-written parse with one object
        objects = [objects]
    boxes, labels, difficult = [], [], []
    for obj in objects:
        name = obj["name"].strip()
        if name not in class_to_label:
            raise ValueError(f"{where}: unknown class {name!r}; this dataset's classes are {sorted(class_to_label)}")
        box = obj["bndbox"]
        xmin, ymin, xmax, ymax = (float(box[key]) for key in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
        labels.append(class_to_label[name])
        difficult.append(int(obj.get("difficult", 0) or 0) == 1)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
    }


class RandomHorizontalFlip:
    """Flip an (image, target) pair left-right with probability ``p``: image (3, H, W) and boxes
    x -> W - x (torchvision's ``horizontal_flip`` on ``BoundingBoxes``). Draws one number from
    torch's CPU generator per call (even when ``p`` is 0 or 1, so the draws do not depend on ``p``)."""

    def __init__(self, p: float = DEFAULT_FLIP_PROBABILITY) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must lie in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if torch.rand(()).item() >= self.p:
            return image, target
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        flipped = dict(target, boxes=F.horizontal_flip(boxes).as_subclass(torch.Tensor))
        return F.horizontal_flip(image), flipped


class VocDetectionDataset(Dataset):
    """One (year, image set) of a VOC-layout folder: ``(image (3, H, W) in [0, 1], target)``.

    Files are found by torchvision's ``VOCDetection`` (``root/VOCdevkit/VOC<year>``); the XML
    becomes a target by :func:`parse_voc_objects`; ``transforms`` (e.g. :class:`RandomHorizontalFlip`)
    is applied to the pair.
    """

    def __init__(self, root: str | Path, year: str, image_set: str, classes: Sequence[str],
                 transforms: Any = None, download: bool = False) -> None:
        self.voc = VOCDetection(str(root), year=year, image_set=image_set, download=download)
        self.classes = tuple(classes)
        self.class_to_label = {name: label for label, name in enumerate(self.classes, start=1)}
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.voc)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        """The untransformed target of item ``index`` (reads only the XML, not the image)."""
        tree = VOCDetection.parse_voc_xml(parse_xml(self.voc.annotations[index]).getroot())
        return parse_voc_objects(tree, self.class_to_label, self.voc.annotations[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with Image.open(self.voc.images[index]) as pil:
            image = F.to_dtype(F.pil_to_tensor(pil.convert("RGB")), torch.float32, scale=True)
        target = self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


@dataclass
class DetectionSplits:
    """The three splits of a detection dataset and its classes (labels 1..C; 0 is the background)."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (the detector predicts C + 1 with the background)."""
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """False: read by code shared with the classification splits (a detection score is AP50, not mAP)."""
        return False


def _require_split(name: str, root: Path, year: str, image_set: str) -> None:
    """Raise DatasetNotFoundError naming the first missing folder or split file of (year, image_set)."""
    voc_root = root / "VOCdevkit" / f"VOC{year}"
    for path in (voc_root, voc_root / "Annotations", voc_root / "JPEGImages", voc_root / "ImageSets" / "Main" / f"{image_set}.txt"):
        if not path.exists():
            how = _HOW_TO_GET[name]
            if name == "voc0712det" and image_set == "test":
                how = "The VOC2007 test images come in VOCtest_06-Nov-2007.tar. " + how
            raise DatasetNotFoundError(name, path, _VOC_LAYOUT, how)


def _concat(parts: list[VocDetectionDataset]) -> Dataset:
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def build_detection_splits(
    name: str, data_dir: str | Path, *, train_image_set: str = "train", flip_probability: float = DEFAULT_FLIP_PROBABILITY,
    download: bool = False,
) -> DetectionSplits:
    """train / val / test of ``name`` (``voc0712det`` or ``fmnistdet``) under ``data_dir``.

    train = VOC2007 + VOC2012 ``train_image_set`` (``train`` or ``trainval``), flipped with
    ``flip_probability`` (0 reproduces the original code); val = 2007 + 2012 ``val``; test =
    VOC2007 ``test``; val and test are never flipped. A missing folder or split file raises
    :class:`DatasetNotFoundError` naming it and where to get the data (before torchvision is
    asked, whose message would be "Dataset not found or corrupted"). ``download`` lets
    torchvision fetch the real VOC tar files (``voc0712det`` only).
    """
    root = detection_root(name, data_dir)
    if train_image_set not in TRAIN_IMAGE_SETS:
        raise ValueError(f"unknown train image set {train_image_set!r}; valid: {', '.join(TRAIN_IMAGE_SETS)}")
    download = download and name == "voc0712det"
    parts = dict(_SPLIT_PARTS, train=(("2007", train_image_set), ("2012", train_image_set)))
    if not download:
        for split in ("train", "val", "test"):
            for year, image_set in parts[split]:
                _require_split(name, root, year, image_set)
    flip = RandomHorizontalFlip(flip_probability) if flip_probability > 0 else None
    classes = DETECTION_CLASSES[name]

    fetched: set[str] = set()

    def fetch_once(year: str, image_set: str) -> bool:
        # One tar per key (2007 trainval, 2007 test, 2012 trainval): download and extract it once, not once per split.
        key = "2007-test" if (year, image_set) == ("2007", "test") else year
        first = download and key not in fetched
        fetched.add(key)
        return first

    def load(split: str, transforms: Any) -> Dataset:
        return _concat([VocDetectionDataset(root, year, image_set, classes, transforms, fetch_once(year, image_set))
                        for year, image_set in parts[split]])

    return DetectionSplits(train=load("train", flip), val=load("val", None), test=load("test", None), classes=classes)


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A batch of (image, target) pairs as the two lists torchvision's detectors take (images of
    different sizes cannot be stacked; the model batches them after resizing)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
