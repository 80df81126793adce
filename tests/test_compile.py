"""--compile (issue 20): torch.compile of the model's forward, in place (source.stages.engine)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from source.run.errors import ConfigError
from source.stages import engine
from tests.script_helpers import load_script, make_image_folder


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


@pytest.mark.slow
@pytest.mark.long
def test_pretraining_script_with_compile_ends_where_the_eager_run_does(tmp_path):
    """ssl_pre-training.py --compile 1 against --compile 0: the same 2 steps of SimCLR on a ResNet-18
    (16 px, batch 8) give the same weights to 1e-4 (float32 kernels fused and reordered by inductor;
    LARS steps of lr 0.5 amplify rounding a little) and the same state_dict keys."""
    pytest.importorskip("torch._inductor")
    images = make_image_folder(tmp_path / "images", classes=2, per_class=8, size=16)
    script = load_script("ssl_pre-training.py")
    weights = {}
    for flag in ("0", "1"):
        model_dir = tmp_path / f"compile{flag}"
        script.main(script.get_args_parser().parse_args([
            "--pretext-type", "simclr", "--dset", "imagefolder", "--data-dir", str(images), "--arch", "resnet18",
            "--img-size", "16", "--epochs", "1", "--batch-size", "8", "--mlp", "32-16", "--lr", "0.5",
            "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0", "--model-dir", str(model_dir),
            "--run-dir", str(model_dir / "run"), "--compile", flag]))
        weights[flag] = torch.load(model_dir / "pretext_simclr_arch-resnet18_bb.pth", weights_only=True)
    assert list(weights["1"]) == list(weights["0"])
    for key, value in weights["0"].items():
        torch.testing.assert_close(weights["1"][key].float(), value.float(), rtol=1e-4, atol=1e-4, msg=key)
