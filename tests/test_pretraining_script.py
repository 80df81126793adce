"""ssl_pre-training.py as a real process: 2-rank consistency, resume after a kill, bad input."""
import json
import signal
import subprocess
import time

import pytest
import torch

from tests.script_helpers import ROOT, command, make_image_folder, run_script, script_env


def common_args(data_dir, model_dir, epochs=1, batch=16, pretext="simclr", workers=0):
    return ["--pretext-type", pretext, "--dset", "imagefolder", "--data-dir", str(data_dir), "--arch", "resnet18",
            "--cifar-stem", "0", "--img-size", "16", "--epochs", str(epochs), "--batch-size", str(batch),
            "--mlp", "32-16", "--lr", "0.5", "--warmup-epochs", "1", "--device", "cpu", "--num-workers", str(workers),
            "--model-dir", str(model_dir), "--log-every", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=2, per_class=16, size=16)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("pretext,files", [("simclr", {"bb", "proj"}), ("byol", {"bb", "proj", "pred"})])
def test_two_ranks_end_identical_and_write_outputs(images, tmp_path, pretext, files):
    run_script("ssl_pre-training.py", *common_args(images, tmp_path, pretext=pretext), nproc=2)
    stem = f"pretext_{pretext}_arch-resnet18"
    written = {p.name for p in tmp_path.glob(f"{stem}_*.pth")}
    assert written == {f"{stem}_{suffix}.pth" for suffix in files}
    state = torch.load(tmp_path / f"{stem}_bb.pth", weights_only=True)
    assert not any(key.startswith("fc.") for key in state) and "conv1.weight" in state
    config = json.loads((tmp_path / f"{stem}_config.json").read_text())
    assert config["pretext_type"] == pretext and config["batch_size"] == 16
    final = json.loads((tmp_path / "runs" / f"{stem}_dset-imagefolder" / "final_state.json").read_text())
    assert len(final["rank_fingerprints"]) == 2
    assert final["rank_fingerprints"][0] == final["rank_fingerprints"][1]
    metrics = (tmp_path / "runs" / f"{stem}_dset-imagefolder" / "metrics.jsonl").read_text().splitlines()
    assert metrics and "train/loss" in json.loads(metrics[0])
    first = json.loads(metrics[0])
    assert first["train/images_per_s"] > 0 and 0 <= first["train/data_wait_frac"] <= 1
    assert any("epoch/images_per_s" in json.loads(line) for line in metrics)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long  # three whole runs; the 2-rank kill-and-resume runs of test_reliability/test_stop are long too
def test_resume_after_kill_matches_uninterrupted_run(images, tmp_path):
    args = common_args(images, tmp_path / "straight", epochs=3)
    # wandb in offline mode rides along: it must work without network and change nothing.
    run_script("ssl_pre-training.py", *args, "--wandb-project", "bissl-tests", "--wandb-mode", "offline")
    wandb_dir = tmp_path / "straight" / "runs" / "pretext_simclr_arch-resnet18_dset-imagefolder" / "wandb"
    assert any(wandb_dir.glob("offline-run-*")), "no offline wandb run was written"
    resumed_dir = tmp_path / "resumed"
    # The killed and resumed run loads with 2 worker processes, the straight one in the main
    # process: augmentations are seeded per (seed, epoch, image), so they must still agree.
    args_resumed = common_args(images, resumed_dir, epochs=3, workers=2)
    checkpoint = resumed_dir / "runs" / "pretext_simclr_arch-resnet18_dset-imagefolder" / "checkpoint.pth"
    process = subprocess.Popen(command("ssl_pre-training.py", *args_resumed), cwd=ROOT, env=script_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run never wrote its first checkpoint"
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 3, "the run finished before it could be killed"
    assert not (resumed_dir / "pretext_simclr_arch-resnet18_bb.pth").exists()
    result = run_script("ssl_pre-training.py", *args_resumed)
    assert "resumed from" in result.stderr
    straight = torch.load(tmp_path / "straight" / "pretext_simclr_arch-resnet18_bb.pth", weights_only=True)
    resumed = torch.load(resumed_dir / "pretext_simclr_arch-resnet18_bb.pth", weights_only=True)
    for key in straight:
        assert torch.allclose(straight[key].float(), resumed[key].float(), atol=1e-6), key


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_bad_input_fails_clearly_and_damages_nothing(images, tmp_path):
    precious = tmp_path / "pretext_simclr_arch-resnet18_bb.pth"
    precious.write_bytes(b"already saved")
    missing = run_script("ssl_pre-training.py", *common_args(tmp_path / "nowhere", tmp_path), check=False)
    assert missing.returncode != 0 and "nowhere" in missing.stderr
    odd = run_script("ssl_pre-training.py", *common_args(images, tmp_path, batch=15), nproc=2, check=False)
    assert odd.returncode != 0 and "multiple of the world size" in odd.stderr
    arch = run_script("ssl_pre-training.py", *common_args(images, tmp_path), "--arch", "resnet34", check=False)
    assert arch.returncode != 0 and "resnet34" in arch.stderr
    assert precious.read_bytes() == b"already saved"
