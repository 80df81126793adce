"""Generate ``fmnistdet``, a small detection set in the PASCAL VOC layout made of real FashionMNIST items.

    python -m source.data.voc_demo_setup --data-dir data --num-images 400

writes ``<data_dir>/fmnistdet/VOCdevkit/VOC2007`` (``num_images`` images: a quarter ``train``, a
quarter ``val``, half ``test``, like VOC2007's 50/50 trainval/test) and ``.../VOC2012``
(``--num-images-2012``, default half as many: half ``train``, half ``val``), each with
``JPEGImages/*.jpg``, ``Annotations/*.xml`` and ``ImageSets/Main/{train,val,trainval}.txt``
(VOC2007 also ``test.txt``), so :mod:`source.data.detection` reads it exactly as it reads the real
VOC07+12. It exists so the detection pipeline can be tested and demonstrated on a CPU.

Each image is a 128 x 128 px canvas (a smooth dark two-colour gradient with pixel noise) with 1-2
FashionMNIST items (28x28, scaled to 48-80 px, tinted with a random bright colour, pasted with
their grey level as opacity): every item is brighter than the canvas, as FashionMNIST's items are
on its black background, and spans several cells of the detector's stride-16 feature map. An item's box is the tight extent of its pixels brighter than
``ITEM_PIXEL_THRESHOLD``, written as VOC writes boxes (inclusive 1-based pixel indices); its
class is its FashionMNIST label. Items may overlap a little (a placement overlapping an earlier
box by IoU > ``MAX_PLACEMENT_IOU`` is redrawn a few times); an item whose box is shorter than
``DIFFICULT_MAX_SIDE`` px or that later items cover for more than ``DIFFICULT_OCCLUSION`` of its
pixels is marked ``difficult``, as VOC marks objects hard to recognise. The 2007 test images use
FashionMNIST's test items, the other splits its training items.

Everything is drawn from one ``numpy`` generator seeded with ``--seed``, so the same arguments
give the same files. The set is written to a temporary folder and renamed into place; an existing
set made with the same settings is kept, a different one is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import FashionMNIST

from source.data.datasets import DatasetNotFoundError
from source.data.detection import FASHION_MNIST_DETECTION_CLASSES, FASHION_MNIST_DETECTION_FOLDER
from source.run.errors import UserError, add_debug_argument, run_entry_point

logger = logging.getLogger(__name__)

# Canvas side lengths (px), drawn uniformly per side. One size the demo's detector takes as it is
# (--det-min-size = --det-max-size = 128: no resize), small enough for CPU training.
CANVAS_MIN, CANVAS_MAX = 128, 128
# Items per image: few, so that a detector trained for minutes on a CPU learns them.
ITEMS_MIN, ITEMS_MAX = 1, 2
# Side of a pasted item (px; FashionMNIST items are 28x28): 3-5 cells of the stride-16 feature map.
ITEM_MIN, ITEM_MAX = 48, 80
# Grey level (0..255) above which a pixel of the scaled item belongs to its box.
ITEM_PIXEL_THRESHOLD = 32
# A box whose longer side is shorter than this (px) is "difficult" (tiny).
DIFFICULT_MAX_SIDE = 20
# An item more than this share of whose pixels later items cover is "difficult" (occluded).
DIFFICULT_OCCLUSION = 0.5
# A new item's box may overlap an earlier one up to this IoU; beyond it the placement is redrawn.
MAX_PLACEMENT_IOU = 0.1
PLACEMENT_TRIES = 10
# Grey-level ranges (0..255) of the background's two gradient colours and of an item's tint: the
# canvas stays darker than every item, so an item reads as in FashionMNIST (bright on black), the
# images the backbones are pre-trained on.
BACKGROUND_LEVELS = (0.0, 96.0)
TINT_LEVELS = (128.0, 255.0)
# Standard deviation of the background's pixel noise (grey levels).
BACKGROUND_NOISE = 12.0
JPEG_QUALITY = 90
# Shares of the VOC2007 images in train and val (the rest is test), and of VOC2012 in train (the rest val).
VOC2007_TRAIN_SHARE, VOC2007_VAL_SHARE = 0.25, 0.25
VOC2012_TRAIN_SHARE = 0.5
# The file recording the settings a set was made with.
SETTINGS_FILE = "settings.json"


def load_fashion_mnist(data_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """FashionMNIST images (N, 28, 28) uint8 and labels (N,) from ``<data_dir>/FashionMNIST/raw``."""
    try:
        dataset = FashionMNIST(str(data_dir), train=train, download=False)
    except RuntimeError as error:
        raise DatasetNotFoundError(
            "fashionmnist", Path(data_dir) / "FashionMNIST" / "raw",
            "FashionMNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte (uncompressed)",
            "Run `python -m source.data.fashion_mnist_setup --data-dir <data_dir>` first.", str(error),
        ) from error
    return dataset.data.numpy(), dataset.targets.numpy()


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float: a linear gradient between two random colours along a random direction, plus noise."""
    start, end = rng.uniform(*BACKGROUND_LEVELS, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    along = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    along = (along - along.min()) / max(along.max() - along.min(), 1e-9)  # (H, W) in [0, 1]
    canvas = start + along[..., None] * (end - start)
    return canvas + rng.normal(0, BACKGROUND_NOISE, canvas.shape)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two boxes in continuous pixel coordinates (x0, y0, x1, y1)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def compose_image(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray) -> tuple[Image.Image, list[dict]]:
    """One canvas with ``ITEMS_MIN``-``ITEMS_MAX`` items drawn from ``items`` (N, 28, 28) uint8 / ``labels`` (N,).

    Returns the RGB image and its objects: ``label`` (0-based FashionMNIST class), ``box``
    (x0, y0, x1, y1) continuous pixel coordinates (VOC's xmin = x0 + 1, xmax = x1) and ``difficult``.
    """
    height, width = (int(v) for v in rng.integers(CANVAS_MIN, CANVAS_MAX + 1, 2))
    canvas = _background(rng, height, width)
    masks, objects = [], []
    for _ in range(int(rng.integers(ITEMS_MIN, ITEMS_MAX + 1))):
        index = int(rng.integers(len(items)))
        side = int(rng.integers(ITEM_MIN, min(ITEM_MAX, height, width) + 1))
        grey = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64)
        rows, cols = np.nonzero(grey > ITEM_PIXEL_THRESHOLD)
        if rows.size == 0:
            continue
        for _ in range(PLACEMENT_TRIES):
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            box = (left + int(cols.min()), top + int(rows.min()), left + int(cols.max()) + 1, top + int(rows.max()) + 1)
            if all(_iou(box, other["box"]) <= MAX_PLACEMENT_IOU for other in objects):
                break
        tint = rng.uniform(*TINT_LEVELS, 3)
        opacity = grey[..., None] / 255.0  # (side, side, 1)
        region = canvas[top:top + side, left:left + side]
        canvas[top:top + side, left:left + side] = region * (1 - opacity) + tint * opacity
        mask = np.zeros((height, width), bool)
        mask[top:top + side, left:left + side] = grey > ITEM_PIXEL_THRESHOLD
        masks.append(mask)
        objects.append({"label": int(labels[index]), "box": box})
    for k, obj in enumerate(objects):
        covered = np.zeros((height, width), bool)
        for later in masks[k + 1:]:
            covered |= later
        occluded = (masks[k] & covered).sum() / masks[k].sum()
        x0, y0, x1, y1 = obj["box"]
        obj["difficult"] = bool(max(x1 - x0, y1 - y0) < DIFFICULT_MAX_SIDE or occluded > DIFFICULT_OCCLUSION)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    return image, objects


def annotation_xml(folder: str, image_id: str, size: tuple[int, int], objects: list[dict]) -> ET.ElementTree:
    """A VOC annotation: boxes as inclusive 1-based pixel indices (xmin = x0 + 1, xmax = x1)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "FashionMNIST detection (generated by source.data.voc_demo_setup)"
    size_node = ET.SubElement(root, "size")
    for key, value in zip(("width", "height", "depth"), (*size, 3)):
        ET.SubElement(size_node, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = FASHION_MNIST_DETECTION_CLASSES[obj["label"]]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = str(int(obj["difficult"]))
        box = ET.SubElement(node, "bndbox")
        x0, y0, x1, y1 = obj["box"]
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0 + 1, y0 + 1, x1, y1)):
            ET.SubElement(box, key).text = str(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def _write_year(rng: np.random.Generator, voc_root: Path, splits: dict[str, tuple[list[str], np.ndarray, np.ndarray]]) -> None:
    """Write the images, XML files and ImageSets/Main lists of one VOC year."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc_root / sub).mkdir(parents=True, exist_ok=True)
    for split, (ids, items, labels) in splits.items():
        for image_id in ids:
            image, objects = compose_image(rng, items, labels)
            image.save(voc_root / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
            annotation_xml(voc_root.name, image_id, image.size, objects).write(voc_root / "Annotations" / f"{image_id}.xml")
        (voc_root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    if "train" in splits and "val" in splits:
        trainval = splits["train"][0] + splits["val"][0]
        (voc_root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in trainval))


def _split_counts(total: int, shares: tuple[float, ...]) -> list[int]:
    """Split ``total`` into len(shares) + 1 parts, each at least 1 (the last takes the rest)."""
    counts = [max(1, int(total * share)) for share in shares]
    counts.append(total - sum(counts))
    if counts[-1] < 1:
        raise ValueError(f"{total} images cannot fill {len(counts)} splits")
    return counts


def build_fashion_mnist_detection(data_dir: str | Path, num_images: int, num_images_2012: int | None = None,
                                  seed: int = 0, overwrite: bool = False) -> Path:
    """Write the ``fmnistdet`` set under ``<data_dir>/fmnistdet`` (see the module docstring); return that folder."""
    data_dir = Path(data_dir)
    num_images_2012 = max(2, num_images // 2) if num_images_2012 is None else num_images_2012
    if num_images < 3 or num_images_2012 < 2:
        raise UserError(f"need --num-images >= 3 (VOC2007 train/val/test) and --num-images-2012 >= 2, got {num_images} and {num_images_2012}")
    settings = {"num_images": num_images, "num_images_2012": num_images_2012, "seed": seed, "format": 2}
    target = data_dir / FASHION_MNIST_DETECTION_FOLDER
    if target.exists():
        recorded = target / SETTINGS_FILE
        if recorded.is_file() and json.loads(recorded.read_text()) == settings:
            logger.info("%s already holds this set (%s); nothing to do", target, settings)
            return target
        if not overwrite:
            raise UserError(f"{target} already exists with other settings; pass --overwrite to replace it (wanted {settings})")
    train_items, train_labels = load_fashion_mnist(data_dir, train=True)
    test_items, test_labels = load_fashion_mnist(data_dir, train=False)
    rng = np.random.default_rng(seed)
    n_train, n_val, n_test = _split_counts(num_images, (VOC2007_TRAIN_SHARE, VOC2007_VAL_SHARE))
    ids_2007 = [f"{i:06d}" for i in range(1, num_images + 1)]
    n12_train, n12_val = _split_counts(num_images_2012, (VOC2012_TRAIN_SHARE,))
    ids_2012 = [f"2012_{i:06d}" for i in range(1, num_images_2012 + 1)]
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{FASHION_MNIST_DETECTION_FOLDER}.", dir=data_dir))
    try:
        devkit = staging / "VOCdevkit"
        _write_year(rng, devkit / "VOC2007", {
            "train": (ids_2007[:n_train], train_items, train_labels),
            "val": (ids_2007[n_train:n_train + n_val], train_items, train_labels),
            "test": (ids_2007[n_train + n_val:], test_items, test_labels),
        })
        _write_year(rng, devkit / "VOC2012", {
            "train": (ids_2012[:n12_train], train_items, train_labels),
            "val": (ids_2012[n12_train:], train_items, train_labels),
        })
        (staging / SETTINGS_FILE).write_text(json.dumps(settings) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d VOC2007 (%d train, %d val, %d test) and %d VOC2012 images to %s",
                num_images, n_train, n_val, n_test, num_images_2012, target)
    return target


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="holds FashionMNIST/raw; the set goes to <data-dir>/fmnistdet")
    parser.add_argument("--num-images", type=int, default=400, help="VOC2007 images (1/4 train, 1/4 val, 1/2 test)")
    parser.add_argument("--num-images-2012", type=int, default=None, help="VOC2012 images (half train, half val); default num-images / 2")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (same arguments, same files)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing set made with other settings")
    add_debug_argument(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_fashion_mnist_detection(args.data_dir, args.num_images, args.num_images_2012, args.seed, args.overwrite)


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
