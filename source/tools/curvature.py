"""Curvature probe: how indefinite is BiSSL's linear system at a given δ?

BiSSL's upper gradient solves A·x = v with A = I + H/(λ + δ), H = ∇²_θP L_P the pretext loss's
Hessian w.r.t. the lower backbone (see ``source/maths/bilevel.py``). A is positive definite exactly
when every eigenvalue of H exceeds −(λ + δ); conjugate gradient assumes that, and measured
ResNet-18s violate it at the paper's δ = 10 (H's spectrum about [−148, 242] after a short SimCLR
pre-training, [−2305, 2451] at random init). This module runs the Lanczos process on H with a
few Hessian-vector products per pretext batch and reports the Ritz values (the eigenvalues of
the small tridiagonal matrix T_k = Q_kᵀ·H·Q_k): their extremes approach H's extreme eigenvalues
from inside, so

    λ_min(Ritz) ≥ λ_min(H),  and A is positive definite only if  λ + δ > −λ_min(H) ≥ −λ_min(Ritz).

The reported "smallest λ + δ" is therefore a lower bound; choose δ with a margin (λ + δ ≥ 2·|λ_min|
keeps A's smallest eigenvalue ≥ ½). Run it on the weights BiSSL starts from, with the same
flags as ``bissl.py``::

    python -m source.tools.curvature --arch resnet18 --img-size 32 --p-dset fashionmnist --p-batch-size 64 \\
        --p-pretrained-backbone-filename pretext_simclr_arch-resnet18_bb.pth \\
        --p-pretrained-proj-filename pretext_simclr_arch-resnet18_proj.pth --probe-batches 3 --curvature-iters 30

It prints a table, writes ``curvature.json`` and a plot of the Ritz values (``curvature.png``) to
``--probe-out``. ``bissl.py --curvature-every N`` logs the same numbers every N alternations.
Lanczos with full reorthogonalisation keeps all k basis vectors (k copies of the backbone's
parameters: 30 × 45 MB for ResNet-18, 30 × 94 MB for ResNet-50).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from source.maths.bilevel import HessianVectorOperator, MatVec, frozen_batch_norm_statistics
from source.run.distributed import all_reduce_mean_tensors_

logger = logging.getLogger(__name__)


def _inner(us: Sequence[Tensor], vs: Sequence[Tensor]) -> Tensor:
    return torch.stack([torch.dot(u.reshape(-1), v.reshape(-1)) for u, v in zip(us, vs)]).sum()


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
    norm = _inner(start, start).sqrt()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"the start vector must be finite and nonzero, its norm is {float(norm)}")
    basis = [tuple(t / norm for t in start)]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(num_iters):
        q = basis[-1]
        w = [t.clone() for t in matvec(q)]
        alpha = _inner(q, w)
        alphas.append(float(alpha))
        for _ in range(2):  # "twice is enough" (Kahan/Parlett) for orthogonality to rounding level
            for basis_vector in basis:
                coefficient = _inner(basis_vector, w)
                for w_i, b_i in zip(w, basis_vector):
                    w_i.sub_(coefficient * b_i)
        beta = _inner(w, w).sqrt()
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


# --------------------------------------------------------------------------------------------
# Command line: bissl.py's model and data flags, plus the probe's own
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    import bissl  # the script's parser and weight loading, so the flags mean exactly what they mean there

    parser = bissl.get_args_parser()
    parser.description = __doc__
    group = parser.add_argument_group("curvature probe")
    group.add_argument("--probe-batches", type=int, default=3, help="pretext batches to probe, one Lanczos run each")
    group.add_argument("--probe-checkpoint", default="",
                       help="a BiSSL run's checkpoint.pth: probe its lower model instead of the pretext weights")
    group.add_argument("--probe-out", default="curvature_probe", help="folder for curvature.json and curvature.png")
    return parser


def plot_ritz_values(reports: Sequence[CurvatureReport], path: Path, title: str) -> None:
    """One row of Ritz values per batch (symmetric-log x axis), with −(λ + δ) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(reports)))
    for row, report in enumerate(reports):
        colours = ["tab:red" if value < -report.lam_plus_delta else "tab:blue" for value in report.ritz]
        ax.scatter(report.ritz, [row] * len(report.ritz), c=colours, s=14, marker="|")
    threshold = -reports[0].lam_plus_delta
    ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"-(lam + delta) = {threshold:g}")
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_xscale("symlog", linthresh=max(1.0, abs(threshold) / 10))
    ax.set_yticks(range(len(reports)), [f"batch {i + 1}" for i in range(len(reports))])
    ax.set_xlabel("Ritz values of the pretext Hessian H (red: negative eigenvalues of A = I + H/(lam + delta))")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> list[CurvatureReport]:
    import bissl
    from source.data import build_pretext_dataset, pretext_transform, subsample
    from source.data.stream import BatchStream
    from source.run import checkpoint as ckpt
    from source.run.runtime import start

    env = start(args)
    if env.world_size > 1:
        raise ValueError("the curvature probe runs in one process; start it with python, not torchrun")
    model = bissl.load_lower_model(args)
    if args.probe_checkpoint:
        state = ckpt.load_checkpoint(Path(args.probe_checkpoint), ("trainer",))
        model.load_state_dict(state["trainer"]["lower_model"])
    model.to(env.device)
    transform = pretext_transform(args.img_size, args.img_crop_min_ratio, bool(getattr(args, "crop_as_original", 0)))
    dataset = build_pretext_dataset(args.p_dset, Path(args.data_dir), transform, download=bool(args.download_dataset))
    dataset = subsample(dataset, args.max_train_samples or None, seed=args.seed, stratify=False)
    stream = BatchStream(dataset, args.p_batch_size, seed=args.seed, num_workers=args.num_workers)
    lam_plus_delta = args.lam + args.cg_lam_dampening

    reports = []
    print(f"Lanczos on H = Hessian of the {args.p_pretext_type} loss w.r.t. the {args.arch} backbone, "
          f"{args.curvature_iters} HVPs per batch of {args.p_batch_size} pairs at {args.img_size} px; "
          f"lam + delta = {lam_plus_delta:g}")
    print("batch   Ritz min    Ritz max   #negative  #below -(lam+delta)  min lam+delta for A > 0   A's min Ritz")
    for index in range(args.probe_batches):
        (view1, view2), _ = next(stream)
        views = (view1.to(env.device), view2.to(env.device))
        report = probe_lower_model(model, views, args.curvature_iters, lam_plus_delta, seed=args.seed + index)
        reports.append(report)
        print(f"{index + 1:5d} {report.min:11.4g} {report.max:11.4g} {report.num_negative:9d} "
              f"{report.num_indefinite:20d} {report.min_lam_plus_delta:25.4g} {report.a_min:14.3g}")
    needed = max(report.min_lam_plus_delta for report in reports)
    verdict = ("A looks positive definite at this delta" if all(r.num_indefinite == 0 for r in reports)
               else "A is INDEFINITE at this delta: CG may diverge; use --cg-solver minres or raise --cg-lam-dampening")
    print(f"{verdict}. A > 0 needs lam + delta > {needed:.4g} at least (Ritz values bound H's spectrum from "
          f"inside); lam + delta >= {2 * needed:.4g} keeps A's smallest eigenvalue >= 1/2.")
    out = Path(args.probe_out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic({"args": vars(args), "batches": [r.to_dict() for r in reports],
                            "min_lam_plus_delta": needed}, out / "curvature.json")
    plot_ritz_values(reports, out / "curvature.png",
                     f"{args.arch} {args.p_pretext_type}, {args.curvature_iters} Lanczos steps per batch, "
                     f"lam + delta = {lam_plus_delta:g}")
    print(f"wrote {out / 'curvature.json'} and {out / 'curvature.png'}")
    return reports


if __name__ == "__main__":
    main(get_args_parser().parse_args())
