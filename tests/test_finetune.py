"""Tests for fine-tuning: the per-trial loop (source/stages/finetune.py) and the sweep script fine-tuning.py.

The script runs on a generated image-folder dataset (3 classes of 8x8 images) with a ResNet-18
backbone (CIFAR stem) written by the test: once under a real 2-process torchrun, once killed
with SIGKILL in the middle of a sweep and then rerun, and in-process for the cheaper checks.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from source.maths.models import build_backbone
from source.run.checkpoint import WeightsError, save_atomic
from source.stages import finetune
from source.stages.engine import Throughput
from source.stages.evaluation import evaluate
from source.stages.finetune import STATUS_FAILED, STATUS_OK, cosine_to_zero_scheduler, fine_tune
from source.stages.finetune_run import report
from source.stages.hpo import ResultsFile, make_trial
from tests.script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "fine-tuning.py"
IMAGES_PER_CLASS = 8
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """<root>/class<k>/<i>.png: classes differ in mean brightness, so a little training helps."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(NUM_CLASSES):
        folder = root / f"class{label}"
        folder.mkdir()
        for index in range(IMAGES_PER_CLASS):
            pixels = (rng.random((10, 10, 3)) * 60 + 80 * label).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The in-process script runs set torch's thread count (--omp-num-threads); give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    save_atomic(backbone.state_dict(), tmp_path / "models" / "bb.pth")
    return tmp_path / "models"


def script_flags(data_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--dset", "imagefolder", "--data-dir", str(data_dir), "--model-dir", str(model_dir),
        "--pretrained-backbone-filename", "bb.pth", "--pretrain-arch", "resnet18", "--pretrain-cifar-stem", "1",
        "--pretrain-img-size", "8", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
        # One thread: on a busy 2-core machine two threads per process make these runs ~10x slower.
        "--omp-num-threads", "1", *extra,
    ]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ the per-trial loop


def test_cosine_schedule_starts_at_lr_and_reaches_zero_after_the_last_step():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.4)
    scheduler = cosine_to_zero_scheduler(optimizer, total_steps=10)
    used = []
    for _ in range(10):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.4 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)]
    assert used == pytest.approx(expected, abs=1e-12)
    assert used[0] == 0.4 and used[-1] > 0  # no step is taken at lr 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _toy_loaders(flip_val: bool) -> tuple[DataLoader, DataLoader, DataLoader]:
    """2-D points labelled by the sign of x0; the val labels are flipped when asked, so that the
    better the model fits the training data the worse it scores on val."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(96, 2, generator=generator)
    labels = (points[:, 0] > 0).long()
    train = TensorDataset(points[:64], labels[:64])
    val = TensorDataset(points[64:80], 1 - labels[64:80] if flip_val else labels[64:80])
    test = TensorDataset(points[80:], labels[80:])
    return (DataLoader(train, batch_size=8, shuffle=True, generator=generator),
            DataLoader(val, batch_size=8), DataLoader(test, batch_size=8))


def test_fine_tune_keeps_a_real_copy_of_the_best_validation_weights():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    # Start far from the boundary x0 = 0 (everything predicted as class 0) so that it is learnt
    # over several epochs and the flipped val score falls epoch by epoch.
    nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([3.0, 0.0]))
    train_loader, val_loader, test_loader = _toy_loaders(flip_val=True)
    snapshots = []
    result = fine_tune(
        model, train_loader, val_loader, test_loader, lr=0.05, wd=0.0, momentum=0.9, epochs=4,
        device=torch.device("cpu"), amp_dtype=None, multilabel=False,
        on_epoch=lambda metrics: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}),
        on_final_model=lambda final: snapshots.append({k: v.clone() for k, v in final.state_dict().items()}),
    )
    assert result.status == STATUS_OK and result.error is None
    assert [entry["epoch"] for entry in result.history] == [1, 2, 3, 4]
    val_scores = [entry["val/top1"] for entry in result.history]
    assert result.best_val == max(val_scores) and result.final_val == val_scores[-1]
    assert result.best_epoch == val_scores.index(max(val_scores)) + 1
    # The flipped val labels make an early epoch the best, so the copy must survive later steps.
    assert result.best_epoch < 4 and result.best_val > result.final_val
    best_snapshot = snapshots[result.best_epoch - 1]
    for key, value in result.best_state.items():
        assert torch.equal(value, best_snapshot[key])
        assert torch.equal(model.state_dict()[key], best_snapshot[key])  # model is left at the best epoch
    assert all(torch.equal(snapshots[-1][key], snapshots[3][key]) for key in snapshots[3])  # final model saved
    cpu = torch.device("cpu")
    assert result.test_best == evaluate(model, test_loader, cpu, False, distributed=False)["top1"]
    model.load_state_dict(snapshots[-1])
    assert result.test_final == evaluate(model, test_loader, cpu, False, distributed=False)["top1"]
    assert result.test_final > 80.0  # the (unflipped) test labels are learnt


class _ScaledLinear(nn.Module):
    """Linear layer whose logits are multiplied by a buffer, so a test can poison it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def test_a_non_finite_loss_fails_the_trial_but_keeps_the_best_epoch():
    torch.manual_seed(0)
    model = _ScaledLinear()
    train_loader, val_loader, test_loader = _toy_loaders(flip_val=False)
    saved = []

    def poison_after_first_epoch(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            model.scale.fill_(float("nan"))

    result = fine_tune(
        model, train_loader, val_loader, test_loader, lr=0.1, wd=1e-4, momentum=0.9, epochs=3,
        device=torch.device("cpu"), amp_dtype=None, multilabel=False, on_epoch=poison_after_first_epoch,
        on_final_model=saved.append,
    )
    assert result.status == STATUS_FAILED
    assert "non-finite training loss" in result.error and "epoch 2" in result.error and "lr 0.1" in result.error
    assert result.best_epoch == 1 and result.best_val is not None and len(result.history) == 1
    assert result.final_val is None and result.test_final is None
    assert saved == []  # a diverged model is not saved
    # test_best comes from the epoch-1 copy, which still has scale 1.
    assert model.scale.item() == 1.0 and math.isfinite(result.test_best)
    row = result.row()
    assert row["status"] == "failed" and row["error"] == result.error


# ------------------------------------------------------------------ the script


def test_spec_command_lines_parse():
    parser = load_script("fine-tuning.py").get_args_parser()
    lines = [
        "--dset 'pets' --pretrained-backbone-filename 'pretext_simclr_arch-resnet50_bb.pth' --backbone-origin 'pretext' --num-runs 100 --use-hpo 1",
        "--dset 'pets' --pretrained-backbone-filename 'BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth' --backbone-origin 'bissl' --num-runs 100 --use-hpo 1",
        "--dset 'pets' --pretrained-backbone-filename 'BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth' --backbone-origin 'bissl' --num-runs 10 --use-hpo 0",
    ]
    parsed = [parser.parse_args(shlex.split(line)) for line in lines]
    assert [(a.dset, a.backbone_origin, a.num_runs, a.use_hpo) for a in parsed] == [
        ("pets", "pretext", 100, 1), ("pets", "bissl", 100, 1), ("pets", "bissl", 10, 0)]
    assert parsed[1].pretrained_backbone_filename == "BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth"
    # The paper's defaults.
    assert (parsed[0].epochs, parsed[0].batch_size, parsed[0].optimizer_momentum) == (400, 256, 0.9)
    assert (parsed[0].hpo_lr_min, parsed[0].hpo_lr_max, parsed[0].hpo_wd_min, parsed[0].hpo_wd_max) == (1e-4, 1.0, 1e-5, 1e-2)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_hpo_sweep_runs_each_trial_once_and_a_rerun_runs_none(image_tree, model_dir, capsys):
    flags = script_flags(image_tree, model_dir, "--use-hpo", "1", "--num-runs", "3", "--epochs", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), *flags]
    done = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = model_dir / "runs" / "finetune_pretext_bb_dset-imagefolder_hpo"
    rows = read_rows(run_dir / "results.jsonl")
    assert sorted(row["trial"] for row in rows) == [0, 1, 2]
    for row in rows:
        trial = make_trial(row["trial"], 0, True, 0.05, 5e-4, (1e-4, 1.0), (1e-5, 1e-2))
        assert (row["seed"], row["lr"], row["wd"]) == (trial.seed, trial.lr, trial.wd)
        assert row["rank"] == row["trial"] % 2  # round-robin over the two processes
        assert row["status"] == "ok" and row["metric"] == "top1" and row["best_epoch"] == 1
        assert 0.0 <= row["test_best"] <= 100.0
    assert len({(row["lr"], row["wd"]) for row in rows}) == 3
    assert "HPO: 3 trials" in done.stdout and "Best: lr=" in done.stdout
    assert (run_dir / "hpo_grid.png").stat().st_size > 0
    assert "HPO: 3 trials" in (run_dir / "summary.txt").read_text()
    # Every rank logs its own trials.
    assert "[rank 0] trial 0" in done.stderr and "[rank 1] trial 1" in done.stderr

    before = (run_dir / "results.jsonl").read_bytes()
    script = load_script("fine-tuning.py")
    script.main(script.get_args_parser().parse_args(flags))  # the same command again, one process
    assert (run_dir / "results.jsonl").read_bytes() == before
    out = capsys.readouterr().out
    assert "3 of 3 trials done" in out and "HPO: 3 trials" in out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_killed_sweep_reruns_only_the_unfinished_trials(image_tree, model_dir, capsys):
    num_runs = 5
    flags = script_flags(image_tree, model_dir, "--use-hpo", "1", "--num-runs", str(num_runs), "--epochs", "2")
    results = model_dir / "runs" / "finetune_pretext_bb_dset-imagefolder_hpo" / "results.jsonl"
    process = subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=ROOT, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (results.exists() and read_rows(results)):
            assert process.poll() is None, f"the sweep ended early:\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    before_kill = {row["trial"]: row for row in read_rows(results)}
    assert 1 <= len(before_kill) < num_runs
    with results.open("a") as handle:  # and a row cut off by the kill
        handle.write('{"trial": 4, "seed": 4, "lr"')

    script = load_script("fine-tuning.py")
    script.main(script.get_args_parser().parse_args(flags))
    rows = ResultsFile(results).rows()  # skips the cut-off line
    assert results.read_text().count('{"trial": 4, "seed": 4, "lr"\n') == 1  # kept, on a line of its own
    assert sorted(row["trial"] for row in rows) == list(range(num_runs))  # each trial exactly once
    for row in rows:
        if row["trial"] in before_kill:
            assert row == before_kill[row["trial"]]  # finished trials were not run again
    assert f"HPO: {num_runs} trials" in capsys.readouterr().out


def test_seed_runs_use_the_fixed_pair_and_report_mean_and_std(image_tree, model_dir, capsys):
    def flags(epochs: int) -> list[str]:
        return script_flags(image_tree, model_dir, "--use-hpo", "0", "--num-runs", "2", "--epochs", str(epochs),
                            "--lr", "0.01", "--wd", "0.001", "--seed", "7")

    script = load_script("fine-tuning.py")
    script.main(script.get_args_parser().parse_args(flags(1)))
    run_dir = model_dir / "runs" / "finetune_pretext_bb_dset-imagefolder_seeds"
    rows = read_rows(run_dir / "results.jsonl")
    assert sorted((row["trial"], row["seed"]) for row in rows) == [(0, 7), (1, 8)]
    assert {(row["lr"], row["wd"]) for row in rows} == {(0.01, 0.001)}
    out = capsys.readouterr().out
    assert "Seeds: 2 trials (seeds 7, 8)" in out and "±" in out

    # Continuing these results with other trial settings is refused, naming the flag.
    with pytest.raises(ValueError, match="--epochs: 1 in the run, 2 now"):
        script.main(script.get_args_parser().parse_args(flags(2)))


def test_save_model_writes_each_trials_backbone_and_head(image_tree, model_dir):
    flags = script_flags(image_tree, model_dir, "--use-hpo", "0", "--num-runs", "1", "--epochs", "1", "--save-model", "1")
    script = load_script("fine-tuning.py")
    script.main(script.get_args_parser().parse_args(flags))
    backbone = torch.load(model_dir / "finetuned_pretext_bb_dset-imagefolder_trial-0_bb.pth", weights_only=True)
    head = torch.load(model_dir / "finetuned_pretext_bb_dset-imagefolder_trial-0_head.pth", weights_only=True)
    assert head["weight"].shape == (NUM_CLASSES, 512)
    pretrained = torch.load(model_dir / "bb.pth", weights_only=True)
    assert backbone.keys() == pretrained.keys()
    assert not torch.equal(backbone["conv1.weight"], pretrained["conv1.weight"])  # it was trained


def test_missing_backbone_and_missing_dataset_are_named(image_tree, tmp_path):
    script = load_script("fine-tuning.py")
    missing_weights = script_flags(image_tree, tmp_path / "nowhere", "--num-runs", "1")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "bb.pth")):
        script.main(script.get_args_parser().parse_args(missing_weights))

    both = script_flags(tmp_path / "empty", tmp_path / "nowhere", "--num-runs", "1")
    both[1] = "fashionmnist"
    with pytest.raises(FileNotFoundError) as error:
        script.main(script.get_args_parser().parse_args(both))
    assert str(tmp_path / "nowhere" / "bb.pth") in str(error.value)
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in str(error.value)


def test_a_backbone_of_another_stem_is_refused_with_the_mismatch(image_tree, tmp_path):
    backbone, _ = build_backbone("resnet18", cifar_stem=False)
    save_atomic(backbone.state_dict(), tmp_path / "bb.pth")
    script = load_script("fine-tuning.py")
    with pytest.raises(WeightsError, match=r"conv1\.weight: file \(64, 3, 7, 7\) vs model \(64, 3, 3, 3\)"):
        script.main(script.get_args_parser().parse_args(script_flags(image_tree, tmp_path, "--num-runs", "1")))


def test_report_lists_failed_trials_apart_from_the_table(tmp_path):
    script = load_script("fine-tuning.py")
    args = script.get_args_parser().parse_args(["--use-hpo", "1", "--num-runs", "3"])
    ok = {"trial": 0, "seed": 0, "lr": 0.01, "wd": 1e-4, "best_val": 60.0, "best_epoch": 2, "final_val": 55.0,
          "test_final": 54.0, "test_best": 58.0, "time_s": 1.0, "metric": "top1", "status": "ok"}
    diverged = {**ok, "trial": 1, "lr": 0.9, "best_val": None, "best_epoch": None, "final_val": None,
                "test_final": None, "test_best": None, "status": "failed", "error": "non-finite training loss (nan)"}
    beyond = {**ok, "trial": 5}  # from an earlier, longer sweep: not part of this command
    text = report(args, tmp_path, [ok, diverged, beyond], "top1")
    assert "2 of 3 trials done, 1 failed" in text
    assert "HPO: 1 trials" in text and "Best: lr=0.01, wd=0.0001 (trial 0" in text
    assert "failed: trial 1 (lr 0.9, wd 0.0001): non-finite training loss (nan)" in text
    assert (tmp_path / "summary.txt").read_text() == text + "\n"
    assert (tmp_path / "hpo_grid.png").is_file()


def test_each_epoch_reports_its_training_throughput_over_the_images_it_trained():
    """train/images_per_s counts the images of the training loop (whole batches of a drop_last loader,
    not the dataset's size) over the loop's time without the val pass; the history leaves it out."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(70, 2, generator=generator)
    train = DataLoader(TensorDataset(points, (points[:, 0] > 0).long()), batch_size=8, drop_last=True)
    counted = []

    class Counting(Throughput):
        def add(self, images: int, wait_s: float) -> None:
            super().add(images, wait_s)
            counted.append(images)

    model, epochs = nn.Linear(2, 2), []
    with patch.object(finetune, "Throughput", Counting):
        result = fine_tune(model, train, train, train, lr=0.05, wd=0.0, momentum=0.9, epochs=2, device=torch.device("cpu"),
                           amp_dtype=None, multilabel=False, on_epoch=epochs.append)
    assert counted == [8] * 16  # 8 whole batches per epoch: 64 of the 70 points
    assert all(metrics["train/images_per_s"] > 0 and 0 <= metrics["train/data_wait_frac"] <= 1 for metrics in epochs)
    assert all("train/images_per_s" not in metrics for metrics in result.history)
    rates = ("train/images_per_s", "train/data_wait_frac")
    assert [{key: value for key, value in metrics.items() if key not in rates} for metrics in epochs] == result.history
