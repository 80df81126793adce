"""Tests for source/maths/bilevel.py against independent references.

CG vs ``torch.linalg.solve``, MINRES vs the residual-minimising solution over an explicit
Krylov basis, every solver's reported true residual vs an explicit product, HVP vs the
autograd Hessian, the implicit gradient vs a closed
form and vs central finite differences of a bilevel problem, graph reuse vs recomputation on
a ResNet, and a real 2-process gloo run vs one process on the concatenated batch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from source.maths.bilevel import (
    SOLVERS,
    HessianVectorOperator,
    conjugate_gradient,
    frozen_batch_norm_statistics,
    hessian_vector_product,
    implicit_gradient,
    minres,
    preserved_buffers,
    solve,
)
from tests.distributed_harness import run_in_processes

SHAPES = [(3,), (2, 2), (5,)]  # 12 unknowns split over three tensors of different shapes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(flat: torch.Tensor, shapes) -> tuple[torch.Tensor, ...]:
    sizes = [math.prod(s) for s in shapes]
    return tuple(part.reshape(s) for part, s in zip(flat.split(sizes), shapes))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _matrix_operator(matrix: torch.Tensor, shapes):
    def matvec(p):
        return _split(matrix @ _flat(p), shapes)

    return matvec


def _random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, dtype=torch.float64, generator=generator)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# conjugate_gradient
# --------------------------------------------------------------------------------------------


def test_global_cg_equals_linalg_solve_after_n_iterations():
    gen = torch.Generator().manual_seed(0)
    n = sum(math.prod(s) for s in SHAPES)
    for _ in range(3):
        matrix = _random_spd(n, gen)
        b = torch.randn(n, dtype=torch.float64, generator=gen)
        x = conjugate_gradient(_matrix_operator(matrix, SHAPES), _split(b, SHAPES), num_iters=n, layerwise=False)
        assert [tuple(t.shape) for t in x] == SHAPES
        torch.testing.assert_close(_flat(x), torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-8)


def test_layerwise_cg_is_exact_for_block_diagonal_systems_and_differs_from_global():
    gen = torch.Generator().manual_seed(1)
    blocks = [_random_spd(math.prod(s), gen) for s in SHAPES]
    matrix = torch.block_diag(*blocks)
    b = torch.randn(matrix.shape[0], dtype=torch.float64, generator=gen)
    iters = max(block.shape[0] for block in blocks)  # 5 < 12 unknowns
    exact = torch.linalg.solve(matrix, b)
    layerwise = conjugate_gradient(_matrix_operator(matrix, SHAPES), _split(b, SHAPES), iters, layerwise=True)
    torch.testing.assert_close(_flat(layerwise), exact, rtol=1e-8, atol=1e-8)
    # Global CG with only 5 of 12 Krylov directions is not exact: the two modes really differ.
    global_x = conjugate_gradient(_matrix_operator(matrix, SHAPES), _split(b, SHAPES), iters, layerwise=False)
    assert (_flat(global_x) - exact).abs().max() > 1e-4


@pytest.mark.parametrize("layerwise", [True, False])
def test_residual_norms_are_the_true_residuals_and_reach_zero(layerwise):
    gen = torch.Generator().manual_seed(2)
    n = sum(math.prod(s) for s in SHAPES)
    blocks = [_random_spd(math.prod(s), gen) for s in SHAPES]
    matrix = torch.block_diag(*blocks) if layerwise else _random_spd(n, gen)
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    matvec = _matrix_operator(matrix, SHAPES)
    norms: list = []
    conjugate_gradient(matvec, _split(b, SHAPES), n, layerwise=layerwise, residual_norms=norms)
    assert len(norms) == n
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in norms)
    for k in (1, 3, n):
        x_k = conjugate_gradient(matvec, _split(b, SHAPES), k, layerwise=layerwise)
        true_residual = torch.linalg.vector_norm(b - matrix @ _flat(x_k))
        torch.testing.assert_close(norms[k - 1], true_residual, rtol=1e-6, atol=1e-10)
    assert norms[0] < torch.linalg.vector_norm(b)
    assert norms[-1] < 1e-6 * torch.linalg.vector_norm(b)


@pytest.mark.parametrize("layerwise", [True, False])
def test_nan_in_rhs_propagates_to_solution(layerwise):
    b = _split(torch.arange(1.0, 13.0, dtype=torch.float64), SHAPES)
    b[1][0, 1] = float("nan")
    x = conjugate_gradient(_matrix_operator(2 * torch.eye(12, dtype=torch.float64), SHAPES), b, 3, layerwise=layerwise)
    assert torch.isnan(_flat(x)).any()
    assert torch.isnan(x[1]).all()


@pytest.mark.parametrize("layerwise", [True, False])
def test_exact_convergence_gives_no_nan(layerwise):
    identity = _matrix_operator(torch.eye(12, dtype=torch.float64), SHAPES)
    zero = _split(torch.zeros(12, dtype=torch.float64), SHAPES)
    norms: list = []
    x = conjugate_gradient(identity, zero, 4, layerwise=layerwise, residual_norms=norms)
    assert torch.equal(_flat(x), torch.zeros(12, dtype=torch.float64))
    assert torch.equal(torch.stack(norms), torch.zeros(4, dtype=torch.float64))
    # A = I: the first step solves exactly (alpha = 1, r = 0); the later 0/0 steps must stay 0.
    b = _split(torch.linspace(-1, 2, 12, dtype=torch.float64), SHAPES)
    x = conjugate_gradient(identity, b, 4, layerwise=layerwise)
    assert torch.equal(_flat(x), _flat(b))


def test_cg_rejects_negative_iterations():
    with pytest.raises(ValueError, match="num_iters"):
        conjugate_gradient(lambda p: p, (torch.ones(2),), -1)


# --------------------------------------------------------------------------------------------
# MINRES and the solvers' reports
# --------------------------------------------------------------------------------------------


def _random_symmetric(n: int, generator: torch.Generator, negative: int) -> torch.Tensor:
    """Symmetric with ``negative`` eigenvalues in [-3, -0.5] and the rest in [0.5, 4]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    eigenvalues = torch.cat([-0.5 - 2.5 * torch.rand(negative, dtype=torch.float64, generator=generator),
                             0.5 + 3.5 * torch.rand(n - negative, dtype=torch.float64, generator=generator)])
    return q @ torch.diag(eigenvalues) @ q.T


def _krylov_minimiser(matrix: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """argmin over x in span{b, Ab, ..., A^(k-1) b} of ||b - A x||, by least squares on a basis."""
    columns = [b]
    for _ in range(k - 1):
        columns.append(matrix @ columns[-1])
    basis, _ = torch.linalg.qr(torch.stack(columns, dim=1))  # orthonormal: a well-conditioned solve
    coefficients = torch.linalg.lstsq(matrix @ basis, b.unsqueeze(1)).solution
    return (basis @ coefficients).squeeze(1)


@pytest.mark.parametrize("negative", [0, 4])  # positive definite, and indefinite
def test_minres_iterates_minimise_the_residual_over_the_krylov_space(negative):
    gen = torch.Generator().manual_seed(11)
    n = sum(math.prod(s) for s in SHAPES)
    matrix = _random_symmetric(n, gen, negative)
    assert (torch.linalg.eigvalsh(matrix) < 0).sum() == negative
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    norms: list = []
    minres(_matrix_operator(matrix, SHAPES), _split(b, SHAPES), n, residual_norms=norms)
    previous = torch.linalg.vector_norm(b)
    for k in range(1, n + 1):
        x_k = _flat(minres(_matrix_operator(matrix, SHAPES), _split(b, SHAPES), k))
        torch.testing.assert_close(x_k, _krylov_minimiser(matrix, b, k), rtol=1e-7, atol=1e-9)
        residual = torch.linalg.vector_norm(b - matrix @ x_k)
        torch.testing.assert_close(norms[k - 1], residual, rtol=1e-7, atol=1e-10)
        assert residual <= previous + 1e-12  # monotone
        previous = residual
    torch.testing.assert_close(x_k, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-8)


def test_cg_oscillates_where_minres_does_not_on_an_indefinite_system():
    gen = torch.Generator().manual_seed(12)
    n = sum(math.prod(s) for s in SHAPES)
    matrix = _random_symmetric(n, gen, 5)
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    _, cg_report = solve(_matrix_operator(matrix, SHAPES), _split(b, SHAPES), n - 1, "global")
    cg_norms = torch.stack(cg_report.residual_norms)
    _, minres_report = solve(_matrix_operator(matrix, SHAPES), _split(b, SHAPES), n - 1, "minres")
    minres_norms = torch.stack(minres_report.residual_norms)
    assert (cg_norms[1:] > cg_norms[:-1]).any()  # CG's residual grows somewhere
    assert (minres_norms[1:] <= minres_norms[:-1] + 1e-12).all()
    assert (minres_norms <= cg_norms + 1e-10).all()  # the minimum over the same Krylov space


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("negative", [0, 3])
def test_every_solver_reports_the_true_residual_of_what_it_returns(solver, negative):
    gen = torch.Generator().manual_seed(13)
    n = sum(math.prod(s) for s in SHAPES)
    matrix = _random_symmetric(n, gen, negative)  # dense: layerwise CG is not exact CG here
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    calls = []

    def matvec(p):
        calls.append(1)
        return _matrix_operator(matrix, SHAPES)(p)

    for k in (0, 1, 3, 6):
        calls.clear()
        x, report = solve(matvec, _split(b, SHAPES), k, solver)
        x = _flat(x)
        assert len(calls) == report.matvecs == k + (solver == "layerwise" and k > 0)
        b_norm = torch.linalg.vector_norm(b)
        torch.testing.assert_close(report.true_rel_residual, torch.linalg.vector_norm(b - matrix @ x) / b_norm,
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(report.rhs_norm, b_norm)
        torch.testing.assert_close(report.x_norm_over_rhs_norm, torch.linalg.vector_norm(x) / b_norm)
        expected_cos = 0.0 if k == 0 else float(x @ b / (torch.linalg.vector_norm(x) * b_norm))
        assert abs(float(report.cos_x_rhs) - expected_cos) < 1e-10
        if k == 0:
            assert float(report.true_rel_residual) == 1.0 and torch.equal(x, torch.zeros_like(x))
    # The layerwise recurrence is not b - Ax on a coupled system: the report must not use it.
    if solver == "layerwise":
        x, report = solve(matvec, _split(b, SHAPES), 6, solver)
        assert abs(float(report.residual_norms[-1]) - float(report.true_rel_residual * report.rhs_norm)) > 1e-3


def test_minres_is_exact_without_nan_when_the_krylov_space_closes():
    identity = _matrix_operator(torch.eye(12, dtype=torch.float64), SHAPES)
    zero = _split(torch.zeros(12, dtype=torch.float64), SHAPES)
    x, report = solve(identity, zero, 4, "minres")
    assert torch.equal(_flat(x), torch.zeros(12, dtype=torch.float64))
    assert float(report.true_rel_residual) == 0.0
    b = _split(torch.linspace(-1, 2, 12, dtype=torch.float64), SHAPES)
    x, report = solve(identity, b, 4, "minres")  # one step solves A = I; the rest are 0/0 steps
    torch.testing.assert_close(_flat(x), _flat(b), rtol=1e-15, atol=1e-15)
    assert torch.equal(torch.stack(report.residual_norms)[1:], torch.zeros(3, dtype=torch.float64))


def test_minres_propagates_nan_and_rejects_bad_arguments():
    b = _split(torch.arange(1.0, 13.0, dtype=torch.float64), SHAPES)
    b[0][1] = float("nan")
    assert torch.isnan(_flat(minres(_matrix_operator(2 * torch.eye(12, dtype=torch.float64), SHAPES), b, 3))).all()
    with pytest.raises(ValueError, match="num_iters"):
        minres(lambda p: p, (torch.ones(2),), -1)
    with pytest.raises(ValueError, match="minres"):
        solve(lambda p: p, (torch.ones(2),), 1, "lanczos")


def test_implicit_gradient_solver_keyword():
    gen = torch.Generator().manual_seed(14)
    matrix = _random_spd(5, gen)
    theta = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    vector = torch.randn(5, dtype=torch.float64, generator=gen)

    def lower_loss():
        return 0.5 * theta @ matrix @ theta

    def run(**kwargs):
        return implicit_gradient([theta], [vector], lower_loss=lower_loss, lam=0.5, damping=0.5, cg_iters=2, **kwargs)[0][0]

    assert torch.equal(run(), run(solver="layerwise"))
    assert not torch.equal(run(solver="minres"), run(solver="global"))  # different Krylov criteria
    with pytest.raises(TypeError, match="layerwise"):  # the legacy keyword is gone: solver= says it
        run(layerwise=True)
    with pytest.raises(ValueError, match="unknown solver"):
        run(solver="gmres")
    exact = torch.linalg.solve(torch.eye(5, dtype=torch.float64) + matrix, vector)
    for solver in SOLVERS[1:]:
        x, report = implicit_gradient([theta], [vector], lower_loss=lower_loss, lam=0.5, damping=0.5, cg_iters=5,
                                      solver=solver)
        torch.testing.assert_close(x[0], exact, rtol=1e-8, atol=1e-8)
        assert float(report.true_rel_residual) < 1e-8


def test_zero_iterations_give_zero_without_any_hessian_product():
    theta = torch.ones(3, requires_grad=True)

    def lower_loss():
        raise AssertionError("no forward pass is needed for x = 0")

    for solver in SOLVERS:
        x, report = implicit_gradient([theta], [torch.ones(3)], lower_loss=lower_loss, lam=0.001, damping=10.0, cg_iters=0,
                                      solver=solver)
        assert torch.equal(x[0], torch.zeros(3)) and report.matvecs == 0
        assert report.metrics()["cg/true_rel_residual"] == 1.0


def test_frozen_batch_norm_statistics_same_output_no_writes_and_graph_outlives_updates():
    net = _bn_net()
    inputs = torch.randn(6, 3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0, 1, 0])
    params = list(net.parameters())
    vectors = [torch.randn_like(p) for p in params]
    expected = hessian_vector_product(lambda: F.cross_entropy(net(inputs), targets), params, vectors)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_batch_norm_statistics(net):
        operator = HessianVectorOperator(lambda: F.cross_entropy(net(inputs), targets), params)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net[1].track_running_stats
    net(inputs + 1)  # a normal train-mode forward pass writes the statistics in place...
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    with preserved_buffers(net):
        net(inputs - 1)
    result = operator(vectors)  # ...and the retained graph is still valid, with the same H
    torch.testing.assert_close(_flat(result), _flat(expected), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Hessian-vector products and BatchNorm buffers
# --------------------------------------------------------------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()


def test_hessian_vector_product_matches_autograd_hessian_with_batchnorm():
    net = _bn_net()
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    targets = torch.tensor([0, 1, 1, 0, 1, 0])
    names = [name for name, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    shapes = [tuple(p.shape) for p in params]

    def loss_of_flat(flat):
        return F.cross_entropy(functional_call(net, dict(zip(names, _split(flat, shapes))), (inputs,)), targets)

    flat_params = _flat(params).detach()
    hessian = torch.autograd.functional.hessian(loss_of_flat, flat_params)
    vector = torch.randn(flat_params.numel(), dtype=torch.float64, generator=gen)
    expected = hessian @ vector
    assert expected.abs().max() > 1e-2  # a meaningful, nonzero product

    def loss():
        return F.cross_entropy(net(inputs), targets)

    recomputed = hessian_vector_product(loss, params, _split(vector, shapes))
    torch.testing.assert_close(_flat(recomputed), expected, rtol=1e-10, atol=1e-12)
    assert not any(t.requires_grad for t in recomputed)

    operator = HessianVectorOperator(loss, params)
    for scale in (1.0, -2.5):  # the retained graph serves several products
        reused = operator(_split(scale * vector, shapes))
        torch.testing.assert_close(_flat(reused), scale * expected, rtol=1e-10, atol=1e-12)


def test_unused_and_linear_parameters_give_zero_blocks():
    a = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    linear = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)

    def loss():
        return (a**3).sum() + (linear * 2.0).sum()

    vectors = (torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    expected_a = 6 * a.detach()  # H = diag(6a)
    for result in (hessian_vector_product(loss, (a, linear, unused), vectors), HessianVectorOperator(loss, (a, linear, unused))(vectors)):
        torch.testing.assert_close(result[0], expected_a)
        assert torch.equal(result[1], torch.zeros(3, dtype=torch.float64))
        assert torch.equal(result[2], torch.zeros(2, 2, dtype=torch.float64))


def test_preserved_buffers_keeps_batchnorm_statistics():
    net = _bn_net()
    inputs = torch.randn(6, 3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0, 1, 0])
    params = list(net.parameters())
    vectors = [torch.ones_like(p) for p in params]
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}

    def loss():
        return F.cross_entropy(net(inputs), targets)

    with preserved_buffers(net):
        hessian_vector_product(loss, params, vectors)
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])  # it did run
    for key, value in before.items():
        assert torch.equal(net.state_dict()[key], value), key

    hessian_vector_product(loss, params, vectors)  # without the guard the statistics move
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    assert not torch.equal(net[1].running_var, before["1.running_var"])
    assert net[1].num_batches_tracked.item() == before["1.num_batches_tracked"].item() + 1


def test_preserved_buffers_restores_after_an_exception():
    net = _bn_net()
    before = net[1].running_mean.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_buffers(net):
            net(torch.randn(4, 3, dtype=torch.float64))
            raise RuntimeError("boom")
    assert torch.equal(net[1].running_mean, before)


# --------------------------------------------------------------------------------------------
# implicit_gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("reuse_graph", [True, False])
def test_implicit_gradient_matches_closed_form_on_a_quadratic(layerwise, reuse_graph):
    gen = torch.Generator().manual_seed(5)
    matrix = _random_spd(6, gen)
    linear = torch.randn(6, dtype=torch.float64, generator=gen)
    theta = torch.randn(2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    vector = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    vector_before = vector.clone()
    lam, damping = 0.5, 0.25

    def lower_loss():  # L = ½θᵀAθ + bᵀθ, so H = A
        flat = theta.reshape(-1)
        return 0.5 * flat @ matrix @ flat + linear @ flat

    expected = torch.linalg.solve(torch.eye(6, dtype=torch.float64) + matrix / (lam + damping), vector.reshape(-1))
    (x,), report = implicit_gradient(
        [theta], [vector], lower_loss=lower_loss, lam=lam, damping=damping, cg_iters=12,
        solver="layerwise" if layerwise else "global", reuse_graph=reuse_graph,
    )
    norms = report.residual_norms
    torch.testing.assert_close(x.reshape(-1), expected, rtol=1e-6, atol=1e-6)
    assert len(norms) == 12 and norms[-1] < 1e-8
    assert torch.equal(vector, vector_before)


def test_implicit_gradient_global_cg_on_coupled_tensors():
    gen = torch.Generator().manual_seed(6)
    matrix = _random_spd(5, gen)
    first = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    second = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    vectors = _split(torch.randn(5, dtype=torch.float64, generator=gen), [(2,), (3,)])

    def lower_loss():
        flat = torch.cat([first, second])
        return 0.5 * flat @ matrix @ flat

    x, _ = implicit_gradient([first, second], vectors, lower_loss=lower_loss, lam=1.0, damping=0.0, cg_iters=5, solver="global")
    expected = torch.linalg.solve(torch.eye(5, dtype=torch.float64) + matrix, _flat(vectors))
    torch.testing.assert_close(_flat(x), expected, rtol=1e-6, atol=1e-6)


def test_implicit_gradient_rejects_bad_arguments():
    theta = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="lam"):
        implicit_gradient([theta], [torch.ones(2)], lower_loss=lambda: (theta**2).sum(), lam=0.0, damping=0.0, cg_iters=1)
    with pytest.raises(ValueError, match="shape"):
        implicit_gradient([theta], [torch.ones(3)], lower_loss=lambda: (theta**2).sum(), lam=1.0, damping=0.0, cg_iters=1)


def _logistic_loss(weight, bias, inputs, labels):
    """mean log(1 + exp(-y·(Xw + c))), y in {-1, +1}: smooth and not quadratic."""
    return F.softplus(-labels * (inputs @ weight + bias)).mean()


def test_hypergradient_matches_central_finite_differences():
    gen = torch.Generator().manual_seed(7)
    d = 3
    lower_x = torch.randn(30, d, dtype=torch.float64, generator=gen)
    lower_y = torch.randint(0, 2, (30,), generator=gen).double() * 2 - 1
    upper_x = torch.randn(25, d, dtype=torch.float64, generator=gen) + 0.5
    upper_y = torch.randint(0, 2, (25,), generator=gen).double() * 2 - 1
    lam = 0.3

    def lower_of_flat(theta):
        return _logistic_loss(theta[:d], theta[d], lower_x, lower_y)

    def upper_of_flat(theta):
        return _logistic_loss(theta[:d], theta[d], upper_x, upper_y)

    def lower_solution(theta_upper):
        """Newton's method on L_P(θ) + (λ/2)‖θ − θ_D‖² (strongly convex)."""
        theta = theta_upper.clone()

        def objective(t):
            return lower_of_flat(t) + 0.5 * lam * ((t - theta_upper) ** 2).sum()

        for _ in range(50):
            grad = torch.autograd.functional.jacobian(objective, theta)
            if grad.abs().max() < 1e-15:
                break
            theta = theta - torch.linalg.solve(torch.autograd.functional.hessian(objective, theta), grad)
        return theta

    def upper_objective(theta_upper):
        return upper_of_flat(lower_solution(theta_upper)).item()

    theta_upper = torch.randn(d + 1, dtype=torch.float64, generator=gen)
    step = 1e-5
    finite_difference = torch.tensor(
        [
            (upper_objective(theta_upper + step * e) - upper_objective(theta_upper - step * e)) / (2 * step)
            for e in torch.eye(d + 1, dtype=torch.float64)
        ],
        dtype=torch.float64,
    )

    theta_star = lower_solution(theta_upper)
    weight = theta_star[:d].clone().requires_grad_(True)
    bias = theta_star[d].clone().requires_grad_(True)  # two tensors: exercises the split
    upper_grads = torch.autograd.grad(_logistic_loss(weight, bias, upper_x, upper_y), [weight, bias])
    for reuse_graph in (True, False):
        x, _ = implicit_gradient(
            [weight, bias], upper_grads, lower_loss=lambda: _logistic_loss(weight, bias, lower_x, lower_y),
            lam=lam, damping=0.0, cg_iters=20, solver="global", reuse_graph=reuse_graph,
        )
        torch.testing.assert_close(_flat(x), finite_difference, rtol=1e-6, atol=1e-8)
    # The correction is material: the naive ∇L_D(θ_P*) is far from the true hypergradient.
    assert (_flat(upper_grads) - finite_difference).abs().max() > 1e-3


@pytest.mark.slow
def test_graph_reuse_equals_recompute_on_a_resnet():
    from torchvision.models import resnet18

    torch.manual_seed(8)
    model = resnet18(num_classes=3).train()
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 1])
    params = [p for p in model.parameters()]
    vectors = [torch.randn_like(p) * 1e-2 for p in params]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def lower_loss():
        return F.cross_entropy(model(images), labels)

    results = {}
    for reuse_graph in (True, False):
        with preserved_buffers(model):
            results[reuse_graph] = implicit_gradient(
                params, vectors, lower_loss=lower_loss, lam=0.001, damping=0.1, cg_iters=3, reuse_graph=reuse_graph
            )[0]
    reused, recomputed = _flat(results[True]), _flat(results[False])
    assert torch.isfinite(reused).all()
    assert (reused - _flat(vectors)).abs().max() > 1e-4  # the Hessian term matters
    torch.testing.assert_close(reused, recomputed, rtol=1e-5, atol=1e-5 * recomputed.abs().max().item())
    for key, value in model.state_dict().items():  # parameters and BN statistics untouched
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes vs one process on the concatenated batch
# --------------------------------------------------------------------------------------------


def _distributed_problem():
    """A BN-free MLP, a batch of 12 samples, and per-rank right-hand sides (float64)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(10)
    inputs = torch.randn(12, 4, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    base = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in model.parameters()]
    delta = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in model.parameters()]
    return model, inputs, labels, base, delta


def _solve(model, inputs, labels, vectors, layerwise):
    def lower_loss():
        return F.cross_entropy(model(inputs), labels)

    return implicit_gradient(list(model.parameters()), vectors, lower_loss=lower_loss, lam=0.05, damping=0.05, cg_iters=6,
                             solver="layerwise" if layerwise else "global")[0]


def _distributed_worker(rank: int, world_size: int, layerwise: bool):
    model, inputs, labels, base, delta = _distributed_problem()
    half = inputs.shape[0] // world_size
    rows = slice(rank * half, (rank + 1) * half)
    vectors = [b + rank * d for b, d in zip(base, delta)]  # each rank has its own v
    copies = [v.clone() for v in vectors]
    x = _solve(model, inputs[rows], labels[rows], vectors, layerwise)
    untouched = all(torch.equal(v, c) for v, c in zip(vectors, copies))
    return [t.numpy() for t in x], untouched


@pytest.mark.multiprocess
@pytest.mark.parametrize("layerwise", [True, False])
def test_two_process_implicit_gradient_equals_one_process_on_full_batch(layerwise):
    results = run_in_processes(_distributed_worker, world_size=2, args=(layerwise,))
    (x0, untouched0), (x1, untouched1) = results
    assert untouched0 and untouched1
    for a, b in zip(x0, x1):
        np.testing.assert_array_equal(a, b)  # every rank applies the same update

    model, inputs, labels, base, delta = _distributed_problem()
    mean_vectors = [b + 0.5 * d for b, d in zip(base, delta)]  # mean of ranks 0 and 1
    reference = _solve(model, inputs, labels, mean_vectors, layerwise)
    for a, ref in zip(x0, reference):
        np.testing.assert_allclose(a, ref.numpy(), rtol=1e-5, atol=1e-10)
    # And the per-rank halves alone give a different answer: the averaging is doing the work.
    alone = _solve(model, inputs[:6], labels[:6], base, layerwise)
    assert max(np.abs(a - b.numpy()).max() for a, b in zip(x0, alone)) > 1e-3
