"""Faster R-CNN R-C4 from torchvision parts around our ResNet backbones, on tiny images made of real
FashionMNIST items: losses, gradients, outputs, the two box heads, BatchNorm modes, and running
the detector with another backbone's weights (what BiSSL's upper level needs)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d

from source.data.voc_demo_setup import compose_image, load_fashion_mnist
from source.maths.detection_model import (
    Res5BoxHead,
    backbone_tensor_names,
    build_faster_rcnn_c4,
    forward_with_backbone,
    head_parameters,
    shared_backbone_parameters,
)
from source.maths.models import build_backbone

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
NUM_CLASSES = 10
LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
# Small sizes keep a CPU step cheap: images resized to 64..96 px, 32 RoIs sampled per image.
SMALL = {"min_size": 64, "max_size": 96, "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 200,
         "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}


@pytest.fixture(scope="module")
def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two generated images (real FashionMNIST items on canvases) with their targets."""
    if not (DATA_DIR / "FashionMNIST" / "raw").is_dir():
        pytest.skip("FashionMNIST is not in data/FashionMNIST/raw")
    items, labels = load_fashion_mnist(DATA_DIR, train=True)
    rng = np.random.default_rng(0)
    images, targets = [], []
    for _ in range(2):
        image, objects = compose_image(rng, items[:500], labels[:500])
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
        targets.append({
            "boxes": torch.tensor([o["box"] for o in objects], dtype=torch.float32),
            "labels": torch.tensor([o["label"] + 1 for o in objects]),
            "difficult": torch.tensor([o["difficult"] for o in objects]),  # as the dataset gives it; the detector ignores it
        })
    return images, targets


def detector(arch: str = "resnet18", **kwargs):
    torch.manual_seed(0)
    backbone, _ = build_backbone(arch)
    return build_faster_rcnn_c4(backbone, NUM_CLASSES, **{**SMALL, **kwargs}), backbone


def test_train_mode_returns_the_four_finite_losses_and_gradients_reach_the_trunk(batch):
    model, backbone = detector()
    model.train()
    losses = model(*batch)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    for param in (backbone.conv1.weight, backbone.layer1[0].conv1.weight, backbone.layer3[-1].conv2.weight, backbone.layer4[-1].conv2.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert model.rpn.head.conv[0][0].weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_the_detector_shares_the_backbone_modules():
    model, backbone = detector()
    assert model.backbone.layer3 is backbone.layer3 and model.roi_heads.box_head.layer4 is backbone.layer4
    assert model.backbone.out_channels == 256 and model.roi_heads.box_head.out_channels == 512
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1  # + background
    # res5 head: every backbone parameter is the detector's, in the backbone's order.
    shared = shared_backbone_parameters(model)
    assert [id(p) for p in shared] == [id(p) for p in backbone.parameters()]
    assert [id(p) for p in shared_backbone_parameters(model, backbone)] == [id(p) for p in backbone.parameters()]
    heads = head_parameters(model)
    assert {id(p) for p in heads} | {id(p) for p in shared} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in heads} & {id(p) for p in shared}
    names = backbone_tensor_names(model)
    assert names["backbone.layer1.0.conv1.weight"] == "layer1.0.conv1.weight"
    assert names["roi_heads.box_head.layer4.1.bn2.running_mean"] == "layer4.1.bn2.running_mean"


def test_eval_mode_returns_boxes_scores_labels_in_input_pixels(batch):
    model, _ = detector(box_score_thresh=0.0)
    model.eval()
    images, _ = batch
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == len(images)
    for image, out in zip(images, outputs):
        assert set(out) == {"boxes", "scores", "labels"}
        count = out["boxes"].shape[0]
        assert count > 0 and out["boxes"].shape == (count, 4) and out["scores"].shape == (count,) and out["labels"].shape == (count,)
        assert out["labels"].min() >= 1 and out["labels"].max() <= NUM_CLASSES
        height, width = image.shape[-2:]
        assert (out["boxes"][:, 2] <= width).all() and (out["boxes"][:, 3] <= height).all() and (out["boxes"] >= 0).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()  # batched NMS keeps them by decreasing score


def test_original_head_has_no_layer4(batch):
    model, backbone = detector(head="original")
    assert isinstance(model.roi_heads.box_head, TwoMLPHead)
    assert model.roi_heads.box_head.fc6.in_features == 256 * 7 * 7
    assert not [name for name, _ in model.named_parameters() if "layer4" in name]
    expected = [p for name, p in backbone.named_parameters() if not name.startswith("layer4.")]
    assert [id(p) for p in shared_backbone_parameters(model)] == [id(p) for p in expected]
    assert {id(p) for p in model.roi_heads.box_head.parameters()} <= {id(p) for p in head_parameters(model)}
    model.train()
    losses = model(*batch)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in backbone.layer4.parameters())
    assert backbone.layer3[-1].conv2.weight.grad.abs().sum() > 0


def test_frozen_batch_norm_never_updates(batch):
    model, backbone = detector(frozen_batch_norm=True)
    assert not [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert isinstance(backbone.bn1, FrozenBatchNorm2d) and model.backbone.bn1 is backbone.bn1
    assert not [name for name, _ in model.named_parameters() if ".bn" in name or "downsample.1" in name]
    before = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    with torch.no_grad():  # statistics change in the forward pass, if at all
        model(*batch)
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())
    # Plain BN, for contrast, updates its running statistics in train mode.
    plain, _ = detector()
    plain.train()
    running = plain.backbone.bn1.running_mean.clone()
    with torch.no_grad():
        plain(*batch)
    assert not torch.equal(running, plain.backbone.bn1.running_mean)


def test_frozen_batch_norm_keeps_the_statistics():
    torch.manual_seed(1)
    backbone, _ = build_backbone("resnet18")
    backbone.bn1.running_mean.uniform_(-1, 1)
    backbone.bn1.weight.data.uniform_(0.5, 2)
    expected_mean, expected_weight = backbone.bn1.running_mean.clone(), backbone.bn1.weight.detach().clone()
    build_faster_rcnn_c4(backbone, NUM_CLASSES, frozen_batch_norm=True)
    assert torch.equal(backbone.bn1.running_mean, expected_mean) and torch.equal(backbone.bn1.weight, expected_weight)


def test_sync_batch_norm_conversion():
    model, backbone = detector(sync_batch_norm=True)
    assert not [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    assert isinstance(model.backbone.bn1, nn.SyncBatchNorm) and model.backbone.bn1 is backbone.bn1
    assert model.roi_heads.box_head.layer4 is backbone.layer4


def test_forward_with_another_backbone_equals_a_detector_built_on_it(batch):
    model, _ = detector()
    torch.manual_seed(5)
    other, _ = build_backbone("resnet18")
    with torch.no_grad():
        for buffer in other.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    other_buffers = {name: b.clone() for name, b in other.named_buffers()}
    own_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    torch.manual_seed(9)  # the RPN and RoI heads sample anchors and proposals
    losses = forward_with_backbone(model, other, *batch)
    sum(losses.values()).backward()
    shared = shared_backbone_parameters(model, other)
    assert [id(p) for p in shared] == [id(p) for p in other.parameters()]
    assert all(p.grad is not None for p in shared) and other.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in shared_backbone_parameters(model))  # the detector's own backbone untouched
    assert all(torch.equal(b, other_buffers[name]) for name, b in other.named_buffers())  # statistics not updated
    assert all(torch.equal(p, own_weights[name]) for name, p in model.named_parameters())
    # The same computation with a detector built around a copy of `other` and the same heads.
    twin = build_faster_rcnn_c4(copy.deepcopy(other), NUM_CLASSES, **SMALL)
    twin.rpn.load_state_dict(model.rpn.state_dict())
    twin.roi_heads.box_predictor.load_state_dict(model.roi_heads.box_predictor.state_dict())
    twin.train()
    torch.manual_seed(9)
    twin_losses = twin(*batch)
    for key in LOSSES:
        torch.testing.assert_close(losses[key], twin_losses[key])


def test_bad_choices_are_refused():
    backbone, _ = build_backbone("resnet18")
    with pytest.raises(ValueError, match="res5, original"):
        build_faster_rcnn_c4(backbone, NUM_CLASSES, head="fpn")
    with pytest.raises(ValueError, match="exclude each other"):
        build_faster_rcnn_c4(backbone, NUM_CLASSES, sync_batch_norm=True, frozen_batch_norm=True)
    with pytest.raises(ValueError, match="one feature map"):
        build_faster_rcnn_c4(backbone, NUM_CLASSES, anchor_sizes=((32,), (64,)))
    with pytest.raises(ValueError, match="ResNet"):
        build_faster_rcnn_c4(nn.Linear(2, 2), NUM_CLASSES)
    model, _ = detector()
    resnet50, _ = build_backbone("resnet50")
    with pytest.raises(ValueError, match="another architecture"):
        forward_with_backbone(model, nn.Conv2d(3, 3, 1), [torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match="shape"):  # same names, other shapes
        forward_with_backbone(model, resnet50, [torch.rand(3, 32, 32)])


@pytest.mark.slow
def test_resnet50_builds_and_runs_one_tiny_forward():
    model, backbone = detector("resnet50", min_size=64, max_size=64, box_batch_size_per_image=16)
    assert model.backbone.out_channels == 1024 and isinstance(model.roi_heads.box_head, Res5BoxHead)
    assert model.roi_heads.box_head.out_channels == 2048 and model.roi_heads.box_predictor.cls_score.in_features == 2048
    original, _ = detector("resnet50", head="original")
    assert original.roi_heads.box_head.fc6.in_features == 1024 * 7 * 7
    model.train()
    image = torch.rand(3, 64, 64)
    losses = model([image], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([3])}])
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_training_step(batch):
    model, backbone = detector()
    device = torch.device("cuda")
    model.to(device).train()
    images = [image.to(device) for image in batch[0]]
    targets = [{key: value.to(device) for key, value in target.items()} for target in batch[1]]
    with torch.autocast("cuda", dtype=torch.float16):
        losses = model(images, targets)
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert backbone.layer3[-1].conv2.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        outputs = model(images)
    assert outputs[0]["boxes"].device.type == "cuda"
