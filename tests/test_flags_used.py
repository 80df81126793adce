"""Every flag a script offers does something there: each script's smallest runs, in this process,
with an argument namespace that records which flags ``main`` reads; a parsed flag that no run
reads fails the test (it is dead, or its code path is not exercised here: then add a run, as the
BYOL, HPO and worker-process runs below do for the flags only those paths read).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from source.maths.models import build_backbone
from tests.script_helpers import load_script, make_image_folder, write_random_pretext_weights

# Read by run_entry_point (the wrapper around main), not by main; tested in tests/test_errors.py.
WRAPPER_FLAGS = {"debug"}


def recording_namespace() -> tuple[argparse.Namespace, set[str]]:
    """A namespace that adds the name of every attribute read from it to the returned set."""
    read: set[str] = set()

    class Recording(argparse.Namespace):
        def __getattribute__(self, name: str):
            if not name.startswith("_"):
                read.add(name)
            return super().__getattribute__(name)

    return Recording(), read


def flags_read(script, argvs: list[list[str]]) -> tuple[set[str], set[str]]:
    """(flags the parser offers, flags read by ``main`` in at least one of the runs)."""
    parser = script.get_args_parser()
    offered = set(vars(parser.parse_args([])))
    read_any: set[str] = set()
    for argv in argvs:
        namespace, read = recording_namespace()
        args = parser.parse_args(argv, namespace=namespace)
        read.clear()  # argparse itself looks at every attribute while parsing
        script.main(args)
        read_any |= read
    return offered, read_any


def check(name: str, offered: set[str], read: set[str]) -> None:
    assert offered - read - WRAPPER_FLAGS == set(), f"{name} parses flags it never reads"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """An image-folder dataset and random pretext weights (SimCLR and BYOL, resnet18); next to the
    image folder, ``detection_data(images)``: a tiny generated fmnistdet set with FashionMNIST."""
    images = make_image_folder(tmp_path_factory.mktemp("images"), classes=2, per_class=16, size=16)
    models = tmp_path_factory.mktemp("models")
    write_random_pretext_weights(models)
    fashion_mnist = Path(__file__).resolve().parents[1] / "data" / "FashionMNIST"
    if fashion_mnist.is_dir():
        from source.data.voc_demo_setup import build_fashion_mnist_detection

        detection_data(images).mkdir()
        (detection_data(images) / "FashionMNIST").symlink_to(fashion_mnist, target_is_directory=True)
        build_fashion_mnist_detection(detection_data(images), num_images=12, num_images_2012=8, seed=0)
    return images, models


def detection_data(images: Path) -> Path:
    """The data dir of the detection runs (fmnistdet and FashionMNIST), made by the ``data`` fixture."""
    return images.parent / "detection-data"


# The detection path reads the --det-* flags (a tiny detector: 48..64 px images).
DETECTION = ["--det-min-size", "48", "--det-max-size", "64", "--det-anchor-sizes", "16,32", "--det-flip", "0.5",
             "--det-rois-per-image", "32", "--det-test-proposals", "50"]


def general(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(images), "--device", "cpu", "--num-workers", "0", "--run-dir", str(run_dir), *extra]


RUNS: dict[str, Callable[[Path, Path, Path], list[list[str]]]] = {
    "ssl_pre-training.py": lambda images, models, tmp: [
        ["--pretext-type", kind, "--dset", "imagefolder", "--arch", "resnet18", "--img-size", "16", "--epochs", "1",
         "--batch-size", "16", "--mlp", "32-16", "--warmup-epochs", "0", "--model-dir", str(tmp),
         *general(images, tmp / kind)] for kind in ("simclr", "byol")],
    "bissl.py": lambda images, models, tmp: [
        ["--d-dset", "imagefolder", "--p-dset", "imagefolder", "--p-pretext-type", kind, "--arch", "resnet18",
         "--img-size", "16", "--cg-iter-num", "1", "--p-mlp", "32-16", "--model-dir", str(models),
         "--p-pretrained-backbone-filename", f"pretext_{kind}_arch-resnet18_bb.pth",
         "--p-pretrained-proj-filename", f"pretext_{kind}_arch-resnet18_proj.pth",
         "--epochs", "1", "--lower-num-iter", "1", "--upper-num-iter", "1", "--d-linear-warmup-epochs", "1",
         "--p-batch-size", "8", "--d-batch-size", "8", "--curvature-every", "1", "--curvature-iters", "2",
         "--cg-verbose", "1", "--save-model", "0", "--lower-knn-every", "1", "--align-bank-size", "8",
         "--align-query-size", "4", "--eval-bn-recalibrate-batches", "1", *general(images, tmp / kind)]
        for kind in ("simclr", "byol")] + [
        ["--d-dset", "fmnistdet", "--p-dset", "fashionmnist", "--arch", "resnet18", "--img-size", "16", "--p-mlp", "32-16",
         "--model-dir", str(models), "--p-pretrained-backbone-filename", "pretext_simclr_arch-resnet18_bb.pth",
         "--p-pretrained-proj-filename", "pretext_simclr_arch-resnet18_proj.pth", "--epochs", "1", "--lower-num-iter", "1",
         "--upper-num-iter", "1", "--d-linear-warmup-epochs", "1", "--p-batch-size", "4", "--d-batch-size", "2",
         "--cg-iter-num", "1", "--max-train-samples", "8", "--max-eval-samples", "2", "--save-model", "0",
         "--det-head", "original", "--det-frozen-bn", "1", *DETECTION, *general(images, tmp / "detection"),
         "--data-dir", str(detection_data(images))]],
    "fine-tuning.py": lambda images, models, tmp: [
        ["--dset", "imagefolder", "--model-dir", str(models), "--pretrained-backbone-filename",
         "pretext_simclr_arch-resnet18_bb.pth", "--pretrain-arch", "resnet18", "--pretrain-img-size", "16",
         "--batch-size", "8", "--epochs", "1", "--num-runs", "1", "--use-hpo", hpo, *general(images, tmp / f"hpo{hpo}"),
         "--num-workers", hpo]  # --prefetch-factor is read for loaders with workers
        for hpo in ("0", "1")] + [
        ["--dset", "fmnistdet", "--model-dir", str(models), "--pretrained-backbone-filename",
         "pretext_simclr_arch-resnet18_bb.pth", "--pretrain-arch", "resnet18", "--batch-size", "2", "--epochs", "1",
         "--num-runs", "1", "--max-train-samples", "2", "--max-eval-samples", "2", *DETECTION,
         *general(images, tmp / "detection"), "--data-dir", str(detection_data(images))]],
    "source/tools/curvature.py": lambda images, models, tmp: [
        ["--p-dset", "imagefolder", "--p-pretext-type", kind, "--arch", "resnet18", "--img-size", "16", "--p-mlp", "32-16",
         "--model-dir", str(models), "--p-pretrained-backbone-filename", f"pretext_{kind}_arch-resnet18_bb.pth",
         "--p-pretrained-proj-filename", f"pretext_{kind}_arch-resnet18_proj.pth", "--p-batch-size", "4",
         "--probe-batches", "1", "--curvature-iters", "2", "--probe-out", str(tmp / kind),
         *general(images, tmp / "unused")[:-2]] for kind in ("simclr", "byol")],
    "source/tools/probe.py": lambda images, models, tmp: [
        ["--dset", "imagefolder", "--model-dir", str(models), "--backbone-filename", "pretext_simclr_arch-resnet18_bb.pth",
         "--arch", "resnet18", "--img-size", "16", "--batch-size", "8", "--linear-max-iter", "5",
         "--recalibrate-bn", "1", *general(images, tmp / "probe")]],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_every_parsed_flag_is_read(name, data, tmp_path):
    images, models = data
    offered, read = flags_read(load_script(name), RUNS[name](images, models, tmp_path))
    check(name, offered, read)


def test_the_recording_namespace_records_reads_and_the_check_fails_on_an_unread_flag():
    namespace, read = recording_namespace()
    parser = argparse.ArgumentParser()
    parser.add_argument("--used", type=int, default=1)
    parser.add_argument("--dead", type=int, default=2)
    args = parser.parse_args(["--used", "3"], namespace=namespace)
    read.clear()
    assert args.used == 3 and read == {"used"} and vars(args) == {"used": 3, "dead": 2}
    assert read == {"used"}  # vars() (e.g. saving the config) is not a read of each flag
    with pytest.raises(AssertionError, match="parses flags it never reads"):
        check("toy", {"used", "dead"}, read)
    check("toy", {"used", "debug"}, read)


# --- the flags that used to be parsed and ignored act -------------------------------------


def test_channels_last_reaches_the_probe_and_fine_tuning_inputs_and_changes_no_result():
    """--channels-last: the batches reach the backbone in NHWC and the features/loss are the same."""
    from torch.utils.data import TensorDataset

    from source.stages.evaluation import sharded_eval_loader
    from source.stages.finetune import fine_tune
    from source.tools.probe import extract_features

    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18")
    images = torch.randn(6, 3, 16, 16)
    loader = sharded_eval_loader(TensorDataset(images, torch.tensor([0, 1, 0, 1, 0, 1])), 3)
    layouts_seen = []
    hook = backbone.conv1.register_forward_pre_hook(
        lambda module, inputs: layouts_seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    plain, _ = extract_features(backbone, loader, torch.device("cpu"))
    assert layouts_seen == [False, False]
    nhwc, _ = extract_features(backbone.to(memory_format=torch.channels_last), loader, torch.device("cpu"),
                               layout=torch.channels_last)
    assert layouts_seen[2:] == [True, True]
    torch.testing.assert_close(nhwc, plain, rtol=1e-4, atol=1e-5)

    layouts_seen.clear()
    model = torch.nn.Sequential(backbone, torch.nn.Linear(512, 2))
    result = fine_tune(model, loader, loader, loader, lr=0.0, wd=0.0, momentum=0.0, epochs=1, device=torch.device("cpu"),
                       amp_dtype=None, multilabel=False, layout=torch.channels_last)
    hook.remove()
    assert result.status == "ok" and layouts_seen and all(layouts_seen)  # train, val and test batches


def test_prefetch_factor_reaches_the_loaders_with_workers():
    from torch.utils.data import TensorDataset

    from source.stages.evaluation import sharded_eval_loader
    from source.stages.finetune_run import eval_loader

    dataset = TensorDataset(torch.zeros(4, 1))
    assert sharded_eval_loader(dataset, 2, num_workers=1, prefetch_factor=5).prefetch_factor == 5
    assert sharded_eval_loader(dataset, 2, num_workers=0, prefetch_factor=5).prefetch_factor is None  # no workers
    args = argparse.Namespace(batch_size=2, num_workers=2, prefetch_factor=7)
    assert eval_loader(dataset, args, torch.device("cpu"), persistent=False).prefetch_factor == 7
