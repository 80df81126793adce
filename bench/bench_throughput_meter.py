"""The throughput meter (``source.stages.engine.Throughput``) against time measured here.

    python bench/bench_throughput_meter.py [--intervals 20] [--step-ms 50] [--images 10] [--wait-frac 0.25]
    python bench/bench_throughput_meter.py --quick      # under a second: checks that the bench runs

A loop stands in for training: each of ``--intervals`` intervals sleeps ``--step-ms``, adds
``--images`` images with ``--wait-frac`` of the step declared as data wait, and asks the meter for
its interval rates. The same loop is timed here with ``time.monotonic`` around the meter's life.
The ratio is the meter's overall images/s over images / that elapsed time: 1 when the meter's
clock and bookkeeping are right (a little above 1, as this window also holds the meter's own
start-up and last read). The median interval ratio and the data-wait shares are printed beside
it. The unit tests check the meter's arithmetic with a fake clock (tests/test_throughput.py);
this bench checks it against real time, which a busy machine makes too noisy to assert in a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from report import add_json_argument, write_report

from source.stages.engine import Throughput

NAME = "throughput_meter"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", type=int, default=20, help="reports of the meter (default: 20)")
    parser.add_argument("--step-ms", type=float, default=50.0, help="sleep per interval, ms (default: 50)")
    parser.add_argument("--images", type=int, default=10, help="images added per interval (default: 10)")
    parser.add_argument("--wait-frac", type=float, default=0.25, help="share of each step declared as data wait (default: 0.25)")
    parser.add_argument("--quick", action="store_true", help="5 intervals of 10 ms: only checks that the bench runs")
    add_json_argument(parser, NAME)
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.quick:
        args.intervals, args.step_ms = 5, 10.0
    step_s = args.step_ms / 1000
    print(f"{args.intervals} intervals of {args.step_ms:g} ms, {args.images} images each, "
          f"{args.wait_frac:.0%} declared as data wait; load average {os.getloadavg()}")
    interval_ratios, interval_waits = [], []
    start = time.monotonic()
    meter = Throughput()
    for _ in range(args.intervals):
        before = time.monotonic()
        time.sleep(step_s)
        meter.add(args.images, wait_s=args.wait_frac * step_s)
        rates = meter.interval()
        interval_ratios.append(rates["images_per_s"] / (args.images / (time.monotonic() - before)))
        interval_waits.append(rates["data_wait_frac"])
    overall = meter.overall()
    elapsed = time.monotonic() - start
    ratio = overall["images_per_s"] / (args.intervals * args.images / elapsed)
    figures = {
        "elapsed_s": elapsed,
        "meter_images_per_s": overall["images_per_s"],
        "measured_images_per_s": args.intervals * args.images / elapsed,
        "median_interval_ratio": statistics.median(interval_ratios),
        "meter_data_wait_frac": overall["data_wait_frac"],
        "declared_data_wait_frac": args.wait_frac * step_s * args.intervals / elapsed,
        "median_interval_data_wait_frac": statistics.median(interval_waits),
    }
    print(f"  meter {figures['meter_images_per_s']:.1f} images/s, measured here {figures['measured_images_per_s']:.1f} "
          f"(median interval ratio {figures['median_interval_ratio']:.3f})")
    print(f"  data wait: meter {figures['meter_data_wait_frac']:.3f}, declared over the elapsed time "
          f"{figures['declared_data_wait_frac']:.3f}")
    print(f"load average after: {os.getloadavg()}")
    write_report(args, NAME, ratio, "the meter's overall images/s over images / elapsed time measured here (1 = right)", figures)
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
