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
from collections.abc import Sequence
from pathlib import Path

import config_default as cfg
from source.data import build_pretext_dataset, pretext_transform, subsample
from source.data.stream import BatchStream
from source.maths.curvature import CurvatureReport, probe_lower_model
from source.run import checkpoint as ckpt
from source.run.cli import build_parser
from source.run.errors import ConfigError, run_entry_point
from source.run.runtime import start
from source.stages.bissl_run import load_lower_model

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Command line: bissl.py's model and data flags, plus the probe's own
# --------------------------------------------------------------------------------------------


# bissl.py's flags that say how to train, log or save: the probe only loads the lower model, draws
# pretext batches and runs Lanczos in float32, so it does not offer them.
NOT_PROBE_FLAGS = (
    "amp", "channels_last", "prefetch_factor", "resume", "run_dir", "log_every", "wandb_project", "wandb_mode",
    "save_model", "epochs", "curvature_every", "cg_iter_num", "cg_solver", "cg_verbose", "grad_clip", "upper_level",
    "lower_num_iter", "upper_num_iter", "upper_steps_whole_passes", "upper_plain_grad_scale", "lower_warmup_alternations",
    "p_lr", "p_wd", "p_momentum", "p_optimizer", "p_lars_exclude_bias_bn", "p_ma_decay", "p_ma_use_scheduler",
    "d_dset", "d_batch_size", "d_lr", "d_wd", "d_momentum", "d_optimizer", "d_linear_warmup_epochs", "d_linear_warmup_lr",
    "d_linear_warmup_update_bn", "d_max_train_samples", "max_eval_samples", "multilabel_loss", "val_fraction",
    "compile",  # the probe's HVPs differentiate the model twice, which torch.compile does not support
    "hvp_precision",  # the probe measures H's spectrum in float32 (its Ritz values are what A's definiteness needs)
    "lower_knn_every", "align_bank_size", "align_query_size", "eval_bn_recalibrate_batches",  # training-time measurements
)


def get_args_parser() -> argparse.ArgumentParser:
    # bissl.py's flag groups, so the model and data flags mean exactly what they mean there.
    parser = build_parser(__doc__, [(cfg.GeneralConfig, "general"), (cfg.BisslConfig, "BiSSL")], exclude=NOT_PROBE_FLAGS)
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
    env = start(args)
    if env.world_size > 1:
        raise ConfigError("the curvature probe runs in one process; start it with python, not torchrun")
    model = load_lower_model(args)
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
    run_entry_point(main, get_args_parser())
