"""The detection fine-tuning trial (source/stages/detection_finetune.py) on a generated fmnistdet set
(real FashionMNIST items on canvases, in the VOC layout) with a ResNet-18 detector at 64-96 px:
training lowers the loss, the results row carries what the sweep and the comparison read, a trial
stopped after an epoch and started again ends where an uninterrupted one does, and two gloo
ranks end with identical weights."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import config_default as cfg
from source.data import voc_demo_setup
from source.data.detection import build_detection_splits
from source.maths.models import build_backbone
from source.run.distributed import DistEnv, fingerprint
from source.stages.detection_finetune import (
    DETECTION_SCORE,
    DetectorSettings,
    build_detector,
    fine_tune_detector,
)
from source.stages.detection_finetune_run import load_detection_data, run_detection_sweep, trial_checkpoint_path
from source.stages.finetune import STATUS_FAILED, STATUS_OK
from source.stages.hpo import RESULT_KEYS, ResultsFile
from source.tools.compare import load_run
from tests.distributed_harness import run_in_processes
from tests.script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = ROOT / "data" / "FashionMNIST"
# Small images and few sampled anchors / RoIs keep a CPU step well under a second.
SETTINGS = DetectorSettings(arch="resnet18", min_size=64, max_size=96, extra={
    "box_batch_size_per_image": 32, "rpn_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
})
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the other CPU tests on this shared machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """fmnistdet with 16 VOC2007 images (4 train, 4 val, 8 test) and 8 VOC2012 (4 train, 4 val)."""
    if not (FASHION_MNIST / "raw").is_dir():
        pytest.skip("FashionMNIST is not in data/FashionMNIST/raw (python -m source.data.fashion_mnist_setup --data-dir data)")
    folder = tmp_path_factory.mktemp("detft") / "data"
    folder.mkdir()
    (folder / "FashionMNIST").symlink_to(FASHION_MNIST, target_is_directory=True)
    voc_demo_setup.build_fashion_mnist_detection(folder, num_images=16, num_images_2012=8, seed=2)
    return folder


def pretrained_backbone() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18")
    return backbone.state_dict()


def new_detector(num_classes: int, init_seed: int = 1, distributed: bool = False) -> torch.nn.Module:
    torch.manual_seed(init_seed)  # the heads' initialisation
    return build_detector(pretrained_backbone(), num_classes, SETTINGS, CPU, distributed)


def trial(model, splits, **kwargs):
    options = {"num_classes": splits.num_classes, "lr": 0.01, "wd": 1e-4, "momentum": 0.9, "epochs": 2, "batch_size": 4,
               "seed": 5, "device": CPU, **kwargs}
    return fine_tune_detector(model, options.pop("train_set", splits.train), splits.val, splits.test, **options)


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_row_holds_what_the_sweep_and_compare_read(data_dir, tmp_path):
    splits = build_detection_splits("fmnistdet", data_dir, flip_probability=0.0)
    fixed_batch = Subset(splits.train, range(4))  # one step per epoch, always on the same four images
    result = trial(new_detector(splits.num_classes), splits, train_set=fixed_batch, epochs=5, lr=0.02)
    assert result.status == STATUS_OK
    losses = [metrics["train/loss"] for metrics in result.history]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], losses
    assert [metrics["epoch"] for metrics in result.history] == [1, 2, 3, 4, 5]
    assert all(0.0 <= metrics["train/data_wait_frac"] <= 1.0 and metrics["train/images_per_s"] > 0 for metrics in result.history)

    row = result.row()
    best = max(result.history, key=lambda metrics: metrics["val/ap50"])
    assert row["best_val"] == best["val/ap50"] and row["final_val"] == result.history[-1]["val/ap50"]
    assert row["status"] == STATUS_OK and 0.0 <= row["test_final"] <= 100.0 and 0.0 <= row["test_best"] <= 100.0
    for model in ("test_final", "test_best"):
        assert {f"{model}_ap75", f"{model}_ap", f"{model}_ap50_original"} <= set(row)
        assert row[f"{model}_ap"] <= row[model] + 1e-9  # AP over IoU 0.5:0.95 never exceeds AP50
    assert 0.0 <= row["data_wait_frac"] <= 1.0

    # The sweep adds the trial's identity; the results file and the comparison tool read the row.
    run_dir = tmp_path / "run"
    full = {"trial": 0, "seed": 5, "lr": 0.02, "wd": 1e-4, **row, "time_s": 1.0, "metric": DETECTION_SCORE}
    assert set(RESULT_KEYS) <= set(full)
    ResultsFile(run_dir / "results.jsonl").append(full)
    (run_dir / "config.json").write_text(json.dumps({"dset": "fmnistdet", "use_hpo": 0}))
    run = load_run(run_dir)
    assert run.metric == "ap50" and run.scores("test_final") == {5: row["test_final"]}


@pytest.mark.slow
@pytest.mark.long
def test_a_trial_stopped_after_an_epoch_and_started_again_ends_as_an_uninterrupted_one(data_dir, tmp_path):
    splits = build_detection_splits("fmnistdet", data_dir)  # with flips: their draws must repeat too
    epochs = 3
    finals = {}
    uninterrupted = trial(new_detector(splits.num_classes), splits, epochs=epochs, checkpoint_path=tmp_path / "a.pth",
                          on_final_model=lambda m: finals.setdefault("a", {k: v.clone() for k, v in m.state_dict().items()}))

    class Killed(Exception):
        pass

    def kill_after_first_epoch(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        trial(new_detector(splits.num_classes), splits, epochs=epochs, checkpoint_path=tmp_path / "b.pth",
              on_epoch=kill_after_first_epoch)
    assert torch.load(tmp_path / "b.pth", weights_only=True)["epoch"] == 1
    # A fresh process would start from other heads and another global RNG state: the checkpoint decides.
    torch.manual_seed(1234)
    resumed = trial(new_detector(splits.num_classes, init_seed=99), splits, epochs=epochs, checkpoint_path=tmp_path / "b.pth",
                    on_final_model=lambda m: finals.setdefault("b", {k: v.clone() for k, v in m.state_dict().items()}))

    assert resumed.status == uninterrupted.status == STATUS_OK
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    for key, value in finals["a"].items():
        torch.testing.assert_close(finals["b"][key], value, rtol=0, atol=1e-6, msg=key)
    for a, b in zip(uninterrupted.history, resumed.history):
        for name in ("train/loss", "val/ap50", "val/ap"):
            assert b[name] == pytest.approx(a[name], abs=1e-6), name
    for name in ("best_val", "best_epoch", "final_val", "test_final", "test_best"):
        assert resumed.row()[name] == pytest.approx(uninterrupted.row()[name], abs=1e-6), name
    assert torch.load(tmp_path / "b.pth", weights_only=True)["epoch"] == epochs
    # Killed after the last epoch but before its row was written: started again, it only scores.
    again = trial(new_detector(splits.num_classes, init_seed=7), splits, epochs=epochs, checkpoint_path=tmp_path / "b.pth")
    assert again.history == resumed.history
    for name in ("best_val", "final_val", "test_final", "test_best", "test_final_ap75", "test_best_ap"):
        assert again.row()[name] == pytest.approx(resumed.row()[name], abs=1e-6), name


@pytest.mark.slow
def test_a_checkpoint_of_another_trial_is_refused(data_dir, tmp_path):
    splits = build_detection_splits("fmnistdet", data_dir, flip_probability=0.0)
    one_step = Subset(splits.train, range(4))
    trial(new_detector(splits.num_classes), splits, train_set=one_step, epochs=1, checkpoint_path=tmp_path / "c.pth")
    with pytest.raises(Exception, match="another trial"):
        trial(new_detector(splits.num_classes), splits, train_set=one_step, epochs=1, lr=0.05, checkpoint_path=tmp_path / "c.pth")


@pytest.mark.slow
def test_a_non_finite_loss_fails_the_trial_without_raising(data_dir):
    splits = build_detection_splits("fmnistdet", data_dir, flip_probability=0.0)
    model = new_detector(splits.num_classes)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    result = trial(model, splits, train_set=Subset(splits.train, range(4)), epochs=2)
    assert result.status == STATUS_FAILED and "non-finite training loss" in result.error and "epoch 1" in result.error
    assert result.best_val is None and result.test_final is None and result.row()["status"] == "failed"


def _two_rank_trial(rank: int, world_size: int, data_dir: Path) -> dict:
    torch.set_num_threads(1)
    splits = build_detection_splits("fmnistdet", data_dir)
    model = new_detector(splits.num_classes, init_seed=1 + rank, distributed=True)  # DDP must make rank 0's heads everyone's
    finals = []
    result = trial(model, splits, epochs=2, on_final_model=lambda m: finals.append(fingerprint(m, include_buffers=True)))
    return {"final": finals[0], "best": fingerprint(model, include_buffers=True), "row": result.row(),
            "history": result.history}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_ranks_end_with_identical_weights_and_scores(data_dir):
    first, second = run_in_processes(_two_rank_trial, world_size=2, args=(data_dir,), timeout=600)
    assert first["row"]["status"] == STATUS_OK
    assert first["final"] == second["final"] and first["best"] == second["best"]
    assert first["row"] == second["row"]
    assert [m["train/loss"] for m in first["history"]] == [m["train/loss"] for m in second["history"]]


@pytest.mark.parametrize("script", ["fine-tuning.py", "bissl.py"])
def test_detection_datasets_get_the_papers_defaults_unless_the_flag_was_given(script, monkeypatch):
    """A flag not given takes its task's default; a given one is kept, also when it equals the other
    task's default (--epochs 400 on a detection dataset is 400)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = load_script(script).get_args_parser()
    dset = "--dset" if script == "fine-tuning.py" else "--d-dset"
    names = (("epochs", "batch_size", "num_runs", "hpo_lr_min", "hpo_lr_max", "hpo_wd_min", "hpo_wd_max")
             if script == "fine-tuning.py" else ("d_batch_size", "d_linear_warmup_epochs"))
    values = {"fine-tuning.py": {"voc0712det": (50, 16, 50, 1e-4, 0.1, 1e-6, 1e-2), "pets": (400, 256, 100, 1e-4, 1.0, 1e-5, 1e-2)},
              "bissl.py": {"voc0712det": (16, 5), "pets": (256, 20)}}[script]
    for dset_name in ("voc0712det", "fmnistdet", "pets"):
        args = parser.parse_args([dset, dset_name])
        assert tuple(getattr(args, name) for name in names) == values.get(dset_name, values["voc0712det"]), dset_name
    given = "--epochs" if script == "fine-tuning.py" else "--d-batch-size"
    classification_value = values["pets"][0]
    args = parser.parse_args([dset, "voc0712det", given, str(classification_value)])
    assert getattr(args, names[0]) == classification_value
    assert "for a detection dataset" in parser.format_help()


def test_detection_batch_must_divide_the_world_size_at_parse_time(monkeypatch, capsys):
    """fine-tuning's detection batch is GLOBAL (one trial on all ranks): checked against WORLD_SIZE with
    its detection default 16; a classification batch (per process) is not."""
    parser = load_script("fine-tuning.py").get_args_parser()
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parser.parse_args(["--dset", "pets"]).batch_size == 256
    with pytest.raises(SystemExit):
        parser.parse_args(["--dset", "voc0712det"])
    assert "--batch-size 16 is the GLOBAL batch size" in capsys.readouterr().err
    assert parser.parse_args(["--dset", "voc0712det", "--batch-size", "15"]).batch_size == 15


@pytest.mark.slow
def test_the_sweep_runs_each_trial_once_and_a_rerun_runs_none(data_dir, tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    torch.save(pretrained_backbone(), model_dir / "bb.pth")
    defaults = {**dataclasses.asdict(cfg.GeneralConfig()), **dataclasses.asdict(cfg.FinetuneConfig()),
                **dataclasses.asdict(cfg.DetectionConfig())}
    args = Namespace(**{**defaults, "dset": "fmnistdet", "data_dir": str(data_dir), "model_dir": str(model_dir),
                        "pretrained_backbone_filename": "bb.pth", "pretrain_arch": "resnet18", "epochs": 1,
                        "batch_size": 4, "num_runs": 2, "use_hpo": 1, "num_workers": 0, "max_train_samples": 4,
                        "max_eval_samples": 4, "hpo_lr_max": 0.1, "hpo_wd_min": 1e-6})  # the paper's detection grid
    assert (args.epochs, args.batch_size, args.num_runs, args.hpo_lr_max) == (1, 4, 2, 0.1)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    run_dir = tmp_path / "run"
    results = ResultsFile(run_dir / "results.jsonl")
    data = load_detection_data(args)
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (4, 4, 4)
    run_detection_sweep(args, env, results, run_dir, pretrained_backbone(), data, None, SETTINGS)
    rows = results.rows()
    assert [row["trial"] for row in rows] == [0, 1] and all(row["metric"] == "ap50" for row in rows)
    assert all(1e-4 <= row["lr"] <= 0.1 and 1e-6 <= row["wd"] <= 1e-2 for row in rows)
    assert not any(trial_checkpoint_path(run_dir, index).exists() for index in (0, 1))  # removed with the row
    assert (run_dir / "trials" / "trial-0000" / "metrics.jsonl").is_file()
    run_detection_sweep(args, env, results, run_dir, pretrained_backbone(), data, None, SETTINGS)
    assert results.rows() == rows


# A trial in a process of its own (argv: the heads' init seed), printing "epoch <n>" after each epoch's
# checkpoint; it writes its final weights to <out>.pth and its results row to <out>.row.
def _trial_process(data_dir: Path, checkpoint: Path, out: Path) -> list[str]:
    code = (
        "import sys, torch\n"
        "from source.data.detection import build_detection_splits\n"
        "from source.stages.detection_finetune import DetectorSettings, build_detector, fine_tune_detector\n"
        "from source.maths.models import build_backbone\n"
        "torch.set_num_threads(1)\n"
        f"settings = DetectorSettings(arch='resnet18', min_size=64, max_size=96, extra={dict(SETTINGS.extra)!r})\n"
        f"splits = build_detection_splits('fmnistdet', {str(data_dir)!r})\n"
        "torch.manual_seed(0)\n"
        "pretrained = build_backbone('resnet18')[0].state_dict()\n"
        "torch.manual_seed(int(sys.argv[1]))\n"
        "model = build_detector(pretrained, splits.num_classes, settings, torch.device('cpu'), False)\n"
        "result = fine_tune_detector(model, splits.train, splits.val, splits.test, num_classes=splits.num_classes, lr=0.01,\n"
        "    wd=1e-4, momentum=0.9, epochs=3, batch_size=4, seed=5, device=torch.device('cpu'),\n"
        f"    checkpoint_path={str(checkpoint)!r}, on_epoch=lambda m: print('epoch', m['epoch'], flush=True),\n"
        f"    on_final_model=lambda m: torch.save(m.state_dict(), {str(out) + '.pth'!r}))\n"
        f"torch.save(result.row(), {str(out) + '.row'!r})\n"
    )
    return [sys.executable, "-c", code]


@pytest.mark.slow
@pytest.mark.long
def test_a_trial_killed_with_sigkill_and_started_again_ends_as_an_uninterrupted_one(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    reference = subprocess.run(_trial_process(data_dir, tmp_path / "a.ckpt", tmp_path / "a") + ["1"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = subprocess.Popen(_trial_process(data_dir, tmp_path / "b.ckpt", tmp_path / "b") + ["1"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert killed.stdout.readline().split() == ["epoch", "1"]
    finally:
        os.kill(killed.pid, signal.SIGKILL)  # during epoch 2, as a node failure would
        killed.wait()
    assert torch.load(tmp_path / "b.ckpt", weights_only=True)["epoch"] == 1 and not (tmp_path / "b.row").exists()
    resumed = subprocess.run(_trial_process(data_dir, tmp_path / "b.ckpt", tmp_path / "b") + ["99"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.split() == ["epoch", "2", "epoch", "3"]  # epoch 1 was not trained again

    final_a, final_b = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in "ab")
    for key, value in final_a.items():
        torch.testing.assert_close(final_b[key], value, rtol=0, atol=1e-6, msg=key)
    row_a, row_b = (torch.load(tmp_path / f"{name}.row", weights_only=True) for name in "ab")
    for name in ("best_val", "best_epoch", "final_val", "test_final", "test_best", "test_final_ap75", "test_final_ap"):
        assert row_b[name] == pytest.approx(row_a[name], abs=1e-6), name


@pytest.mark.slow
def test_fine_tuning_py_dispatches_a_detection_dset_to_the_detection_sweep(data_dir, tmp_path, monkeypatch, capsys):
    import source.stages.detection_finetune_run as detection_run

    monkeypatch.setattr(detection_run, "detector_settings", lambda args: SETTINGS)  # small images and samples
    script = load_script("fine-tuning.py")
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    torch.save(pretrained_backbone(), model_dir / "bb.pth")
    flags = ["--dset", "fmnistdet", "--data-dir", str(data_dir), "--model-dir", str(model_dir),
             "--pretrained-backbone-filename", "bb.pth", "--pretrain-arch", "resnet18", "--epochs", "1",
             "--batch-size", "4", "--num-runs", "2", "--max-train-samples", "4", "--max-eval-samples", "4",
             "--device", "cpu", "--num-workers", "0", "--omp-num-threads", "1"]
    script.main(script.get_args_parser().parse_args(flags))
    run_dir = model_dir / "runs" / "finetune_pretext_bb_dset-fmnistdet_hpo"
    rows = ResultsFile(run_dir / "results.jsonl").rows()
    assert [row["trial"] for row in rows] == [0, 1] and {row["metric"] for row in rows} == {"ap50"}
    assert all(row["lr"] <= 0.1 and row["wd"] >= 1e-6 for row in rows)  # the detection grid
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["epochs"], config["batch_size"], config["hpo_lr_max"], config["hpo_wd_min"]) == (1, 4, 0.1, 1e-6)
    assert "AP50 (%)" in (run_dir / "summary.txt").read_text() and (run_dir / "hpo_grid.png").is_file()
    capsys.readouterr()
    script.main(script.get_args_parser().parse_args(flags))  # the same command again: nothing left to run
    assert ResultsFile(run_dir / "results.jsonl").rows() == rows
