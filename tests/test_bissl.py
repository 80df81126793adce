"""BiSSL trainer: frozen-backbone warmup, rank consistency, 1-vs-2-process equality."""
import copy

import pytest
import torch

from source.run.tracking import MetricsWriter
from source.stages.bissl_trainer import backbone_distance
from tests.bissl_helpers import make_batches, make_trainer, run_alternations
from tests.distributed_harness import run_in_processes


def shard(batches, rank: int, world: int):
    def part(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(part(item) for item in x)
        size = x.shape[0] // world
        return x[rank * size:(rank + 1) * size]
    return [part(b) for b in batches]


def test_head_warmup_keeps_backbone_bit_identical(tmp_path):
    trainer = make_trainer("simclr", batch_norm=True)
    before = {k: v.clone() for k, v in trainer.upper_backbone.state_dict().items()}
    head_before = trainer.head.weight.detach().clone()
    _, upper = make_batches(0, 8)
    optimizer = torch.optim.SGD(trainer.head.parameters(), lr=0.5, momentum=0.9)
    trainer.warmup_head(iter(upper), 5, optimizer, MetricsWriter(tmp_path, False, {}), show_progress=False)
    after = trainer.upper_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not torch.equal(head_before, trainer.head.weight)


def test_alternation_moves_both_levels_and_logs():
    trainer = make_trainer("simclr", batch_norm=True)
    lower0 = [p.detach().clone() for p in trainer.lower_model.backbone.parameters()]
    lower, upper = make_batches(0, 8)
    _, history = run_alternations(trainer, lower, upper)
    assert trainer.lower_step_count == 6 and trainer.upper_step_count == 6
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(trainer.lower_model.backbone.parameters(), lower0))
    assert moved > 0
    for key in ("lower/loss", "upper/loss", "cg/residual_last", "cg/true_rel_residual", "distance", "lower/lr", "upper/lr"):
        assert key in history[-1]
    assert history[-1]["distance"] == float(backbone_distance(trainer.lower_model.backbone, trainer.upper_backbone))


@pytest.mark.parametrize("gamma", [1.0, 0.01])
@pytest.mark.parametrize("shared_graph", [False, True])
def test_upper_gradient_composition_matches_formula(gamma, shared_graph):
    """θ_D.grad = x + γ ∇θD L_D(θ_D, φ), φ.grad = ∇φ L_D(θ_P, φ) + γ ∇φ L_D(θ_D, φ) (before clipping).

    The reference differentiates ONE scalar, L_D(θ_P, φ) + γ·L_D(θ_D, φ), with autograd: γ must
    reach both plain terms (θ_D's and φ's), as in the first paper version's code.
    """
    from source.maths.bilevel import implicit_gradient

    trainer = make_trainer("simclr", batch_norm=False, gamma=gamma)
    trainer.settings.grad_clip = 1e9
    lower, upper = make_batches(3, 8)
    (v1, v2), _ = lower[0]
    images, targets = upper[0]
    reference = copy.deepcopy(trainer)
    captured = {}
    original_step = trainer.upper_optimizer.step

    def capture(*args, **kwargs):
        captured["upper"] = [p.grad.clone() for p in trainer.upper_backbone_params]
        captured["head"] = [p.grad.clone() for p in trainer.head_params]
        return original_step(*args, **kwargs)

    trainer.upper_optimizer.step = capture
    hessian = trainer.hessian_operator((v1, v2)) if shared_graph else None
    trainer.upper_step(images, targets, (v1, v2), hessian)
    n = len(reference.lower_backbone_params)
    lower_loss = reference.criterion(reference.head(reference.lower_model.backbone(images)), targets)
    upper_loss = reference.criterion(reference.head(reference.upper_backbone(images)), targets)
    combined = torch.autograd.grad(lower_loss + gamma * upper_loss,
                                   reference.lower_backbone_params + reference.upper_backbone_params + reference.head_params)
    rhs, plain_backbone, head = combined[:n], combined[n:2 * n], combined[2 * n:]
    x, _ = implicit_gradient(reference.lower_backbone_params, rhs, lower_loss=lambda: reference.lower_model(v1, v2),
                             lam=0.5, damping=1.0, cg_iters=3)
    for got, xi, gi in zip(captured["upper"], x, plain_backbone):
        torch.testing.assert_close(got, xi + gi, atol=1e-6, rtol=1e-5)
    for got, expected in zip(captured["head"], head):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    if gamma != 1.0:  # and the two plain terms really are scaled: γ = 1 gives another head gradient
        unscaled = torch.autograd.grad(
            reference.criterion(reference.head(reference.lower_model.backbone(images)), targets)
            + reference.criterion(reference.head(reference.upper_backbone(images)), targets), reference.head_params)
        assert max(float((a - b).abs().max()) for a, b in zip(unscaled, captured["head"])) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["layerwise", "minres"])
def test_shared_hessian_graph_equals_per_step_build(solver):
    """One Hessian graph per alternation gives the per-step build's models (θ_P, ψ fixed meanwhile)."""
    results = {}
    for share in (True, False):
        trainer = make_trainer("simclr", batch_norm=True)
        trainer.settings.cg_solver, trainer.settings.share_hessian_graph = solver, share
        lower, upper = make_batches(5, 8)
        flat, history = run_alternations(trainer, lower, upper, alternations=2)
        buffers = torch.cat([b.double().flatten() for b in trainer.lower_model.buffers()])
        results[share] = flat, buffers, history
    (flat_shared, buffers_shared, history_shared), (flat_each, buffers_each, history_each) = results[True], results[False]
    torch.testing.assert_close(flat_shared, flat_each, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffers_shared, buffers_each, rtol=1e-5, atol=1e-5)
    for key in ("cg/true_rel_residual", "cg/cos_x_v", "upper/grad_norm"):
        assert abs(history_shared[-1][key] - history_each[-1][key]) < 1e-5 * max(1.0, abs(history_each[-1][key]))


def test_upper_steps_leave_the_lower_model_untouched():
    """Neither the shared Hessian graph nor the downstream pass through θ_P moves θ_P, ψ or BN stats."""
    trainer = make_trainer("simclr", batch_norm=True)
    lower, upper = make_batches(6, 8)
    (v1, v2), _ = lower[0]
    trainer.lower_step(v1, v2)
    before = {k: v.clone() for k, v in trainer.lower_model.state_dict().items()}
    hessian = trainer.hessian_operator(lower[1][0])
    for images, targets in upper[:2]:
        metrics = trainer.upper_step(images, targets, lower[1][0], hessian)
    after = trainer.lower_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["cg/hvps"] == 4  # layerwise: 3 iterations + the product that checks x
    for key in ("cg/true_rel_residual", "cg/x_norm_over_v_norm", "cg/cos_x_v", "cg/rhs_norm"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN


def test_zero_solver_iterations_use_the_plain_gradient_only():
    trainer = make_trainer("simclr", batch_norm=True, gamma=0.5)
    trainer.settings.cg_iters = 0
    lower, upper = make_batches(4, 8)
    history = run_alternations(trainer, lower, upper, alternations=1)[1]
    assert history[-1]["cg/true_rel_residual"] == 1.0 and history[-1]["cg/hvps"] == 0


def _distributed_bissl(rank, world, kind, batch_norm):
    torch.set_num_threads(1)
    trainer = make_trainer(kind, batch_norm)
    lower, upper = make_batches(7, 8)
    flat, history = run_alternations(trainer, shard(lower, rank, world), shard(upper, rank, world))
    buffers = torch.cat([b.float().flatten() for b in trainer.lower_model.buffers()] or [torch.zeros(1)])
    return flat, buffers, history[-1]["upper/loss"]


@pytest.mark.multiprocess
def test_two_ranks_stay_identical_with_batch_norm_simclr():
    (flat0, buffers0, _), (flat1, buffers1, _) = run_in_processes(_distributed_bissl, 2, args=("simclr", True))
    assert torch.equal(flat0, flat1)
    assert torch.equal(buffers0, buffers1)


@pytest.mark.multiprocess
def test_two_ranks_equal_one_process_on_concatenated_batches():
    results = run_in_processes(_distributed_bissl, 2, args=("byol", False))
    trainer = make_trainer("byol", batch_norm=False)
    lower, upper = make_batches(7, 8)
    reference, history = run_alternations(trainer, lower, upper)
    for flat, _, upper_loss in results:
        assert torch.allclose(flat, reference, atol=1e-5), float((flat - reference).abs().max())
        assert abs(upper_loss - history[-1]["upper/loss"]) < 1e-5


def test_non_finite_implicit_gradient_stops_the_run():
    from source.stages.engine import NonFiniteLossError

    trainer = make_trainer("simclr", batch_norm=False)
    lower, upper = make_batches(0, 8)
    (v1, v2), _ = lower[0]
    images, targets = upper[0]
    v1 = v1.clone()
    v1[0, 0, 0, 0] = float("nan")  # poisons only the Hessian batch, hence only the CG solve
    before = [p.detach().clone() for p in trainer.upper_backbone_params]
    try:
        trainer.upper_step(images, targets, (v1, v2))
    except NonFiniteLossError as error:
        assert "CG residuals" in str(error)
    else:
        raise AssertionError("a NaN implicit gradient was applied silently")
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.upper_backbone_params))
