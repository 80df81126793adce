"""--hvp-precision (issue 20): the precision of BiSSL's Hessian-vector products and solve.

Reference: the dense Hessian of a small conv net's loss, formed by ``torch.func.hessian`` in
float64, and ``torch.linalg.solve`` on A = I + H/(λ + δ) at a δ where A is positive definite.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from source.maths.bilevel import (
    HVP_PRECISIONS,
    HessianVectorOperator,
    hessian_vector_product,
    hvp_precision,
    implicit_gradient,
    solve,
)
from tests.bissl_helpers import make_batches, make_trainer, run_alternations

LAM, DAMPING = 0.01, 8.0  # H's eigenvalues lie in about [-3.7, 8.1]: A is positive definite (> 0.5)


def small_model_and_loss(dtype: torch.dtype = torch.float32):
    """conv 2->4 (3x3) + tanh + linear 64->3 on 6x6 inputs, cross-entropy: 271 parameters. The
    same parameters, inputs and targets for every dtype (drawn in float32, then cast)."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model = model.to(dtype)
    inputs = torch.randn(8, 2, 6, 6, generator=generator).to(dtype)
    targets = torch.randint(0, 3, (8,), generator=generator)
    return model, lambda: nn.functional.cross_entropy(model(inputs), targets), (inputs, targets)


def dense_hessian() -> torch.Tensor:
    """H = ∇²L over all parameters of the small model, flattened in parameters() order, formed in
    float64 by ``torch.func.hessian`` (independent of the HVP code)."""
    model64, _, (inputs, targets) = small_model_and_loss(torch.float64)
    names = [name for name, _ in model64.named_parameters()]
    shapes = [p.shape for p in model64.parameters()]

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [math.prod(s) for s in shapes])
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}
        return nn.functional.cross_entropy(functional_call(model64, params, (inputs,)), targets)

    flat = torch.cat([p.detach().flatten() for p in model64.parameters()])
    return hessian(flat_loss)(flat)


def random_vectors(params, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, generator=generator, dtype=dtype) for p in params)


def flat(vectors) -> torch.Tensor:
    return torch.cat([v.detach().double().flatten() for v in vectors])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def system():
    model, loss, _ = small_model_and_loss()
    H = dense_hessian()
    eigenvalues = torch.linalg.eigvalsh(H)
    A = torch.eye(len(H), dtype=torch.float64) + H / (LAM + DAMPING)
    return model, loss, H, A, eigenvalues


def test_the_reference_system_is_positive_definite_and_not_trivial(system):
    _, _, H, A, eigenvalues = system
    assert torch.linalg.eigvalsh(A).min() > 0.4  # CG and the fp64 reference are well defined
    assert eigenvalues.min() < -1 and eigenvalues.max() > 4  # a real, indefinite curvature


def test_fp32_is_the_path_before_the_flag_bit_for_bit(system):
    """fp32 changes nothing: the products and the solve equal the plain autograd double backward
    (the code before --hvp-precision) and a solve on it, bit for bit."""
    model, loss, _, _, _ = system
    params = list(model.parameters())
    v = random_vectors(params, 1)
    grads = torch.autograd.grad(loss(), params, create_graph=True)
    by_hand = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
    operator = HessianVectorOperator(loss, params, "fp32")
    for product in (operator(v), hessian_vector_product(loss, params, v, precision="fp32")):
        assert all(torch.equal(a, b) for a, b in zip(product, by_hand))
    scale = 1 / (LAM + DAMPING)

    def matvec(p):
        hp = torch.autograd.grad(grads, params, grad_outputs=p, retain_graph=True)
        return tuple(p_i + scale * h_i for p_i, h_i in zip(p, hp))

    for solver in ("layerwise", "global", "minres"):
        expected, _ = solve(matvec, v, 4, solver)
        x, _ = implicit_gradient(params, v, hessian=operator, lam=LAM, damping=DAMPING, cg_iters=4, solver=solver,
                                 precision="fp32")
        assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(x, expected))


def test_fp64_products_and_solve_match_the_dense_reference(system):
    model, loss, H, A, _ = system
    model64, loss64, _ = small_model_and_loss(torch.float64)
    params = list(model64.parameters())
    v = random_vectors(params, 2)  # float32, as the trainer passes them
    products = HessianVectorOperator(loss64, params, "fp64")(v)
    assert all(p.dtype == torch.float64 for p in products)
    # float64 against float64: only rounding of a few hundred terms separates them
    assert rel(flat(products), H @ flat(v)) < 1e-12
    x, report = implicit_gradient(params, v, lower_loss=loss64, lam=LAM, damping=DAMPING, cg_iters=40,
                                  solver="global", precision="fp64")
    assert all(t.dtype == torch.float32 for t in x)  # returned in the right-hand side's dtype
    exact = torch.linalg.solve(A, flat(v))
    # float32 rounding of the returned x (2^-24 relative) bounds the error, not the solve's arithmetic
    assert rel(flat(x), exact) < 1e-6
    assert float(report.true_rel_residual) < 1e-10  # the float64 solve itself is exact to rounding
    with pytest.raises(ValueError, match="float64 parameters"):
        HessianVectorOperator(loss, list(model.parameters()), "fp64")


def test_bf16_products_and_solve_are_within_bf16_error_of_the_dense_reference(system):
    """bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.2 %); the conv and linear layers round
    their inputs and weights to it in the forward pass and in both backward passes, a few roundings
    each, with float32 accumulation: errors of order 1 % are expected. Bounds: 5 % for H·v and for x
    (A's smallest eigenvalue ≈ 0.6 keeps the solve from amplifying them), and at least 1e-4 so the
    test fails if autocast were silently not applied (float32 is ~1e-7 here)."""
    model, loss, H, A, _ = system
    params = list(model.parameters())
    v = random_vectors(params, 3)
    operator = HessianVectorOperator(loss, params, "bf16")
    product = operator(v)
    assert all(p.dtype == torch.float32 for p in product)
    error = rel(flat(product), H @ flat(v))
    assert 1e-4 < error < 0.05, error
    fp32_error = rel(flat(HessianVectorOperator(loss, params, "fp32")(v)), H @ flat(v))
    assert fp32_error < 1e-5
    x, report = implicit_gradient(params, v, hessian=operator, lam=LAM, damping=DAMPING, cg_iters=30,
                                  solver="global", precision="bf16")
    assert all(t.dtype == torch.float32 for t in x)
    x_error = rel(flat(x), torch.linalg.solve(A, flat(v)))
    assert 1e-4 < x_error < 0.05, x_error


def test_tf32_switches_are_set_during_the_products_and_restored(system):
    model, loss, _, _, _ = system
    params = list(model.parameters())
    seen = []

    def recording_loss():
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return loss()

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for name, expected in (("tf32", (True, True)), ("fp32-strict", (False, False)), ("fp32", before)):
        seen.clear()
        hessian_vector_product(recording_loss, params, random_vectors(params, 4), precision=name)
        assert seen == [expected], name
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    # on CPU they change nothing: fp32-strict and tf32 give fp32's products bit for bit
    v = random_vectors(params, 5)
    products = {name: HessianVectorOperator(loss, params, name)(v) for name in ("fp32", "fp32-strict", "tf32")}
    assert all(torch.equal(a, b) for name in ("fp32-strict", "tf32") for a, b in zip(products[name], products["fp32"]))


def test_bad_precision_and_mismatched_operator_are_refused(system):
    model, loss, _, _, _ = system
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"unknown HVP precision 'fp8'.*fp32"):
        hvp_precision("fp8")
    operator = HessianVectorOperator(loss, params, "bf16")
    with pytest.raises(ValueError, match="runs in bf16, the solve in fp32"):
        implicit_gradient(params, random_vectors(params, 6), hessian=operator, lam=LAM, damping=DAMPING, cg_iters=1)
    assert set(HVP_PRECISIONS) == {"fp32", "fp32-strict", "tf32", "bf16", "fp64"}


def test_trainer_default_is_fp32_and_fp64_runs_on_a_double_copy():
    """The trainer's default path is the fp32 one (bit for bit, over a whole alternation); fp64
    builds its HVPs on a float64 copy of the lower model, leaves the model float32, and gives the
    fp32 x up to float32 rounding (A positive definite: λ + δ = 100 on the tiny model)."""
    lower, upper = make_batches(0, 8, alternations=1)
    results = {}
    for name in ("default", "fp32"):
        trainer = make_trainer("simclr", batch_norm=True)
        if name != "default":
            trainer.settings.hvp_precision = name
        results[name], _ = run_alternations(trainer, lower, upper, alternations=1)
    assert torch.equal(results["default"], results["fp32"])
    trainer = make_trainer("simclr", batch_norm=True)
    trainer.settings.cg_damping, trainer.settings.cg_solver, trainer.settings.cg_iters = 100.0, "global", 8
    rhs = random_vectors(trainer.lower_backbone_params, 7)
    solutions = {}
    for name in ("fp32", "fp64"):
        trainer.settings.hvp_precision = name
        solutions[name], report = trainer._implicit_gradient(rhs, lower[0][0], None)
        assert float(report.true_rel_residual) < 0.05  # converging: A is positive definite
    assert all(p.dtype == torch.float32 for p in trainer.lower_model.parameters())
    assert all(x.dtype == torch.float32 for x in solutions["fp64"])
    difference = rel(flat(solutions["fp32"]), flat(solutions["fp64"]))
    assert 0 < difference < 1e-5, difference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_precision_on_cuda_against_the_dense_reference(system):
    """On a GPU: IEEE float32 (fp32-strict) to float32 rounding; TF32 (10-bit mantissa, unit
    roundoff 2^-11 ≈ 5e-4; fp32 = PyTorch's default lets cuDNN convolutions use it) and bf16
    (2^-9) to their rounding over a few layers; fp64 to float64 rounding."""
    _, _, H, _, _ = system
    bounds = {"fp32-strict": 1e-5, "fp32": 1e-2, "tf32": 1e-2, "bf16": 0.05, "fp64": 1e-12}
    for name, bound in bounds.items():
        model, loss, _ = small_model_and_loss(torch.float64 if name == "fp64" else torch.float32)
        model.cuda()
        loss_cuda = _on_cuda(model, loss)
        params = list(model.parameters())
        v = tuple(t.cuda() for t in random_vectors(params, 8))
        product = HessianVectorOperator(loss_cuda, params, name)(v)
        error = rel(flat(product).cpu(), H @ flat(v).cpu())
        assert error < bound, (name, error)


def _on_cuda(model: nn.Module, loss):
    """The small model's loss with its inputs and targets on the GPU."""
    _, _, (inputs, targets) = small_model_and_loss(next(model.parameters()).dtype)
    inputs, targets = inputs.cuda(), targets.cuda()
    return lambda: nn.functional.cross_entropy(model(inputs), targets)
