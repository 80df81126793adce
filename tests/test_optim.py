"""LARS one step against its formula; warmup+cosine schedule values."""
import math

import pytest
import torch

from source.maths.optim import LARS, build_optimizer, warmup_cosine_factor, warmup_cosine_scheduler


def test_lars_one_step_equals_formula():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.nn.Parameter(torch.randn(4))
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad.clone(), bias.grad.clone()
    lr, wd, eta, momentum = 0.7, 0.01, 0.001, 0.9
    optimizer = build_optimizer("lars", [weight, bias], lr, wd, momentum, eta=eta, exclude_bias_bn=True)
    optimizer.step()
    update = gw + wd * w0
    update = update * eta * w0.norm() / update.norm()
    assert torch.allclose(weight.detach(), w0 - lr * update, atol=1e-7)
    assert torch.allclose(bias.detach(), b0 - lr * gb, atol=1e-7)  # excluded: no decay, no trust ratio
    # second step uses momentum
    weight.grad = gw.clone()
    w1 = weight.detach().clone()
    optimizer.step()
    update2 = gw + wd * w1
    update2 = update2 * eta * w1.norm() / update2.norm()
    assert torch.allclose(weight.detach(), w1 - lr * (momentum * update + update2), atol=1e-6)


def test_lars_default_includes_biases_like_the_original():
    bias = torch.nn.Parameter(torch.ones(3))
    bias.grad = torch.ones(3)
    optimizer = build_optimizer("lars", [bias], 1.0, 0.0, 0.0, eta=0.001)
    optimizer.step()
    assert torch.allclose(bias.detach(), torch.full((3,), 1 - 0.001))  # trust ratio applied


def test_unknown_optimizer_names_valid_choices():
    with pytest.raises(ValueError, match="lars"):
        build_optimizer("adam", [torch.nn.Parameter(torch.ones(1))], 1, 0, 0)


def test_schedule_first_last_and_warmup_shape():
    warmup, total, final = 10, 111, 0.001
    factors = [warmup_cosine_factor(t, warmup, total, final) for t in range(total)]
    assert factors[0] == pytest.approx(0.1)  # the very first step is already warmed up, not 1.0
    assert factors[:warmup] == pytest.approx([(t + 1) / warmup for t in range(warmup)])
    assert factors[warmup] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(final)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    middle = warmup + (total - 1 - warmup) // 2  # progress exactly 0.5
    assert factors[middle] == pytest.approx(final + (1 - final) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_lambda_scheduler_applies_factor_from_step_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = LARS([param], lr=2.0)
    scheduler = warmup_cosine_scheduler(optimizer, 4, 20, 0.001)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert seen[0] == pytest.approx(0.5) and seen[3] == pytest.approx(2.0) and seen[-1] == pytest.approx(0.002)
