"""Implicit gradients for BiSSL: Hessian-vector products and Krylov solvers (CG, MINRES).

BiSSL (Zakarias et al., arXiv 2410.02387) couples a lower (pretext) problem and an upper
(downstream) problem::

    θ_P*(θ_D) = argmin_θP  L_P(θ_P) + (λ/2)·‖θ_P − θ_D‖²
    min_θD    L_D(θ_P*(θ_D), φ)

From the lower optimality condition ∇L_P(θ_P*) + λ(θ_P* − θ_D) = 0 the implicit function
theorem gives dθ_P*/dθ_D = λ(H + λI)⁻¹ = (I + H/λ)⁻¹ with H = ∇²_θP L_P(θ_P*), a symmetric
matrix. The upper gradient through the lower solution is therefore

    x = (I + H/(λ + δ))⁻¹ · v,        v = ∇_θ L_D(θ_P, φ),

where δ ≥ 0 is a damping. x is approximated by a few iterations of a Krylov solver from
x = 0 (``layerwise`` CG as the original code, textbook ``global`` CG, or ``minres``), with H
applied through Hessian-vector products (double backward of the pretext loss with respect to
the lower backbone parameters only), so H is never formed. A = I + H/(λ + δ) is symmetric but
NOT positive definite when H has eigenvalues below −(λ + δ), which measured ResNet-18s have at
the paper's δ = 10 (``source/tools/curvature.py`` measures it); CG assumes positive definiteness,
MINRES does not. Every solve reports the true relative residual ‖v − A·x‖/‖v‖ of its x
(:class:`SolveReport`).

Precision (``--hvp-precision``, :data:`HVP_PRECISIONS`): the products run in float32 as PyTorch's
defaults run it (``fp32``, the behaviour before the flag), in IEEE float32 (``fp32-strict``), with
TF32 matmuls and convolutions on CUDA (``tf32``), under bf16 autocast (``bf16``: the pretext forward
pass and so the double backward through it; the solver's vectors and recurrences stay float32), or
in float64 (``fp64``: the operator must be built on a float64 copy of the model; the solve runs in
float64 and x is returned in the right-hand side's dtype).

Every function here works on a *sequence of tensors* (one per parameter tensor) rather than a
flattened vector, so no copy of the parameters is ever concatenated.

BatchNorm: a Hessian-vector product runs the lower model's forward pass in train mode, which
would update BatchNorm running statistics. :func:`implicit_gradient` (the one entry point) does
not know about modules; the caller wraps it in :func:`preserved_buffers`, or builds a
:class:`HessianVectorOperator` under :func:`frozen_batch_norm_statistics` (which a graph that
outlives the context needs)::

    with preserved_buffers(lower_backbone, lower_head):
        x, report = implicit_gradient(lower_params, v, lower_loss=lambda: pretext_loss(batch),
                                      lam=lam, damping=damping, cg_iters=cg_iters)

    with frozen_batch_norm_statistics(lower_model):
        hessian = HessianVectorOperator(lambda: pretext_loss(batch), lower_params)
    x, report = implicit_gradient(lower_params, v, hessian=hessian, lam=lam, damping=damping,
                                  cg_iters=5, solver="minres")
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from source.run.distributed import all_reduce_mean_tensors_

Vectors = tuple[Tensor, ...]
MatVec = Callable[[Sequence[Tensor]], Sequence[Tensor]]


# --------------------------------------------------------------------------------------------
# Precision of the products and of the solve
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HvpPrecision:
    """How the Hessian-vector products and the solver's arithmetic run (one of :data:`HVP_PRECISIONS`).

    solver_dtype: dtype of the Krylov vectors, inner products and recurrences (None: that of the
    right-hand side, float32 in a training run, as before the flag). autocast_dtype: the
    forward pass (and hence its first and second backward) runs under ``torch.autocast`` with it.
    tf32: allow (True) or forbid (False) TF32 for CUDA matmuls and cuDNN convolutions while the
    products run; None leaves PyTorch's settings alone (its default: convolutions may use TF32,
    matmuls not). On CPU only the dtypes matter (TF32 is a CUDA tensor-core format).
    """

    name: str
    solver_dtype: torch.dtype | None = None
    autocast_dtype: torch.dtype | None = None
    tf32: bool | None = None

    @contextlib.contextmanager
    def backends(self) -> Iterator[None]:
        """This precision's TF32 switches (for the forward pass and both backward passes), restored on exit."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        if self.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            if self.tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def forward_context(self, device_type: str) -> contextlib.AbstractContextManager:
        """Autocast for the forward pass only: backward passes run in the dtypes autocast chose for
        the forward operations (PyTorch's advice: no autocast around backward). Nothing for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)


HVP_PRECISIONS: dict[str, HvpPrecision] = {
    precision.name: precision for precision in (
        HvpPrecision("fp32"),  # the behaviour before the flag: nothing is changed
        HvpPrecision("fp32-strict", tf32=False),
        HvpPrecision("tf32", tf32=True),
        HvpPrecision("bf16", autocast_dtype=torch.bfloat16),
        HvpPrecision("fp64", solver_dtype=torch.float64),
    )
}


def hvp_precision(name: str) -> HvpPrecision:
    """The :class:`HvpPrecision` called ``name``; ValueError naming the valid ones otherwise."""
    if name not in HVP_PRECISIONS:
        raise ValueError(f"unknown HVP precision {name!r}; choose one of {tuple(HVP_PRECISIONS)}")
    return HVP_PRECISIONS[name]


def _check_params_dtype(params: Sequence[Tensor], precision: HvpPrecision) -> None:
    if precision.solver_dtype == torch.float64 and any(param.dtype != torch.float64 for param in params):
        raise ValueError("fp64 Hessian-vector products need float64 parameters: build them on a float64 copy "
                         "of the model (model.double()), as BisslTrainer.hessian_operator does")


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------


def _check_vectors(params: Sequence[Tensor], vectors: Sequence[Tensor]) -> None:
    if len(params) != len(vectors):
        raise ValueError(f"got {len(vectors)} vectors for {len(params)} parameter tensors; they must pair up")
    for i, (param, vector) in enumerate(zip(params, vectors)):
        if param.shape != vector.shape:
            raise ValueError(f"vector {i} has shape {tuple(vector.shape)}, its parameter {tuple(param.shape)}")


def _first_order_grads(loss: Callable[[], Tensor], params: Sequence[Tensor],
                       precision: HvpPrecision = HVP_PRECISIONS["fp32"]) -> tuple[Tensor, tuple]:
    """Evaluate ``loss()`` (under ``precision``'s autocast) and its gradient g = ∇L with the graph
    kept for a second backward."""
    for i, param in enumerate(params):
        if not param.requires_grad:
            raise ValueError(f"parameter tensor {i} (shape {tuple(param.shape)}) does not require grad")
    with precision.forward_context(params[0].device.type):
        value = loss()
    if value.ndim != 0:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
    # allow_unused: a parameter the loss does not touch has g = 0 and contributes a zero row of H.
    grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    return value, grads


def _differentiable(grad: Tensor | None) -> bool:
    # A gradient that is None (unused parameter) or does not require grad (the loss is at most
    # linear in that parameter) has a zero derivative: it adds nothing to H·v.
    return grad is not None and grad.requires_grad


def _materialise(results: Sequence[Tensor | None], params: Sequence[Tensor]) -> Vectors:
    """None (no path from the outputs to a parameter) means a zero block of H·v."""
    return tuple(
        torch.zeros_like(param) if result is None else result.detach()
        for result, param in zip(results, params)
    )


def hessian_vector_product(
    loss: Callable[[], Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor], precision: str = "fp32"
) -> Vectors:
    """H·v by recomputation: a fresh forward pass and first-order graph for this one product.

        g = ∇_θ L(θ)  (with create_graph),     H·v = ∇_θ ⟨g, v⟩ = ∇²_θ L(θ)·v

    ``loss()`` is called once and must return a scalar built from ``params``. params and
    vectors: matching sequences of tensors (v_i has the shape of θ_i). Returns detached tensors
    of those shapes; blocks of parameters that ``loss`` does not use are zero.

    This is the straightforward method, kept as a reference and for the benchmark; the CG solver
    uses :class:`HessianVectorOperator`, which builds the first-order graph once. ``precision``:
    one of :data:`HVP_PRECISIONS` (vectors are cast to the parameters' dtype).
    """
    params, setting = tuple(params), hvp_precision(precision)
    vectors = tuple(vector.to(param.dtype) for vector, param in zip(vectors, params))
    _check_vectors(params, vectors)
    _check_params_dtype(params, setting)
    with setting.backends():
        _, grads = _first_order_grads(loss, params, setting)
        terms = [(grad * vector).sum() for grad, vector in zip(grads, vectors) if _differentiable(grad)]
        if not terms:
            return _materialise([None] * len(params), params)
        inner = torch.stack(terms).sum()
        return _materialise(torch.autograd.grad(inner, params, allow_unused=True), params)


class HessianVectorOperator:
    """v ↦ H·v at fixed θ, reusing ONE forward pass and first-order graph for every product.

    Construction evaluates ``loss()`` once and g = ∇_θ L with ``create_graph=True``. Each call
    then back-propagates the vector-Jacobian product of g with v through that retained graph,

        H·v = (∂g/∂θ)ᵀ·v = ∇_θ ⟨g, v⟩      (H is symmetric),

    which is exactly the recompute method's result without its forward pass and first
    backward per product. The graph (activations included) stays alive as long as the
    operator does; drop the operator to free it. θ must not change while the operator is used.

    params: the tensors to differentiate with respect to (e.g. the lower backbone's parameters);
    vectors in ``__call__``: a matching sequence, cast to the parameters' dtype. Results are
    detached, in the parameters' dtype. ``precision`` (one of :data:`HVP_PRECISIONS`) applies to the
    forward pass and first-order graph built here and to every product: under ``bf16`` the graph's
    operations run in bf16 where autocast puts them, and the gradients and products come back in
    the parameters' float32; ``fp64`` needs float64 parameters.
    """

    def __init__(self, loss: Callable[[], Tensor], params: Sequence[Tensor], precision: str = "fp32") -> None:
        self.params = tuple(params)
        self.precision = hvp_precision(precision)
        _check_params_dtype(self.params, self.precision)
        with self.precision.backends():
            value, grads = _first_order_grads(loss, self.params, self.precision)
        self.loss_value = value.detach()
        self._index = [i for i, grad in enumerate(grads) if _differentiable(grad)]
        self._grads = [grads[i] for i in self._index]

    def __call__(self, vectors: Sequence[Tensor]) -> Vectors:
        vectors = tuple(vector.to(param.dtype) for vector, param in zip(vectors, self.params))
        _check_vectors(self.params, vectors)
        if not self._grads:
            return _materialise([None] * len(self.params), self.params)
        with self.precision.backends():
            products = torch.autograd.grad(
                self._grads,
                self.params,
                grad_outputs=[vectors[i] for i in self._index],
                retain_graph=True,
                allow_unused=True,
            )
        return _materialise(products, self.params)


# --------------------------------------------------------------------------------------------
# Krylov solvers for A·x = b (A symmetric, given only through products)
# --------------------------------------------------------------------------------------------

SOLVERS = ("layerwise", "global", "minres")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def inner_product(us: Sequence[Tensor], vs: Sequence[Tensor]) -> Tensor:
    """⟨u, v⟩ of the concatenated vectors, as a 0-dim tensor."""
    return torch.stack([_dot(u, v) for u, v in zip(us, vs)]).sum()


def _norm(us: Sequence[Tensor]) -> Tensor:
    return inner_product(us, us).sqrt()


def _guarded_div(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, except 0/0 := 0.

    In CG, 0/0 arises only when the residual is exactly zero (the system is solved exactly,
    e.g. b = 0): then r = 0, so p = 0 and pᵀAp = 0. Defining the step α (and β) as 0 there
    keeps x at the exact solution instead of turning it into NaN. MINRES meets 0/0 in the same
    situation (the Krylov space stopped growing because x is exact). Nothing else is masked: a
    zero denominator with a nonzero numerator (a breakdown on an indefinite system) gives
    inf, and a NaN anywhere stays NaN, so numerical failures surface to the caller.
    """
    exact = (numerator == 0) & (denominator == 0)
    return torch.where(exact, torch.zeros_like(numerator), numerator / denominator)


@dataclass
class SolveReport:
    """How good the x returned by :func:`solve` is, as 0-dim tensors (no host synchronisation).

    true_rel_residual = ‖b − A·x‖ / ‖b‖ of the x actually returned (1 for x = 0; above 1 the
    solve is worse than not solving at all). ``residual_norms`` are the solver's own
    per-iteration residual estimates: exact for ``global`` CG and MINRES (up to rounding), but
    for ``layerwise`` CG they are the per-tensor recurrence, which is not b − A·x (see
    :func:`conjugate_gradient`). ``matvecs`` counts products with A, i.e. Hessian-vector products.
    """

    solver: str
    iterations: int
    matvecs: int
    rhs_norm: Tensor
    true_rel_residual: Tensor
    x_norm: Tensor
    x_dot_rhs: Tensor
    residual_norms: list[Tensor] = field(default_factory=list)

    @property
    def x_norm_over_rhs_norm(self) -> Tensor:
        """‖x‖/‖b‖ (1 for x = b; the exact x of A = I + H/(λ+δ) with H ⪰ 0 has ‖x‖ ≤ ‖b‖)."""
        return _guarded_div(self.x_norm, self.rhs_norm)

    @property
    def cos_x_rhs(self) -> Tensor:
        """cos∠(x, b); 0 for x = 0. Negative means x points against the plain gradient b."""
        return _guarded_div(self.x_dot_rhs, self.x_norm * self.rhs_norm)

    def metrics(self, prefix: str = "cg/") -> dict[str, float]:
        """Plain floats for a metrics file (this is where the host waits for the device)."""
        return {
            f"{prefix}true_rel_residual": float(self.true_rel_residual),
            f"{prefix}x_norm_over_v_norm": float(self.x_norm_over_rhs_norm),
            f"{prefix}cos_x_v": float(self.cos_x_rhs),
            f"{prefix}rhs_norm": float(self.rhs_norm),
            f"{prefix}hvps": float(self.matvecs),
        }


def _cg(
    matvec: MatVec, b: Vectors, num_iters: int, layerwise: bool, residual_norms: list | None,
    callback: Callable[[int, Vectors], None] | None,
) -> tuple[Vectors, list[Tensor]]:
    """CG from x = 0; returns x and its recurrence residual r (see :func:`conjugate_gradient`)."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.detach().clone() for t in b]
    p = [t.clone() for t in r]

    def inner_products(us: Sequence[Tensor], vs: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        per_tensor = [_dot(u, v) for u, v in zip(us, vs)]
        total = torch.stack(per_tensor).sum()
        return (per_tensor if layerwise else [total] * len(per_tensor)), total

    rr, _ = inner_products(r, r)
    for k in range(num_iters):
        ap = tuple(matvec(tuple(p)))
        pap, _ = inner_products(p, ap)
        alpha = [_guarded_div(num, den) for num, den in zip(rr, pap)]
        for x_i, r_i, p_i, ap_i, alpha_i in zip(x, r, p, ap, alpha):
            x_i.add_(alpha_i * p_i)
            r_i.sub_(alpha_i * ap_i)
        rr_new, total = inner_products(r, r)
        beta = [_guarded_div(num, den) for num, den in zip(rr_new, rr)]
        p = [r_i + beta_i * p_i for r_i, p_i, beta_i in zip(r, p, beta)]
        rr = rr_new
        if residual_norms is not None:
            residual_norms.append(total.sqrt().detach())
        if callback is not None:
            callback(k + 1, tuple(x))
    return tuple(x), r


def conjugate_gradient(
    matvec: MatVec,
    b: Sequence[Tensor],
    num_iters: int,
    layerwise: bool = True,
    residual_norms: list | None = None,
) -> Vectors:
    """Approximately solve A·x = b by ``num_iters`` conjugate-gradient iterations from x = 0.

    A is given only through ``matvec(p) = A·p`` on sequences of tensors shaped like ``b``
    (A should be symmetric positive definite). With r₀ = p₀ = b, every iteration is

        α = rᵀr / pᵀAp,   x ← x + α·p,   r ← r − α·Ap,
        β = r_newᵀr_new / rᵀr,   p ← r + β·p.

    layerwise=True (the original BiSSL code's method): the inner products and therefore α and β
    are computed separately for each tensor of ``b`` while A·p is applied to all of them
    jointly. This is exact CG when A is block diagonal with one block per tensor, and a
    heuristic otherwise: with a different α per tensor, x advances by D·p (D = diag of the
    α's) while r is updated by D·A·p ≠ A·D·p, so the recurrence r is NOT b − A·x and its norm
    is not the true residual. layerwise=False: textbook CG on the concatenated vector (inner
    products summed over all tensors); r = b − A·x up to rounding, and x is exact after
    dim(b) iterations in exact arithmetic when A is positive definite. On an indefinite A, CG
    can step anywhere (pᵀAp may be ≈ 0); use :func:`minres` there.

    residual_norms: if a list, the recurrence's global norm ‖r‖ = (Σᵢ ‖rᵢ‖²)^½ after each
    iteration is appended as a detached 0-dim tensor (no host synchronisation).

    Returns x as a tuple of tensors shaped like ``b``. NaN or inf in b or A·p propagate to x;
    only the exact-convergence case 0/0 is defined as 0 (see ``_guarded_div``).
    """
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    return _cg(matvec, tuple(b), num_iters, layerwise, residual_norms, None)[0]


def _minres(
    matvec: MatVec, b: Vectors, num_iters: int, residual_norms: list | None,
    callback: Callable[[int, Vectors], None] | None,
) -> tuple[Vectors, Tensor]:
    """MINRES from x = 0; returns x and ‖b − A·x‖ from the recurrence (see :func:`minres`)."""
    x = [torch.zeros_like(t) for t in b]
    beta = _norm(b)  # β₁ = ‖b‖, then β_{k+1} = ‖ỹ_k‖ (the Lanczos off-diagonal)
    v = [_guarded_div(t, beta) for t in b]  # v₁ = b/‖b‖
    v_old = [torch.zeros_like(t) for t in b]
    w, w_old = [torch.zeros_like(t) for t in b], [torch.zeros_like(t) for t in b]
    phibar = beta.clone()  # ‖r_k‖
    one = torch.ones_like(beta)
    cs, sn, dbar, eps = -one, 0 * one, 0 * one, 0 * one
    for k in range(num_iters):
        av = tuple(matvec(tuple(v)))
        # Lanczos: β_{k+1}·v_{k+1} = A·v_k − α_k·v_k − β_k·v_{k−1}
        alpha = inner_product(v, av)
        y = [a - alpha * v_i - beta * o for a, v_i, o in zip(av, v, v_old)]
        beta_next = _norm(y)
        # Apply the previous Givens rotation to the new column (β_k, α_k, β_{k+1}) of T, then
        # choose the rotation that zeroes β_{k+1}: the QR factorisation of T, one column a step.
        eps_old = eps
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps = sn * beta_next
        dbar = -cs * beta_next
        gamma = torch.hypot(gbar, beta_next)
        cs, sn = _guarded_div(gbar, gamma), _guarded_div(beta_next, gamma)
        phi = cs * phibar
        phibar = sn * phibar  # |sn| ≤ 1: the residual never grows
        # Search direction w_k = (v_k − ε_k·w_{k−2} − δ_k·w_{k−1}) / γ_k, then x ← x + φ_k·w_k.
        w_new = [_guarded_div(v_i - eps_old * wo - delta * w_i, gamma) for v_i, wo, w_i in zip(v, w_old, w)]
        for x_i, w_i in zip(x, w_new):
            x_i.add_(phi * w_i)
        w_old, w = w, w_new
        v_old, v = v, [_guarded_div(y_i, beta_next) for y_i in y]
        beta = beta_next
        if residual_norms is not None:
            residual_norms.append(phibar.abs().detach())
        if callback is not None:
            callback(k + 1, tuple(x))
    return tuple(x), phibar.abs()


def minres(
    matvec: MatVec, b: Sequence[Tensor], num_iters: int, residual_norms: list | None = None
) -> Vectors:
    """Approximately solve A·x = b by ``num_iters`` MINRES iterations from x = 0.

    MINRES (Paige & Saunders, 1975) returns the x_k of the Krylov space
    K_k = span{b, A·b, …, A^{k−1}·b} that minimises the residual norm ‖b − A·x‖. It needs A
    only to be symmetric, not positive definite, which is what BiSSL's A = I + H/(λ + δ) is
    when the pretext Hessian H has eigenvalues below −(λ + δ). The residual decreases
    monotonically, so x_k is never worse than x = 0. One product with A per iteration (the
    Lanczos process), three-term recurrences, a Givens rotation per step; six vectors of
    storage. On a positive definite A it reaches CG's accuracy per product (CG minimises the
    A-norm of the error over the same space instead).

    The inner products are global (summed over all tensors of ``b``), as in ``global`` CG.
    residual_norms: if a list, ‖b − A·x_k‖ from the recurrence (exact up to rounding) is
    appended after each iteration, as a detached 0-dim tensor. NaN or inf propagate to x.
    """
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    return _minres(matvec, tuple(b), num_iters, residual_norms, None)[0]


def solve(
    matvec: MatVec,
    b: Sequence[Tensor],
    num_iters: int,
    solver: str = "layerwise",
    callback: Callable[[int, Vectors], None] | None = None,
) -> tuple[Vectors, SolveReport]:
    """x ≈ A⁻¹·b by ``num_iters`` iterations of ``solver`` from x = 0, with a report on x.

    solver: ``layerwise`` (the original BiSSL code's CG, one α/β per tensor),
    ``global`` (textbook CG) or ``minres``; each uses one product with A per iteration.
    The report's true relative residual ‖b − A·x‖/‖b‖ comes from the recurrence for
    ``global`` and ``minres`` (where it is exact up to rounding) and from ONE EXTRA product
    A·x for ``layerwise`` (its recurrence is not the true residual), counted in
    ``report.matvecs``. ``callback(k, x_k)``, if given, sees every iterate (for benchmarks).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    b = tuple(t.detach() for t in b)
    rhs_norm = _norm(b)
    norms: list[Tensor] = []
    matvecs = num_iters
    if solver == "minres":
        x, residual = _minres(matvec, b, num_iters, norms, callback)
    else:
        x, r = _cg(matvec, b, num_iters, solver == "layerwise", norms, callback)
        if solver == "layerwise" and num_iters > 0:
            ax = tuple(matvec(x))
            r = [b_i - ax_i for b_i, ax_i in zip(b, ax)]
            matvecs += 1
        residual = _norm(r)
    report = SolveReport(
        solver=solver, iterations=num_iters, matvecs=matvecs, rhs_norm=rhs_norm,
        true_rel_residual=_guarded_div(residual, rhs_norm), x_norm=_norm(x), x_dot_rhs=inner_product(x, b),
        residual_norms=norms,
    )
    return x, report


# --------------------------------------------------------------------------------------------
# The implicit gradient
# --------------------------------------------------------------------------------------------


def implicit_gradient(
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    lam: float,
    damping: float,
    cg_iters: int,
    solver: str = "layerwise",
    lower_loss: Callable[[], Tensor] | None = None,
    hessian: HessianVectorOperator | None = None,
    reuse_graph: bool = True,
    callback: Callable[[int, Vectors], None] | None = None,
    precision: str = "fp32",
) -> tuple[Vectors, SolveReport]:
    """x ≈ (I + H/(λ + δ))⁻¹·v, BiSSL's upper gradient through the lower solution, and its report.

    H = ∇²_θ L_P is the Hessian of ``lower_loss()`` (a scalar, the pretext loss on one batch)
    with respect to ``params`` (the lower backbone's parameters θ_P); v = ∇_θ L_D(θ_P, φ) is
    given in ``vectors`` (matching shapes). λ = ``lam`` is the proximity weight and
    δ = ``damping`` the dampening; the system matrix A = I + H/(λ + δ) is applied as
    A·p = p + (H·p)/(λ + δ), and ``cg_iters`` iterations of ``solver`` run from x = 0:
    ``layerwise`` CG (the original's; default), ``global`` CG or ``minres`` (see :func:`solve`).
    A is indefinite when H has eigenvalues below −(λ + δ) (measured on ResNet-18 at δ = 10);
    only MINRES is guaranteed not to make the residual grow then. ``cg_iters = 0`` gives x = 0
    without any Hessian-vector product (and without calling ``lower_loss``).

    H comes from one of (neither is needed for ``cg_iters = 0``):

    - ``lower_loss``: with ``reuse_graph=True`` its forward pass and first-order gradient graph
      run once and serve every H·p (:class:`HessianVectorOperator`); False recomputes them for
      each product (:func:`hessian_vector_product`, as the original code did); both give the
      same x up to rounding;
    - ``hessian``: a prebuilt :class:`HessianVectorOperator` on ``params``. BiSSL's trainer
      builds one per alternation and shares it across the upper steps: θ_P does not change
      during them, so H does not either.

    ``callback(k, x_k)``, if given, sees every iterate (for benchmarks).

    ``precision`` (one of :data:`HVP_PRECISIONS`; a prebuilt ``hessian`` must have the same): the
    solver's vectors, inner products and recurrences run in its ``solver_dtype`` (the right-hand side's, or float64
    for ``fp64``), the products as :class:`HessianVectorOperator` describes; x is returned in the
    dtype of ``vectors``. ``fp64`` needs float64 ``params`` (a float64 copy of the model).

    Distributed: when torch.distributed is initialised with world size W > 1, the right-hand
    side (a copy; the caller's tensors are untouched) and every H·p are averaged over ranks,
    so every rank solves the same system (the H of the mean of per-rank losses) and returns
    the identical x. Each rank's ``lower_loss`` should use its own batch and must not go
    through a DistributedDataParallel wrapper (call the wrapped ``.module``). The lower model
    must be twice differentiable: plain BatchNorm is, SyncBatchNorm is not (its backward
    kernels have no derivative formulas), so keep the lower backbone's BN per-rank.

    This function knows nothing about modules: wrap the call in :func:`preserved_buffers` (or
    build the operator under :func:`frozen_batch_norm_statistics`) so the forward passes it
    runs leave BatchNorm running statistics unchanged.

    Returns (x: detached tensors shaped like ``params``, the :class:`SolveReport` of x).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if lam + damping <= 0:
        raise ValueError(f"lam + damping must be > 0, got lam={lam}, damping={damping}")
    if cg_iters < 0:
        raise ValueError(f"cg_iters must be >= 0, got {cg_iters}")
    if lower_loss is not None and hessian is not None:
        raise ValueError("pass lower_loss= or a prebuilt hessian=, not both")
    if lower_loss is None and hessian is None and cg_iters > 0:
        raise ValueError("implicit_gradient needs lower_loss= or a prebuilt hessian= operator")
    params, setting = tuple(params), hvp_precision(precision)
    out_dtypes = [v.dtype for v in vectors]
    rhs = tuple(v.detach().to(setting.solver_dtype or v.dtype, copy=True) for v in vectors)
    _check_vectors(params, rhs)
    all_reduce_mean_tensors_(rhs)
    if hessian is not None and len(hessian.params) != len(params):
        raise ValueError("the prebuilt Hessian operator is for other parameters")
    if hessian is not None and hessian.precision.name != setting.name:
        raise ValueError(f"the prebuilt Hessian operator runs in {hessian.precision.name}, the solve in {setting.name}")

    def matvec(p: Sequence[Tensor]) -> Vectors:
        hp = tuple(h.to(p_i.dtype) for h, p_i in zip(hvp(p), p))
        all_reduce_mean_tensors_(hp)
        return tuple(p_i + scale * hp_i for p_i, hp_i in zip(p, hp))

    scale = 1.0 / (lam + damping)
    hvp: Callable[[Sequence[Tensor]], Vectors]
    if cg_iters == 0:  # x = 0: no product is needed, and no graph is built
        hvp = _no_products
    elif hessian is not None:
        hvp = hessian
    elif reuse_graph:
        hvp = HessianVectorOperator(lower_loss, params, precision)
    else:
        _check_params_dtype(params, setting)
        hvp = functools.partial(hessian_vector_product, lower_loss, params, precision=precision)
    x, report = solve(matvec, rhs, cg_iters, solver, callback)
    return tuple(x_i.to(dtype) for x_i, dtype in zip(x, out_dtypes)), report


def _no_products(vectors: Sequence[Tensor]) -> Vectors:
    raise AssertionError("no Hessian-vector product is needed for zero solver iterations")


# --------------------------------------------------------------------------------------------
# BatchNorm statistics around the extra forward passes
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_buffers(*modules: nn.Module) -> Iterator[None]:
    """Snapshot every buffer of ``modules`` and restore it on exit (also on an exception).

    The forward passes behind Hessian-vector products run in train mode (H must be the
    Hessian of the training loss, with batch statistics), and BatchNorm would otherwise fold
    each of them into ``running_mean``/``running_var``/``num_batches_tracked``, so the lower
    model's statistics would depend on the number of CG iterations. Buffers are restored in
    place, so references to them stay valid; but the restore is an in-place write, so a graph
    built inside the context cannot be back-propagated after it (BatchNorm's backward checks
    the running statistics' versions): use :func:`frozen_batch_norm_statistics` for a graph
    that must outlive the context.
    """
    saved = [(buffer, buffer.detach().clone()) for module in modules for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, snapshot in saved:
                buffer.copy_(snapshot)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def frozen_batch_norm_statistics(*modules: nn.Module) -> Iterator[None]:
    """Train-mode forward passes inside normalise with batch statistics but never write buffers.

    Sets ``track_running_stats = False`` on every BatchNorm layer of ``modules`` for the
    duration: in train mode BatchNorm then normalises exactly as before (with the batch's
    mean and variance) but receives no running statistics to update, so ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are neither changed nor saved in the autograd
    graph. Graphs built inside therefore stay valid after the context, while other forward
    passes update the statistics (unlike :func:`preserved_buffers`, whose restoring write
    invalidates them). Eval-mode layers keep using their running statistics.
    """
    layers = [m for module in modules for m in module.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True
