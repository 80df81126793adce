"""How every benchmark ends: its headline ratio printed, and all its figures written as JSON.

A benchmark script calls ``add_json_argument(parser, name)`` when it builds its parser and
``write_report(args, name, ratio, ratio_is, figures)`` at the end. The JSON goes to
``bench/results/<name>.json`` (a ``--quick`` run, which measures nothing, to
``bench/results/quick/<name>.json``) unless ``--json`` names another file. Besides the figures it
records what a measurement needs to be read later: when, the command line, the load average at
the end, the torch version and the host's CPU count.

Imported by the scripts beside it (``python bench/bench_x.py`` puts bench/ first on sys.path).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_json_argument(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", default="", help=f"write the figures to this file (default: bench/results/{name}.json; "
                                                   f"bench/results/quick/{name}.json with --quick)")


def write_report(args: argparse.Namespace, name: str, ratio: float | None, ratio_is: str, figures: dict) -> Path:
    """Print ``ratio`` and write ``figures`` with it to the benchmark's JSON file; return the path.

    ``ratio`` is None when a setting measures none (``ratio_is`` says why). A non-finite ratio is
    written as it is (JSON ``NaN``/``Infinity``) and printed, never hidden: the smoke test
    (tests/test_bench_smoke.py) fails on it."""
    quick = bool(getattr(args, "quick", False))
    path = Path(args.json) if args.json else RESULTS_DIR / ("quick" if quick else "") / f"{name}.json"
    record = {
        "bench": name,
        "ratio": ratio,
        "ratio_is": ratio_is,
        "quick": quick,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    if ratio is None:
        print(f"ratio: {ratio_is}")
    else:
        print(f"ratio {ratio:.3f}: {ratio_is}" + ("" if math.isfinite(ratio) else "   (NOT FINITE)"))
    print(f"figures written to {path}")
    return path
