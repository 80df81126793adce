"""Datasets, splits and subsampling on tiny generated files in each dataset's real on-disk layout.

The layouts follow torchvision 0.29's dataset classes (and CUB-200-2011's official files).
torchvision verifies the MD5 of the real CIFAR / STL-10 / Flowers-102 files; generated
stand-ins cannot match those, so the ``no_checksums`` fixture reduces that check to "file exists".
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from source.data import datasets as data_module
from source.data.datasets import (
    DOWNSTREAM_DATASETS,
    PRETEXT_DATASETS,
    VOC_CLASSES,
    DatasetNotFoundError,
    build_downstream_splits,
    build_pretext_dataset,
)
from source.data.fashion_mnist_setup import RAW_FILES, ensure_fashion_mnist
from source.data.splits import (
    SplitSubset,
    dataset_labels,
    split_file_path,
    stratified_choice,
    stratified_split,
    subsample,
)
from source.data.transforms import downstream_test_transform, downstream_train_transform, pretext_transform

torch.set_num_threads(1)
SIZE = 8  # output image side used throughout
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


@pytest.fixture
def no_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers102
    import torchvision.datasets.stl10 as stl10

    def exists(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    for module in (cifar, stl10, flowers102):
        monkeypatch.setattr(module, "check_integrity", exists)


def _image(path: Path, label: int, mode: str = "RGB", size: tuple[int, int] = (10, 7)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = COLOURS[label % len(COLOURS)]
    Image.new("RGB", size, colour).convert(mode).save(path)


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


@dataclass
class Layout:
    """What a generated dataset should load as."""

    num_classes: int
    pool_labels: list[int]  # labels of the official training split ("pool"), in index order
    test_size: int
    official_val: tuple[int, int] | None = None  # (train, val) sizes of an official val split
    holdout_test: bool = False  # test is held out of the pool (pool = whole dataset)


# --- generators: one per dataset, each writing the real layout --------------------------------


def make_food(root: Path) -> Layout:
    classes = ["apple_pie", "baby_back_ribs", "ramen"]
    meta = {"train": {c: [f"{c}/{c}{i}" for i in range(5)] for c in classes},
            "test": {c: [f"{c}/{c}t{i}" for i in range(2)] for c in classes}}
    for split, content in meta.items():
        _lines(root / "food-101" / "meta" / f"{split}.json", [json.dumps(content)])
        for label, cls in enumerate(classes):
            for rel in content[cls]:
                _image(root / "food-101" / "images" / f"{rel}.jpg", label)
    return Layout(3, [0] * 5 + [1] * 5 + [2] * 5, 6)


def make_cars(root: Path) -> Layout:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT RS Coupe 2012"]
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    pool_labels = []
    for split, folder, mat, per_class in (
        ("train", "cars_train", base / "devkit" / "cars_train_annos.mat", 4),
        ("test", "cars_test", base / "cars_test_annos_withlabels.mat", 2),
    ):
        records = []
        for i in range(3 * per_class):
            label = (i * 2) % 3  # interleaved classes
            fname = f"{i + 1:05d}.jpg"
            _image(base / folder / fname, label)
            records.append((np.uint8(label + 1), fname))
            if split == "train":
                pool_labels.append(label)
        scipy.io.savemat(mat, {"annotations": np.array(records, dtype=[("class", "O"), ("fname", "O")])})
    return Layout(3, pool_labels, 6)


def make_dtd(root: Path) -> Layout:
    base = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "bubbly"]
    counts = {"train": 4, "val": 2, "test": 2}
    for split, n in counts.items():
        lines = []
        for label, cls in enumerate(classes):
            for i in range(n):
                name = f"{cls}_{split}{i}.jpg"
                _image(base / "images" / cls / name, label)
                lines.append(f"{cls}/{name}")
        _lines(base / "labels" / f"{split}1.txt", lines)
    return Layout(3, [c for c in range(3) for _ in range(4)] + [c for c in range(3) for _ in range(2)], 6, official_val=(12, 6))


def make_pets(root: Path) -> Layout:
    base = root / "oxford-iiit-pet"
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    pool_labels = []
    for split, n in (("trainval", 5), ("test", 2)):
        lines = []
        for i in range(n):
            for label, breed in enumerate(breeds):
                image_id = f"{breed}_{split}{i}"
                _image(base / "images" / f"{image_id}.jpg", label)
                lines.append(f"{image_id} {label + 1} {1 + label % 2} {i + 1}")
                if split == "trainval":
                    pool_labels.append(label)
        _lines(base / "annotations" / f"{split}.txt", lines)
    return Layout(3, pool_labels, 6)


def make_flowers(root: Path) -> Layout:
    base = root / "flowers-102"
    flower_classes = [0, 1, 49]  # 0-based; the dataset always has 102 classes
    labels, split_ids = [], {"trnid": [], "valid": [], "tstid": []}
    image_id = 0
    for key, n in (("trnid", 3), ("valid", 2), ("tstid", 2)):
        for cls in flower_classes:
            for _ in range(n):
                image_id += 1
                labels.append(cls + 1)
                split_ids[key].append(image_id)
                _image(base / "jpg" / f"image_{image_id:05d}.jpg", cls)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    scipy.io.savemat(base / "setid.mat", {k: np.array(v) for k, v in split_ids.items()})
    pool = [labels[i - 1] - 1 for i in split_ids["trnid"] + split_ids["valid"]]
    return Layout(102, pool, 6, official_val=(9, 6))


def make_aircrafts(root: Path) -> Layout:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    _lines(data / "variants.txt", variants)
    pool, image_id = [], 1000
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(n):
                image_id += 1
                _image(data / "images" / f"{image_id:07d}.jpg", label)
                lines.append(f"{image_id:07d} {variant}")
                if split != "test":
                    pool.append(label)
        _lines(data / f"images_variant_{split}.txt", lines)
    return Layout(3, pool, 6, official_val=(9, 6))


def _pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(content, handle)


def _cifar_pixels(labels: list[int]) -> np.ndarray:
    return np.stack([np.full(3 * 32 * 32, 40 * (label % 6), dtype=np.uint8) for label in labels])


def make_cifar10(root: Path) -> Layout:
    base = root / "cifar-10-batches-py"
    pool = []
    for b in range(1, 6):
        labels = [(4 * b + i) % 4 for i in range(4)]  # classes 0..3 only, 5 images each
        pool += labels
        _pickle(base / f"data_batch_{b}", {"data": _cifar_pixels(labels), "labels": labels})
    test_labels = [0, 1, 2, 3, 9]
    _pickle(base / "test_batch", {"data": _cifar_pixels(test_labels), "labels": test_labels})
    _pickle(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return Layout(10, pool, 5)


def make_cifar100(root: Path) -> Layout:
    base = root / "cifar-100-python"
    pool = [i % 3 * 33 for i in range(12)]  # classes 0, 33, 66
    _pickle(base / "train", {"data": _cifar_pixels(pool), "fine_labels": pool, "coarse_labels": [0] * 12})
    _pickle(base / "test", {"data": _cifar_pixels([99, 5]), "fine_labels": [99, 5], "coarse_labels": [0, 0]})
    _pickle(base / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)]})
    return Layout(100, pool, 2)


def make_caltech101(root: Path) -> Layout:
    base = root / "caltech101" / "101_ObjectCategories"
    counts = {"Faces": 33, "airplanes": 32, "ant": 31}  # > 30 per class so each class has test images
    _image(base / "BACKGROUND_Google" / "image_0001.jpg", 0)
    pool = []
    for label, (category, n) in enumerate(sorted(counts.items())):
        for i in range(1, n + 1):
            # Some Caltech-101 images are greyscale; they must come out with 3 channels.
            _image(base / category / f"image_{i:04d}.jpg", label, mode="L" if i % 3 == 0 else "RGB", size=(6, 5))
        pool += [label] * n
    return Layout(3, pool, 3 + 2 + 1, holdout_test=True)


def _sun397_images(root: Path) -> tuple[list[str], list[int]]:
    base = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom"]
    _lines(base / "ClassName.txt", classes)
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for i in range(4):
            rel = f"{cls[1:]}/sun_{label}{i:03d}.jpg"
            _image(base / rel, label)
            paths.append(rel)
            labels.append(label)
    return paths, labels


def make_sun397(root: Path) -> Layout:
    _, labels = _sun397_images(root)
    return Layout(3, labels, 6, holdout_test=True)  # 50% of each class held out


def make_sun397_partitions(root: Path) -> Layout:
    paths, labels = _sun397_images(root)
    order = [3, 0, 5, 4, 8, 9]  # two training images per class, in the file's order
    test = [1, 6, 10]
    _lines(root / "SUN397" / "Partitions" / "Training_01.txt", ["/" + paths[i] for i in order])
    _lines(root / "SUN397" / "Partitions" / "Testing_01.txt", ["/" + paths[i] for i in test])
    return Layout(3, [labels[i] for i in order], 3)


def _voc_annotation(names: list[str], difficult: list[int]) -> str:
    objects = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for n, d in zip(names, difficult)
    )
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{objects}</annotation>"


VOC_OBJECTS = {
    "000001": ["dog", "person"], "000002": ["car"], "000003": ["cat", "cat", "sofa"],
    "000004": ["aeroplane"], "000005": ["tvmonitor", "bottle"], "000006": ["person"],
    "000007": ["horse"], "000008": ["bird", "dog"],
}
VOC_SPLITS = {"train": ["000001", "000002", "000003"], "val": ["000004", "000005"], "test": ["000006", "000007", "000008"]}


def make_voc2007(root: Path) -> Layout:
    base = root / "VOCdevkit" / "VOC2007"
    for image_id, names in VOC_OBJECTS.items():
        _image(base / "JPEGImages" / f"{image_id}.jpg", 0)
        _lines(base / "Annotations" / f"{image_id}.xml", [_voc_annotation(names, [1] + [0] * (len(names) - 1))])
    for split, ids in VOC_SPLITS.items():
        _lines(base / "ImageSets" / "Main" / f"{split}.txt", ids)
    _lines(base / "ImageSets" / "Main" / "trainval.txt", VOC_SPLITS["train"] + VOC_SPLITS["val"])
    return Layout(20, [-1] * 5, 3, official_val=(3, 2))  # multi-label: no single class per image


def make_cub2011(root: Path) -> Layout:
    base = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    _lines(base / "classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)])
    images, labels, split = [], [], []
    rng = np.random.default_rng(0)
    entries = [(c, i) for c in range(3) for i in range(6)]
    for image_id, (label, i) in enumerate([entries[j] for j in rng.permutation(len(entries))], start=1):
        rel = f"{classes[label]}/bird_{label}_{i}.jpg"
        _image(base / "images" / rel, label)
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {label + 1}")
        split.append(f"{image_id} {1 if i < 4 else 0}")
    _lines(base / "images.txt", images)
    _lines(base / "image_class_labels.txt", labels)
    _lines(base / "train_test_split.txt", split)
    pool = [int(line.split()[1]) - 1 for line, s in zip(labels, split) if s.endswith(" 1")]
    return Layout(3, pool, 6)


def _stl10_pixels(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8).tobytes()


def make_stl10(root: Path) -> Layout:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    train_labels = [i % 3 for i in range(15)]
    (base / "train_X.bin").write_bytes(_stl10_pixels(15))
    (base / "train_y.bin").write_bytes(bytes(label + 1 for label in train_labels))  # 1-based on disk
    (base / "test_X.bin").write_bytes(_stl10_pixels(4))
    (base / "test_y.bin").write_bytes(bytes([1, 2, 3, 10]))
    (base / "unlabeled_X.bin").write_bytes(_stl10_pixels(7))
    _lines(base / "class_names.txt", list(data_module.STL10_CLASSES))
    return Layout(10, train_labels, 4)


def _idx_images(n: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return struct.pack(">IIII", 0x0803, n, 28, 28) + pixels.tobytes()


def _idx_labels(labels: list[int]) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + bytes(labels)


def make_fashionmnist(root: Path) -> Layout:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    train_labels = [i % 4 for i in range(20)]
    (raw / "train-images-idx3-ubyte").write_bytes(_idx_images(20, 0))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx_labels(train_labels))
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx_images(6, 1))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_labels([0, 1, 2, 3, 8, 9]))
    return Layout(10, train_labels, 6)


def make_imagefolder(root: Path) -> Layout:
    labels = []
    for label, cls in enumerate(["cat", "dog", "owl"]):
        for i in range(5):
            _image(root / cls / f"{i}.png", label)
            labels.append(label)
    return Layout(3, labels, 3, holdout_test=True)  # 20% of 5 per class


def make_imagefolder_with_test(root: Path) -> Layout:
    labels = []
    for label, cls in enumerate(["cat", "dog"]):
        for i in range(5):
            _image(root / "train" / cls / f"{i}.png", label)
            labels.append(label)
        for i in range(2):
            _image(root / "test" / cls / f"{i}.png", label)
    return Layout(2, labels, 4)


GENERATORS = {
    "food": make_food, "cars": make_cars, "dtd": make_dtd, "pets": make_pets, "flowers": make_flowers,
    "aircrafts": make_aircrafts, "cifar10": make_cifar10, "cifar100": make_cifar100, "caltech101": make_caltech101,
    "sun397": make_sun397, "voc2007": make_voc2007, "cub2011": make_cub2011, "stl10": make_stl10,
    "fashionmnist": make_fashionmnist, "imagefolder": make_imagefolder,
}
CASES = [*GENERATORS.items(), ("sun397", make_sun397_partitions), ("imagefolder", make_imagefolder_with_test)]
CASE_IDS = [name for name in GENERATORS] + ["sun397-partitions", "imagefolder-train-test"]


def test_every_downstream_dataset_has_a_generator() -> None:
    assert set(GENERATORS) == set(DOWNSTREAM_DATASETS)


def _build(name: str, root: Path, **kwargs):
    return build_downstream_splits(name, root, downstream_train_transform(SIZE, 0.5), downstream_test_transform(SIZE), **kwargs)


def _expected_val_count(n: int, fraction: float = 0.2) -> int:
    return 0 if n < 2 else min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)


@pytest.mark.parametrize(("name", "make"), CASES, ids=CASE_IDS)
def test_downstream_splits_load_generated_layout(name, make, tmp_path: Path, no_checksums) -> None:
    layout = make(tmp_path)
    splits = _build(name, tmp_path)
    assert splits.num_classes == layout.num_classes
    assert splits.multilabel == (name == "voc2007")
    assert len(splits.test) == layout.test_size
    train_idx, val_idx = set(splits.train.indices), set(splits.val.indices)
    assert not train_idx & val_idx
    if layout.holdout_test:  # the test views index the same base dataset
        assert splits.test.dataset is splits.train.dataset
        assert not (train_idx | val_idx) & set(splits.test.indices)
        assert len(train_idx | val_idx) + len(splits.test) == len(layout.pool_labels)
    else:
        assert len(train_idx | val_idx) == len(layout.pool_labels)
    if layout.official_val is not None:
        assert (len(splits.train), len(splits.val)) == layout.official_val
        assert not split_file_path(tmp_path, name, "train").exists()  # official split: nothing written
    else:
        assert split_file_path(tmp_path, name, "train").is_file() and split_file_path(tmp_path, name, "val").is_file()

    for split_name in ("train", "val", "test"):
        split = getattr(splits, split_name)
        targets = []
        for image, target in (split[i] for i in range(len(split))):
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
            targets.append(target)
        if splits.multilabel:
            stacked = torch.stack(targets)
            assert stacked.shape == (len(split), 20) and set(stacked.unique().tolist()) <= {0.0, 1.0}
            assert split.labels is None
        else:
            assert all(type(t) is int and 0 <= t < splits.num_classes for t in targets)
            assert targets == split.labels  # cheap labels agree with what __getitem__ returns
    if not splits.multilabel:
        held_out = splits.test.labels if layout.holdout_test else []
        assert Counter(splits.train.labels + splits.val.labels + held_out) == Counter(layout.pool_labels)
        if name != "sun397":  # sun397 pools are views (partition or sorted order) of torchvision's file list
            assert [layout.pool_labels[i] for i in splits.train.indices] == splits.train.labels


@pytest.mark.parametrize("name", ["food", "cars", "pets", "cifar10", "cub2011", "stl10", "fashionmnist", "caltech101"])
def test_generated_val_split_is_stratified(name, tmp_path: Path, no_checksums) -> None:
    GENERATORS[name](tmp_path)
    splits = _build(name, tmp_path, val_fraction=0.2)
    per_class_pool = Counter(splits.train.labels + splits.val.labels)
    per_class_val = Counter(splits.val.labels)
    for cls, n in per_class_pool.items():
        assert per_class_val[cls] == _expected_val_count(n), (cls, n)


def test_caltech101_keeps_30_training_images_per_class(tmp_path: Path) -> None:
    make_caltech101(tmp_path)
    splits = _build("caltech101", tmp_path)
    assert Counter(splits.train.labels + splits.val.labels) == {0: 30, 1: 30, 2: 30}
    assert Counter(splits.test.labels) == {0: 3, 1: 2, 2: 1}  # Faces 33, airplanes 32, ant 31
    assert split_file_path(tmp_path, "caltech101", "test").is_file()


def test_sun397_official_partitions_define_the_pool_order(tmp_path: Path) -> None:
    layout = make_sun397_partitions(tmp_path)
    splits = _build("sun397", tmp_path)
    train_file = split_file_path(tmp_path, "sun397", "train").read_text().split()
    # Split-file indices are positions in Training_01.txt; map them back to labels.
    assert [splits.train.labels[i] for i in range(len(splits.train))] == [layout.pool_labels[int(p)] for p in train_file]
    assert splits.classes == ["abbey", "apartment_building/outdoor", "bedroom"]


def test_split_files_are_written_once_and_reused(tmp_path: Path, no_checksums) -> None:
    make_cifar10(tmp_path)
    first = _build("cifar10", tmp_path, split_seed=0)
    files = [split_file_path(tmp_path, "cifar10", s) for s in ("train", "val")]
    contents = [f.read_text() for f in files]
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = _build("cifar10", tmp_path, split_seed=123)  # the files win over the seed
    assert second.train.indices == first.train.indices and second.val.indices == first.val.indices
    assert [f.read_text() for f in files] == contents and [f.stat().st_mtime_ns for f in files] == mtimes
    assert [int(x) for x in contents[1].split()] == first.val.indices
    for f in files:
        f.unlink()
    third = _build("cifar10", tmp_path, split_seed=123)  # regenerated from another seed: differs
    assert third.val.indices != first.val.indices
    fourth_dir = tmp_path / "copy"
    make_cifar10(fourth_dir)
    assert _build("cifar10", fourth_dir, split_seed=0).val.indices == first.val.indices  # deterministic


def test_dropped_in_split_files_are_honoured(tmp_path: Path, no_checksums) -> None:
    make_cifar10(tmp_path)
    _lines(split_file_path(tmp_path, "cifar10", "train"), ["5", "3", "10"])
    _lines(split_file_path(tmp_path, "cifar10", "val"), ["0", "19"])
    splits = _build("cifar10", tmp_path)
    assert splits.train.indices == [5, 3, 10] and splits.val.indices == [0, 19]


def test_paper_split_file_names_are_accepted(tmp_path: Path) -> None:
    make_cub2011(tmp_path)
    _lines(split_file_path(tmp_path, "cub200", "train"), ["0", "1", "2"])
    _lines(split_file_path(tmp_path, "cub200", "val"), ["3"])
    splits = _build("cub2011", tmp_path)
    assert splits.train.indices == [0, 1, 2] and splits.val.indices == [3]


def test_split_files_override_an_official_val_split(tmp_path: Path) -> None:
    make_dtd(tmp_path)  # pool = 12 official train + 6 official val
    _lines(split_file_path(tmp_path, "dtd", "train"), [str(i) for i in range(6, 18)])
    _lines(split_file_path(tmp_path, "dtd", "val"), [str(i) for i in range(6)])
    splits = _build("dtd", tmp_path)
    assert (len(splits.train), len(splits.val)) == (12, 6)
    assert splits.val.labels == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    ("train_lines", "val_lines", "match"),
    [(["0", "1"], None, "counterpart"), (["0", "25"], ["1"], "outside"), (["0", "1"], ["1"], "share"),
     (["0", "0"], ["1"], "more than once"), (["a"], ["1"], "one integer")],
)
def test_bad_split_files_raise(tmp_path: Path, no_checksums, train_lines, val_lines, match) -> None:
    make_cifar10(tmp_path)
    _lines(split_file_path(tmp_path, "cifar10", "train"), train_lines)
    if val_lines is not None:
        _lines(split_file_path(tmp_path, "cifar10", "val"), val_lines)
    with pytest.raises(ValueError, match=match):
        _build("cifar10", tmp_path)


def test_caltech_split_files_may_not_use_test_images(tmp_path: Path) -> None:
    make_caltech101(tmp_path)
    _build("caltech101", tmp_path)
    test = [int(x) for x in split_file_path(tmp_path, "caltech101", "test").read_text().split()]
    _lines(split_file_path(tmp_path, "caltech101", "val"), [str(test[0])])
    with pytest.raises(ValueError, match="held-out test"):
        _build("caltech101", tmp_path)


def test_voc2007_multi_hot_targets(tmp_path: Path) -> None:
    make_voc2007(tmp_path)
    splits = _build("voc2007", tmp_path)
    assert splits.classes == list(VOC_CLASSES) and splits.multilabel
    for split_name, ids in VOC_SPLITS.items():
        split = getattr(splits, split_name)
        for position, image_id in enumerate(ids):
            _, target = split[position]
            expected = torch.zeros(20)
            for name in VOC_OBJECTS[image_id]:  # "difficult" objects count as positives too
                expected[VOC_CLASSES.index(name)] = 1.0
            assert torch.equal(target, expected), (split_name, image_id)


def test_dataloader_batches_apply_the_view_transform(tmp_path: Path, no_checksums) -> None:
    make_cifar10(tmp_path)
    splits = _build("cifar10", tmp_path)
    images, labels = next(iter(DataLoader(splits.train, batch_size=4)))
    assert images.shape == (4, 3, SIZE, SIZE) and labels.dtype == torch.int64
    clone = pickle.loads(pickle.dumps(splits.val))  # DataLoader workers pickle datasets
    assert torch.equal(clone[0][0], splits.val[0][0])


def test_greyscale_caltech_images_become_rgb(tmp_path: Path) -> None:
    make_caltech101(tmp_path)
    splits = build_downstream_splits("caltech101", tmp_path, downstream_test_transform(SIZE), downstream_test_transform(SIZE))
    grey_positions = [i for i, idx in enumerate(splits.train.indices) if (splits.train.dataset.index[idx]) % 3 == 0]
    image, _ = splits.train[grey_positions[0]]
    assert image.shape == (3, SIZE, SIZE)
    assert torch.allclose(image[0] * 0.229 + 0.485, image[1] * 0.224 + 0.456, atol=1e-5)  # equal channels


# --- missing data -----------------------------------------------------------------------------

EXPECTED_PATHS = {
    "food": "food-101", "cars": "stanford_cars", "dtd": "dtd/dtd", "pets": "oxford-iiit-pet",
    "flowers": "flowers-102", "aircrafts": "fgvc-aircraft-2013b", "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python", "caltech101": "caltech101/101_ObjectCategories", "sun397": "SUN397",
    "voc2007": "VOCdevkit/VOC2007", "cub2011": "CUB_200_2011", "stl10": "stl10_binary",
    "fashionmnist": "FashionMNIST/raw", "imagenet": "imagenet", "imagefolder": "",
}


@pytest.mark.parametrize("name", DOWNSTREAM_DATASETS)
def test_missing_downstream_data_raises_with_path(name, tmp_path: Path) -> None:
    data_dir = tmp_path / "data" if name == "imagefolder" else tmp_path
    with pytest.raises(DatasetNotFoundError) as info:
        _build(name, data_dir)
    expected = data_dir / EXPECTED_PATHS[name]
    assert str(expected) in str(info.value) and info.value.path == expected
    assert isinstance(info.value, FileNotFoundError)
    # It says how to get the data: an address or a command, or, for your own images, the folder layout.
    if name == "imagefolder":
        assert "<class>/<image>" in str(info.value) and "class folders" in str(info.value)
    else:
        assert "http" in str(info.value) or "python -m" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded


@pytest.mark.parametrize("name", PRETEXT_DATASETS)
def test_missing_pretext_data_raises_with_path(name, tmp_path: Path) -> None:
    data_dir = tmp_path / "data" if name == "imagefolder" else tmp_path
    with pytest.raises(DatasetNotFoundError, match=name):
        build_pretext_dataset(name, data_dir, pretext_transform(SIZE, 0.5))
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_corrupted_data_raises_not_found(tmp_path: Path) -> None:
    make_cifar10(tmp_path)  # checksums are really verified here and cannot match
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        _build("cifar10", tmp_path)
    make_voc2007(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="test.txt"):
        _build("voc2007", tmp_path)


def test_download_cannot_fetch_manual_datasets(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cannot fetch"):
        _build("cars", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_imagenet_missing_train_folder(tmp_path: Path) -> None:
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as info:
        build_pretext_dataset("imagenet", tmp_path, pretext_transform(SIZE, 0.5))
    assert info.value.path == tmp_path / "imagenet" / "train"


def test_unknown_names_and_bad_fractions_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: food"):
        _build("mnist", tmp_path)
    with pytest.raises(ValueError, match="valid: imagenet"):
        build_pretext_dataset("pets", tmp_path, pretext_transform(SIZE, 0.5))
    with pytest.raises(ValueError, match="val_fraction"):
        _build("food", tmp_path, val_fraction=1.0)


# --- pretext datasets ---------------------------------------------------------------------------


def _make_imagenet_folder(root: Path) -> int:
    for label, wnid in enumerate(["n01440764", "n01443537"]):
        for i in range(3):
            _image(root / "imagenet" / "train" / wnid / f"{wnid}_{i}.JPEG", label)
    return 6


def _make_imagenet_with_meta(root: Path) -> int:
    # meta.bin as torchvision's ImageNet writes it: ({wnid: class names}, validation wnids).
    _make_imagenet_folder(root)
    torch.save(({"n01440764": ("tench",), "n01443537": ("goldfish",)}, []), root / "imagenet" / "meta.bin")
    return 6


def _make_stl10_unlabeled(root: Path) -> int:
    make_stl10(root)
    return 7


def _make_fashionmnist_train(root: Path) -> int:
    make_fashionmnist(root)
    return 20


def _make_imagefolder_root(root: Path) -> int:
    make_imagefolder(root)
    (root / "tv_splits").mkdir()  # must not become a class
    return 15


def _make_imagefolder_train(root: Path) -> int:
    make_imagefolder_with_test(root)
    return 10


PRETEXT_CASES = {
    "imagenet": _make_imagenet_folder,
    "imagenet-meta": _make_imagenet_with_meta,
    "stl10": _make_stl10_unlabeled,
    "fashionmnist": _make_fashionmnist_train,
    "imagefolder": _make_imagefolder_root,
    "imagefolder-train": _make_imagefolder_train,
}


@pytest.mark.parametrize("case", PRETEXT_CASES)
def test_pretext_datasets_give_two_views(case, tmp_path: Path, no_checksums) -> None:
    expected_size = PRETEXT_CASES[case](tmp_path)
    dataset = build_pretext_dataset(case.split("-")[0], tmp_path, pretext_transform(SIZE, 0.5))
    assert len(dataset) == expected_size
    (view1, view2), _ = dataset[len(dataset) - 1]
    assert view1.shape == view2.shape == (3, SIZE, SIZE)
    if case.startswith("imagefolder"):
        assert "tv_splits" not in dataset.classes
    if case == "imagenet-meta":  # torchvision's ImageNet class, with human-readable class names
        assert type(dataset).__name__ == "ImageNet" and dataset.classes == [("tench",), ("goldfish",)]


# --- subsampling and labels -----------------------------------------------------------------------


def test_subsample_is_seeded_and_stratified(tmp_path: Path) -> None:
    make_fashionmnist(tmp_path)
    dataset = build_pretext_dataset("fashionmnist", tmp_path, downstream_test_transform(SIZE))
    labels = dataset_labels(dataset)
    assert labels == [i % 4 for i in range(20)]
    small = subsample(dataset, 8, seed=0)
    assert isinstance(small, SplitSubset) and len(small) == 8
    assert Counter(small.labels) == {0: 2, 1: 2, 2: 2, 3: 2}  # 2 labels per class
    assert [labels[i] for i in small.indices] == small.labels
    assert subsample(dataset, 8, seed=0).indices == small.indices
    assert any(subsample(dataset, 8, seed=s).indices != small.indices for s in range(1, 5))
    assert small[0][0].shape == (3, SIZE, SIZE)  # the dataset's own transform still applies
    assert subsample(dataset, None, seed=0) is dataset and subsample(dataset, 0, seed=0) is dataset
    assert subsample(dataset, 50, seed=0) is dataset
    unstratified = subsample(dataset, 5, seed=0, stratify=False)
    assert len(unstratified) == 5 and len(set(unstratified.indices)) == 5
    with pytest.raises(ValueError):
        subsample(dataset, -1, seed=0)


def test_subsample_of_a_split_view_keeps_its_transform_and_flattens(tmp_path: Path, no_checksums) -> None:
    make_stl10(tmp_path)
    splits = _build("stl10", tmp_path)
    small = subsample(splits.train, 3, seed=1)
    assert small.dataset is splits.train.dataset and small.transform is splits.train.transform
    assert set(small.indices) <= set(splits.train.indices)
    assert sorted(Counter(small.labels).values()) == [1, 1, 1]
    assert dataset_labels(small) == [small.dataset.labels[i] for i in small.indices]


def test_stratified_choice_allocates_proportionally() -> None:
    labels = [0] * 60 + [1] * 30 + [2] * 10
    for seed in range(5):
        chosen = stratified_choice(labels, len(labels), 20, seed)
        assert Counter(labels[i] for i in chosen) == {0: 12, 1: 6, 2: 2}
    odd = Counter(labels[i] for i in stratified_choice(labels, 100, 7, seed=0))
    assert sum(odd.values()) == 7 and all(abs(odd[c] - 7 * n / 100) < 1 for c, n in ((0, 60), (1, 30), (2, 10)))


def test_stratified_split_fractions_and_edge_cases() -> None:
    labels = [0] * 10 + [1] * 5 + [2] * 1 + [3] * 2
    kept, held = stratified_split(labels, seed=0, held_fraction=0.2)
    held_counts = Counter(labels[i] for i in held)
    assert held_counts == {0: 2, 1: 1, 3: 1}  # a single-image class stays in training
    assert sorted(kept + held) == list(range(len(labels)))
    kept, held = stratified_split(labels, seed=0, keep_per_class=3)
    assert Counter(labels[i] for i in kept) == {0: 3, 1: 3, 2: 1, 3: 2}
    with pytest.raises(ValueError):
        stratified_split(labels, seed=0)


def test_dataset_labels_reads_torchvision_attributes(tmp_path: Path, no_checksums) -> None:
    make_cars(tmp_path / "cars")
    make_voc2007(tmp_path / "voc")
    from torchvision import datasets as tv

    cars = tv.StanfordCars(str(tmp_path / "cars"), split="train")
    assert dataset_labels(cars) == [label for _, label in cars._samples]
    voc = tv.VOCDetection(str(tmp_path / "voc"), year="2007", image_set="train")
    assert dataset_labels(voc) is None  # targets are annotation paths, not class indices


# --- FashionMNIST set-up --------------------------------------------------------------------------


def test_ensure_fashion_mnist_decompresses_archives(tmp_path: Path) -> None:
    archives = tmp_path / "debian"
    archives.mkdir()
    contents = {}
    for i, name in enumerate(RAW_FILES):
        contents[name] = bytes([i]) * (10 + i)
        with gzip.open(archives / f"{name}.gz", "wb") as handle:
            handle.write(contents[name])
    raw = ensure_fashion_mnist(tmp_path / "data", debian_dir=archives, allow_apt=False, allow_download=False)
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert {name: (raw / name).read_bytes() for name in RAW_FILES} == contents
    (archives / f"{RAW_FILES[0]}.gz").unlink()  # already present: nothing more is needed
    assert ensure_fashion_mnist(tmp_path / "data", debian_dir=archives, allow_apt=False, allow_download=False) == raw


def test_ensure_fashion_mnist_fails_clearly_offline(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        ensure_fashion_mnist(tmp_path, debian_dir=tmp_path / "absent", allow_apt=False, allow_download=False)


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_end_to_end(tmp_path: Path) -> None:
    ensure_fashion_mnist(tmp_path, allow_apt=False, allow_download=False)
    splits = _build("fashionmnist", tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48000, 12000, 10000)
    assert splits.num_classes == 10 and splits.classes[0] == "T-shirt/top"
    assert Counter(splits.val.labels) == {c: 1200 for c in range(10)}
    image, label = splits.test[0]
    assert image.shape == (3, SIZE, SIZE) and label == 9  # the first test image is an ankle boot
    pretext = build_pretext_dataset("fashionmnist", tmp_path, pretext_transform(SIZE, 0.5))
    assert len(pretext) == 60000
