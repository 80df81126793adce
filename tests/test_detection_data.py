"""The VOC-layout detection loader on a tiny generated ``fmnistdet`` set: targets against the XML,
the horizontal flip, the VOC07+12 split rules, and the missing-folder messages."""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

from source.data import voc_demo_setup
from source.data.datasets import DatasetNotFoundError
from source.data.detection import (
    FASHION_MNIST_DETECTION_CLASSES,
    RandomHorizontalFlip,
    VocDetectionDataset,
    build_detection_splits,
    detection_collate,
    parse_voc_objects,
)
from source.run.errors import UserError

FASHION_MNIST = Path(__file__).resolve().parents[1] / "data" / "FashionMNIST"
NUM_2007, NUM_2012 = 8, 4  # VOC2007: 2 train, 2 val, 4 test; VOC2012: 2 train, 2 val


def data_dir_with_fashion_mnist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "FashionMNIST").symlink_to(FASHION_MNIST, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    if not (FASHION_MNIST / "raw").is_dir():
        pytest.skip("FashionMNIST is not in data/FashionMNIST/raw (python -m source.data.fashion_mnist_setup --data-dir data)")
    data_dir = data_dir_with_fashion_mnist(tmp_path_factory.mktemp("det") / "data")
    voc_demo_setup.build_fashion_mnist_detection(data_dir, NUM_2007, NUM_2012, seed=3)
    return data_dir


def image_ids(root: Path, year: str, image_set: str) -> list[str]:
    return (root / "fmnistdet" / "VOCdevkit" / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split()


def parts(dataset) -> list[VocDetectionDataset]:
    return list(dataset.datasets) if isinstance(dataset, ConcatDataset) else [dataset]


def ids_of(dataset) -> list[str]:
    return [Path(path).stem for part in parts(dataset) for path in part.voc.images]


def read_xml(path: str) -> tuple[tuple[int, int], list[tuple[str, list[float], bool]]]:
    root = ET.parse(path).getroot()
    size = (int(root.find("size/height").text), int(root.find("size/width").text))
    objects = []
    for obj in root.findall("object"):
        box = [float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((obj.find("name").text, box, obj.find("difficult").text == "1"))
    return size, objects


def test_targets_match_the_xml(generated):
    splits = build_detection_splits("fmnistdet", generated, flip_probability=0.0)
    assert splits.classes == FASHION_MNIST_DETECTION_CLASSES and splits.num_classes == 10
    seen_objects = 0
    for split in (splits.train, splits.val, splits.test):
        for part in parts(split):
            for index in range(len(part)):
                image, target = part[index]
                (height, width), objects = read_xml(part.voc.annotations[index])
                assert image.dtype == torch.float32 and tuple(image.shape) == (3, height, width)
                assert 0.0 <= image.min() and image.max() <= 1.0
                # VOC's inclusive 1-based pixels -> continuous (xmin - 1, ymin - 1, xmax, ymax).
                expected_boxes = torch.tensor([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b, _ in objects], dtype=torch.float32)
                assert torch.equal(target["boxes"], expected_boxes.reshape(-1, 4))
                assert target["labels"].dtype == torch.int64
                assert target["labels"].tolist() == [FASHION_MNIST_DETECTION_CLASSES.index(name) + 1 for name, _, _ in objects]
                assert target["difficult"].tolist() == [d for _, _, d in objects]
                assert (target["boxes"][:, :2] >= 0).all() and (target["boxes"][:, 2] <= width).all() and (target["boxes"][:, 3] <= height).all()
                assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
                seen_objects += len(objects)
    assert seen_objects >= NUM_2007 + NUM_2012  # every image has at least one item


def test_boxes_are_the_tight_extent_of_the_pasted_items(monkeypatch):
    monkeypatch.setattr(voc_demo_setup, "ITEM_MIN", 28)  # no rescaling: the item's extent is known
    monkeypatch.setattr(voc_demo_setup, "ITEM_MAX", 28)
    items = np.zeros((1, 28, 28), np.uint8)
    items[0, 4:24, 6:22] = 255  # a 16 x 20 opaque block
    image, objects = voc_demo_setup.compose_image(np.random.default_rng(5), items, np.array([2]))
    pixels = np.asarray(image, dtype=np.float64)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        assert (x1 - x0, y1 - y0) == (16, 20) and obj["label"] == 2
    last = objects[-1]["box"]  # drawn on top, so its block is one flat colour (no JPEG yet)
    block = pixels[last[1]:last[3], last[0]:last[2]]
    assert block.std(axis=(0, 1)).max() < 1.0


def test_split_membership(generated):
    splits = build_detection_splits("fmnistdet", generated, flip_probability=0.0)
    assert ids_of(splits.train) == image_ids(generated, "2007", "train") + image_ids(generated, "2012", "train")
    assert ids_of(splits.val) == image_ids(generated, "2007", "val") + image_ids(generated, "2012", "val")
    assert ids_of(splits.test) == image_ids(generated, "2007", "test")
    assert [len(splits.train), len(splits.val), len(splits.test)] == [4, 4, 4]
    assert not set(ids_of(splits.train)) & set(ids_of(splits.val)) and not set(ids_of(splits.val)) & set(ids_of(splits.test))
    trainval = build_detection_splits("fmnistdet", generated, train_image_set="trainval").train
    assert ids_of(trainval) == image_ids(generated, "2007", "trainval") + image_ids(generated, "2012", "trainval")
    assert set(ids_of(trainval)) == set(ids_of(splits.train)) | set(ids_of(splits.val))
    flipped = build_detection_splits("fmnistdet", generated, flip_probability=0.5)
    assert all(part.transforms is not None for part in parts(flipped.train))
    assert all(part.transforms is None for part in parts(flipped.val) + parts(flipped.test))
    with pytest.raises(ValueError, match="trainval"):
        build_detection_splits("fmnistdet", generated, train_image_set="test")


def test_horizontal_flip_moves_boxes_with_the_pixels():
    height, width = 6, 10
    image = torch.zeros(3, height, width)
    image[:, 1:4, 2:5] = 1.0  # the object covers columns 2..4 and rows 1..3: box (2, 1, 5, 4)
    target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 4.0]]), "labels": torch.tensor([3]), "difficult": torch.tensor([True])}
    flipped_image, flipped = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped["boxes"], torch.tensor([[5.0, 1.0, 8.0, 4.0]]))  # x -> W - x
    x0, y0, x1, y1 = (int(v) for v in flipped["boxes"][0])
    assert flipped_image[:, y0:y1, x0:x1].eq(1).all() and flipped_image.sum() == image.sum()
    assert torch.equal(flipped["labels"], target["labels"]) and torch.equal(flipped["difficult"], target["difficult"])
    assert type(flipped["boxes"]) is torch.Tensor
    same_image, same = RandomHorizontalFlip(p=0.0)(image, target)
    assert same_image is image and same is target


def test_flip_of_a_loaded_item_and_its_repeatability(generated):
    plain = parts(build_detection_splits("fmnistdet", generated, flip_probability=0.0).train)[0]
    flipping = parts(build_detection_splits("fmnistdet", generated, flip_probability=1.0).train)[0]
    image, target = plain[0]
    flipped_image, flipped = flipping[0]
    width = image.shape[-1]
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor([width, 0.0, width, 0]), target["boxes"])
    halves = parts(build_detection_splits("fmnistdet", generated, flip_probability=0.5).train)[0]
    torch.manual_seed(11)
    first = [halves[0][1]["boxes"] for _ in range(8)]
    torch.manual_seed(11)
    second = [halves[0][1]["boxes"] for _ in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert any(torch.equal(b, target["boxes"]) for b in first) and any(not torch.equal(b, target["boxes"]) for b in first)


def test_collate_keeps_images_of_different_sizes_apart(generated):
    test = build_detection_splits("fmnistdet", generated).test
    images, targets = detection_collate([test[0], test[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert torch.equal(images[1], test[1][0])


def test_parse_voc_objects_reads_difficult_and_refuses_unknown_classes():
    tree = {"annotation": {"object": [
        {"name": "bag", "difficult": "1", "bndbox": {"xmin": "1", "ymin": "2", "xmax": "10", "ymax": "20"}},
        {"name": "coat", "bndbox": {"xmin": "3.0", "ymin": "4", "xmax": "5", "ymax": "6"}},  # no <difficult>: 0
    ]}}
    labels = {name: i + 1 for i, name in enumerate(FASHION_MNIST_DETECTION_CLASSES)}
    target = parse_voc_objects(tree, labels)
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 1, 10, 20], [2, 3, 5, 6]]))
    assert target["labels"].tolist() == [9, 5] and target["difficult"].tolist() == [True, False]
    empty = parse_voc_objects({"annotation": {"object": []}}, labels)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        parse_voc_objects({"annotation": {"object": [dict(tree["annotation"]["object"][0], name="dog")]}}, labels)


def test_tiny_items_are_difficult(monkeypatch):
    monkeypatch.setattr(voc_demo_setup, "ITEM_MIN", 16)
    monkeypatch.setattr(voc_demo_setup, "ITEM_MAX", 16)
    rng = np.random.default_rng(0)
    items = np.zeros((1, 28, 28), np.uint8)
    items[0, 4:24, 6:22] = 200
    _, objects = voc_demo_setup.compose_image(rng, items, np.array([4]))
    assert objects and all(o["difficult"] and o["label"] == 4 for o in objects)
    assert all(o["box"][2] - o["box"][0] < voc_demo_setup.DIFFICULT_MAX_SIDE for o in objects)


def test_generation_is_deterministic_and_kept(generated, tmp_path):
    again = data_dir_with_fashion_mnist(tmp_path / "again")
    voc_demo_setup.build_fashion_mnist_detection(again, NUM_2007, NUM_2012, seed=3)
    first, second = generated / "fmnistdet", again / "fmnistdet"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    stamp = (second / "settings.json").stat().st_mtime_ns
    voc_demo_setup.build_fashion_mnist_detection(again, NUM_2007, NUM_2012, seed=3)  # same settings: nothing to do
    assert (second / "settings.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="--overwrite"):
        voc_demo_setup.build_fashion_mnist_detection(again, NUM_2007, NUM_2012, seed=4)
    assert not [p for p in again.iterdir() if p.name.startswith(".fmnistdet")]  # no staging folder left


def test_missing_voc_folder_names_it_and_where_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        build_detection_splits("voc0712det", tmp_path)
    message = str(error.value)
    assert isinstance(error.value, UserError)
    assert str(tmp_path / "VOCdevkit" / "VOC2007") in message and "host.robots.ox.ac.uk/pascal/VOC/voc2007" in message
    assert "Dataset not found or corrupted" not in message  # torchvision's own message is never reached
    with pytest.raises(DatasetNotFoundError, match="voc_demo_setup"):
        build_detection_splits("fmnistdet", tmp_path)


def test_missing_test_split_names_the_test_tar(generated, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(generated / "fmnistdet", copy)
    (copy / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink()
    voc_like = tmp_path / "voc"
    (voc_like).mkdir()
    (copy / "VOCdevkit").rename(voc_like / "VOCdevkit")
    with pytest.raises(DatasetNotFoundError, match="VOCtest_06-Nov-2007.tar") as error:
        build_detection_splits("voc0712det", voc_like)
    assert "test.txt" in str(error.value)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="voc0712det"):
        build_detection_splits("coco", Path("."))


def test_download_fetches_each_voc_tar_once(monkeypatch, tmp_path):
    calls = []

    class RecordingVOC:
        def __init__(self, root, year, image_set, download):
            calls.append((year, image_set, download))
            self.images, self.annotations = [], []

        def __len__(self):
            return 0

    monkeypatch.setattr("source.data.detection.VOCDetection", RecordingVOC)
    build_detection_splits("voc0712det", tmp_path, download=True)
    fetched = [(year, image_set) for year, image_set, download in calls if download]
    assert fetched == [("2007", "train"), ("2012", "train"), ("2007", "test")]  # 2007 trainval, 2012 trainval, 2007 test
    assert len(calls) == 5
