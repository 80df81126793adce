"""The decoded-image cache (source/data/decoded_cache.py) and fine-tuning's per-sample seeded loader.

The cache must give the tensors that decoding each time gives for the same random draws (bit for
bit where an image is stored unreduced and for val/test; within a fraction of a grey level where
it is reduced), draw its crops on the original size, be built once and reused, refuse a cache
whose source files changed, and decide by the size budget; the loader must give the same
batches with 0 and 2 workers.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from source.data import decoded_cache as dc
from source.data.datasets import ImageTree
from source.data.loader import SeededEpochs, epoch_loader, sample_seed
from source.data.splits import SplitSubset
from source.data.transforms import downstream_test_transform, downstream_train_view
from source.maths.models import build_backbone
from source.run.checkpoint import save_atomic
from source.run.errors import UserError
from tests.script_helpers import load_script, make_image_folder

torch.set_num_threads(1)
IMG_SIZE = 16
# Source sizes (width, height): two no larger than the train side (stored as they are), two reduced.
SIZES = [(20, 14), (18, 30), (90, 60), (48, 128)]


def _natural(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients, a sharp disc and mild noise: a natural-ish image to resample."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    channels = [128 + 100 * np.sin(xx / (3.0 + seed)) * np.cos(yy / 5.0), 255 * xx / max(1, width - 1),
                255.0 * ((xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 3) ** 2)]
    return np.clip(np.stack(channels, -1) + rng.integers(-8, 9, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def tree(tmp_path) -> Path:
    """<tmp>/data: 2 classes x 4 PNGs of the SIZES (one greyscale), an image-folder dataset."""
    root = tmp_path / "data"
    for label in range(2):
        (root / f"class{label}").mkdir(parents=True)
        for k, (width, height) in enumerate(SIZES):
            image = Image.fromarray(_natural(width, height, 4 * label + k))
            (image.convert("L") if k == 1 else image).save(root / f"class{label}" / f"{k}.png")
    return root


def _splits(root: Path, img_size: int = IMG_SIZE) -> tuple[SplitSubset, SplitSubset]:
    base = ImageTree(root)
    train = SplitSubset(base, [7, 0, 1, 2, 3, 4, 5], downstream_train_view(img_size, 0.5), [base.targets[i] for i in [7, 0, 1, 2, 3, 4, 5]])
    test = SplitSubset(base, [6, 1], downstream_test_transform(img_size), [base.targets[i] for i in [6, 1]])
    return train, test


def _build(root: Path, split: SplitSubset, prepare: dc.Prepare) -> dc.DecodedCache:
    return dc.open_or_build(split, prepare, root / dc.DEFAULT_FOLDER_NAME, "imagefolder", root)


def test_train_side_keeps_img_size_pixels_under_the_smallest_crop() -> None:
    assert dc.train_side(96, (0.5, 1.0), (3 / 4, 4 / 3)) == 157
    assert dc.train_side(96, (0.08, 1.0), (0.5, 1.0)) == 480  # --crop-as-original
    for img_size, scale, ratio in ((96, (0.5, 1.0), (3 / 4, 4 / 3)), (32, (0.2, 1.0), (0.6, 1.2))):
        side = dc.train_side(img_size, scale, ratio)
        area = side * side  # the smallest stored area: a square image reduced to short side `side`
        for r in (ratio[0], ratio[1]):
            assert min(np.sqrt(scale[0] * area * r), np.sqrt(scale[0] * area / r)) >= img_size - 1e-6
        assert dc.train_side(img_size, scale, ratio) - 1 < img_size / np.sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))


def test_cached_train_items_equal_decoding_each_time_for_the_same_draws(tree: Path) -> None:
    """Same seed, same crop box (drawn on the original size); bit for bit for the images stored as
    they are, within a fraction of a grey level for those reduced to the train side."""
    train, _ = _splits(tree)
    side = dc.train_side(IMG_SIZE, train.transform.scale, train.transform.ratio)  # 27: two of the SIZES are reduced
    cache = _build(tree, train, dc.ShortSideAtMost(side))
    served = dc.CachedImages(cache, train.transform)
    assert len(served) == len(train) and served.labels == train.labels
    exact = reduced = 0
    for i in range(len(train)):
        original = train.dataset[train.indices[i]][0].convert("RGB")
        assert cache.source_size(i) == original.size
        stored = cache.image(i)
        assert min(stored.shape[:2]) == min(side, *original.size[::-1]) and stored.dtype == np.uint8
        for draw in range(25):
            seed = sample_seed(0, draw, i)
            torch.manual_seed(seed)
            ours, target = served[i]
            torch.manual_seed(seed)
            expected, expected_target = train[i]
            assert target == expected_target and ours.shape == (3, IMG_SIZE, IMG_SIZE)
            if stored.shape[:2] == original.size[::-1]:
                assert torch.equal(ours, expected)
                exact += 1
            else:
                grey_levels = (ours - expected).abs() * torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255
                assert grey_levels.mean() < 2.0, grey_levels.mean()
                reduced += 1
    assert exact and reduced


def test_cached_eval_items_equal_the_test_transform(tree: Path) -> None:
    _, test = _splits(tree)
    cache = _build(tree, test, dc.ResizeCenterCrop(IMG_SIZE))
    served = dc.CachedImages(cache, None)
    for i in range(len(test)):
        ours, target = served[i]
        expected, expected_target = test[i]
        assert torch.equal(ours, expected) and target == expected_target


def test_built_once_reused_and_refused_when_the_source_files_change(tree: Path, monkeypatch) -> None:
    train, _ = _splits(tree)
    first = _build(tree, train, dc.ShortSideAtMost(27))
    builds = []
    monkeypatch.setattr(dc, "_write", lambda *a, **k: builds.append(a))
    again = _build(tree, train, dc.ShortSideAtMost(27))
    assert not builds and again.folder == first.folder and np.array_equal(again.image(3), first.image(3))
    other = dc.cache_folder(tree / dc.DEFAULT_FOLDER_NAME, dc.cache_identity("imagefolder", tree, train.indices, dc.ShortSideAtMost(28)))
    assert other != first.folder  # the resize is part of the key
    changed = tree / "class1" / "2.png"
    os.utime(changed, ns=(time.time_ns(), changed.stat().st_mtime_ns + 10**9))
    with pytest.raises(dc.StaleCacheError, match="1 changed \\(e.g. class1/2.png\\).*--decode-cache off") as error:
        _build(tree, train, dc.ShortSideAtMost(27))
    assert isinstance(error.value, UserError) and str(first.folder) in str(error.value)
    (tree / "class0" / "new.png").write_bytes(changed.read_bytes())
    with pytest.raises(dc.StaleCacheError, match="1 added \\(e.g. class0/new.png\\)"):
        _build(tree, train, dc.ShortSideAtMost(27))
    assert not builds


def test_a_full_disk_is_a_user_error_and_leaves_nothing(tree: Path, monkeypatch) -> None:
    train, _ = _splits(tree)

    def full(folder, *args, **kwargs):
        folder.mkdir(parents=True)
        (folder / "pixels.u8").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dc, "_write", full)
    with pytest.raises(UserError, match="filled up.*--decode-cache off"):
        _build(tree, train, dc.ShortSideAtMost(27))
    assert [p.name for p in (tree / dc.DEFAULT_FOLDER_NAME).iterdir() if p.is_dir()] == []


def test_concurrent_processes_build_once(tree: Path, monkeypatch) -> None:
    """Two builders at once (threads take the flock like processes do): one builds, both map it."""
    train, _ = _splits(tree)
    real_write, builds = dc._write, []

    def slow_write(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.3)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(dc, "_write", slow_write)
    caches = []
    threads = [threading.Thread(target=lambda: caches.append(_build(tree, train, dc.ShortSideAtMost(27)))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(caches) == 2 and caches[0].folder == caches[1].folder
    assert not list((tree / dc.DEFAULT_FOLDER_NAME).glob("*.tmp-*"))


def test_budget_decides_and_the_estimate_is_the_stored_size(tree: Path) -> None:
    train, test = _splits(tree)
    assert dc.estimate_bytes(test, dc.ResizeCenterCrop(IMG_SIZE)) == 2 * IMG_SIZE * IMG_SIZE * 3
    estimate = dc.estimate_bytes(train, dc.ShortSideAtMost(27))
    assert estimate == _build(tree, train, dc.ShortSideAtMost(27)).nbytes  # fewer images than samples: exact
    root = tree / dc.DEFAULT_FOLDER_NAME
    assert dc.use_cache("auto", estimate, 1.0, root) and not dc.use_cache("auto", estimate, estimate / 2e9, root)
    assert dc.use_cache("on", estimate, 0.0, root) and not dc.use_cache("off", estimate, 1.0, root)
    with pytest.raises(UserError, match="GB free"):
        dc.use_cache("on", 10**18, 1.0, root)
    assert not dc.use_cache("auto", 10**18, 10**10, root)
    with pytest.raises(UserError, match="auto, on, off"):
        dc.use_cache("yes", estimate, 1.0, root)


def test_cached_splits_serves_all_three_or_none(tree: Path) -> None:
    train, test = _splits(tree)
    settings = dc.CacheSettings("auto", 1.0, tree / dc.DEFAULT_FOLDER_NAME, "imagefolder", tree, train_side=0)
    served = dc.cached_splits(settings, train, test, test, train.transform, IMG_SIZE)
    assert served is not None and [len(s) for s in served] == [7, 2, 2]
    assert dc.train_side(IMG_SIZE, (0.5, 1.0), (3 / 4, 4 / 3)) == 27 and min(served[0].cache.image(4).shape[:2]) == 27
    assert torch.equal(served[2][1][0], test[1][0])
    for mode, budget in (("off", 1.0), ("auto", 1e-9)):
        settings.mode, settings.max_gb = mode, budget
        assert dc.cached_splits(settings, train, test, test, train.transform, IMG_SIZE) is None


def test_pickled_cache_carries_no_pixels(tree: Path) -> None:
    train, _ = _splits(tree)
    served = dc.CachedImages(_build(tree, train, dc.ShortSideAtMost(27)), train.transform)
    served[0]  # maps the pixels in this process
    clone = pickle.loads(pickle.dumps(served))
    assert clone.cache._pixels is None and np.array_equal(clone.cache.image(5), served.cache.image(5))
    assert len(pickle.dumps(served)) < served.cache.nbytes


def test_seeded_epochs_are_pure_functions_of_seed_and_epoch() -> None:
    sampler = SeededEpochs(50, seed=3)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(50)) and [i for i, _ in epoch0] != [i for i, _ in epoch1]
    assert all(seed == sample_seed(3, 1, i) for i, seed in epoch1)
    sampler.set_epoch(1)
    assert list(sampler) == epoch1 and list(SeededEpochs(50, seed=3)) == epoch0
    unused = iter(sampler)  # an iterator nobody reads counts no epoch
    del unused
    epoch2, fresh = list(sampler), SeededEpochs(50, seed=3)
    fresh.set_epoch(2)
    assert sampler.epoch == 3 and list(fresh) == epoch2 != epoch1
    assert [i for i, _ in SeededEpochs(5, seed=3, shuffle=False)] == list(range(5))


def _batches(dataset, workers: int, epochs: int = 2) -> list[list[torch.Tensor]]:
    loader = epoch_loader(dataset, 3, seed=11, num_workers=workers, pin_memory=False, prefetch_factor=2)
    return [[torch.cat([images.flatten(), labels.float()]) for images, labels in loader] for _ in range(epochs)]


@pytest.mark.multiprocess
def test_batches_are_identical_with_0_and_2_workers(tree: Path) -> None:
    train, _ = _splits(tree)
    served = dc.CachedImages(_build(tree, train, dc.ShortSideAtMost(27)), train.transform)
    for dataset in (served, train):  # from the cache and decoding each time
        without, with_workers = _batches(dataset, 0), _batches(dataset, 2)
        assert len(without) == 2 and len(without[0]) == len(train) // 3
        for a, b in zip(without, with_workers):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(*without))  # the two epochs differ


# ------------------------------------------------------------------ fine-tuning.py with the cache


def _finetune_rows(data_dir: Path, model_dir: Path, *extra: str) -> list[dict]:
    script = load_script("fine-tuning.py")
    flags = ["--dset", "imagefolder", "--data-dir", str(data_dir), "--model-dir", str(model_dir),
             "--pretrained-backbone-filename", "bb.pth", "--pretrain-arch", "resnet18", "--pretrain-cifar-stem", "1",
             "--pretrain-img-size", "8", "--batch-size", "4", "--device", "cpu", "--omp-num-threads", "1",
             "--use-hpo", "0", "--num-runs", "1", "--epochs", "2", "--resume", "0", *extra]
    args = script.get_args_parser().parse_args(flags)
    script.main(args)
    run_dir = model_dir / "runs" / "finetune_pretext_bb_dset-imagefolder_seeds"
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (run_dir / "trials" / "trial-0000" / "metrics.jsonl").read_text().splitlines()]
    # The per-epoch train and val losses: floats that differ if a single input pixel differs.
    rows[0]["losses"] = [(epoch["train/loss"], epoch["val/loss"]) for epoch in epochs]
    return rows


@pytest.fixture
def finetune_inputs(tmp_path) -> tuple[Path, Path]:
    """A 3-class image folder of 20 px PNGs and a random ResNet-18 (CIFAR stem) backbone."""
    data_dir = make_image_folder(tmp_path / "images", classes=3, per_class=8, size=20)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    save_atomic(backbone.state_dict(), tmp_path / "models" / "bb.pth")
    return data_dir, tmp_path / "models"


@pytest.mark.slow
def test_a_trial_gives_the_same_result_with_the_cache_on_and_off(finetune_inputs) -> None:
    """Images stored unreduced (--decode-cache-side above their 20 px): the cache serves the same
    tensors as decoding, so the trial's scores are identical; with the default side (14 px here)
    the trial runs on reduced copies."""
    data_dir, model_dir = finetune_inputs
    off = _finetune_rows(data_dir, model_dir, "--decode-cache", "off", "--num-workers", "0")
    assert not (data_dir / dc.DEFAULT_FOLDER_NAME).exists()
    on = _finetune_rows(data_dir, model_dir, "--decode-cache", "on", "--decode-cache-side", "64", "--num-workers", "0")
    caches = sorted(p.name for p in (data_dir / dc.DEFAULT_FOLDER_NAME).iterdir() if p.is_dir())
    assert len(caches) == 3 and sum("short-side-at-most-64" in name for name in caches) == 1, caches
    scores = ("status", "best_val", "best_epoch", "final_val", "test_final", "test_best", "losses")
    assert [off[0][key] for key in scores] == [on[0][key] for key in scores] and off[0]["status"] == "ok"
    assert len(off[0]["losses"]) == 2
    reduced = _finetune_rows(data_dir, model_dir, "--decode-cache", "on", "--num-workers", "0")
    assert reduced[0]["status"] == "ok" and reduced[0]["losses"] != on[0]["losses"]  # other pixels, other losses
    assert any("short-side-at-most-14" in p.name for p in (data_dir / dc.DEFAULT_FOLDER_NAME).iterdir())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_trial_gives_the_same_result_with_0_and_2_workers(finetune_inputs) -> None:
    data_dir, model_dir = finetune_inputs
    scores = ("status", "best_val", "best_epoch", "final_val", "test_final", "test_best", "losses")
    for mode in ("on", "off"):
        rows = [_finetune_rows(data_dir, model_dir, "--decode-cache", mode, "--num-workers", workers)[0]
                for workers in ("0", "2")]
        assert [rows[0][key] for key in scores] == [rows[1][key] for key in scores] and rows[0]["status"] == "ok", mode


@pytest.mark.multiprocess
def test_building_with_worker_processes_stores_the_same_bytes(tree: Path, tmp_path: Path) -> None:
    train, _ = _splits(tree)
    caches = [dc.open_or_build(train, dc.ShortSideAtMost(27), tmp_path / f"cache{workers}", "imagefolder", tree,
                               num_workers=workers) for workers in (0, 2)]
    assert np.array_equal(caches[0].index, caches[1].index) and np.array_equal(caches[0].targets, caches[1].targets)
    assert (caches[0].folder / "pixels.u8").read_bytes() == (caches[1].folder / "pixels.u8").read_bytes()
