"""Time the implicit-gradient part of one BiSSL upper step: graph reuse vs recomputation.

The lower model is a torchvision ResNet (``fc`` removed) + SimCLR projector with the NT-Xent
loss over two augmented views; x ≈ (I + H/(λ + δ))⁻¹·v is solved by CG with H the Hessian of
that loss w.r.t. the backbone. Both Hessian-vector-product methods run in the same process on
the same batch, interleaved after a warm-up, so the ratio is not skewed by drift in machine load:

    python bench/bench_upper_step.py --threads 2 --batch-size 64 --img-size 32 --cg-iters 5 --repeats 3
    python bench/bench_upper_step.py --quick      # a few seconds: checks that the bench runs

The ratio is recomputation's median wall time over graph reuse's (the speed-up).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import add_json_argument, write_report

from source.maths.bilevel import implicit_gradient, preserved_buffers
from source.maths.losses import nt_xent_loss
from source.maths.models import Projector, build_backbone
from source.run.distributed import resolve_device

NAME = "upper_step"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=64, help="pretext pairs per batch (2x images)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--cg-iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per method, after one warm-up each")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--mlp", default="256-256-256", help="projector widths")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--lam", type=float, default=0.001)
    parser.add_argument("--cg-damping", type=float, default=10.0)
    parser.add_argument("--device", default="cpu", help="auto | cuda | cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="batch 4, 16 px, 2 CG iterations, 1 repeat: only checks that the bench runs")
    add_json_argument(parser, NAME)
    return parser


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args: argparse.Namespace) -> dict:
    if args.quick:
        args.batch_size, args.img_size, args.cg_iters, args.repeats = 4, 16, 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    backbone, feat_dim = build_backbone(args.arch)
    projector = Projector(feat_dim, args.mlp)
    backbone.to(device).train()
    projector.to(device).train()
    # Two "augmented views": random images stand in for the pipeline, which does not affect cost.
    view1 = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    view2 = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    params = list(backbone.parameters())
    rhs = [torch.randn_like(p) * 1e-3 for p in params]  # stands in for ∇_θ L_D(θ_P, φ)

    def lower_loss() -> torch.Tensor:
        return nt_xent_loss(projector(backbone(view1)), projector(backbone(view2)), args.temperature)

    def solve(reuse_graph: bool) -> tuple[float, float, tuple[torch.Tensor, ...]]:
        _synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        with preserved_buffers(backbone, projector):
            x, _ = implicit_gradient(params, rhs, lower_loss=lower_loss, lam=args.lam, damping=args.cg_damping,
                                     cg_iters=args.cg_iters, reuse_graph=reuse_graph)
        _synchronize(device)
        return time.perf_counter() - start, time.process_time() - start_cpu, x

    methods = {"reuse": True, "recompute": False}
    results = {name: solve(reuse)[2] for name, reuse in methods.items()}  # warm-up
    difference = max((a - b).abs().max().item() for a, b in zip(results["reuse"], results["recompute"]))
    scale = max(b.abs().max().item() for b in results["recompute"])
    # Wall time is what a user waits for; process CPU time is also shown because on a shared
    # machine it is far less sensitive to other jobs competing for the same cores.
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, reuse in methods.items():
            wall, cpu, _ = solve(reuse)
            times[name].append(wall)
            cpu_times[name].append(cpu)

    reuse_s, recompute_s = statistics.median(times["reuse"]), statistics.median(times["recompute"])
    reuse_cpu, recompute_cpu = statistics.median(cpu_times["reuse"]), statistics.median(cpu_times["recompute"])
    print(
        f"{args.arch} {args.img_size}px batch {args.batch_size} (x2 views), {args.cg_iters} CG iterations, "
        f"device {device}, threads {args.threads}, {args.repeats} repeats (median)"
    )
    for label, name in (("graph reuse", "reuse"), ("recompute  ", "recompute")):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {label} : {statistics.median(times[name]):.2f} s wall ({runs}), "
              f"{statistics.median(cpu_times[name]):.2f} s CPU")
    print(f"  speed-up    : {recompute_s / reuse_s:.2f}x wall, {recompute_cpu / reuse_cpu:.2f}x process CPU time")
    print(f"  agreement   : max |x_reuse - x_recompute| = {difference:.2e}, max |x| = {scale:.2e}")
    figures = {"reuse_s": reuse_s, "recompute_s": recompute_s, "speedup": recompute_s / reuse_s,
               "speedup_cpu": recompute_cpu / reuse_cpu, "max_abs_difference": difference, "max_abs_x": scale,
               "runs_s": times, "runs_cpu_s": cpu_times}
    write_report(args, NAME, recompute_s / reuse_s, "recomputation's wall time over graph reuse's (the speed-up)", figures)
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
