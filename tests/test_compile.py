"""--compile (issue 20): torch.compile of the model's forward, in place (source.stages.engine)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from source.run.errors import ConfigError
from source.stages import engine


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def train(model: nn.Module, steps: int = 3) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        images, targets = torch.randn(16, 3, 10, 10, generator=generator), torch.randint(0, 4, (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_compile_without_a_cpp_compiler_is_a_clear_config_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"--compile 1 on CPU needs a C\+\+ compiler.*--compile 0"):
        engine.compile_modules(True, torch.device("cpu"), small_model())
    engine.compile_modules(False, torch.device("cpu"), small_model())  # off: nothing is checked or compiled


@pytest.mark.slow
def test_compiled_training_matches_eager_and_keeps_the_state_dict_keys():
    """Three SGD steps of a conv + BN + linear model, eager and compiled on CPU. Inductor fuses and
    reorders float32 reductions, so the two differ by rounding only: per step the losses agree to
    1e-5 and the parameters to 1e-5 (they are O(0.1-1); float32's 2^-24 ≈ 6e-8 relative per
    operation, amplified a little by three steps of lr 0.1)."""
    pytest.importorskip("torch._inductor")
    eager, compiled = small_model(), small_model()
    engine.compile_modules(True, torch.device("cpu"), compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and weight files unchanged
    eager_losses, compiled_losses = train(eager), train(compiled)
    assert compiled._compiled_call_impl is not None
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-5, atol=1e-5, msg=name)
    assert eager_losses[0] != eager_losses[-1]  # the steps did train


@pytest.mark.slow
def test_a_compiled_module_cannot_be_differentiated_twice():
    """Why bissl.py compiles the upper backbone only: the HVPs' double backward through a compiled
    forward is refused by torch.compile (checked here, so the help text stays true)."""
    pytest.importorskip("torch._inductor")
    model = copy.deepcopy(small_model())
    engine.compile_modules(True, torch.device("cpu"), model)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 10, 10)), torch.tensor([0, 1, 2, 3]))
    # Refused at the first backward (create_graph=True: with a graph already compiled for this code,
    # whose saved buffers are donated) or at the second ("does not currently support double backward").
    with pytest.raises(RuntimeError, match="double backward|create_graph=False"):
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        torch.autograd.grad(sum((g * g).sum() for g in grads), list(model.parameters()))
