"""Curvature of BiSSL's linear system: Lanczos Ritz values of the pretext Hessian H.

BiSSL's upper gradient solves A·x = v with A = I + H/(λ + δ), H = ∇²_θP L_P the pretext loss's
Hessian w.r.t. the lower backbone (see :mod:`source.maths.bilevel`). A is positive definite exactly
when every eigenvalue of H exceeds −(λ + δ); conjugate gradient assumes that, and measured
ResNet-18s violate it at the paper's δ = 10. The Lanczos process on H, with a few Hessian-vector
products per pretext batch, gives the Ritz values (the eigenvalues of the small tridiagonal matrix
T_k = Q_kᵀ·H·Q_k): their extremes approach H's extreme eigenvalues from inside, so

    λ_min(Ritz) ≥ λ_min(H),  and A is positive definite only if  λ + δ > −λ_min(H) ≥ −λ_min(Ritz).

Lanczos with full reorthogonalisation keeps all k basis vectors (k copies of the backbone's
parameters: 30 × 45 MB for ResNet-18, 30 × 94 MB for ResNet-50). ``python -m source.tools.curvature``
is the command line; ``bissl.py --curvature-every N`` calls :func:`probe_next_batch`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from source.maths.bilevel import HessianVectorOperator, MatVec, frozen_batch_norm_statistics, inner_product
from source.run.distributed import all_reduce_mean_tensors_


def lanczos(matvec: MatVec, start: Sequence[Tensor], num_iters: int) -> tuple[Tensor, Tensor]:
    """k = ``num_iters`` steps of Lanczos on symmetric H (given by ``matvec``), fully reorthogonalised.

    From q₁ = start/‖start‖: β_{j+1}·q_{j+1} = H·q_j − α_j·q_j − β_j·q_{j−1}, α_j = q_jᵀ·H·q_j,
    then Gram–Schmidt against every earlier q (without it, rounding makes copies of converged
    Ritz values appear, which would inflate the count of negative ones). Stops early when the
    Krylov space is invariant (β = 0: the Ritz values are then exact eigenvalues).

    Returns (α: (m,), β: (m−1,)) in float64 on the CPU, m ≤ k: the tridiagonal T_m = QᵀHQ.
    One product with H per step.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    norm = inner_product(start, start).sqrt()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"the start vector must be finite and nonzero, its norm is {float(norm)}")
    basis = [tuple(t / norm for t in start)]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(num_iters):
        q = basis[-1]
        w = [t.clone() for t in matvec(q)]
        alpha = inner_product(q, w)
        alphas.append(float(alpha))
        for _ in range(2):  # "twice is enough" (Kahan/Parlett) for orthogonality to rounding level
            for basis_vector in basis:
                coefficient = inner_product(basis_vector, w)
                for w_i, b_i in zip(w, basis_vector):
                    w_i.sub_(coefficient * b_i)
        beta = inner_product(w, w).sqrt()
        if not torch.isfinite(beta) or not torch.isfinite(alpha):
            raise FloatingPointError(f"non-finite Hessian-vector product at Lanczos step {j + 1}")
        if j + 1 == num_iters or float(beta) <= 1e-10 * max(abs(a) for a in alphas + [1e-30]):
            break
        betas.append(float(beta))
        basis.append(tuple(t / beta for t in w))
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)


def ritz_values(alphas: Tensor, betas: Tensor) -> Tensor:
    """Eigenvalues (ascending) of the symmetric tridiagonal matrix with diagonal α, off-diagonal β."""
    tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    return torch.linalg.eigvalsh(tridiagonal)


@dataclass
class CurvatureReport:
    """What the Ritz values of H say about A = I + H/(λ + δ) at the given λ + δ."""

    ritz: list[float]
    lam_plus_delta: float

    @property
    def min(self) -> float:
        return self.ritz[0]

    @property
    def max(self) -> float:
        return self.ritz[-1]

    @property
    def num_negative(self) -> int:
        """Negative Ritz values of H (directions of negative curvature found)."""
        return sum(value < 0 for value in self.ritz)

    @property
    def num_indefinite(self) -> int:
        """Ritz values below −(λ + δ): negative eigenvalues of A found at this δ."""
        return sum(value < -self.lam_plus_delta for value in self.ritz)

    @property
    def min_lam_plus_delta(self) -> float:
        """Smallest λ + δ with A positive definite on the Ritz values (a lower bound for H's)."""
        return max(0.0, -self.min)

    @property
    def a_min(self) -> float:
        """Smallest Ritz value of A at this λ + δ (≤ 0: A is indefinite or singular)."""
        return 1.0 + self.min / self.lam_plus_delta

    def metrics(self, prefix: str = "curvature/") -> dict[str, float]:
        return {f"{prefix}ritz_min": self.min, f"{prefix}ritz_max": self.max,
                f"{prefix}num_negative": float(self.num_negative), f"{prefix}num_below_minus_lam_delta": float(self.num_indefinite),
                f"{prefix}min_lam_plus_delta": self.min_lam_plus_delta, f"{prefix}a_min": self.a_min}

    def to_dict(self) -> dict:
        return {**asdict(self), **self.metrics(prefix="")}


def probe_hessian(hessian: HessianVectorOperator, num_iters: int, lam_plus_delta: float, seed: int = 0) -> CurvatureReport:
    """Lanczos on the operator's H (averaged over ranks when distributed) from a seeded random start.

    The start vector comes from a private generator (the same on every rank, so every rank runs
    the identical process) and leaves the global RNG untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in hessian.params]

    def matvec(vectors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        products = hessian(vectors)
        all_reduce_mean_tensors_(products)
        return products

    alphas, betas = lanczos(matvec, start, num_iters)
    return CurvatureReport(ritz=ritz_values(alphas, betas).tolist(), lam_plus_delta=lam_plus_delta)


def probe_lower_model(lower_model: nn.Module, views: tuple[Tensor, Tensor], num_iters: int, lam_plus_delta: float,
                      seed: int = 0) -> CurvatureReport:
    """Probe H = ∇²_θP L_P on one pretext batch (``views``: two (B, 3, S, S) tensors on the model's device).

    As in BiSSL's upper steps: the pretext loss of this rank's batch in full precision,
    w.r.t. the backbone's parameters, BatchNorm in train mode with its running statistics
    untouched. Nothing in the model changes.
    """
    lower_model.train()
    params = [p for p in lower_model.backbone.parameters()]
    with frozen_batch_norm_statistics(lower_model):
        hessian = HessianVectorOperator(lambda: lower_model(*views, gather_across_ranks=False), params)
    return probe_hessian(hessian, num_iters, lam_plus_delta, seed)


def probe_next_batch(lower_model: nn.Module, stream: Iterator, num_iters: int, lam_plus_delta: float,
                     device: torch.device, seed: int = 0) -> CurvatureReport:
    """``bissl.py --curvature-every``: probe on the next batch of a stream of its own, leaving training as it was.

    The batch comes from a separate stream whose augmentations are seeded per sample
    (``source.data.loader``) and the Lanczos start vector from a private generator, so the probe
    draws nothing from the global RNG: a run with the probe sees the same batches, augmentations
    and models as one without it. (It must not fork or restore the global RNG either: the
    streams' loading threads reseed it concurrently.)
    """
    (view1, view2), _ = next(stream)
    views = (view1.to(device, non_blocking=True), view2.to(device, non_blocking=True))
    return probe_lower_model(lower_model, views, num_iters, lam_plus_delta, seed)
