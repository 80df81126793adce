"""Pre-training throughput (images/s) of one SimCLR training step, as ssl_pre-training.py runs it.

    python bench/bench_pretrain_throughput.py [--arch resnet18] [--sizes 32 96] [--batch-size 64]

Times forward (two views) + NT-Xent + backward + LARS step on random tensors already in memory,
so it measures the model, not the data pipeline. An "image" is one sample (two views).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from source.distributed import resolve_device  # noqa: E402
from source.models import build_backbone
from source.optim import build_optimizer
from source.pretext import SimCLR
from source.runtime import amp_dtype  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="backbone (default: resnet18)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96], help="image sides to time (default: 32 96)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default: 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per size (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--cifar-stem", type=int, default=0, help="1: CIFAR-style stem (default: 0)")
    parser.add_argument("--device", default="auto", help="auto|cuda|cpu (default: auto)")
    parser.add_argument("--amp", default="auto", help="auto|none|bf16|fp16 (default: auto = bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    return parser


def images_per_second(args: argparse.Namespace, img_size: int, device: torch.device) -> float:
    torch.manual_seed(0)
    backbone, dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem))
    model = SimCLR(backbone, dim, "256-256-256", 0.5).to(device)
    optimizer = build_optimizer("lars", list(model.parameters()), 0.1, 1e-6, 0.9)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    views = [torch.randn(args.batch_size, 3, img_size, img_size, device=device) for _ in range(2)]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(*views)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, {args.arch}, batch {args.batch_size}, "
          f"cifar stem {args.cifar_stem}, amp {args.amp}")
    for size in args.sizes:
        print(f"{size:4d} px: {images_per_second(args, size, device):8.1f} images/s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
