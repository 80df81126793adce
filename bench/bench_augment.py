"""Cost of the two SSL views per image: this project's ``pretext_transform`` vs lightly's BYOLTransform.

    python bench/bench_augment.py [--data-dir data] [--sizes 32 96] [--threads 1 2] [--images 1000] [--repeats 7]
    python bench/bench_augment.py --quick      # a few seconds: checks that the bench runs

Both pipelines get the same FashionMNIST training images, converted to RGB once up front (lightly's
pipeline needs 3 channels; ours converts any mode itself) and the same recipe: crop area scale
in [--crop-min-scale, 1], flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale
0.2, blur sigma in [0.1, 2] with p 1.0 / 0.1, solarisation p 0 / 0.2, ImageNet normalisation.
lightly's side is ``BYOLTransform(BYOLView1Transform(min_scale=...), BYOLView2Transform(min_scale=...))``
with otherwise default parameters, which are exactly these (lightly 1.6; install it from
requirements-dev.txt).

``--jpeg-side 500`` adds one more line: our pipeline at the largest ``--sizes`` value on JPEG
files of ImageNet's typical size (500 x 375, quality 90; decoding included, as an ImageFolder run
pays it), i.e. the CPU cost c of one ImageNet-style sample: a GPU that trains g images/s needs
about g * c / 1000 loader cores (docs/data-loading.md).

The two pipelines are timed interleaved (ours, lightly, lightly, ours, ...), one pass over all the
images each, in the same process, for every image size and torch thread count; the table
gives the median ms per image (both views) over the repeats and the ratio ours / lightly
(< 1: ours is faster). The load average is printed before and after: record it with the figures.
The headline ratio is the largest ours / lightly over the settings (none with ``--skip-lightly``).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import add_json_argument, write_report

from source.data import build_pretext_dataset, pretext_transform

NAME = "augment"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding FashionMNIST/raw (default: data)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96], help="output image sides (default: 32 96)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts (default: 1 2)")
    parser.add_argument("--images", type=int, default=1000, help="images per timed pass (default: 1000)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per pipeline and setting (default: 7)")
    parser.add_argument("--crop-min-scale", type=float, default=0.5, help="crop area minimum (default: 0.5, the paper's)")
    parser.add_argument("--jpeg-side", type=int, default=0,
                        help="also time ours on JPEGs this wide (4:3, decoding included); 0 = skip (default: 0)")
    parser.add_argument("--skip-lightly", action="store_true",
                        help="time ours alone (a machine without lightly, e.g. a GPU node measuring --jpeg-side)")
    parser.add_argument("--quick", action="store_true", help="64 images, 2 repeats: only checks that the bench runs")
    add_json_argument(parser, NAME)
    return parser


def load_images(data_dir: Path, count: int) -> list:
    """The first ``count`` FashionMNIST training images as 28x28 RGB PIL images."""
    dataset = build_pretext_dataset("fashionmnist", data_dir, transform=None)
    return [dataset[i][0].convert("RGB") for i in range(min(count, len(dataset)))]


def lightly_transform(img_size: int, crop_min_scale: float):
    try:
        from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    except ImportError as error:
        raise SystemExit(f"lightly is needed for this bench: pip install -r requirements-dev.txt ({error})") from error
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=img_size, min_scale=crop_min_scale),
        view_2_transform=BYOLView2Transform(input_size=img_size, min_scale=crop_min_scale),
    )


def ms_per_image(transform, images: list, seed: int) -> float:
    # lightly draws its blur and solarisation from numpy, everything else (and ours) from torch.
    torch.manual_seed(seed)
    np.random.seed(seed)
    start = time.perf_counter()
    for image in images:
        transform(image)
    return (time.perf_counter() - start) * 1000 / len(images)


class DecodeThen:
    """Decode JPEG bytes to RGB, then apply ``transform`` (what an ImageFolder sample costs)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, data: bytes):
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB"))


def jpeg_files(images: list, side: int) -> list[bytes]:
    """The images upscaled to ``side`` x ``side * 3 // 4`` with mild noise (texture for the
    encoder), encoded as quality-90 JPEGs in memory."""
    rng = np.random.default_rng(0)
    files = []
    for image in images:
        pixels = np.asarray(image.resize((side, side * 3 // 4), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.images, args.repeats = 64, 2
    images = load_images(Path(args.data_dir), args.images)
    print(f"{len(images)} FashionMNIST images (28x28, RGB), crop min scale {args.crop_min_scale}, "
          f"{args.repeats} interleaved passes per pipeline; load average {os.getloadavg()}")
    print(f"{'size':>5} {'threads':>7} {'ours ms/img':>12} {'lightly ms/img':>15} {'ours/lightly':>13}")
    rows: list[dict] = []
    for size in args.sizes:
        pipelines = {"ours": pretext_transform(size, args.crop_min_scale)}
        if not args.skip_lightly:
            pipelines["lightly"] = lightly_transform(size, args.crop_min_scale)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for transform in pipelines.values():  # untimed warm-up pass
                ms_per_image(transform, images[:32], seed=0)
            times: dict[str, list[float]] = {name: [] for name in pipelines}
            for repeat in range(args.repeats):
                order = list(pipelines) if repeat % 2 == 0 else list(reversed(pipelines))
                for name in order:
                    times[name].append(ms_per_image(pipelines[name], images, seed=repeat))
            ours = statistics.median(times["ours"])
            rows.append({"size": size, "threads": threads, "ours_ms": ours, "runs_ms": times})
            if args.skip_lightly:
                print(f"{size:>5} {threads:>7} {ours:>12.3f} {'-':>15} {'-':>13}")
                continue
            theirs = statistics.median(times["lightly"])
            rows[-1].update(lightly_ms=theirs, ours_over_lightly=ours / theirs)
            print(f"{size:>5} {threads:>7} {ours:>12.3f} {theirs:>15.3f} {ours / theirs:>13.2f}")
    figures: dict = {"images": len(images), "repeats": args.repeats, "settings": rows}
    if args.jpeg_side:
        size, files = max(args.sizes), jpeg_files(images, args.jpeg_side)
        torch.set_num_threads(1)
        pipeline = DecodeThen(pretext_transform(size, args.crop_min_scale))
        ms_per_image(pipeline, files[:16], seed=0)
        cost = statistics.median(ms_per_image(pipeline, files, seed=repeat) for repeat in range(args.repeats))
        print(f"ours at {size} px on {args.jpeg_side}x{args.jpeg_side * 3 // 4} JPEGs, decoding included: {cost:.3f} ms/img "
              f"(one core feeds {1000 / cost:.0f} images/s)")
        figures["jpeg"] = {"side": args.jpeg_side, "size": size, "ms_per_image": cost}
    print(f"load average after: {os.getloadavg()}")
    if args.skip_lightly:
        write_report(args, NAME, None, "none: --skip-lightly times ours alone", figures)
    else:
        write_report(args, NAME, max(row["ours_over_lightly"] for row in rows),
                     "ours / lightly ms per image, the largest over the settings (< 1: ours is faster)", figures)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
