"""Tests for source/stages/hpo.py: the random (lr, wd) grid, trial sharding, the results file, reports."""
from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kstest

from source.stages.hpo import (
    RESULT_KEYS,
    ResultsFile,
    Trial,
    make_trial,
    pending_trials,
    plot_hpo_grid,
    quantised_log_uniform,
    shard_trials,
    summary_table,
)

LR_RANGE = (1e-4, 1.0)
WD_RANGE = (1e-5, 1e-2)


def hpo_trial(index: int, base_seed: int = 0) -> Trial:
    return make_trial(index, base_seed, use_hpo=True, lr=0.1, wd=1e-3, lr_range=LR_RANGE, wd_range=WD_RANGE)


def row_for(trial: int, **overrides) -> dict:
    row = {
        "trial": trial, "seed": trial, "lr": 0.01, "wd": 1e-4, "best_val": 50.0, "best_epoch": 3,
        "final_val": 49.0, "test_final": 48.0, "test_best": 47.0, "time_s": 1.5,
    }
    row.update(overrides)
    return row


# ---------------------------------------------------------------- sampling


def test_draws_lie_in_range_and_are_quantised():
    trials = [hpo_trial(index) for index in range(500)]
    for trial in trials:
        for value, (low, high), decimals in ((trial.lr, LR_RANGE, 4), (trial.wd, WD_RANGE, 5)):
            assert low <= value <= high
            multiple = value / low
            assert abs(multiple - round(multiple)) < 1e-9
            # No float noise: the value is exactly what typing it with `decimals` digits gives.
            assert value == round(value, decimals)


def test_quantisation_follows_round_value_over_low():
    """The value is round(v / low) * low for the log-uniform draw v the same generator state gives."""
    for seed in range(50):
        low, high = WD_RANGE
        value = quantised_log_uniform(np.random.default_rng(seed), low, high)
        raw = math.exp(np.random.default_rng(seed).uniform(math.log(low), math.log(high)))
        assert value == pytest.approx(round(raw / low) * low, rel=1e-12, abs=0)


def test_quantisation_keeps_bounds_reachable_and_clamped():
    # A range one step wide can only give its two ends.
    rng = np.random.default_rng(0)
    values = {quantised_log_uniform(rng, 0.5, 1.0) for _ in range(200)}
    assert values == {0.5, 1.0}
    assert quantised_log_uniform(rng, 1e-4, 1e-4) == 1e-4
    # 0.25 is not a multiple of 0.1: draws stay inside [0.1, 0.25], so 0.3 never appears.
    values = {quantised_log_uniform(rng, 0.1, 0.25) for _ in range(200)}
    assert values == {0.1, 0.2}


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-1e-4, 1.0), (1.0, 0.5), (1e-4, math.inf)])
def test_bad_range_raises(low, high):
    with pytest.raises(ValueError, match="low"):
        quantised_log_uniform(np.random.default_rng(0), low, high)


def _ks_pvalue(values: np.ndarray, low: float, high: float) -> float:
    """KS test of log(values) against U(log low, log high)."""
    return kstest(np.log(values), "uniform", args=(math.log(low), math.log(high) - math.log(low))).pvalue


def test_draws_are_log_uniform():
    # The rounding to multiples of `low` shifts the CDF by at most log(1.5)/log(high/low) (4% for lr,
    # 6% for wd) near the lower end. At a few hundred draws that is well below what KS can see, while
    # a sampler that is not log-uniform is rejected by orders of magnitude. Over 200 base seeds none
    # of these sample sizes gave p < 1e-3.
    trials = [hpo_trial(index, base_seed=1) for index in range(300)]
    lrs = np.array([trial.lr for trial in trials])
    wds = np.array([trial.wd for trial in trials[:200]])
    assert _ks_pvalue(lrs, *LR_RANGE) > 1e-3
    assert _ks_pvalue(wds, *WD_RANGE) > 1e-3
    # The median of a log-uniform draw on [1e-4, 1] is 1e-2; a uniform draw's would be ~0.5.
    assert 10 ** -2.5 < np.median(lrs) < 10 ** -1.5

    # The same test rejects a plainly uniform sampler with the same quantisation.
    rng = np.random.default_rng(1)
    low, high = LR_RANGE
    uniform = np.array([max(1, round(rng.uniform(low, high) / low)) * low for _ in range(300)])
    assert _ks_pvalue(uniform, low, high) < 1e-10
    # ... and a log-uniform sampler on the wrong (narrower) range.
    narrow = np.array([quantised_log_uniform(rng, 1e-3, 1.0) for _ in range(300)])
    assert _ks_pvalue(narrow, low, high) < 1e-10


def test_trials_are_deterministic_and_differ():
    assert hpo_trial(7, base_seed=3) == hpo_trial(7, base_seed=3)
    pairs = {(trial.lr, trial.wd) for trial in (hpo_trial(index, base_seed=3) for index in range(50))}
    assert len(pairs) >= 45  # a few repeats are expected: 4% of lr draws round to 1e-4 alone
    other_seed = [(hpo_trial(index, base_seed=4).lr, hpo_trial(index, base_seed=4).wd) for index in range(50)]
    same_seed = [(hpo_trial(index, base_seed=3).lr, hpo_trial(index, base_seed=3).wd) for index in range(50)]
    assert sum(a == b for a, b in zip(other_seed, same_seed)) <= 2
    assert [hpo_trial(index, base_seed=3).seed for index in range(5)] == [3, 4, 5, 6, 7]


def test_fixed_hyperparameters_without_hpo():
    trials = [
        make_trial(index, 10, use_hpo=False, lr=0.03, wd=5e-4, lr_range=LR_RANGE, wd_range=WD_RANGE)
        for index in range(10)
    ]
    assert all(trial.lr == 0.03 and trial.wd == 5e-4 for trial in trials)
    assert [trial.seed for trial in trials] == list(range(10, 20))
    assert [trial.index for trial in trials] == list(range(10))


def test_negative_index_or_seed_raises():
    with pytest.raises(ValueError, match="index"):
        hpo_trial(-1)
    with pytest.raises(ValueError, match="base_seed"):
        hpo_trial(0, base_seed=-2)


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("finished", [set(), {0, 3, 4, 9}])
def test_sharding_covers_every_pending_trial_once(world_size, finished):
    pending = pending_trials(10, finished)
    assert pending == [index for index in range(10) if index not in finished]
    shards = [shard_trials(pending, rank, world_size) for rank in range(world_size)]
    assigned = [index for shard in shards for index in shard]
    assert sorted(assigned) == pending
    assert len(assigned) == len(set(assigned))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_sharding_is_round_robin():
    assert shard_trials([0, 1, 2, 3, 4, 5, 6], 1, 3) == [1, 4]
    assert shard_trials([2, 5, 8], 2, 4) == [8]
    assert shard_trials([2, 5, 8], 3, 4) == []
    with pytest.raises(ValueError, match="rank"):
        shard_trials([0, 1], 2, 2)


# ---------------------------------------------------------------- results file


def _append_rows(path: str, writer: int, count: int) -> None:
    results = ResultsFile(Path(path))
    for number in range(count):
        # A long extra field makes each line larger than one page-sized write would need to be atomic alone.
        results.append(row_for(writer * 1000 + number, note="x" * 5000))


@pytest.mark.multiprocess
def test_concurrent_appends_all_land_intact(tmp_path):
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_rows, args=(str(path), writer, 25)) for writer in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 100
    rows = [json.loads(line) for line in lines]  # every line is a complete row
    assert all(row["note"] == "x" * 5000 for row in rows)
    expected = {writer * 1000 + number for writer in range(4) for number in range(25)}
    assert ResultsFile(path).finished_trials() == expected


def test_truncated_last_line_is_ignored_and_next_append_is_clean(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    results = ResultsFile(path)
    assert results.rows() == [] and results.finished_trials() == set()
    results.append(row_for(0))
    results.append(row_for(1))
    with open(path, "a") as file:  # what a process killed in the middle of its write leaves behind
        file.write(json.dumps(row_for(2))[:40])
    with caplog.at_level("WARNING"):
        assert results.finished_trials() == {0, 1}
    assert "line 3" in caplog.text
    # Trial 2 is pending again; the row written after the damage is read back.
    assert pending_trials(4, results.finished_trials()) == [2, 3]
    results.append(row_for(2, best_val=61.0))
    assert results.finished_trials() == {0, 1, 2}
    assert results.rows()[-1]["best_val"] == 61.0


def test_append_rejects_incomplete_rows(tmp_path):
    row = row_for(0)
    del row["test_best"]
    with pytest.raises(ValueError, match="test_best"):
        ResultsFile(tmp_path / "results.jsonl").append(row)
    assert set(RESULT_KEYS) == set(row_for(0))


# ---------------------------------------------------------------- reports


def test_summary_table_hpo_names_the_best_pair():
    rows = [
        row_for(0, lr=0.1, wd=1e-4, best_val=60.0),
        row_for(1, lr=0.0123, wd=0.00456, best_val=75.5, best_epoch=17),
        row_for(2, lr=0.5, wd=1e-5, best_val=40.0),
    ]
    table = summary_table(rows, use_hpo=True, metric_name="top1", top=2)
    assert "Best: lr=0.0123, wd=0.00456" in table
    assert "75.50 at epoch 17" in table
    assert "40.00" not in table  # only the top 2 are listed
    body = table.splitlines()
    assert body[2].split()[:2] == ["1", "1"] and body[3].split()[:2] == ["2", "0"]


def test_summary_table_seeds_mean_and_std():
    rows = [
        row_for(0, seed=0, best_val=70.0, final_val=68.0, test_final=66.0, test_best=67.0),
        row_for(1, seed=1, best_val=72.0, final_val=70.0, test_final=69.0, test_best=68.0),
        row_for(2, seed=2, best_val=74.0, final_val=75.0, test_final=72.0, test_best=66.0),
    ]
    table = summary_table(rows, use_hpo=False, metric_name="top1")
    # best val: mean 72, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2
    assert "best val:                72.00 ± 2.00" in table
    # final val: mean 71, deviations -3, -1, 4 -> sqrt(26 / 2) = 3.61
    assert "final val:               71.00 ± 3.61" in table
    # test final: mean 69, deviations -3, 0, 3 -> sqrt(18 / 2) = 3
    assert "test (final model):      69.00 ± 3.00" in table
    # test best: mean 67, deviations 0, 1, -1 -> 1
    assert "test (best-val model):   67.00 ± 1.00" in table
    assert summary_table([], use_hpo=False, metric_name="top1") == "No finished trials."


def test_summary_uses_one_row_per_trial():
    rows = [row_for(0, best_val=10.0), row_for(1, best_val=20.0), row_for(0, best_val=30.0)]
    table = summary_table(rows, use_hpo=False, metric_name="map")
    assert "2 trials" in table
    assert "25.00 ± 7.07" in table  # mean and std of 30 and 20


def test_plot_is_written(tmp_path):
    rows = [
        row_for(index, lr=trial.lr, wd=trial.wd, best_val=float(index))
        for index, trial in enumerate(hpo_trial(index) for index in range(12))
    ]
    path = tmp_path / "plots" / "hpo_grid.png"
    plot_hpo_grid(rows, path, "top1")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    assert not (path.parent / "hpo_grid.png.tmp").exists()
    with pytest.raises(ValueError, match="no finished trials"):
        plot_hpo_grid([], path, "top1")
