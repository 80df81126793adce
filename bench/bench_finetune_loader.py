"""Loader CPU cost per fine-tuning sample, with and without the decoded-image cache (issue 20, item 3).

    python bench/bench_finetune_loader.py [--data-dir data] [--jpeg-side 500] [--sizes 32 96] [--images 300] [--repeats 5]
    python bench/bench_finetune_loader.py --quick      # a few seconds: checks that the bench runs

The images: FashionMNIST training images upscaled to ``--jpeg-side`` x ``3/4 --jpeg-side`` with mild
noise and saved as quality-90 JPEGs in an image-folder tree (``bench_augment.jpeg_files``; 500
gives ImageNet's typical 500 x 375), so every pipeline reads files as a fine-tuning run does.
Per output size, three ways to serve one training sample (``(3, size, size)`` tensor + label):

* ``chain``: today's uncached path, decode the JPEG + ``downstream_train_transform`` (torchvision's
  RandomResizedCrop, RandomHorizontalFlip, then normalisation);
* ``fused``: decode + :class:`source.data.transforms.DownstreamView` (same pixels for the same choices);
* ``cached``: the item of :class:`source.data.decoded_cache.CachedImages`, i.e. crop, flip and normalise
  of the image decoded once (stored with its short side at most ``train_side(size)``).

All run on one core (the process is pinned to one CPU and torch to one thread), interleaved
(chain, fused, cached, cached, fused, chain, ...), each pass over all images with the per-sample
reseeding the training loader does; the table gives the median ms per sample and the ratio
chain / cached (the headline: the largest size's; goal >= 10 at 96 px from 500 px JPEGs). The
one-off cost of building the cache (ms per image) and its size are printed too. The load average
is printed before and after: record it with the figures.

Cores per GPU for a sweep: a GPU that trains ``--gpu-images-per-s`` fine-tuning images per second
needs that rate times each pipeline's ms per sample of loader CPU (one core's ms, so cores =
rate x ms / 1000), printed per size for the chain, the fused view and the cache. The default rate
is an estimate from bench/RESULTS.md's CUDA section: the H200's bare SimCLR step at the paper's
per-GPU setting (ResNet-50, 96 px, bf16, channels_last) trains about 4,700 two-view samples/s,
i.e. about 9,400 single-view images/s, a fine-tuning step's load; measure the fine-tuning step
itself with ``bench_finetune_throughput.py --sizes 96 --script-workers --device cuda --arch resnet50``
and pass its rate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_augment import jpeg_files, load_images
from report import add_json_argument, write_report

from source.data import decoded_cache
from source.data.datasets import ImageTree
from source.data.loader import SeededDataset, sample_seed
from source.data.splits import SplitSubset
from source.data.transforms import downstream_train_transform, downstream_train_view

NAME = "finetune_loader"
CLASSES = 2  # folders of the generated tree (labels are served but do not matter here)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding FashionMNIST/raw (default: data)")
    parser.add_argument("--jpeg-side", type=int, default=500, help="width of the generated JPEGs, 4:3 (default: 500)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96], help="output image sides (default: 32 96)")
    parser.add_argument("--images", type=int, default=300, help="JPEGs per timed pass (default: 300)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline and size (default: 5)")
    parser.add_argument("--crop-min-scale", type=float, default=0.5, help="crop area minimum (default: 0.5, the paper's)")
    parser.add_argument("--gpu-images-per-s", type=float, default=9400.0,
                        help="fine-tuning images/s of one GPU for the cores-per-GPU estimate (default: 9400, the H200's "
                             "ResNet-50 96 px bf16 bare step: 4,700 two-view samples/s, bench/RESULTS.md CUDA section)")
    parser.add_argument("--quick", action="store_true", help="24 images, 2 repeats: only checks that the bench runs")
    add_json_argument(parser, NAME)
    return parser


def pin_to_one_core() -> str:
    """Pin this process to one CPU (Linux) and torch to one thread: the cost of one loader core."""
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"cpu {cpu}"
    return "not pinned (no sched_setaffinity)"


def write_tree(root: Path, files: list[bytes]) -> Path:
    """The JPEGs as an image-folder tree ``root/class<k>/<i>.jpg``."""
    for i, data in enumerate(files):
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(data)
    return root


def ms_per_sample(dataset, epoch: int) -> float:
    """One pass over ``dataset`` as the training loader serves it (reseeded per sample)."""
    seeded = SeededDataset(dataset)
    start = time.perf_counter()
    for index in range(len(dataset)):
        seeded[index, sample_seed(0, epoch, index)]
    return (time.perf_counter() - start) * 1000 / len(dataset)


def print_cores_per_gpu(rows: list[dict], gpu_images_per_s: float) -> None:
    """Loader cores one GPU needs per pipeline: its rate times the one-core ms per sample (see the docstring)."""
    print(f"loader cores per GPU at {gpu_images_per_s:,.0f} images/s (rate x one-core ms per sample / 1000):")
    for row in rows:
        cores = {name: gpu_images_per_s * row[f"{name}_ms"] / 1000 for name in ("chain", "fused", "cached")}
        row["cores_per_gpu"] = cores
        print(f"  {row['size']:>4} px: without the cache {cores['chain']:.1f} (torchvision chain) / {cores['fused']:.1f} "
              f"(fused view); with the cache {cores['cached']:.1f}")


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.images, args.repeats = 24, 2
    pinned = pin_to_one_core()
    images = load_images(Path(args.data_dir), args.images)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-loader-") as tmp:
        root = write_tree(Path(tmp) / "jpegs", jpeg_files(images, args.jpeg_side))
        base = ImageTree(root)
        print(f"{len(base)} JPEGs of {args.jpeg_side}x{args.jpeg_side * 3 // 4} (FashionMNIST upscaled, quality 90), "
              f"crop min scale {args.crop_min_scale}, {args.repeats} interleaved passes; one core ({pinned}); "
              f"load average {os.getloadavg()}")
        print(f"{'size':>5} {'side':>5} {'chain ms':>9} {'fused ms':>9} {'cached ms':>10} {'chain/cached':>13} "
              f"{'build ms/img':>13} {'cache MB':>9}")
        for size in args.sizes:
            view = downstream_train_view(size, args.crop_min_scale)
            indices = list(range(len(base)))
            pipelines = {"chain": SplitSubset(base, indices, downstream_train_transform(size, args.crop_min_scale)),
                         "fused": SplitSubset(base, indices, view)}
            side = decoded_cache.train_side(size, view.scale, view.ratio)
            started = time.perf_counter()
            cache = decoded_cache.open_or_build(pipelines["fused"], decoded_cache.ShortSideAtMost(side),
                                                Path(tmp) / "cache", "imagefolder", root)
            build_ms = (time.perf_counter() - started) * 1000 / len(base)
            pipelines["cached"] = decoded_cache.CachedImages(cache, view)
            for dataset in pipelines.values():  # untimed warm-up (and the cache's pages into memory)
                ms_per_sample(dataset, epoch=-1)
            times: dict[str, list[float]] = {name: [] for name in pipelines}
            for repeat in range(args.repeats):
                for name in (list(pipelines) if repeat % 2 == 0 else list(reversed(pipelines))):
                    times[name].append(ms_per_sample(pipelines[name], epoch=repeat))
            median = {name: statistics.median(values) for name, values in times.items()}
            ratio = median["chain"] / median["cached"]
            rows.append({"size": size, "train_side": side, "chain_ms": median["chain"], "fused_ms": median["fused"],
                         "cached_ms": median["cached"], "chain_over_cached": ratio,
                         "fused_over_cached": median["fused"] / median["cached"], "build_ms_per_image": build_ms,
                         "cache_bytes": cache.nbytes, "runs_ms": times})
            print(f"{size:>5} {side:>5} {median['chain']:>9.3f} {median['fused']:>9.3f} {median['cached']:>10.3f} "
                  f"{ratio:>13.1f} {build_ms:>13.2f} {cache.nbytes / 1e6:>9.1f}")
    print(f"load average after: {os.getloadavg()}")
    print_cores_per_gpu(rows, args.gpu_images_per_s)
    headline = max(rows, key=lambda row: row["size"])
    write_report(args, NAME, headline["chain_over_cached"],
                 f"chain / cached loader ms per sample at {headline['size']} px from {args.jpeg_side} px JPEGs, one core "
                 "(> 1: the cache is cheaper; goal >= 10)",
                 {"images": len(images), "repeats": args.repeats, "jpeg_side": args.jpeg_side,
                  "crop_min_scale": args.crop_min_scale, "pinned": pinned, "gpu_images_per_s": args.gpu_images_per_s,
                  "settings": rows})


if __name__ == "__main__":
    main(get_args_parser().parse_args())
