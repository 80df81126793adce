"""BYOL target: EMA formula, schedule, no gradients; model/head construction."""
import math

import pytest
import torch

from source.maths.models import Projector, build_backbone
from source.stages.pretext import BYOL, SimCLR, build_pretext_model, byol_decay


def tiny_byol() -> BYOL:
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6), torch.nn.BatchNorm1d(6))
    return BYOL(backbone, 6, "8-5")


def test_byol_decay_schedule_values():
    assert byol_decay(0, 100, 0.99, use_schedule=False) == 0.99
    assert byol_decay(50, 100, 0.99, use_schedule=False) == 0.99
    assert byol_decay(0, 100, 0.99, use_schedule=True) == pytest.approx(0.99)
    assert byol_decay(50, 100, 0.99, use_schedule=True) == pytest.approx(0.995)
    assert byol_decay(100, 100, 0.99, use_schedule=True) == pytest.approx(1.0)
    k = 30
    assert byol_decay(k, 100, 0.9, True) == pytest.approx(1 - 0.1 * (math.cos(math.pi * k / 100) + 1) / 2)


def test_byol_ema_update_follows_formula_and_target_gets_no_gradient():
    torch.manual_seed(0)
    model = tiny_byol()
    x1, x2 = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    loss = model(x1, x2)
    loss.backward()
    assert all(p.grad is None for p in model.target_parameters())
    assert all(not p.requires_grad for p in model.target_parameters())
    assert model.backbone[1].weight.grad is not None
    with torch.no_grad():
        for p in model.online_parameters():
            p.add_(torch.randn_like(p))
    before_target = [p.clone() for p in model.target_parameters()]
    online = [p.clone() for p in model.online_parameters()]
    decay = byol_decay(10, 40, 0.9, use_schedule=True)
    model.update_target(decay)
    for new, old, theta in zip(model.target_parameters(), before_target, online):
        assert torch.allclose(new, decay * old + (1 - decay) * theta)


def test_byol_forward_changes_no_parameter():
    model = tiny_byol()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    model(torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_projector_layout():
    proj = Projector(10, "16-16-4")
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 16), (16, 4)]
    assert linears[-1].bias is None and linears[0].bias is not None
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in proj) == 2
    with pytest.raises(ValueError, match="mlp"):
        Projector(10, "16-x")


def test_backbone_keys_match_torchvision_without_fc():
    import torchvision

    for arch, dim in [("resnet18", 512), ("resnet50", 2048)]:
        backbone, feat_dim = build_backbone(arch)
        reference = getattr(torchvision.models, arch)(weights=None).state_dict()
        assert feat_dim == dim
        assert set(backbone.state_dict()) == {k for k in reference if not k.startswith("fc.")}
    small, _ = build_backbone("resnet18", cifar_stem=True)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert small.conv1.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="resnet34"):
        build_backbone("resnet34")


def test_build_pretext_model_kinds():
    backbone, dim = build_backbone("resnet18")
    assert isinstance(build_pretext_model("simclr", backbone, dim, "32-16", 0.5), SimCLR)
    with pytest.raises(ValueError, match="moco"):
        build_pretext_model("moco", backbone, dim, "32-16", 0.5)
