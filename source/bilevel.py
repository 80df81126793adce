"""Implicit gradients for BiSSL: Hessian-vector products and conjugate gradient.

BiSSL (Zakarias et al., arXiv 2410.02387) couples a lower (pretext) problem and an upper
(downstream) problem::

    θ_P*(θ_D) = argmin_θP  L_P(θ_P) + (λ/2)·‖θ_P − θ_D‖²
    min_θD    L_D(θ_P*(θ_D), φ)

From the lower optimality condition ∇L_P(θ_P*) + λ(θ_P* − θ_D) = 0 the implicit function
theorem gives dθ_P*/dθ_D = λ(H + λI)⁻¹ = (I + H/λ)⁻¹ with H = ∇²_θP L_P(θ_P*), a symmetric
matrix. The upper gradient through the lower solution is therefore

    x = (I + H/(λ + δ))⁻¹ · v,        v = ∇_θ L_D(θ_P, φ),

where δ ≥ 0 is a damping that keeps the system well conditioned when H has negative
curvature. x is approximated by a few conjugate-gradient (CG) iterations from x = 0, with H
applied through Hessian-vector products (double backward of the pretext loss with respect to
the lower backbone parameters only), so H is never formed.

Every function here works on a *sequence of tensors* (one per parameter tensor) rather than a
flattened vector, so no copy of the parameters is ever concatenated.

BatchNorm: a Hessian-vector product re-runs the lower model's forward pass in train mode,
which updates BatchNorm running statistics. ``implicit_gradient`` does not know about modules;
the caller wraps it in :func:`preserved_buffers`::

    with preserved_buffers(lower_backbone, lower_head):
        x = implicit_gradient(lambda: pretext_loss(batch), lower_params, v, lam, damping, cg_iters)
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from source.distributed import all_reduce_mean_tensors_

Vectors = tuple[Tensor, ...]
MatVec = Callable[[Sequence[Tensor]], Sequence[Tensor]]


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------


def _check_vectors(params: Sequence[Tensor], vectors: Sequence[Tensor]) -> None:
    if len(params) != len(vectors):
        raise ValueError(f"got {len(vectors)} vectors for {len(params)} parameter tensors; they must pair up")
    for i, (param, vector) in enumerate(zip(params, vectors)):
        if param.shape != vector.shape:
            raise ValueError(f"vector {i} has shape {tuple(vector.shape)}, its parameter {tuple(param.shape)}")


def _first_order_grads(loss: Callable[[], Tensor], params: Sequence[Tensor]) -> tuple[Tensor, tuple]:
    """Evaluate ``loss()`` and its gradient g = ∇L with the graph kept for a second backward."""
    for i, param in enumerate(params):
        if not param.requires_grad:
            raise ValueError(f"parameter tensor {i} (shape {tuple(param.shape)}) does not require grad")
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
    loss: Callable[[], Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor]
) -> Vectors:
    """H·v by recomputation: a fresh forward pass and first-order graph for this one product.

        g = ∇_θ L(θ)  (with create_graph),     H·v = ∇_θ ⟨g, v⟩ = ∇²_θ L(θ)·v

    ``loss()`` is called once and must return a scalar built from ``params``. params and
    vectors: matching sequences of tensors (v_i has the shape of θ_i). Returns detached tensors
    of those shapes; blocks of parameters that ``loss`` does not use are zero.

    This is the straightforward method, kept as a reference and for the benchmark; the CG solver
    uses :class:`HessianVectorOperator`, which builds the first-order graph once.
    """
    params, vectors = tuple(params), tuple(vectors)
    _check_vectors(params, vectors)
    _, grads = _first_order_grads(loss, params)
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
    vectors in ``__call__``: a matching sequence. Results are detached.
    """

    def __init__(self, loss: Callable[[], Tensor], params: Sequence[Tensor]) -> None:
        self.params = tuple(params)
        value, grads = _first_order_grads(loss, self.params)
        self.loss_value = value.detach()
        self._index = [i for i, grad in enumerate(grads) if _differentiable(grad)]
        self._grads = [grads[i] for i in self._index]

    def __call__(self, vectors: Sequence[Tensor]) -> Vectors:
        vectors = tuple(vectors)
        _check_vectors(self.params, vectors)
        if not self._grads:
            return _materialise([None] * len(self.params), self.params)
        products = torch.autograd.grad(
            self._grads,
            self.params,
            grad_outputs=[vectors[i] for i in self._index],
            retain_graph=True,
            allow_unused=True,
        )
        return _materialise(products, self.params)


# --------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _guarded_div(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, except 0/0 := 0.

    In CG, 0/0 arises only when the residual is exactly zero (the system is solved exactly,
    e.g. b = 0): then r = 0, so p = 0 and pᵀAp = 0. Defining the step α (and β) as 0 there
    keeps x at the exact solution instead of turning it into NaN. Nothing else is masked: a
    zero denominator with a nonzero numerator (a breakdown on an indefinite system) gives
    inf, and a NaN anywhere stays NaN, so numerical failures surface to the caller.
    """
    exact = (numerator == 0) & (denominator == 0)
    return torch.where(exact, torch.zeros_like(numerator), numerator / denominator)


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

    layerwise=True (BiSSL's default, as the original code did): the inner products and
    therefore α and β are computed separately for each tensor of ``b`` while A·p is applied
    to all of them jointly. This is exact CG when A is block diagonal with one block per
    tensor, and a heuristic otherwise. layerwise=False: textbook CG on the concatenated vector
    (inner products summed over all tensors); exact after dim(b) iterations in exact
    arithmetic.

    residual_norms: if a list, the global residual norm ‖r‖ = (Σᵢ ‖rᵢ‖²)^½ after each
    iteration is appended as a detached 0-dim tensor (no host synchronisation).

    Returns x as a tuple of tensors shaped like ``b``. NaN or inf in b or A·p propagate to x;
    only the exact-convergence case 0/0 is defined as 0 (see ``_guarded_div``).
    """
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    b = tuple(b)
    x = [torch.zeros_like(t) for t in b]
    r = [t.detach().clone() for t in b]
    p = [t.clone() for t in r]

    def inner_products(us: Sequence[Tensor], vs: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        per_tensor = [_dot(u, v) for u, v in zip(us, vs)]
        total = torch.stack(per_tensor).sum()
        return (per_tensor if layerwise else [total] * len(per_tensor)), total

    rr, _ = inner_products(r, r)
    for _ in range(num_iters):
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
    return tuple(x)


# --------------------------------------------------------------------------------------------
# The implicit gradient
# --------------------------------------------------------------------------------------------


def implicit_gradient(
    lower_loss: Callable[[], Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    lam: float,
    damping: float,
    cg_iters: int,
    layerwise: bool = True,
    reuse_graph: bool = True,
    residual_norms: list | None = None,
) -> Vectors:
    """x ≈ (I + H/(λ + δ))⁻¹·v, BiSSL's upper gradient through the lower solution.

    H = ∇²_θ L_P is the Hessian of ``lower_loss()`` (a scalar, the pretext loss on one batch)
    with respect to ``params`` (the lower backbone's parameters θ_P); v = ∇_θ L_D(θ_P, φ) is
    given in ``vectors`` (matching shapes). λ = ``lam`` is the proximity weight and
    δ = ``damping`` the CG dampening; the system matrix A = I + H/(λ + δ) is applied as
    A·p = p + (H·p)/(λ + δ), and ``cg_iters`` iterations of :func:`conjugate_gradient`
    (layerwise or global, see there) run from x = 0.

    reuse_graph=True runs ``lower_loss()`` and its first-order gradient graph once and reuses
    it for every H·p (:class:`HessianVectorOperator`); False recomputes them for each product
    (:func:`hessian_vector_product`); both give the same x up to rounding.

    Distributed: when torch.distributed is initialised with world size W > 1, the right-hand
    side (a copy; the caller's tensors are untouched) and every H·p are averaged over ranks,
    so every rank solves the same system (the H of the mean of per-rank losses) and returns
    the identical x. Each rank's ``lower_loss`` should use its own batch and must not go
    through a DistributedDataParallel wrapper (call the wrapped ``.module``). The lower model
    must be twice differentiable: plain BatchNorm is, SyncBatchNorm is not (its backward
    kernels have no derivative formulas), so keep the lower backbone's BN per-rank.

    This function knows nothing about modules: wrap the call in :func:`preserved_buffers` so
    the forward passes it runs leave BatchNorm running statistics unchanged.

    Returns detached tensors shaped like ``params``.
    """
    if lam + damping <= 0:
        raise ValueError(f"lam + damping must be > 0, got lam={lam}, damping={damping}")
    if cg_iters < 0:
        raise ValueError(f"cg_iters must be >= 0, got {cg_iters}")
    params = tuple(params)
    rhs = tuple(v.detach().clone() for v in vectors)
    _check_vectors(params, rhs)
    all_reduce_mean_tensors_(rhs)
    if cg_iters == 0:
        return tuple(torch.zeros_like(v) for v in rhs)

    hvp: Callable[[Sequence[Tensor]], Vectors] = (
        HessianVectorOperator(lower_loss, params)
        if reuse_graph
        else functools.partial(hessian_vector_product, lower_loss, params)
    )
    scale = 1.0 / (lam + damping)

    def matvec(p: Sequence[Tensor]) -> Vectors:
        hp = hvp(p)
        all_reduce_mean_tensors_(hp)
        return tuple(p_i + scale * hp_i for p_i, hp_i in zip(p, hp))

    return conjugate_gradient(matvec, rhs, cg_iters, layerwise=layerwise, residual_norms=residual_norms)


@contextlib.contextmanager
def preserved_buffers(*modules: nn.Module) -> Iterator[None]:
    """Snapshot every buffer of ``modules`` and restore it on exit (also on an exception).

    The forward passes behind Hessian-vector products run in train mode (H must be the
    Hessian of the training loss, with batch statistics), and BatchNorm would otherwise fold
    each of them into ``running_mean``/``running_var``/``num_batches_tracked``, so the lower
    model's statistics would depend on the number of CG iterations. Buffers are restored in
    place, so references to them stay valid.
    """
    saved = [(buffer, buffer.detach().clone()) for module in modules for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, snapshot in saved:
                buffer.copy_(snapshot)
