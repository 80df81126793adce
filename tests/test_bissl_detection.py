"""BiSSL with the detection loss (source/stages/bissl_detection.py): the upper gradients of one step
against a reference assembled from plain torchvision calls on copies of the models, the implicit
gradient against a dense solve, the original head's split (layer4 in the pretext head) and the
frozen-backbone head warmup."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from source.data.voc_demo_setup import compose_image, load_fashion_mnist
from source.maths.bilevel import implicit_gradient
from source.maths.detection_model import build_faster_rcnn_c4
from source.maths.models import build_backbone
from source.maths.optim import build_optimizer, warmup_cosine_scheduler
from source.run.tracking import MetricsWriter
from source.stages.bissl_detection import DetectionUpperTask
from source.stages.bissl_trainer import BilevelSettings, BisslTrainer
from source.stages.pretext import SimCLR

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
NUM_CLASSES = 10
LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
# Tiny images, and sample sizes above the anchor and proposal counts: every anchor and proposal is
# used, so the losses do not depend on the detector's random sampling and a reference can recompute them.
DETECTOR = {"min_size": 48, "max_size": 64, "rpn_batch_size_per_image": 100_000, "box_batch_size_per_image": 100_000,
            "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20}
BACKBONE_PREFIXES = ("backbone.", "roi_heads.box_head.layer4.")


@pytest.fixture(scope="module")
def batches():
    """Two detection images (real FashionMNIST items on canvases) with targets, and two pretext views of 4 images."""
    if not (DATA_DIR / "FashionMNIST" / "raw").is_dir():
        pytest.skip("FashionMNIST is not in data/FashionMNIST/raw")
    items, labels = load_fashion_mnist(DATA_DIR, train=True)
    rng = np.random.default_rng(1)
    images, targets = [], []
    for _ in range(2):
        image, objects = compose_image(rng, items[:300], labels[:300])
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
        targets.append({"boxes": torch.tensor([o["box"] for o in objects], dtype=torch.float32),
                        "labels": torch.tensor([o["label"] + 1 for o in objects])})
    generator = torch.Generator().manual_seed(2)
    views = (torch.randn(4, 3, 16, 16, generator=generator), torch.randn(4, 3, 16, 16, generator=generator))
    return images, targets, views


def make_trainer(head: str, cg_iters: int = 2, damping: float = 1.0, solver: str = "layerwise") -> BisslTrainer:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    lower = SimCLR(backbone, dim, "32-16", temperature=0.5)
    upper, _ = build_backbone("resnet18")
    upper.load_state_dict(lower.backbone.state_dict())
    detector = build_faster_rcnn_c4(upper, NUM_CLASSES, head=head, **DETECTOR)
    task = DetectionUpperTask(detector, upper, NUM_CLASSES, seed=0, rank=0, world_size=1)
    settings = BilevelSettings(
        lam=0.5, cg_damping=damping, cg_iters=cg_iters, cg_solver=solver, upper_plain_grad_scale=1.0, grad_clip=1e9,
        lower_steps_per_alternation=1, upper_steps_per_alternation=1, alternations=2, ma_decay=0.9, ma_use_scheduler=False,
    )
    lower_opt = build_optimizer("lars", list(lower.parameters()), 0.5, 1e-4, 0.9)
    upper_opt = build_optimizer("sgd", task.shared_parameters(upper) + task.head_parameters(), 0.01, 1e-4, 0.9)
    return BisslTrainer(lower, upper, detector, None, lower_opt, warmup_cosine_scheduler(lower_opt, 0, 2, 0.001),
                        upper_opt, warmup_cosine_scheduler(upper_opt, 0, 2, 0.001), settings, torch.device("cpu"),
                        upper_task=task)


def capture_upper_gradients(trainer: BisslTrainer) -> dict[str, list[torch.Tensor]]:
    """The gradients the upper optimizer steps with (filled when it steps)."""
    captured: dict[str, list[torch.Tensor]] = {}
    step = trainer.upper_optimizer.step

    def capture(*args, **kwargs):
        captured["upper"] = [p.grad.clone() for p in trainer.upper_backbone_params]
        captured["head"] = [p.grad.clone() for p in trainer.head_params]
        return step(*args, **kwargs)

    trainer.upper_optimizer.step = capture
    return captured


def detector_with(backbone: torch.nn.Module, heads_from: torch.nn.Module, head: str) -> torch.nn.Module:
    """A new detector around ``backbone`` with the box/RPN heads of the detector ``heads_from``."""
    detector = build_faster_rcnn_c4(backbone, NUM_CLASSES, head=head, **DETECTOR)
    heads = {k: v for k, v in heads_from.state_dict().items() if not k.startswith(BACKBONE_PREFIXES)}
    missing, unexpected = detector.load_state_dict(heads, strict=False)
    assert not unexpected and all(k.startswith(BACKBONE_PREFIXES) for k in missing)
    return detector.train()


def shared_names(head: str) -> list[str]:
    """ResNet parameter names the detector uses: all with res5, conv1 ... layer3 with the original head."""
    names = [name for name, _ in build_backbone("resnet18")[0].named_parameters()]
    return names if head == "res5" else [name for name in names if not name.startswith("layer4.")]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["res5", "original"])
def test_upper_step_gradients_match_plain_torchvision_reference(batches, head):
    """θ_D.grad = x + ∇θD L_D(θ_D, φ) over the shared backbone part, φ.grad = ∇φ L_D(θ_P, φ) + ∇φ L_D(θ_D, φ),
    with L_D the sum of the four losses and x the solve on v = ∇θP L_D(θ_P, φ); the reference runs
    torchvision's detector on deep copies (θ_P's weights loaded into a detector of its own)."""
    images, targets, (v1, v2) = batches
    trainer = make_trainer(head)
    with torch.no_grad():  # the levels apart, so that θ_P and θ_D give different gradients
        for param in trainer.lower_model.backbone.parameters():
            param.add_(0.01 * torch.randn_like(param))
    reference = copy.deepcopy(trainer)
    captured = capture_upper_gradients(trainer)
    trainer.upper_step(images, targets, (v1, v2))

    names = shared_names(head)
    assert [n for n, p in trainer.lower_model.backbone.named_parameters() if any(p is q for q in trainer.lower_backbone_params)] == names
    lower_backbone = dict(reference.lower_model.backbone.named_parameters())
    lower_shared = [lower_backbone[name] for name in names]
    lower_detector = detector_with(reference.lower_model.backbone, reference.head, head)
    lower_loss = sum(lower_detector(images, targets)[key] for key in LOSSES)
    head_names = [n for n, _ in reference.head.named_parameters() if not n.startswith(BACKBONE_PREFIXES)]
    lower_heads = dict(lower_detector.named_parameters())
    grads = torch.autograd.grad(lower_loss, lower_shared + [lower_heads[n] for n in head_names])
    rhs, head_via_lower = grads[:len(names)], grads[len(names):]
    upper_detector = reference.head.train()
    upper_loss = sum(upper_detector(images, targets)[key] for key in LOSSES)
    upper_named = dict(reference.upper_backbone.named_parameters())
    upper_heads = dict(upper_detector.named_parameters())
    plain = torch.autograd.grad(upper_loss, [upper_named[n] for n in names] + [upper_heads[n] for n in head_names])
    x, _ = implicit_gradient(lower_shared, rhs, lower_loss=lambda: reference.lower_model(v1, v2), lam=0.5, damping=1.0, cg_iters=2)

    assert len(captured["upper"]) == len(names) and len(captured["head"]) == len(head_names)
    for got, xi, gi in zip(captured["upper"], x, plain[:len(names)]):
        torch.testing.assert_close(got, xi + gi, atol=1e-5, rtol=1e-4)
    for got, a, b in zip(captured["head"], head_via_lower, plain[len(names):]):
        torch.testing.assert_close(got, a + b, atol=1e-5, rtol=1e-4)
    assert max(float(xi.abs().max()) for xi in x) > 1e-6  # the implicit part is not zero
    if head == "original":  # layer4 of θ_D takes no part: no gradient, unchanged by the step
        for name, param in trainer.upper_backbone.named_parameters():
            if name.startswith("layer4."):
                assert torch.equal(param, dict(reference.upper_backbone.named_parameters())[name]), name


@pytest.mark.slow
def test_implicit_gradient_equals_a_dense_solve(batches):
    """With the unknowns cut to one tensor (layer1.0.bn1.weight, 64 numbers), the x the upper step
    adds equals (I + H/(λ+δ))⁻¹ v from the dense autograd Hessian of the pretext loss and
    v = ∇ L_D(θ_P, φ) of the detection loss. δ is set from H's spectrum so that A is positive
    definite with condition number <= 9: global CG then reaches the dense solution in 20 iterations
    (H is indefinite here: at a fixed δ = 50 the solve diverged)."""
    images, targets, (v1, v2) = batches
    trainer = make_trainer("res5", cg_iters=20, solver="global")
    name = "layer1.0.bn1.weight"
    lower_param = dict(trainer.lower_model.backbone.named_parameters())[name]
    upper_param = dict(trainer.upper_backbone.named_parameters())[name]
    trainer.lower_backbone_params, trainer.upper_backbone_params = [lower_param], [upper_param]
    reference = copy.deepcopy(trainer)

    lower_model = reference.lower_model.train()
    point = dict(lower_model.backbone.named_parameters())[name].detach().clone()

    def pretext_loss(weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(lower_model, {f"backbone.{name}": weight}, (v1, v2))

    hessian = torch.autograd.functional.hessian(pretext_loss, point).double()
    eigenvalues = torch.linalg.eigvalsh(hessian)
    scale = 1.25 * float(eigenvalues.abs().max())  # λ + δ: the eigenvalues of A lie in [0.2, 1.8]
    trainer.settings.cg_damping = scale - trainer.settings.lam
    captured = capture_upper_gradients(trainer)
    trainer.upper_step(images, targets, (v1, v2))

    lower_detector = detector_with(reference.lower_model.backbone, reference.head, "res5")
    loss_lower = sum(lower_detector(images, targets)[key] for key in LOSSES)
    (rhs,) = torch.autograd.grad(loss_lower, [dict(reference.lower_model.backbone.named_parameters())[name]])
    system = torch.eye(point.numel(), dtype=torch.float64) + hessian / scale
    x = torch.linalg.solve(system, rhs.double().flatten()).float()
    upper_loss = sum(reference.head.train()(images, targets)[key] for key in LOSSES)
    (plain,) = torch.autograd.grad(upper_loss, [dict(reference.upper_backbone.named_parameters())[name]])
    torch.testing.assert_close(captured["upper"][0], x.view_as(plain) + plain, atol=1e-4, rtol=1e-3)
    # H mattered: without the solve (x = v) the same comparison fails
    assert not torch.allclose(captured["upper"][0], rhs + plain, atol=1e-4, rtol=1e-3)
    assert float((x - rhs.flatten()).norm()) > 5e-3 * float(x.norm())


@pytest.mark.slow
@pytest.mark.parametrize("head", ["res5", "original"])
def test_head_warmup_trains_the_heads_only_and_leaves_the_backbone_bit_identical(tmp_path, batches, head):
    images, targets, _ = batches
    trainer = make_trainer(head)
    backbone_before = {k: v.clone() for k, v in trainer.upper_backbone.state_dict().items()}
    heads_before = [p.detach().clone() for p in trainer.head_params]
    optimizer = torch.optim.SGD(trainer.head_params, lr=0.01, momentum=0.9)
    stream = iter([(images, targets)] * 2)
    trainer.warmup_head(stream, 2, optimizer, MetricsWriter(tmp_path, False, {}), show_progress=False)
    after = trainer.upper_backbone.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in backbone_before)  # weights and BN statistics
    assert all(p.requires_grad for p in trainer.upper_backbone.parameters())  # unfrozen again
    moved = [not torch.equal(before, p) for before, p in zip(heads_before, trainer.head_params)]
    assert sum(moved) >= len(moved) // 2
    head_names = [n for n, _ in trainer.upper_task.detector.named_parameters() if not n.startswith(BACKBONE_PREFIXES)]
    assert len(head_names) == len(moved)
    assert any(m for m, n in zip(moved, head_names) if n.startswith("rpn."))
    assert any(m for m, n in zip(moved, head_names) if n.startswith("roi_heads.box_predictor."))
    if head == "original":  # the original's box head is the two FC layers, trained here
        assert any(m for m, n in zip(moved, head_names) if n.startswith("roi_heads.box_head."))


def test_original_head_moves_layer4_into_the_pretext_head_and_off_the_proximity_term():
    trainer = make_trainer("original")
    lower_ids = {id(p) for p in trainer.lower_backbone_params}
    layer4 = list(trainer.lower_model.backbone.layer4.parameters())
    assert not any(id(p) in lower_ids for p in layer4)
    assert all(any(p is q for q in trainer.lower_params) for p in layer4)  # still trained by the pretext loss
    assert len(trainer.lower_backbone_params) == len(shared_names("original")) < len(list(trainer.lower_model.backbone.parameters()))
    res5 = make_trainer("res5")
    assert len(res5.lower_backbone_params) == len(list(res5.lower_model.backbone.parameters()))


# ---------------------------------------------------------------------------------------------
# bissl.py --d-dset fmnistdet as real processes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script_setup(tmp_path_factory):
    """A tiny generated fmnistdet set next to FashionMNIST (the pretext set), and random resnet18 pretext weights."""
    if not (DATA_DIR / "FashionMNIST" / "raw").is_dir():
        pytest.skip("FashionMNIST is not in data/FashionMNIST/raw")
    from source.data.voc_demo_setup import build_fashion_mnist_detection
    from tests.script_helpers import write_random_pretext_weights

    data_dir = tmp_path_factory.mktemp("det") / "data"
    data_dir.mkdir()
    (data_dir / "FashionMNIST").symlink_to(DATA_DIR / "FashionMNIST", target_is_directory=True)
    build_fashion_mnist_detection(data_dir, num_images=12, num_images_2012=8, seed=4)
    models = tmp_path_factory.mktemp("models")
    write_random_pretext_weights(models)
    return data_dir, models


def detection_bissl_args(data_dir: Path, model_dir: Path, epochs: int = 2, *extra: str) -> list[str]:
    return ["--d-dset", "fmnistdet", "--p-dset", "fashionmnist", "--data-dir", str(data_dir), "--model-dir", str(model_dir),
            "--arch", "resnet18", "--img-size", "16", "--p-mlp", "32-16", "--p-pretext-type", "simclr",
            "--p-pretrained-backbone-filename", "pretext_simclr_arch-resnet18_bb.pth",
            "--p-pretrained-proj-filename", "pretext_simclr_arch-resnet18_proj.pth",
            "--epochs", str(epochs), "--lower-num-iter", "1", "--upper-num-iter", "1", "--d-linear-warmup-epochs", "1",
            "--p-batch-size", "4", "--d-batch-size", "2", "--cg-iter-num", "1", "--device", "cpu", "--num-workers", "0",
            "--max-train-samples", "8", "--d-max-train-samples", "4", "--max-eval-samples", "2",
            "--det-min-size", "48", "--det-max-size", "64", *extra]


TAG = "simclr_arch-resnet18_dset-fmnistdet"


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("head", ["res5", "original"])
def test_two_rank_detection_run_stays_identical_and_writes_a_backbone_fine_tuning_loads(script_setup, tmp_path, head):
    """Two gloo ranks: the run checks after every alternation that both ranks hold identical models
    (check_ranks_identical), so finishing is the check; its lower backbone loads into the detection
    fine-tuning's detector."""
    from source.stages.detection_finetune import DetectorSettings, build_detector
    from tests.script_helpers import run_script

    data_dir, models = script_setup
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    for weights in models.glob("pretext_simclr_*"):
        (model_dir / weights.name).write_bytes(weights.read_bytes())
    run_script("bissl.py", *detection_bissl_args(data_dir, model_dir, 2, "--det-head", head), nproc=2, timeout=900)
    lower = torch.load(model_dir / f"BiSSL-backbone_{TAG}.pth", weights_only=True)
    pretext = torch.load(model_dir / "pretext_simclr_arch-resnet18_bb.pth", weights_only=True)
    assert lower.keys() == pretext.keys() and any(not torch.equal(lower[k], pretext[k]) for k in lower)
    config = json.loads((model_dir / f"BiSSL_{TAG}_config.json").read_text())
    assert (config["d_lr"], config["d_wd"], config["d_batch_size"]) == (0.015, 0.0, 2)  # the paper's detection lr / wd
    assert len(config["history"]) == 2 and all("val/ap50" in row and "upper/loss" in row for row in config["history"])
    detector = build_detector(lower, NUM_CLASSES, DetectorSettings(arch="resnet18", head=head), torch.device("cpu"), False)
    assert torch.equal(detector.backbone.layer1[0].conv1.weight, lower["layer1.0.conv1.weight"])


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.multiprocess
def test_detection_resume_after_kill_matches_uninterrupted_and_refuses_changed_flags(script_setup, tmp_path):
    import signal
    import subprocess
    import time

    from tests.script_helpers import ROOT, command, model_dirs_with_pretext_weights, run_script, script_env

    data_dir, models = script_setup
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    model_dirs_with_pretext_weights(models, straight_dir, resumed_dir)
    run_script("bissl.py", *detection_bissl_args(data_dir, straight_dir, 3), timeout=900)
    args = detection_bissl_args(data_dir, resumed_dir, 3)
    checkpoint = resumed_dir / "runs" / f"BiSSL_{TAG}" / "checkpoint.pth"
    process = subprocess.Popen(command("bissl.py", *args), cwd=ROOT, env=script_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, alternation = time.time() + 900, 0
    while time.time() < deadline and process.poll() is None and alternation < 1:
        time.sleep(0.2)
        if checkpoint.exists():
            alternation = torch.load(checkpoint, weights_only=True)["alternation"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 1 <= alternation < 3, f"killed at alternation {alternation}"
    changed = run_script("bissl.py", *args, "--det-head", "original", check=False, timeout=900)
    assert changed.returncode != 0 and "--det-head" in changed.stderr
    result = run_script("bissl.py", *args, timeout=900)
    assert "resumed from" in result.stderr
    for name in (f"BiSSL-backbone_{TAG}.pth", f"BiSSL-upper-head_{TAG}.pth"):
        straight = torch.load(straight_dir / name, weights_only=True)
        resumed = torch.load(resumed_dir / name, weights_only=True)
        for key in straight:
            assert torch.allclose(straight[key].float(), resumed[key].float(), atol=1e-6), (name, key)


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.multiprocess
def test_detection_demo_runs_end_to_end_at_tiny_sizes(tmp_path, monkeypatch):
    """``python demo.py --task detection`` with every size cut down: all stages run, both fine-tuning
    runs are compared in AP50, and everything is written under the output folder."""
    if not (DATA_DIR / "FashionMNIST" / "raw").is_dir():
        pytest.skip("FashionMNIST is not in data/FashionMNIST/raw")
    from source.tools import detection_demo
    from tests.script_helpers import load_script

    monkeypatch.setattr(detection_demo, "PRETRAIN", dict(epochs=1, batch_size=32, samples=64, lr=0.5, warmup_epochs=0))
    monkeypatch.setattr(detection_demo, "DATA", dict(num_images_2007=24, num_images_2012=8, seed=1))
    monkeypatch.setattr(detection_demo, "DETECTOR", dict(head="original", min_size=48, max_size=64, anchor_sizes="16,32",
                                                         rois_per_image=16, test_proposals=20))
    monkeypatch.setattr(detection_demo, "BISSL", dict(alternations=1, lower_steps=1, upper_steps=1, lam=0.001, p_lr=0.2,
                                                      p_batch_size=16, d_batch_size=2, warmup_epochs=1, d_lr=0.015,
                                                      d_wd=0.0, cg_iters=1, train_samples=4, eval_samples=2))
    monkeypatch.setattr(detection_demo, "FINETUNE", dict(epochs=1, batch_size=2, lr=0.01, wd=1e-4, eval_samples=4))
    demo = load_script("demo.py")
    out_dir = tmp_path / "out"
    demo.main(demo.get_args_parser().parse_args(["--task", "detection", "--data-dir", str(DATA_DIR), "--out-dir", str(out_dir),
                                                 "--nproc", "1", "--seeds", "2"]))
    table = (out_dir / "demo_results.md").read_text()
    assert "SimCLR + BiSSL" in table and "AP50" in table
    # Every step's CPU time per process and load are recorded and reported beside its wall time.
    costs = json.loads((out_dir / detection_demo.COSTS_FILE).read_text())
    stage_names = [stage.name for stage in detection_demo.stages(out_dir, out_dir / "models", 2)]
    assert set(costs) == {detection_demo.GENERATION, *stage_names}
    assert all(cost["cpu_per_process_s"] > 0 and cost["load_1min_at_end"] >= 0 for cost in costs.values())
    assert all(f"{name} " in table for name in stage_names) and table.count("min per process") == len(stage_names)
    assert (out_dir / "demo_results.png").is_file() and (out_dir / "data" / "fmnistdet" / "VOCdevkit").is_dir()
    for origin in ("pretext", "bissl"):
        rows = (out_dir / f"finetune_{origin}" / "results.jsonl").read_text().splitlines()
        assert len(rows) == 2 and all('"metric": "ap50"' in row for row in rows)
