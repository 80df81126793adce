"""Fine-tuning throughput: the whole ``fine-tuning.py`` against its bare model step, in one run (issue 20, item 3).

    python bench/bench_finetune_throughput.py [--sizes 32 96] [--script-workers 0 2] [--repeats 3] [--threads 2]
    python bench/bench_finetune_throughput.py --quick          # checks that the bench runs
    python bench/bench_finetune_throughput.py --compile-ratio  # bare step, torch.compile'd over eager (--compile 1)

Bare step: forward + cross-entropy + backward + SGD step of the fine-tuning classifier (backbone +
linear head) on random tensors already in memory, in the layout the script uses
(``--channels-last auto``), at ``--threads`` torch threads and the script's precision.

Script: ``fine-tuning.py`` as a subprocess, one trial (``--use-hpo 0 --num-runs 1``) on an image
folder of ``--images`` JPEGs of ``--jpeg-side`` x 3/4 of it (FashionMNIST upscaled, as
``bench_finetune_loader.py``; 500 = ImageNet's typical size), with ``--decode-cache off`` (decode
and augment every sample) and ``on`` (crop, flip and normalise the images decoded once), once per
``--script-workers`` value. Its images/s come from the trial's per-epoch metric timestamps:
training images of epochs 2..E over the time between the ends of epochs 1 and E. That time also
holds each epoch's val pass (``--max-eval-samples`` 32 images: a few per cent); the first epoch,
with start-up and (``on``) the cache build, is dropped.

Every script run is bracketed by bare steps (bare, script, bare, script, ..., the order reversed
every other round): a script's share is its images/s over the mean of the two bare measurements
around it (a shared VM drifts by up to 20 % within minutes). The table gives medians of these
paired shares (issue 20's goal: >= 0.9 on CPU with 0 and 2 workers). The headline ratio is the
smallest median share of the cached runs. The load average is printed before and after.
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
from pathlib import Path

import torch
from bench_augment import jpeg_files, load_images
from bench_finetune_loader import write_tree
from report import add_json_argument, write_report
from torch import nn

from source.maths.models import Classifier, build_backbone
from source.run.distributed import resolve_device
from source.run.runtime import amp_dtype
from source.stages.engine import compile_modules, memory_format

NAME = "finetune_throughput"
ROOT = Path(__file__).resolve().parents[1]  # where fine-tuning.py is
CLASSES = 2  # folders of the generated tree (bench_finetune_loader.write_tree)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="backbone (default: resnet18)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96], help="image sides (default: 32 96)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default: 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed bare steps per measurement (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed bare steps first (default: 3)")
    parser.add_argument("--script-workers", type=int, nargs="*", default=[0, 2],
                        help="--num-workers values of the script runs; none = bare step only (default: 0 2)")
    parser.add_argument("--caches", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="--decode-cache values of the script runs (default: off on)")
    parser.add_argument("--images", type=int, default=640, help="JPEGs in the folder, 80 %% of them train (default: 640)")
    parser.add_argument("--jpeg-side", type=int, default=500, help="width of the generated JPEGs, 4:3 (default: 500)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each script run, the first not timed (default: 4)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per image size (default: 2)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="folder holding FashionMNIST/raw")
    parser.add_argument("--device", default="auto", help="auto|cuda|cpu (default: auto)")
    parser.add_argument("--amp", default="auto", help="auto|none|bf16 (default: auto = bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, bench and script (0 = default)")
    parser.add_argument("--compile-ratio", action="store_true",
                        help="only the bare step, eager and torch.compile'd (--compile 1): prints compiled/eager images/s")
    parser.add_argument("--quick", action="store_true", help="tiny settings: only checks that the bench runs")
    add_json_argument(parser, NAME)
    return parser


def bare_images_per_second(args: argparse.Namespace, size: int, device: torch.device, compiled: bool = False) -> float:
    """images/s of the classifier's training step on random in-memory tensors (see the docstring)."""
    torch.manual_seed(0)
    backbone, dim = build_backbone(args.arch)
    layout = memory_format("auto", device)
    model = Classifier(backbone, dim, CLASSES).to(device, memory_format=layout)
    compile_modules(compiled, device, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    dtype = amp_dtype(args.amp, device)
    images = torch.randn(args.batch_size, 3, size, size, device=device).to(memory_format=layout)
    targets = torch.randint(0, CLASSES, (args.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the script syncs on the loss every step too

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def script_images_per_second(args: argparse.Namespace, tree: Path, models: Path, size: int, workers: int,
                             cache: str, device: torch.device, train_images: int) -> float:
    """Steady-state training images/s of one ``fine-tuning.py`` trial (epochs 2..E, see the docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as run_dir:
        command = [
            sys.executable, str(ROOT / "fine-tuning.py"), "--dset", "imagefolder", "--data-dir", str(tree),
            "--model-dir", str(models), "--pretrained-backbone-filename", "backbone.pth", "--pretrain-arch", args.arch,
            "--pretrain-img-size", str(size), "--use-hpo", "0", "--num-runs", "1", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", "0.01", "--max-train-samples", str(train_images),
            "--max-eval-samples", "32", "--device", device.type, "--amp", args.amp, "--num-workers", str(workers),
            "--decode-cache", cache, "--decode-cache-dir", str(Path(run_dir) / "cache"),
            "--omp-num-threads", str(args.threads), "--run-dir", str(Path(run_dir) / "run"), "--resume", "0", "--seed", "0",
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, WANDB_SILENT="true"))
        if result.returncode != 0:
            raise SystemExit(f"fine-tuning.py failed:\n{result.stderr[-3000:]}")
        metrics = next((Path(run_dir) / "run" / "trials").glob("trial-*/metrics.jsonl"))
        times = [json.loads(line)["time"] for line in metrics.read_text().splitlines() if '"epoch"' in line]
    if len(times) < 2:
        raise SystemExit("the trial logged fewer than two epochs; raise --epochs")
    return train_images * (len(times) - 1) / (times[-1] - times[0])


def compile_ratio(args: argparse.Namespace, device: torch.device) -> None:
    """--compile-ratio: eager and compiled bare steps, interleaved per size; the ratio of their medians."""
    figures = {}
    for size in args.sizes:
        rates: dict[str, list[float]] = {"eager": [], "compiled": []}
        for repeat in range(args.repeats):
            for name in (("eager", "compiled") if repeat % 2 == 0 else ("compiled", "eager")):
                rates[name].append(bare_images_per_second(args, size, device, compiled=name == "compiled"))
        ratio = statistics.median(rates["compiled"]) / statistics.median(rates["eager"])
        figures[str(size)] = {"images_per_s": rates, "compiled_over_eager": ratio}
        print(f"{size} px: eager {statistics.median(rates['eager']):.1f} images/s, compiled "
              f"{statistics.median(rates['compiled']):.1f} (runs {rates}); compiled / eager x{ratio:.2f}")
    print(f"load average after: {os.getloadavg()}")
    write_report(args, NAME, min(entry["compiled_over_eager"] for entry in figures.values()),
                 "bare fine-tuning step images/s, torch.compile'd over eager, the smallest over the sizes", figures)


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.sizes, args.steps, args.warmup, args.repeats, args.batch_size = [16], 2, 1, 1, 8
        args.images, args.jpeg_side, args.epochs, args.script_workers = 40, 64, 2, args.script_workers[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, {args.arch}, batch {args.batch_size}, amp {args.amp}, "
          f"{args.repeats} interleaved rounds; load average {os.getloadavg()}")
    if args.compile_ratio:
        return compile_ratio(args, device)
    train_images = (int(args.images * 0.8) // args.batch_size) * args.batch_size  # whole batches (drop_last)
    figures: dict = {"train_images": train_images, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-data-") as tmp:
        tree = write_tree(Path(tmp) / "jpegs", jpeg_files(load_images(Path(args.data_dir), args.images), args.jpeg_side))
        models = Path(tmp) / "models"
        models.mkdir()
        torch.save(build_backbone(args.arch)[0].state_dict(), models / "backbone.pth")
        for size in args.sizes:
            figures["sizes"][str(size)] = time_size(args, tree, models, size, device, train_images)
    print(f"load average after: {os.getloadavg()}")
    cached = [share for entry in figures["sizes"].values() for name, share in entry["median_share"].items()
              if name.endswith("cache on")]
    shares = cached or [share for entry in figures["sizes"].values() for share in entry["median_share"].values()]
    if shares:
        write_report(args, NAME, min(shares), "fine-tuning.py's images/s over its bare step's, the smallest median "
                     "paired share of the --decode-cache on runs", figures)
    else:
        write_report(args, NAME, None, "none: no --script-workers given, bare steps only", figures)


def time_size(args: argparse.Namespace, tree: Path, models: Path, size: int, device: torch.device,
              train_images: int) -> dict:
    """The interleaved bare and script measurements of one image size, printed and returned."""
    runs = [(workers, cache) for workers in args.script_workers for cache in args.caches]
    rates: dict[str, list[float]] = {"bare": [], **{f"workers {w}, cache {c}": [] for w, c in runs}}
    shares: dict[str, list[float]] = {name: [] for name in rates if name != "bare"}
    before = bare_images_per_second(args, size, device)
    rates["bare"].append(before)
    for repeat in range(args.repeats):
        for workers, cache in (runs if repeat % 2 == 0 else list(reversed(runs))):
            name = f"workers {workers}, cache {cache}"
            rate = script_images_per_second(args, tree, models, size, workers, cache, device, train_images)
            after = bare_images_per_second(args, size, device)
            rates[name].append(rate)
            rates["bare"].append(after)
            shares[name].append(rate / ((before + after) / 2))
            before = after
    print(f"{size} px, {train_images} training JPEGs of {args.jpeg_side} px (shares: of the bare step timed just "
          "before and after each script run; medians of these paired shares)")
    for name, values in rates.items():
        share = statistics.median(shares[name]) if name in shares else 1.0
        detail = f"paired shares {', '.join(f'{v:.2f}' for v in shares[name])}" if name in shares else "median over the run"
        print(f"  {name:<24} {statistics.median(values):8.1f} images/s   x{share:5.2f}   "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)}; {detail})")
    return {"images_per_s": rates, "paired_shares": shares,
            "median_share": {name: statistics.median(values) for name, values in shares.items()}}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
