"""Tests for source/tools/compare.py: paired and Welch statistics against direct formulas, pairing by
seed, refusal of incomparable runs, and the report files."""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import config_default as cfg
from source.run.errors import EXIT_USER_ERROR, run_entry_point
from source.tools.compare import (
    DETECTION_SUMMARY_SETTINGS,
    HPO_SETTINGS,
    NOT_COMPARED,
    SUMMARY_SETTINGS,
    compare_scores,
    get_args_parser,
    load_run,
    main,
    markdown_report,
    paired_difference,
    plot_comparison,
    settings_line,
    welch_difference,
)

BASELINE = [60.1, 58.3, 61.0, 57.5, 59.9, 62.2, 58.8, 60.4]
# Differences of mixed sign and distinct sizes (no ties, no zeros), so the exact tests are unambiguous.
DIFFS = [1.3, -0.4, 2.1, 0.9, -1.6, 3.0, 0.2, 1.8]
OTHER = [a + d for a, d in zip(BASELINE, DIFFS)]


def config(**overrides) -> dict:
    """A fine-tuning config.json as fine-tuning.py writes it (vars(args) of its parser's defaults)."""
    values = {**dataclasses.asdict(cfg.GeneralConfig()), **dataclasses.asdict(cfg.FinetuneConfig()),
              **dataclasses.asdict(cfg.DetectionConfig())}
    values.update(use_hpo=0, dset="fashionmnist", epochs=8, batch_size=50, max_train_samples=200)
    values.update(overrides)
    return values


def write_run(path: Path, scores: dict[int, float], base_seed: int = 0, best: dict[int, float] | None = None,
              failed: tuple[int, ...] = (), **overrides) -> Path:
    """A run dir with one row per seed (trial = seed - base_seed), rows written in reverse order."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config(seed=base_seed, **overrides)))
    lines = []
    for seed, score in sorted(scores.items(), reverse=True):
        lines.append({"trial": seed - base_seed, "seed": seed, "lr": overrides.get("lr", 0.03), "wd": 5e-4,
                      "status": "ok", "best_val": score - 1, "best_epoch": 8, "final_val": score - 1,
                      "test_final": score, "test_best": (best or scores)[seed], "time_s": 1.0, "metric": "top1"})
    for index in failed:
        lines.append({"trial": index, "seed": base_seed + index, "lr": 0.03, "wd": 5e-4, "status": "failed",
                      "best_val": None, "best_epoch": None, "final_val": None, "test_final": None, "test_best": None,
                      "time_s": 1.0, "error": "loss is nan"})
    (path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_settings_are_real_fine_tuning_flags():
    flags = set(config())
    assert set(NOT_COMPARED + HPO_SETTINGS + SUMMARY_SETTINGS + DETECTION_SUMMARY_SETTINGS) <= flags


def test_detection_runs_state_the_detectors_sizes_not_the_pretraining_crop(tmp_path):
    detection = load_run(write_run(tmp_path / "det", {0: 50.0}, dset="fmnistdet", det_min_size=128, det_max_size=160))
    assert "det-min-size 128, det-max-size 160" in settings_line(detection)
    assert "pretrain-img-size" not in settings_line(detection)
    assert "pretrain-img-size" in settings_line(load_run(write_run(tmp_path / "cls", {0: 50.0})))


def test_paired_t_interval_and_p_value_match_the_formula():
    diff = paired_difference(dict(enumerate(BASELINE)), dict(enumerate(OTHER)))
    d = np.array(DIFFS)
    n = d.size
    se = d.std(ddof=1) / math.sqrt(n)
    t = d.mean() / se
    half = stats.t.ppf(0.975, n - 1) * se
    assert diff.test == "paired" and diff.n == n
    assert diff.mean == pytest.approx(d.mean(), abs=1e-12)
    assert diff.ci_low == pytest.approx(d.mean() - half, rel=1e-9)
    assert diff.ci_high == pytest.approx(d.mean() + half, rel=1e-9)
    assert diff.p_value == pytest.approx(2 * stats.t.sf(abs(t), n - 1), rel=1e-9)
    # Not the unpaired answer: pairing removes the seed-to-seed spread of the baseline.
    assert diff.p_value != pytest.approx(welch_difference(BASELINE, OTHER).p_value, rel=1e-3)


def test_wilcoxon_and_sign_test_match_exact_enumeration():
    diff = paired_difference(dict(enumerate(BASELINE)), dict(enumerate(OTHER)))
    d = np.array(DIFFS)
    ranks = stats.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    # Exact null distribution of W+: every sign pattern of the ranks is equally likely.
    null = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=d.size)])
    p_exact = min(1.0, 2 * min((null <= w_plus).mean(), (null >= w_plus).mean()))
    assert diff.p_wilcoxon == pytest.approx(p_exact, rel=1e-9)
    positives, n = int((d > 0).sum()), d.size
    tail = sum(math.comb(n, k) for k in range(0, min(positives, n - positives) + 1)) / 2**n
    assert diff.p_sign == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_welch_interval_and_p_value_match_the_formula():
    a = np.array(BASELINE)
    b = np.array([63.0, 61.2, 66.4, 59.9, 64.1])  # different size and spread
    diff = welch_difference(a, b)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    mean = b.mean() - a.mean()
    half = stats.t.ppf(0.975, df) * se
    assert diff.test == "welch" and diff.n == a.size + b.size
    assert diff.mean == pytest.approx(mean, rel=1e-12)
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(mean - half, rel=1e-9), pytest.approx(mean + half, rel=1e-9))
    assert diff.p_value == pytest.approx(2 * stats.t.sf(abs(mean / se), df), rel=1e-9)


def test_degenerate_inputs_give_no_interval_instead_of_failing():
    one = paired_difference({0: 50.0}, {0: 52.0})
    assert one.mean == 2.0 and math.isnan(one.ci_low) and math.isnan(one.p_value)
    same = paired_difference({0: 50.0, 1: 51.0}, {0: 52.0, 1: 53.0})  # every seed +2: zero spread
    assert same.mean == pytest.approx(2.0) and same.ci_low == same.ci_high == pytest.approx(2.0)
    zero = paired_difference({0: 50.0, 1: 51.0}, {0: 50.0, 1: 51.0})
    assert zero.mean == 0.0 and zero.p_wilcoxon == zero.p_sign == 1.0 and math.isnan(zero.p_value)


def test_runs_are_paired_by_seed_not_by_row_order(tmp_path):
    baseline = write_run(tmp_path / "pretext", {seed: BASELINE[seed] for seed in range(8)})
    # Seeds 2..9: only 2..7 are shared; the file lists them in reverse order.
    other_scores = {seed: BASELINE[seed] + DIFFS[seed] for seed in range(2, 8)} | {8: 99.0, 9: 1.0}
    other = write_run(tmp_path / "bissl", other_scores, base_seed=0, backbone_origin="bissl",
                      pretrained_backbone_filename="BiSSL-backbone.pth", lr=0.05)
    runs = [load_run(baseline), load_run(other)]
    diff = compare_scores(runs[0].scores("test_final"), runs[1].scores("test_final"))
    assert diff.test == "paired" and diff.seeds == list(range(2, 8))
    assert diff.mean == pytest.approx(np.mean(DIFFS[2:8]), abs=1e-9)
    report = markdown_report(runs)
    assert "paired t | 6 |" in report and f"{np.mean(DIFFS[2:8]):+.2f}" in report
    # The best-val model is the final one in every trial here: one row instead of two equal ones.
    assert report.count("| bissl | final = best-val | paired t |") == 1 and "| bissl | best-val |" not in report


def test_runs_without_shared_seeds_use_welch(tmp_path):
    baseline = write_run(tmp_path / "a", {seed: BASELINE[seed] for seed in range(8)})
    other = write_run(tmp_path / "b", {100 + i: v for i, v in enumerate(OTHER)}, base_seed=100)
    runs = [load_run(baseline), load_run(other)]
    diff = compare_scores(runs[0].scores("test_final"), runs[1].scores("test_final"))
    assert diff.test == "welch"
    assert diff.p_value == pytest.approx(stats.ttest_ind(OTHER, BASELINE, equal_var=False).pvalue, rel=1e-9)


def test_mismatched_runs_are_refused_naming_the_settings(tmp_path, capsys):
    scores = {seed: BASELINE[seed] for seed in range(8)}
    baseline = write_run(tmp_path / "a", scores)
    longer = write_run(tmp_path / "b", scores, epochs=10, max_eval_samples=500)
    with pytest.raises(ValueError, match="--epochs: 8 in a, 10 in b") as error:
        markdown_report([load_run(baseline), load_run(longer)])
    assert "--max-eval-samples" in str(error.value) and "--batch-size" not in str(error.value)
    with pytest.raises(SystemExit) as exit_info:  # what `python -m source.tools.compare a b` does
        run_entry_point(main, get_args_parser(), [str(baseline), str(longer)])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: these runs were fine-tuned under different settings") and "--epochs" in err
    # The backbone and the (lr, wd) pair are what a comparison varies: allowed.
    other = write_run(tmp_path / "c", scores, backbone_origin="bissl", pretrained_backbone_filename="x.pth", lr=0.1, wd=1e-3)
    assert "(baseline)" in markdown_report([load_run(baseline), load_run(other)])
    # A setting the comparison does not know (a flag added later) is compared too; a run that
    # predates a flag counts as having its default.
    newer = write_run(tmp_path / "d", scores, some_new_flag=1)
    with pytest.raises(ValueError, match="--some-new-flag: None in a, 1 in d"):
        markdown_report([load_run(baseline), load_run(newer)])
    older = write_run(tmp_path / "e", scores)
    config_path = older / "config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items() if k != "optimizer_momentum"}))
    assert "(baseline)" in markdown_report([load_run(baseline), load_run(older)])


def test_recorded_input_hashes_other_than_the_backbone_must_agree(tmp_path):
    scores = {seed: BASELINE[seed] for seed in range(8)}
    backbone, split = "content of --pretrained-backbone-filename", "content of the train split file"
    baseline = write_run(tmp_path / "a", scores, inputs={backbone: "1" * 64, split: "2" * 64})
    same_backbone = write_run(tmp_path / "b", scores, inputs={backbone: "1" * 64, split: "2" * 64})
    other_split = write_run(tmp_path / "c", scores, inputs={backbone: "3" * 64, split: "4" * 64})
    report = markdown_report([load_run(baseline), load_run(same_backbone)])
    assert "a, b fine-tuned byte-identical backbone files (sha256 111111111111...)" in report
    with pytest.raises(ValueError, match="content of the train split file: sha256 222222222222... in a, sha256 444444444444... in c"):
        markdown_report([load_run(baseline), load_run(other_split)])
    older = write_run(tmp_path / "d", scores)  # predates the record: not checked
    assert "byte-identical" not in markdown_report([load_run(baseline), load_run(older)])


def test_failed_trials_are_left_out(tmp_path):
    run = load_run(write_run(tmp_path / "a", {0: 50.0, 1: 52.0}, failed=(2,)))
    assert run.failed == 1 and sorted(run.scores("test_final")) == [0, 1]


def test_command_writes_markdown_csv_and_figure(tmp_path, capsys):
    baseline = write_run(tmp_path / "pretext", {seed: BASELINE[seed] for seed in range(8)})
    other = write_run(tmp_path / "bissl", {seed: OTHER[seed] for seed in range(8)},
                      best={seed: OTHER[seed] - 1 for seed in range(8)})
    out = tmp_path / "out"
    code = main(get_args_parser().parse_args([str(baseline), str(other), "--labels", "SimCLR,BiSSL", "--markdown",
                                              str(out / "t.md"), "--csv", str(out / "t.csv"), "--figure", str(out / "f.png")]))
    assert code == 0
    printed = capsys.readouterr().out
    assert "| SimCLR (baseline) |" in printed and (out / "t.md").read_text().strip() in printed
    assert "| BiSSL | final | paired t |" in printed and "| BiSSL | best-val | paired t |" in printed
    rows = list(csv.DictReader((out / "t.csv").open()))
    assert [(row["label"], row["model"]) for row in rows] == [("SimCLR", "final"), ("SimCLR", "best-val"),
                                                               ("BiSSL", "final"), ("BiSSL", "best-val")]
    assert float(rows[2]["difference"]) == pytest.approx(np.mean(DIFFS))
    assert float(rows[3]["difference"]) == pytest.approx(np.mean(DIFFS) - 1)
    assert rows[2]["test"] == "paired" and rows[0]["difference"] == ""
    assert (out / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hpo_runs_report_best_pair_and_top_k_spread(tmp_path):
    path = tmp_path / "hpo"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config(use_hpo=1)))
    vals = [40.0, 55.0, 52.0, 61.0, 47.0, 58.0]
    rows = [{"trial": i, "seed": i, "lr": 0.01 * (i + 1), "wd": 1e-4, "status": "ok", "best_val": v, "best_epoch": 3,
             "final_val": v, "test_final": v - 2, "test_best": v - 1, "time_s": 1.0} for i, v in enumerate(vals)]
    (path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = markdown_report([load_run(path)], top_k=3)
    top = np.array([61.0, 58.0, 55.0])
    assert "| hpo | pretext: pretext_simclr_arch-resnet50_bb.pth | 6 | 0.04 | 0.0001 | 61.00 | 59.00 | 60.00 |" in report
    assert f"{top.mean():.2f} ± {top.std(ddof=1):.2f} | 55.00–61.00 |" in report
    assert plot_comparison([load_run(path)], tmp_path / "hpo.png").is_file()
