"""Which solver gives BiSSL's implicit gradient most accurately per Hessian-vector product?

On ONE lower model, ONE pretext (Hessian) batch and the same right-hand sides v = ∇_θ L_D(θ_P, φ),
for the solvers ``layerwise`` (the original's CG), ``global`` (textbook CG) and ``minres``:

1. the curvature probe (Lanczos on H) picks a damping δ that makes A = I + H/(λ + δ) positive
   definite (λ + δ = 2·|most negative Ritz value|, a margin for the Ritz values' inside bound);
2. at δ = 10 (the paper's) and at that δ: the TRUE relative residual ‖v − A·x_K‖/‖v‖ after
   K = 1..K_max products (layerwise: an explicit product per iterate, not counted; global CG
   and MINRES: their recurrences, exact up to rounding, with the last iterate checked
   explicitly), the seconds each solver spent to reach x_K (one shared graph), and
   the fewest products each solver needs to match layerwise CG at K = 5 (the original's
   accuracy; the goal is ≤ 60 % of its 5 products);
3. BiSSL upper steps timed three ways on the same batches: the original's scheme (every HVP
   re-runs the pretext forward pass and first backward, layerwise K = 5), this project's
   previous one (one graph per upper step) and the current one (one graph per alternation,
   shared by all N_U upper steps), plus the shared graph with MINRES at the K that matches the
   original's accuracy.

The model: ResNet-18 (torchvision stem) + SimCLR projector at 32 px on FashionMNIST, from a
short SimCLR pre-training (``--pretrain-steps``; 0 = random init, whose Hessian is far more
indefinite) or from weights you pass (``--backbone``/``--projector``, e.g. the demo's). The
downstream head is a fresh linear layer. Full run (about 4 minutes on 2 idle CPU cores):

    python bench/bench_solvers.py --threads 2
    python bench/bench_solvers.py --quick          # a smoke test of the script (about 1 minute)

4. the precision axis (``--precisions``, issue 20): per ``--hvp-precision``, at each δ, the
   relative error of x (K = ``--match-k`` iterations of ``--precision-solver``) against the same
   solve in float64 (a float64 copy of the model and the solver), its true relative residual
   ‖v − A·x‖/‖v‖ with A applied in float64, the seconds per HVP (median over K products on the
   shared graph) and per upper step (the trainer's own, graph shared, at the last δ).
   ``--precision-only`` skips 2 and 3 (the GPU call of ``bench/cuda_run.sh``); its ratio is the
   last precision's upper-step time over the first's.

    python bench/bench_solvers.py --precision-only --precisions fp32,bf16     # CPU: the two that differ

The ratio is the upper steps' time with the shared graph and MINRES (at the K that matches the
original's accuracy) over the original scheme's; every number goes to bench/results/solvers.json.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
from report import add_json_argument, write_report
from torch import nn

import config_default as cfg
from source.data import build_pretext_dataset, downstream_train_transform, pretext_transform, subsample
from source.data.stream import BatchStream
from source.maths.bilevel import (
    SOLVERS,
    HessianVectorOperator,
    frozen_batch_norm_statistics,
    hessian_vector_product,
    hvp_precision,
    implicit_gradient,
    solve,
)
from source.maths.curvature import probe_hessian
from source.maths.models import build_backbone
from source.maths.optim import build_optimizer, warmup_cosine_scheduler
from source.run.distributed import resolve_device
from source.stages.bissl_trainer import BilevelSettings, BisslTrainer
from source.stages.engine import peak_memory_metrics
from source.stages.pretext import SimCLR

NAME = "solvers"

QUICK = dict(pretrain_steps=2, pretrain_batch=16, img_size=16, hessian_batch=4, upper_batch=8, max_iters=3, probe_iters=4,
             num_rhs=1, upper_steps=2, match_k=2)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="auto | cuda | cpu")
    parser.add_argument("--data-dir", default="./data/", help="holds FashionMNIST/raw")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--mlp", default="256-256-256", help="SimCLR projector widths")
    parser.add_argument("--backbone", default="", help="backbone weights (.pth); empty: --pretrain-steps of SimCLR")
    parser.add_argument("--projector", default="", help="projector weights (.pth) to go with --backbone")
    parser.add_argument("--pretrain-steps", type=int, default=20, help="SimCLR steps (LARS) before measuring; 0 = random init")
    parser.add_argument("--pretrain-batch", type=int, default=64)
    parser.add_argument("--pretrain-lr", type=float, default=1.0)
    parser.add_argument("--hessian-batch", type=int, default=16, help="pretext pairs in the Hessian batch")
    parser.add_argument("--upper-batch", type=int, default=32, help="downstream images per right-hand side / upper step")
    parser.add_argument("--num-rhs", type=int, default=2, help="right-hand sides (downstream batches) per damping")
    parser.add_argument("--max-iters", type=int, default=8, help="K_max, products per solve")
    parser.add_argument("--match-k", type=int, default=5, help="the layerwise K whose accuracy the others must match")
    parser.add_argument("--probe-iters", type=int, default=20, help="Lanczos steps of the curvature probe")
    parser.add_argument("--deltas", default="10,auto", help="dampings δ to compare; 'auto' = the probe's positive definite one")
    parser.add_argument("--lam", type=float, default=0.001)
    parser.add_argument("--upper-steps", type=int, default=3, help="upper steps per timed alternation (N_U)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="--hvp-precision values to compare with float64 (comma-separated; on CPU fp32-strict and "
                             "tf32 are fp32); empty: skip the precision axis")
    parser.add_argument("--precision-solver", default="minres", choices=SOLVERS, help="solver of the precision axis")
    parser.add_argument("--precision-only", action="store_true", help="only the precision axis (no solver curves or schemes)")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check that the script runs")
    add_json_argument(parser, NAME)
    return parser


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _norm(vectors) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in vectors))


class RecomputedHessian:
    """The original code's HVPs: every product re-runs the forward pass and the first backward.
    ``params`` and ``precision`` as :class:`HessianVectorOperator`'s, which ``implicit_gradient``
    checks a prebuilt operator by."""

    def __init__(self, loss, params, model: nn.Module, precision: str = "fp32") -> None:
        self.loss, self.params, self.model, self.precision = loss, tuple(params), model, hvp_precision(precision)

    def __call__(self, vectors):
        with frozen_batch_norm_statistics(self.model):
            return hessian_vector_product(self.loss, self.params, vectors, precision=self.precision.name)


def build_model(args: argparse.Namespace, pretext_stream: BatchStream, device: torch.device) -> tuple[SimCLR, str]:
    backbone, feat_dim = build_backbone(args.arch)
    model = SimCLR(backbone, feat_dim, args.mlp, temperature=0.5)
    if args.backbone:
        model.backbone.load_state_dict(torch.load(args.backbone, map_location="cpu", weights_only=True))
        if args.projector:
            model.projector.load_state_dict(torch.load(args.projector, map_location="cpu", weights_only=True))
        return model.to(device), f"weights from {args.backbone}"
    model.to(device).train()
    if args.pretrain_steps == 0:
        return model, "random init (no pre-training)"
    optimizer = build_optimizer("lars", list(model.parameters()), args.pretrain_lr, 1e-6, 0.9, eta=cfg.LARS_ETA)
    scheduler = warmup_cosine_scheduler(optimizer, max(1, args.pretrain_steps // 5), args.pretrain_steps, cfg.FINAL_LR_FACTOR)
    start = time.perf_counter()
    for _ in range(args.pretrain_steps):
        (view1, view2), _ = next(pretext_stream)
        loss = model(view1.to(device), view2.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.BisslConfig.grad_clip)
        optimizer.step()
        scheduler.step()
    return model, (f"{args.pretrain_steps} SimCLR steps (batch {args.pretrain_batch}, LARS lr {args.pretrain_lr}), "
                   f"final loss {float(loss.detach()):.3f}, {time.perf_counter() - start:.0f} s")


def fresh_head(in_features: int, num_classes: int, seed: int, device: torch.device) -> nn.Linear:
    """A linear head with PyTorch's default initialisation (weights and bias ~ U(±1/sqrt(fan_in))),
    drawn from a private generator: the streams' prefetch threads reseed torch's global generator
    per sample (``source.data.loader``), so a draw from it here would race with them and make the
    bench's numbers differ from run to run."""
    head = nn.Linear(in_features, num_classes, device="meta").to_empty(device="cpu")
    generator, bound = torch.Generator().manual_seed(seed), 1 / math.sqrt(in_features)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    return head.to(device)


def right_hand_side(model: SimCLR, head: nn.Module, images: torch.Tensor, targets: torch.Tensor):
    """v = ∇_θP L_D(θ_P, φ) on one downstream batch (BN statistics untouched)."""
    with frozen_batch_norm_statistics(model):
        loss = nn.functional.cross_entropy(head(model.backbone(images)), targets)
    return tuple(g.detach() for g in torch.autograd.grad(loss, list(model.backbone.parameters())))


def _timed_iterates(matvec, rhs, max_iters: int, solver: str, device: torch.device):
    """Every iterate x_1..x_K of one solve and the seconds from the start to each."""
    iterates, stamps = [], []
    _synchronize(device)
    start = time.perf_counter()

    def keep(k, x):
        _synchronize(device)
        stamps.append(time.perf_counter() - start)
        iterates.append(tuple(t.clone() for t in x))

    _, report = solve(matvec, rhs, max_iters, solver, callback=keep)
    return iterates, stamps, report


def solver_curves(hessian: HessianVectorOperator, lam_plus_delta: float, rhs, max_iters: int, device: torch.device):
    """Per solver: true relative residuals of x_1..x_K (explicit products) and seconds to reach each x_k."""
    scale = 1.0 / lam_plus_delta

    def matvec(p):
        return tuple(p_i + scale * h_i for p_i, h_i in zip(p, hessian(p)))

    rhs_norm = _norm(rhs)
    curves = {}
    for solver in SOLVERS:
        iterates, stamps, report = _timed_iterates(matvec, rhs, max_iters, solver, device)
        seconds = [stamps[0]] + [b - a for a, b in zip(stamps, stamps[1:])]  # per iteration (clone time is negligible)
        # Layerwise CG: an explicit product per iterate (its recurrence is not the residual). Global CG and
        # MINRES: their recurrences, which the tests check against explicit products in float64; here
        # the last iterate is also checked explicitly, in the model's float32.
        checked = iterates if solver == "layerwise" else iterates[-1:]
        explicit = [_norm([b - a for b, a in zip(rhs, matvec(x))]) / rhs_norm for x in checked]
        residuals = explicit if solver == "layerwise" else [float(r) / rhs_norm for r in report.residual_norms]
        curves[solver] = {"true_rel_residual": residuals, "explicit_last": explicit[-1], "seconds_per_iteration": seconds,
                          "cumulative_seconds": list(torch.tensor(seconds).cumsum(0).tolist()),
                          "reported_true_rel_residual": float(report.true_rel_residual),
                          "recurrence_last": float(report.residual_norms[-1]) / rhs_norm if report.residual_norms else 1.0,
                          "cos_x_v": float(report.cos_x_rhs), "x_norm_over_v_norm": float(report.x_norm_over_rhs_norm)}
    return curves


def time_upper_steps(base: BisslTrainer, scheme: str, solver: str, cg_iters: int, hessian_views, upper_batches,
                     device: torch.device) -> tuple[float, float]:
    """Seconds for len(upper_batches) upper steps of a copy of ``base``, and the peak GPU memory
    allocated meanwhile in MiB (NaN on CPU)."""
    trainer = copy.deepcopy(base)
    trainer.settings.cg_solver, trainer.settings.cg_iters = solver, cg_iters
    if scheme == "original":  # per-HVP recomputation, as the original code
        view1, view2 = (v.to(device) for v in hessian_views)
        model = trainer.lower_model
        trainer.hessian_operator = lambda views: RecomputedHessian(
            lambda: model(view1, view2, gather_across_ranks=False), trainer.lower_backbone_params, model,
            trainer.settings.hvp_precision)
    _synchronize(device)
    peak_memory_metrics(device)  # resets the peak: what follows is measured alone
    start = time.perf_counter()
    hessian = trainer.hessian_operator(hessian_views) if scheme == "shared" else None
    for images, targets in upper_batches:
        trainer.upper_step(images, targets, hessian_views, hessian)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, peak_memory_metrics(device).get("peak_memory_gib", math.nan) * 1024


def _flat64(vectors) -> torch.Tensor:
    return torch.cat([v.detach().double().flatten() for v in vectors])


def precision_axis(args: argparse.Namespace, model: SimCLR, views, rhs_list, deltas: list[float], base: BisslTrainer,
                   upper_batches, device: torch.device) -> dict:
    """Per precision and δ: x's relative error against the float64 solve, its float64 true residual,
    seconds per HVP and per upper step (see the module docstring, item 4)."""
    model64 = copy.deepcopy(model).double()
    views64 = tuple(v.double() for v in views)
    params, params64 = list(model.backbone.parameters()), list(model64.backbone.parameters())
    with frozen_batch_norm_statistics(model64):
        hessian64 = HessianVectorOperator(lambda: model64(*views64, gather_across_ranks=False), params64, "fp64")
    solves = {delta: dict(lam=args.lam, damping=delta, cg_iters=args.match_k, solver=args.precision_solver) for delta in deltas}
    references = {(delta, i): implicit_gradient(params64, rhs, hessian=hessian64, precision="fp64", **solves[delta])[0]
                  for delta in deltas for i, rhs in enumerate(rhs_list)}
    figures: dict = {}
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        # fp64 runs on the float64 copy (as BisslTrainer.hessian_operator does); the others on the model
        on_model, on_views, on_params = (model64, views64, params64) if precision == "fp64" else (model, views, params)
        with frozen_batch_norm_statistics(on_model):
            hessian = HessianVectorOperator(lambda m=on_model, v=on_views: m(*v, gather_across_ranks=False), on_params, precision)
        hvp_seconds = []
        for _ in range(args.match_k):
            _synchronize(device)
            start = time.perf_counter()
            hessian(rhs_list[0])
            _synchronize(device)
            hvp_seconds.append(time.perf_counter() - start)
        entry: dict = {"seconds_per_hvp": statistics.median(hvp_seconds), "deltas": {}}
        for delta in deltas:
            errors, residuals = [], []
            for i, rhs in enumerate(rhs_list):
                x, _ = implicit_gradient(on_params, rhs, hessian=hessian, precision=precision, **solves[delta])
                x64 = references[delta, i]
                ax = [x_i + h_i / (args.lam + delta) for x_i, h_i in zip(_as64(x), hessian64(_as64(x)))]
                errors.append(float((_flat64(x) - _flat64(x64)).norm() / _flat64(x64).norm()))
                residuals.append(float((_flat64(rhs) - _flat64(ax)).norm() / _flat64(rhs).norm()))
            entry["deltas"][f"{delta:g}"] = {"rel_error_vs_fp64": statistics.median(errors),
                                             "true_rel_residual": statistics.median(residuals)}
        del hessian
        trainer = copy.deepcopy(base)
        trainer.settings.hvp_precision = precision
        seconds, _ = time_upper_steps(trainer, "shared", args.precision_solver, args.match_k, views, upper_batches, device)
        entry["seconds_per_upper_step"] = seconds / len(upper_batches)
        figures[precision] = entry
    print(f"\nprecision axis: {args.precision_solver} K={args.match_k}, x against the same solve in float64 "
          "(median over the right-hand sides); true residual with A in float64")
    print(f"  {'precision':12}" + "".join(f"{'δ=' + d + ' rel err':>18}{'residual':>11}" for d in map('{:g}'.format, deltas))
          + f"{'s/HVP':>9}{'s/upper step':>14}")
    for precision, entry in figures.items():
        cells = "".join(f"{entry['deltas'][f'{d:g}']['rel_error_vs_fp64']:18.3g}{entry['deltas'][f'{d:g}']['true_rel_residual']:11.4g}"
                        for d in deltas)
        print(f"  {precision:12}{cells}{entry['seconds_per_hvp']:9.3f}{entry['seconds_per_upper_step']:14.3f}")
    return figures


def _as64(vectors):
    return tuple(v.double() for v in vectors)


def main(args: argparse.Namespace) -> dict:
    # The copies of the trainer would each warn about the indefinite solve; the table says it all.
    logging.getLogger("source.stages.bissl_trainer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    if args.precision_only and not args.precisions:
        raise SystemExit("--precision-only needs --precisions")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    total_start = time.perf_counter()
    data_dir = Path(args.data_dir)
    pretext_set = build_pretext_dataset("fashionmnist", data_dir, pretext_transform(args.img_size, 0.5))
    labelled_set = build_pretext_dataset("fashionmnist", data_dir, downstream_train_transform(args.img_size, 0.5))
    pretext_set = subsample(pretext_set, 8192, seed=args.seed, stratify=False)
    pretrain_stream = BatchStream(pretext_set, args.pretrain_batch, seed=args.seed)
    model, origin = build_model(args, pretrain_stream, device)
    pretrain_stream.close()
    model.train()
    hessian_stream = BatchStream(pretext_set, args.hessian_batch, seed=args.seed + 1)
    (view1, view2), _ = next(hessian_stream)
    hessian_stream.close()
    views = (view1.to(device), view2.to(device))
    upper_stream = BatchStream(labelled_set, args.upper_batch, seed=args.seed + 2)
    head = fresh_head(model.projector[0].in_features, 10, args.seed + 3, device)  # on the features
    params = list(model.backbone.parameters())
    print(f"{args.arch} {args.img_size}px + SimCLR projector, {origin}; Hessian batch {args.hessian_batch} pairs, "
          f"downstream batch {args.upper_batch}, threads {args.threads}, device {device}")

    def loss():
        return model(*views, gather_across_ranks=False)

    _synchronize(device)
    start = time.perf_counter()
    with frozen_batch_norm_statistics(model):
        hessian = HessianVectorOperator(loss, params)
    _synchronize(device)
    build_seconds = time.perf_counter() - start
    probe = probe_hessian(hessian, args.probe_iters, args.lam + 10.0, seed=args.seed)
    auto_lam_delta = float(f"{2 * max(probe.min_lam_plus_delta, 1e-3):.2g}")
    print(f"curvature probe ({args.probe_iters} Lanczos steps): Ritz values in [{probe.min:.4g}, {probe.max:.4g}], "
          f"{probe.num_negative} negative, {probe.num_indefinite} below -(lam + 10); A > 0 needs lam + delta > "
          f"{probe.min_lam_plus_delta:.4g} at least -> 'auto' uses lam + delta = {auto_lam_delta:g}")
    deltas = [auto_lam_delta - args.lam if d.strip() == "auto" else float(d) for d in args.deltas.split(",")]
    batches = [tuple(t.to(device) for t in next(upper_stream)) for _ in range(args.num_rhs)]
    rhs_list = [right_hand_side(model, head, images, targets) for images, targets in batches]

    results: dict = {"origin": origin, "probe": probe.to_dict(), "graph_build_s": build_seconds, "deltas": {}}
    for delta in ([] if args.precision_only else deltas):
        per_rhs = [solver_curves(hessian, args.lam + delta, rhs, args.max_iters, device) for rhs in rhs_list]
        summary = {}
        for solver in SOLVERS:
            residuals = [statistics.median(c[solver]["true_rel_residual"][k] for c in per_rhs) for k in range(args.max_iters)]
            seconds = [statistics.median(c[solver]["cumulative_seconds"][k] for c in per_rhs) for k in range(args.max_iters)]
            summary[solver] = {"true_rel_residual": residuals, "cumulative_seconds": seconds, "per_rhs": [c[solver] for c in per_rhs]}
        target = summary["layerwise"]["true_rel_residual"][args.match_k - 1]
        for solver in SOLVERS:
            hits = [k + 1 for k, r in enumerate(summary[solver]["true_rel_residual"]) if r <= target]
            summary[solver]["products_to_match"] = hits[0] if hits else None
        results["deltas"][f"{delta:g}"] = summary
        a_min = 1 + probe.min / (args.lam + delta)
        print(f"\ndelta = {delta:g} (A's smallest Ritz value {a_min:.3g}: {'indefinite' if a_min <= 0 else 'positive definite on the probe'}); "
              f"true relative residual ||v - A x_K|| / ||v|| (median over {args.num_rhs} right-hand sides; x = 0 gives 1)")
        print("   K " + "".join(f"{s:>12}" for s in SOLVERS) + "   seconds (median, " + "/".join(SOLVERS) + ")")
        for k in range(args.max_iters):
            print(f"{k + 1:4d} " + "".join(f"{summary[s]['true_rel_residual'][k]:12.4g}" for s in SOLVERS) + "   "
                  + " / ".join(f"{summary[s]['cumulative_seconds'][k]:.2f}" for s in SOLVERS))
        if target >= 1:
            print(f"  (layerwise CG at K={args.match_k} is no better than x = 0 here: {target:.4g})")
        for solver in SOLVERS:
            hits = summary[solver]["products_to_match"]
            last = summary[solver]["per_rhs"][0]
            print(f"  {solver:9}: matches layerwise K={args.match_k} ({target:.4g}) with "
                  f"{hits if hits else '>' + str(args.max_iters)} products; at K={args.max_iters} reported "
                  f"{last['reported_true_rel_residual']:.4g} vs explicit {last['explicit_last']:.4g}, "
                  f"recurrence {last['recurrence_last']:.4g}; cos(x, v) {last['cos_x_v']:.3f}, "
                  f"|x|/|v| {last['x_norm_over_v_norm']:.3g}")

    # ---- upper steps: the original's recompute-per-HVP vs a graph per step vs one per alternation
    del hessian
    upper_backbone = copy.deepcopy(model.backbone)
    settings = BilevelSettings(
        lam=args.lam, cg_damping=deltas[-1], cg_iters=args.match_k, cg_solver="layerwise", upper_plain_grad_scale=1.0,
        grad_clip=10.0, lower_steps_per_alternation=0, upper_steps_per_alternation=args.upper_steps,
        alternations=1, ma_decay=0.9995, ma_use_scheduler=False,
    )
    lower_optimizer = build_optimizer("lars", list(model.parameters()), 1.0, 1e-6, 0.9)
    upper_optimizer = build_optimizer("sgd", list(upper_backbone.parameters()) + list(head.parameters()), 0.03, 1e-3, 0.9)
    base = BisslTrainer(model, upper_backbone, head, nn.CrossEntropyLoss(), lower_optimizer,
                        warmup_cosine_scheduler(lower_optimizer, 0, 10, 0.001), upper_optimizer,
                        warmup_cosine_scheduler(upper_optimizer, 0, 10, 0.001), settings, device)
    upper_batches = [tuple(t.to(device) for t in next(upper_stream)) for _ in range(args.upper_steps)]
    upper_stream.close()
    if args.precisions:
        time_upper_steps(base, "shared", "layerwise", 1, views, upper_batches[:1], device)  # warm-up
        results["precisions"] = precision_axis(args, model, views, rhs_list, deltas, base, upper_batches, device)
    if args.precision_only:
        first, last = list(results["precisions"].values())[0], list(results["precisions"].values())[-1]
        names = list(results["precisions"])
        results["total_s"] = time.perf_counter() - total_start
        write_report(args, NAME, last["seconds_per_upper_step"] / first["seconds_per_upper_step"],
                     f"upper step seconds, --hvp-precision {names[-1]} over {names[0]}", results)
        return results
    # At the last damping (the positive definite one by default), where "equal accuracy" means something.
    matched = results["deltas"][f"{deltas[-1]:g}"]["minres"]["products_to_match"] or args.match_k
    schemes = [("original (recompute every HVP), layerwise", "original", "layerwise", args.match_k),
               ("graph per upper step, layerwise", "per-step", "layerwise", args.match_k),
               ("graph per alternation, layerwise", "shared", "layerwise", args.match_k),
               (f"graph per alternation, minres K={matched}", "shared", "minres", matched)]
    time_upper_steps(base, "shared", "layerwise", 1, views, upper_batches[:1], device)  # warm-up
    timings, peaks = {}, {}
    print(f"\n{args.upper_steps} upper steps on the same batches (delta = {deltas[-1]:g}; layerwise adds one HVP to check x):")
    for label, scheme, solver, iters in schemes:
        seconds, peaks[label] = time_upper_steps(base, scheme, solver, iters, views, upper_batches, device)
        timings[label] = seconds
        memory = f", peak GPU memory {peaks[label]:.0f} MiB" if device.type == "cuda" else ""
        print(f"  {label:45}: {seconds:7.2f} s  ({seconds / args.upper_steps:.2f} s per step{memory})")
    original = timings[schemes[0][0]]
    for label in list(timings)[1:]:
        print(f"  {label:45}: {timings[label] / original:.2f} x the original's time")
    results["upper_steps"] = {"n": args.upper_steps, "seconds": timings}
    if device.type == "cuda":
        results["upper_steps"]["peak_mib"] = peaks
    results["total_s"] = time.perf_counter() - total_start
    print(f"\ntotal {results['total_s']:.0f} s")
    minres = schemes[-1][0]
    write_report(args, NAME, timings[minres] / original,
                 f"upper steps' time, {minres}, over the original's (recompute every HVP, layerwise K={args.match_k})", results)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
