"""Trials for ``fine-tuning.py``: the random (lr, wd) grid, seed repeats, sharding and results.

The paper fine-tunes each backbone on a random grid of 100 (learning rate, weight decay) pairs,
drawn log-uniformly and quantised to the lower bound's step (lr in [1e-4, 1] to multiples of
1e-4, wd in [1e-5, 1e-2] to multiples of 1e-5), and then repeats the best pair with 10 seeds
(BiSSL, arXiv 2410.02387, Sec. 4).

Every trial is a pure function of ``(base_seed, index)`` (:func:`make_trial`), so any process on
any node can compute any trial without communication. Trials are spread round-robin over the
global ranks (:func:`shard_trials`); each finished trial appends one JSON line to
``results.jsonl`` in the run directory (:class:`ResultsFile`), and a rerun of the same command
only runs the trials that have no row yet (:func:`pending_trials`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from source.run.checkpoint import save_figure_atomic

try:  # POSIX only; elsewhere appends still go out as one write call each
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

RESULTS_FILENAME = "results.jsonl"

# Keys every results row carries; rows may hold more.
RESULT_KEYS = (
    "trial",  # trial index in [0, num_runs)
    "seed",  # integer seed the trial was trained with
    "lr",
    "wd",
    "best_val",  # best validation score over epochs (top-1 % or mAP %)
    "best_epoch",  # epoch at which best_val was reached
    "final_val",  # validation score after the last epoch
    "test_final",  # test score of the model after the last epoch
    "test_best",  # test score of the model from best_epoch
    "time_s",  # wall-clock seconds the trial took
)


@dataclass(frozen=True)
class Trial:
    """One fine-tuning run: its index, its seed and its hyperparameters."""

    index: int
    seed: int
    lr: float
    wd: float


def _decimals(step: float) -> int:
    """Number of decimal places needed to write ``step`` exactly as typed (1e-4 -> 4, 2.5e-4 -> 5)."""
    exponent = Decimal(repr(step)).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def quantised_log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Draw ``v`` log-uniformly from ``[low, high]`` and quantise it to the step ``low``.

    ``log v ~ U(log low, log high)``, then ``v_q = round(v / low) * low``, clamped to the
    multiples of ``low`` that lie in ``[low, high]`` and rounded to as many decimals as ``low``
    has, so ``1e-4 * 3`` comes back as ``0.0003`` and not ``0.00030000000000000003``.

    The quantisation follows the original code (``round(value / low) * low``). It makes the
    smallest values coarse: every draw in ``[low, 1.5 low)`` becomes ``low``.

    Args:
        rng: numpy generator that supplies the one uniform draw.
        low: lower bound and quantisation step, > 0.
        high: upper bound, >= low.
    """
    if not (low > 0 and high >= low and math.isfinite(high)):
        raise ValueError(f"need 0 < low <= high < inf for a log-uniform range, got low={low}, high={high}")
    value = math.exp(rng.uniform(math.log(low), math.log(high)))
    # The 1e-9 slack keeps high itself reachable when high / low is an integer up to float noise.
    max_multiple = max(1, math.floor(high / low * (1 + 1e-9)))
    multiple = min(max(1, round(value / low)), max_multiple)
    return round(multiple * low, _decimals(low))


def make_trial(
    index: int,
    base_seed: int,
    use_hpo: bool,
    lr: float,
    wd: float,
    lr_range: tuple[float, float],
    wd_range: tuple[float, float],
) -> Trial:
    """Trial ``index`` of a run: a deterministic function of ``(base_seed, index)`` only.

    The training seed is ``base_seed + index`` in both modes, so repeated runs (``use_hpo``
    False) differ only by seed and a trial can be rerun on its own. With ``use_hpo`` the pair
    (lr, wd) is drawn by :func:`quantised_log_uniform` from ``lr_range`` and ``wd_range`` with a
    generator seeded by ``[base_seed, index]``; otherwise the fixed ``lr`` and ``wd`` are used.
    """
    if index < 0 or base_seed < 0:
        raise ValueError(f"trial index and base seed must be >= 0, got index={index}, base_seed={base_seed}")
    if use_hpo:
        rng = np.random.default_rng([base_seed, index])
        lr = quantised_log_uniform(rng, *lr_range)
        wd = quantised_log_uniform(rng, *wd_range)
    return Trial(index=index, seed=base_seed + index, lr=float(lr), wd=float(wd))


def shard_trials(trial_indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Trials this global ``rank`` runs: every ``world_size``-th of ``trial_indices`` from ``rank``.

    Round-robin over the global rank, so the trials spread evenly over all processes of all nodes
    and together the ranks cover each trial exactly once. Every rank must pass the same list.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(trial_indices)[rank::world_size]


def pending_trials(num_runs: int, finished: set[int]) -> list[int]:
    """Trial indices in ``range(num_runs)`` that have no results row yet, in order."""
    if num_runs < 0:
        raise ValueError(f"--num-runs must be >= 0, got {num_runs}")
    return [index for index in range(num_runs) if index not in finished]


class ResultsFile:
    """JSON-lines file with one row per finished trial (``results.jsonl`` in the run directory).

    Several processes, possibly on several nodes sharing a file system, append to the same file.
    Each row is written with one ``write`` of one complete line in append mode under an exclusive
    ``fcntl.flock`` and then flushed and fsynced, so rows never interleave. A process killed in the
    middle of a write can leave a partial line; the next append starts on a fresh line so that the
    damage stays on that line, and readers skip such lines with a warning (the trial has no row and
    is therefore run again).

    Processes must agree on which trials are pending: read :meth:`finished_trials` on every rank
    before any rank appends (e.g. behind a barrier), or read it on rank 0 and broadcast it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: dict) -> None:
        """Append one results row; it must hold every key in ``RESULT_KEYS`` (extra keys are kept)."""
        missing = [key for key in RESULT_KEYS if key not in row]
        if missing:
            raise ValueError(f"results row is missing keys {missing}; rows need {list(RESULT_KEYS)}")
        line = json.dumps(row) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as file:
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            try:
                # Under the lock, so no other writer can add to the file between the check and the write.
                if file.seek(0, os.SEEK_END) > 0:
                    file.seek(-1, os.SEEK_END)
                    if file.read(1) != b"\n":
                        line = "\n" + line
                file.write(line.encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
            finally:
                if fcntl is not None:
                    fcntl.flock(file.fileno(), fcntl.LOCK_UN)

    def rows(self) -> list[dict]:
        """All complete rows in file order (none if the file does not exist yet).

        Lines that are not a JSON object holding a ``trial`` key (the remains of a killed write)
        are skipped with a warning.
        """
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or "trial" not in row:
                    logger.warning(
                        "%s line %d is not a complete results row (a trial killed while writing?); "
                        "ignoring it, so that trial will be run again: %r",
                        self.path, line_number, line[:200],
                    )
                    continue
                rows.append(row)
        return rows

    def finished_trials(self) -> set[int]:
        """Indices of the trials that have a complete row."""
        return {int(row["trial"]) for row in self.rows()}


def _unique_by_trial(rows: list[dict]) -> list[dict]:
    """One row per trial index (the last one written), sorted by trial index."""
    by_trial = {int(row["trial"]): row for row in rows}
    if len(by_trial) < len(rows):
        logger.warning("results hold %d rows for %d trials; using the last row of each trial", len(rows), len(by_trial))
    return [by_trial[index] for index in sorted(by_trial)]


def _format_score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mean_std(values: list[float | None]) -> str:
    """``mean ± std`` over the values that are present; std is the sample std (ddof=1), 0 for one value."""
    present = np.array([value for value in values if value is not None], dtype=np.float64)
    if present.size == 0:
        return "-"
    std = present.std(ddof=1) if present.size > 1 else 0.0
    return f"{present.mean():.2f} ± {std:.2f}"


def summary_table(rows: list[dict], use_hpo: bool, metric_name: str, top: int = 10) -> str:
    """Human-readable summary of the finished trials (higher ``metric_name`` is better).

    HPO: the ``top`` trials sorted by best validation score, then a line naming the best
    (lr, wd). Seeds: mean ± sample std (ddof=1) over trials of the best validation score, the
    final validation score, and the test score of the final and of the best-validation model.
    If a trial index appears more than once, its last row is used.
    """
    if not rows:
        return "No finished trials."
    rows = _unique_by_trial(rows)
    if use_hpo:
        ranked = sorted(rows, key=lambda row: row["best_val"], reverse=True)
        header = (
            f"{'#':>3} {'trial':>5} {'lr':>8} {'wd':>8} {'best val':>9} {'epoch':>5} "
            f"{'final val':>9} {'test final':>10} {'test best':>9}"
        )
        lines = [f"HPO: {len(rows)} trials, top {min(top, len(rows))} by best validation {metric_name}", header]
        for place, row in enumerate(ranked[:top], start=1):
            lines.append(
                f"{place:>3} {row['trial']:>5} {row['lr']:>8g} {row['wd']:>8g} {_format_score(row['best_val']):>9} "
                f"{row['best_epoch']:>5} {_format_score(row['final_val']):>9} "
                f"{_format_score(row['test_final']):>10} {_format_score(row['test_best']):>9}"
            )
        best = ranked[0]
        lines.append(
            f"Best: lr={best['lr']:g}, wd={best['wd']:g} (trial {best['trial']}, best validation "
            f"{metric_name} {_format_score(best['best_val'])} at epoch {best['best_epoch']})"
        )
        return "\n".join(lines)
    lines = [
        f"Seeds: {len(rows)} trials (seeds {', '.join(str(row['seed']) for row in rows)}), {metric_name} mean ± std",
        f"  best val:                {_mean_std([row['best_val'] for row in rows])}",
        f"  final val:               {_mean_std([row['final_val'] for row in rows])}",
        f"  test (final model):      {_mean_std([row['test_final'] for row in rows])}",
        f"  test (best-val model):   {_mean_std([row['test_best'] for row in rows])}",
    ]
    return "\n".join(lines)


def plot_hpo_grid(rows: list[dict], path: Path, metric_name: str) -> None:
    """Scatter the best validation score over lr (x) and wd (y) on log axes; mark the best trial.

    Uses matplotlib's object-oriented ``Figure`` with the Agg canvas, so no display and no global
    pyplot state is needed. The image is written to a temporary file and renamed into ``path``.
    """
    if not rows:
        raise ValueError("no finished trials to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _unique_by_trial(rows)
    lrs = np.array([row["lr"] for row in rows], dtype=np.float64)
    wds = np.array([row["wd"] for row in rows], dtype=np.float64)
    scores = np.array([row["best_val"] for row in rows], dtype=np.float64)
    best = int(np.nanargmax(scores))

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = axes.scatter(lrs, wds, c=scores, cmap="viridis", s=30, edgecolors="none")
    axes.scatter(lrs[best], wds[best], marker="*", s=250, facecolors="none", edgecolors="red", linewidths=1.5)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("weight decay")
    # The best pair goes in the title rather than a legend, which would cover points of the grid.
    axes.set_title(
        f"Validation {metric_name} over {len(rows)} trials\n"
        f"best (red star): lr={lrs[best]:g}, wd={wds[best]:g}, {metric_name} {scores[best]:.2f}",
        fontsize="medium",
    )
    figure.colorbar(points, ax=axes, label=f"best validation {metric_name}")
    figure.tight_layout()
    save_figure_atomic(figure, path)
