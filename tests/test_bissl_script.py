"""bissl.py as a real process: 2-rank runs for SimCLR and BYOL weights, kill/resume, clear errors."""
import json
import signal
import subprocess
import time

import pytest
import torch

from tests.script_helpers import ROOT, command, make_image_folder, model_dirs_with_pretext_weights, run_script, script_env, write_random_pretext_weights


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    images = make_image_folder(tmp_path_factory.mktemp("images"), classes=2, per_class=20, size=16)
    models = tmp_path_factory.mktemp("models")
    write_random_pretext_weights(models)
    return images, models


def bissl_args(images, model_dir, kind="simclr", epochs=2, run_dir=None):
    args = ["--d-dset", "imagefolder", "--p-dset", "imagefolder", "--data-dir", str(images), "--p-pretext-type", kind,
            "--arch", "resnet18", "--cifar-stem", "0", "--img-size", "16", "--cg-iter-num", "2", "--p-mlp", "32-16",
            "--p-pretrained-backbone-filename", f"pretext_{kind}_arch-resnet18_bb.pth",
            "--p-pretrained-proj-filename", f"pretext_{kind}_arch-resnet18_proj.pth",
            "--epochs", str(epochs), "--lower-num-iter", "2", "--upper-num-iter", "2", "--d-linear-warmup-epochs", "1",
            "--p-batch-size", "8", "--d-batch-size", "8", "--device", "cpu", "--num-workers", "0",
            "--model-dir", str(model_dir)]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    return args


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["simclr", pytest.param("byol", marks=pytest.mark.long)])  # BYOL's 2-rank step: test_bissl.py
def test_two_rank_run_writes_the_bissl_backbone(setup, tmp_path, kind):
    images, models = setup
    run_dir = tmp_path / "run"
    run_script("bissl.py", *bissl_args(images, models, kind, run_dir=run_dir), nproc=2)
    tag = f"{kind}_arch-resnet18_dset-imagefolder"
    lower = torch.load(models / f"BiSSL-backbone_{tag}.pth", weights_only=True)
    pretext = torch.load(models / f"pretext_{kind}_arch-resnet18_bb.pth", weights_only=True)
    assert lower.keys() == pretext.keys()
    assert any(not torch.equal(lower[k], pretext[k]) for k in lower)  # BiSSL changed the backbone
    assert (models / f"BiSSL-upper-backbone_{tag}.pth").exists() and (models / f"BiSSL-upper-head_{tag}.pth").exists()
    config = json.loads((models / f"BiSSL_{tag}_config.json").read_text())
    assert config["d_lr"] == 0.03 and len(config["history"]) == 2  # fallback lr for datasets outside the table
    assert "val/top1" in config["history"][-1] and "cg/residual_last" in config["history"][-1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("warmup/loss" in row for row in rows) and any("upper/loss" in row for row in rows)
    speeds = [row for row in rows if "throughput/images_per_s" in row]
    assert len(speeds) == 2 and all(row["throughput/images_per_s"] > 0 for row in speeds)
    assert all(0 <= row["throughput/data_wait_frac"] <= 1 for row in speeds)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long  # three whole runs; the 2-rank kill-and-resume runs of test_reliability/test_stop are long too
def test_resume_after_kill_matches_uninterrupted(setup, tmp_path):
    images, models = setup
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    model_dirs_with_pretext_weights(models, straight_dir, resumed_dir)
    run_script("bissl.py", *bissl_args(images, straight_dir, epochs=3))
    args = bissl_args(images, resumed_dir, epochs=3)
    checkpoint = resumed_dir / "runs" / "BiSSL_simclr_arch-resnet18_dset-imagefolder" / "checkpoint.pth"
    process = subprocess.Popen(command("bissl.py", *args), cwd=ROOT, env=script_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, alternation = time.time() + 240, 0
    while time.time() < deadline and process.poll() is None and alternation < 1:
        time.sleep(0.2)
        if checkpoint.exists():
            alternation = torch.load(checkpoint, weights_only=True)["alternation"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 1 <= alternation < 3, f"killed at alternation {alternation}"
    result = run_script("bissl.py", *args)
    assert "resumed from" in result.stderr
    name = "BiSSL-backbone_simclr_arch-resnet18_dset-imagefolder.pth"
    straight = torch.load(straight_dir / name, weights_only=True)
    resumed = torch.load(resumed_dir / name, weights_only=True)
    for key in straight:
        assert torch.allclose(straight[key].float(), resumed[key].float(), atol=1e-6), key


@pytest.mark.multiprocess
@pytest.mark.slow
def test_spec_command_line_fails_only_for_missing_pets_data(tmp_path):
    result = run_script("bissl.py", "--d-dset", "pets", "--p-pretext-type", "simclr",
                        "--p-pretrained-backbone-filename", "pretext_simclr_arch-resnet50_bb.pth",
                        "--p-pretrained-proj-filename", "pretext_simclr_arch-resnet50_proj.pth",
                        "--data-dir", str(tmp_path), "--model-dir", str(tmp_path), "--device", "cpu", check=False)
    assert result.returncode != 0
    assert "oxford-iiit-pet" in result.stderr and "unrecognized arguments" not in result.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_mismatched_weights_name_the_keys(setup, tmp_path):
    images, models = setup
    (tmp_path / "pretext_simclr_arch-resnet18_bb.pth").write_bytes((models / "pretext_simclr_arch-resnet18_bb.pth").read_bytes())
    (tmp_path / "pretext_simclr_arch-resnet18_proj.pth").write_bytes((models / "pretext_simclr_arch-resnet18_proj.pth").read_bytes())
    args = bissl_args(images, tmp_path)
    args[args.index("--cifar-stem") + 1] = "1"  # the file has the standard 7x7 stem
    result = run_script("bissl.py", *args, check=False)
    assert result.returncode != 0 and "conv1.weight" in result.stderr and "shape" in result.stderr
    args = bissl_args(images, tmp_path)
    args[args.index("--p-pretrained-proj-filename") + 1] = "missing_proj.pth"
    result = run_script("bissl.py", *args, check=False)
    assert result.returncode != 0 and "missing_proj.pth" in result.stderr
