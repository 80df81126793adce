"""The three stages in miniature, each under a 2-process torchrun, each consuming the previous one's files."""
import json

import pytest
import torch

from tests.script_helpers import make_image_folder, run_script


@pytest.mark.multiprocess
@pytest.mark.slow
def test_pretraining_then_bissl_then_fine_tuning(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=20, size=16)
    models = tmp_path / "models"
    common = ["--data-dir", str(images), "--model-dir", str(models), "--device", "cpu", "--num-workers", "0"]

    run_script("ssl_pre-training.py", *common, "--pretext-type", "simclr", "--dset", "imagefolder", "--arch", "resnet18",
               "--img-size", "16", "--epochs", "1", "--batch-size", "16", "--mlp", "32-16", "--warmup-epochs", "1", nproc=2)
    pretext_file = models / "pretext_simclr_arch-resnet18_bb.pth"
    pretext = torch.load(pretext_file, weights_only=True)

    run_script("bissl.py", *common, "--d-dset", "imagefolder", "--p-dset", "imagefolder", "--p-pretext-type", "simclr",
               "--arch", "resnet18", "--img-size", "16", "--p-mlp", "32-16",
               "--p-pretrained-backbone-filename", pretext_file.name,
               "--p-pretrained-proj-filename", "pretext_simclr_arch-resnet18_proj.pth",
               "--epochs", "1", "--lower-num-iter", "1", "--upper-num-iter", "1", "--cg-iter-num", "1",
               "--d-linear-warmup-epochs", "1", "--p-batch-size", "8", "--d-batch-size", "8", nproc=2)
    bissl_file = models / "BiSSL-backbone_simclr_arch-resnet18_dset-imagefolder.pth"
    bissl = torch.load(bissl_file, weights_only=True)
    # BiSSL started from the pre-trained weights: after one lower step it is close to them, not to a fresh init.
    change = sum(float((bissl[k].float() - pretext[k].float()).norm()) for k in pretext if k.endswith("weight"))
    scale = sum(float(pretext[k].float().norm()) for k in pretext if k.endswith("weight"))
    assert 0 < change < 0.05 * scale
    history = json.loads((models / "BiSSL_simclr_arch-resnet18_dset-imagefolder_config.json").read_text())["history"]
    assert history[0]["distance"] > 0

    run_dir = tmp_path / "finetune"
    result = run_script("fine-tuning.py", *common, "--dset", "imagefolder", "--pretrained-backbone-filename", bissl_file.name,
                        "--backbone-origin", "bissl", "--pretrain-arch", "resnet18", "--pretrain-img-size", "16",
                        "--use-hpo", "0", "--num-runs", "2", "--epochs", "1", "--batch-size", "8", "--run-dir", str(run_dir),
                        nproc=2)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(row["trial"] for row in rows) == [0, 1]
    assert json.loads((run_dir / "config.json").read_text())["pretrained_backbone_filename"] == bissl_file.name
    assert "±" in result.stdout
