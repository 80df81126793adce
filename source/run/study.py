"""Pieces the experiment studies share (``experiments/bissl_ablation.py``, ``experiments/bissl_dose_response.py``).

A study runs the real entry scripts under torchrun, one stage at a time (``demo.py``'s ``Stages``,
which skips finished stages); what is common beyond that lives here: giving every run its own
model folder with the pre-trained weights, recording how busy the machine was while a stage ran
(a wall time means little without it), the interval of a mean over seeds, and minutes for tables.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from source.run.checkpoint import write_json_atomic

CONFIDENCE = 0.95


def link_pretrained(files: Sequence[str], source_dir: Path, target_dir: Path) -> None:
    """Give a run's model folder the pre-trained weights (hard link, else copy): bissl.py reads
    them from, and writes its outputs to, one --model-dir, and every run needs its own outputs."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        target = target_dir / name
        if target.exists():
            continue
        try:
            os.link(source_dir / name, target)
        except OSError:
            shutil.copy2(source_dir / name, target)


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


class LoadLog:
    """The 1-minute load average when each stage started and ended (``loads.json`` beside the timings).

    Only stages that really run are recorded; a stage skipped on a rerun keeps the load of the run
    that did it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loads: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}

    def start(self, name: str) -> None:
        self.loads[name] = [round(os.getloadavg()[0], 2)]

    def end(self, name: str) -> None:
        self.loads.setdefault(name, []).append(round(os.getloadavg()[0], 2))
        write_json_atomic(self.loads, self.path)

    def describe(self, name: str) -> str:
        """``"1.9-2.3"`` (start-end load) or ``"-"``."""
        values = self.loads.get(name, [])
        return "-".join(f"{value:.1f}" for value in values) if values else "-"


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its 95 % t-interval, mean ± t_{0.975, n−1}·sd/√n
    (NaN bounds for fewer than two values)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if data.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return mean, mean - half, mean + half
