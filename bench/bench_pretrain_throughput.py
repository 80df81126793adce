"""Pre-training throughput: the whole ``ssl_pre-training.py`` against the bare model step, in one run.

    python bench/bench_pretrain_throughput.py [--sizes 32 96] [--batch-size 64] [--script-workers 0 2] [--repeats 3]
    python bench/bench_pretrain_throughput.py --sizes 32 --script-workers      # bare step only
    python bench/bench_pretrain_throughput.py --quick                           # checks that the bench runs

Bare step: forward of two views + NT-Xent + backward + LARS step of a SimCLR model on random
tensors already in memory -- the model alone, no data pipeline -- in the default contiguous (NCHW)
layout and in channels_last (``--channels-last 1``'s layout), at ``--threads`` torch threads.

Script: ``ssl_pre-training.py`` itself as a subprocess (SimCLR, FashionMNIST from ``--data-dir``,
the same architecture, batch, image size, threads and precision), once per ``--script-workers``
value; its steady-state images/s come from its metrics file (``train/images_per_s`` every
``--log-every`` steps; the first interval, which includes start-up, is dropped). It includes
everything a real run does per step: augmentations, collation, the rank all-reduce of the loss,
the LR schedule and the progress bar.

Every script run is bracketed by bare steps in the layout the script itself uses
(``--channels-last auto``: channels_last on CUDA, contiguous on CPU): bare, script w=0, bare,
script w=2, bare, ... (the script order reversed every other round, ``--repeats`` rounds, the
other layout once per round). A script's share is its images/s over the mean of the two bare
measurements around it: a shared VM's speed drifts by up to 20 % within minutes, which unpaired
medians would mix into the ratio. The table gives median images/s, the median paired share
(issue 9's target: >= 0.85 at 32 px, batch 64, --num-workers 0 and 2) and the share of its time
the script waited for data. An "image" is one sample (two views). The
load average is printed before and after. The headline ratio is the smallest median paired share
over the image sizes and --script-workers values.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from report import add_json_argument, write_report

from source.maths.models import build_backbone
from source.maths.optim import build_optimizer
from source.run.distributed import resolve_device
from source.run.runtime import amp_dtype
from source.stages.engine import memory_format
from source.stages.pretext import SimCLR

NAME = "pretrain_throughput"
ROOT = Path(__file__).resolve().parents[1]  # where ssl_pre-training.py is
MLP = "256-256-256"  # the default projector of ssl_pre-training.py
waits: defaultdict[tuple[int, int], list[float]] = defaultdict(list)  # (size, workers) -> data-wait shares


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="backbone (default: resnet18)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96], help="image sides to time (default: 32 96)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default: 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed bare steps per measurement (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed bare steps first (default: 3)")
    parser.add_argument("--script-workers", type=int, nargs="*", default=[0, 2],
                        help="--num-workers values to run the script with; none = bare step only (default: 0 2)")
    parser.add_argument("--script-steps", type=int, default=40, help="steps of each script run (default: 40)")
    parser.add_argument("--log-every", type=int, default=5, help="script metrics interval in steps (default: 5)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per image size (default: 3)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="folder holding FashionMNIST/raw")
    parser.add_argument("--cifar-stem", type=int, default=0, help="1: CIFAR-style stem (default: 0)")
    parser.add_argument("--device", default="auto", help="auto|cuda|cpu (default: auto)")
    parser.add_argument("--amp", default="auto", help="auto|none|bf16|fp16 (default: auto = bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, bench and script (0 = default)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: only checks that the bench runs")
    add_json_argument(parser, NAME)
    return parser


def bare_images_per_second(args: argparse.Namespace, img_size: int, device: torch.device,
                           layout: torch.memory_format) -> float:
    torch.manual_seed(0)
    backbone, dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem))
    model = SimCLR(backbone, dim, MLP, 0.5).to(device, memory_format=layout)
    optimizer = build_optimizer("lars", list(model.parameters()), 0.1, 1e-6, 0.9)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    views = [torch.randn(args.batch_size, 3, img_size, img_size, device=device).to(memory_format=layout)
             for _ in range(2)]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(*views)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # the script syncs on the loss every step too

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def script_images_per_second(args: argparse.Namespace, img_size: int, workers: int, device: torch.device) -> float:
    """Steady-state images/s of one ``ssl_pre-training.py`` run (harmonic mean of its metric intervals
    after the first, i.e. total images over total time); its mean share of time waiting for data
    goes to ``waits``."""
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as run_dir:
        command = [
            sys.executable, str(ROOT / "ssl_pre-training.py"), "--pretext-type", "simclr", "--dset", "fashionmnist",
            "--data-dir", args.data_dir, "--arch", args.arch, "--cifar-stem", str(args.cifar_stem),
            "--img-size", str(img_size), "--batch-size", str(args.batch_size), "--epochs", "1",
            "--max-train-samples", str(args.batch_size * args.script_steps), "--mlp", MLP, "--lr", "0.1",
            "--warmup-epochs", "1", "--device", device.type, "--amp", args.amp, "--num-workers", str(workers),
            "--omp-num-threads", str(args.threads), "--log-every", str(args.log_every), "--save-model", "0",
            "--model-dir", run_dir, "--run-dir", str(Path(run_dir) / "run"), "--resume", "0", "--seed", "0",
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, WANDB_SILENT="true"))
        if result.returncode != 0:
            raise SystemExit(f"ssl_pre-training.py failed:\n{result.stderr[-3000:]}")
        lines = [json.loads(line) for line in (Path(run_dir) / "run" / "metrics.jsonl").read_text().splitlines()]
    intervals = [line for line in lines if "train/images_per_s" in line][1:]
    if not intervals:
        raise SystemExit("the script logged too few intervals; raise --script-steps or lower --log-every")
    waits[(img_size, workers)].append(statistics.mean(line["train/data_wait_frac"] for line in intervals))
    return statistics.harmonic_mean([line["train/images_per_s"] for line in intervals])


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.sizes, args.steps, args.warmup, args.script_steps, args.log_every, args.repeats = [16], 2, 1, 4, 1, 1
        args.batch_size, args.script_workers = 16, args.script_workers[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, {args.arch}, batch {args.batch_size}, cifar stem "
          f"{args.cifar_stem}, amp {args.amp}, {args.repeats} interleaved rounds; load average {os.getloadavg()}")
    # The script's --channels-last auto picks the layout by device: its reference is the bare step
    # in that layout; the other layout is timed once per round for the layout comparison.
    layouts = {"bare": torch.contiguous_format, "bare channels_last": torch.channels_last}
    reference = "bare channels_last" if memory_format("auto", device) == torch.channels_last else "bare"
    other = next(name for name in layouts if name != reference)
    figures: dict = {"reference": reference, "sizes": {}}
    for size in args.sizes:
        bare = partial(bare_images_per_second, args, size, device, layouts[reference])
        rates: dict[str, list[float]] = {reference: [], other: [], **{f"script --num-workers {w}": [] for w in args.script_workers}}
        shares: dict[str, list[float]] = {name: [] for name in rates if name.startswith("script")}
        before = bare()
        rates[reference].append(before)
        for repeat in range(args.repeats):
            rates[other].append(bare_images_per_second(args, size, device, layouts[other]))
            for workers in (args.script_workers if repeat % 2 == 0 else list(reversed(args.script_workers))):
                name = f"script --num-workers {workers}"
                rate = script_images_per_second(args, size, workers, device)
                after = bare()
                rates[name].append(rate)
                rates[reference].append(after)
                shares[name].append(rate / ((before + after) / 2))  # paired with the bare steps around it
                before = after
        reference_rate = statistics.median(rates[reference])
        print(f"{size} px (script shares: of the {reference!r} step, the scripts' layout, timed just before and after "
              f"each script run; medians of these paired shares)")
        for name, values in rates.items():
            if name.startswith("script"):
                share = statistics.median(shares[name])
                detail = (f"paired shares {', '.join(f'{v:.2f}' for v in shares[name])}; waiting for data "
                          f"{statistics.median(waits[(size, int(name.split()[-1]))]):.0%} of the time")
            else:
                share = statistics.median(values) / reference_rate
                detail = "median over the run"
            print(f"  {name:<26} {statistics.median(values):8.1f} images/s   x{share:5.2f}   "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)}; {detail})")
        figures["sizes"][str(size)] = {
            "images_per_s": rates, "paired_shares": shares,
            "median_share": {name: statistics.median(values) for name, values in shares.items()},
            "data_wait_frac": {name: statistics.median(waits[(size, int(name.split()[-1]))]) for name in shares}}
    print(f"load average after: {os.getloadavg()}")
    script_shares = [share for entry in figures["sizes"].values() for share in entry["median_share"].values()]
    if script_shares:
        write_report(args, NAME, min(script_shares), "the script's images/s over the bare step's, the smallest median "
                     "paired share over the sizes and --script-workers", figures)
    else:
        write_report(args, NAME, None, "none: no --script-workers given, bare steps only", figures)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
