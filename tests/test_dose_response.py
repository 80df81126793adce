"""The dose-response study: its grid, its summary, and that a study stopped between stages reruns only what is missing."""
from __future__ import annotations

import csv
import io

import pytest
import torch

from source.run.errors import ConfigError
from source.run.scripts import load_script
from source.run.study import mean_interval
from tests.script_helpers import ROOT, make_image_folder, write_random_pretext_weights


@pytest.fixture(scope="module")
def study():
    return load_script(ROOT / "experiments" / "bissl_dose_response.py")


def test_points_expand_to_their_product_in_order_without_repeats(study):
    points = study.parse_points("sgd:0.05:0.1/1:12, lars:0.2/1:1:12/48,sgd:0.05:1:12")
    assert [p.name for p in points] == [
        "sgd-lr0.05_lam0.1_alt12", "sgd-lr0.05_lam1_alt12",
        "lars-lr0.2_lam1_alt12", "lars-lr0.2_lam1_alt48", "lars-lr1_lam1_alt12", "lars-lr1_lam1_alt48"]
    assert points[0].bissl_flags(4, 0) == ["--p-optimizer", "sgd", "--p-lr", 0.05, "--lam", 0.1, "--epochs", 12,
                                           "--lower-num-iter", 4]
    for bad, message in (("adam:0.1:1:3", "unknown lower optimizer 'adam'"), ("sgd:0.1:1", "optimizer:lr:lam:alternations"),
                         ("sgd:x:1:3", "must be numbers"), ("sgd:0.1:0:3", "> 0"), (",", "no grid point")):
        with pytest.raises(ConfigError, match=message):
            study.parse_points(bad)


def test_mean_interval_is_the_t_interval():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    # sd = 1, t_{0.975, 2} = 4.302653: half-width 4.302653 / sqrt(3) = 2.484138
    assert mean == 2.0 and low == pytest.approx(2.0 - 2.484138, abs=1e-6) and high == pytest.approx(2.0 + 2.484138, abs=1e-6)
    assert mean_interval([5.0])[0] == 5.0 and all(v != v for v in mean_interval([5.0])[1:])


def test_movement_is_relative_to_the_pretrained_parameters_only(study, tmp_path):
    start = {"conv.weight": torch.tensor([3.0, 4.0]), "bn.running_mean": torch.tensor([100.0]), "bn.num_batches_tracked": torch.tensor(7)}
    moved = {"conv.weight": torch.tensor([3.0, 4.5]), "bn.running_mean": torch.tensor([0.0]), "bn.num_batches_tracked": torch.tensor(9)}
    torch.save(start, tmp_path / "a.pth")
    torch.save(moved, tmp_path / "b.pth")
    assert study.backbone_movement(tmp_path / "b.pth", tmp_path / "a.pth") == pytest.approx(0.5 / 5.0)


def test_summary_pairs_bissl_with_its_control_by_seed(study):
    point = study.Point("sgd", 0.05, 1.0, 2)
    measured = [{"point": point.name, "kind": kind, "seed": seed, "knn_val_top1": 0.0, "linear_val_top1": 0.0,
                 "knn_test_top1": value, "linear_test_top1": value, "moved": 0.01, "final_gap": 1.0, "prox_ratio": 0.5, "wall_s": 60.0, "load": "2.0-2.0",
                 "upper_knn_test_top1": value + 5 if kind == "bissl" and seed < 2 else float("nan"), "upper_linear_test_top1": float("nan")}
                for kind, values in (("bissl", (60.0, 62.0, 64.0)), ("control", (50.0, 51.0, 52.0))) for seed, value in enumerate(values)]
    bissl, control = study.summary_rows([point], measured, lower_steps=4)
    # per-seed differences 10, 11, 12: mean 11, sd 1, 95 % CI 11 ± 2.484
    assert bissl["BiSSL − control, kNN test"] == "+11.00 [+8.52, +13.48]"
    assert bissl["knn_test_top1"] == "62.00 [57.03, 66.97]" and control["final ‖θ_P − θ_D‖"] == "-"
    assert bissl["lower steps"] == "8" and bissl["moved from pre-trained (%)"] == "1.000 [1.000, 1.000]"
    assert control["BiSSL − control, kNN test"] == "" and bissl["wall (min, mean)"] == "1.0"
    # the upper backbone probed for two of the three seeds (65, 67): said so; not at all: '-'
    assert bissl["upper backbone θ_D, knn_test_top1"] == "66.00 [53.29, 78.71] (n = 2)" and bissl["upper backbone θ_D, linear_test_top1"] == "-"
    assert control["upper backbone θ_D, knn_test_top1"] == "-"
    assert not [column for column in bissl if "|" in column]  # a '|' in a header would split its markdown column


def _study_args(study, out_dir, data_dir, models):
    flags = ["--scale", "paper", "--out-dir", str(out_dir), "--model-dir", str(models), "--data-dir", str(data_dir),
             "--dset", "imagefolder", "--arch", "resnet18", "--points", "sgd:0.05:1:1", "--seeds", "1", "--nproc", "1",
             "--lower-steps", "1", "--upper-steps", "1",
             "--bissl-args", "--p-dset imagefolder --img-size 16 --p-mlp 32-16 --cg-iter-num 1 --d-linear-warmup-epochs 1 "
                             "--p-batch-size 8 --d-batch-size 8 --num-workers 0",
             "--probe-args", "--img-size 16 --num-workers 0 --batch-size 16"]
    return study.get_args_parser().parse_args(flags)


def _scores(out_dir):
    """The table's measured values (wall time and load vary between runs)."""
    rows = list(csv.DictReader(io.StringIO((out_dir / "dose_response.csv").read_text())))
    return [{key: value for key, value in row.items() if key not in ("wall_s", "load")} for row in rows]


def test_the_figure_draws_one_curve_per_shared_setting_along_lam_and_along_alternations(study, tmp_path):
    points = study.parse_points("sgd:0.05:1/0.001:6,sgd:0.05:1:12/3,lars:1:1:6")
    along_lam = study.curves(points, "lam")
    assert {label: [p.lam for p in members] for label, members in along_lam.items()} == {
        "sgd lr 0.05, T 6": [0.001, 1.0], "sgd lr 0.05, T 12": [1.0], "sgd lr 0.05, T 3": [1.0], "lars lr 1, T 6": [1.0]}
    along_alternations = study.curves(points, "alternations")
    assert {label: [p.alternations for p in members] for label, members in along_alternations.items()} == {
        "sgd lr 0.05, λ 1": [3, 6, 12], "sgd lr 0.05, λ 0.001": [6], "lars lr 1, λ 1": [6]}
    measured = [{"point": point.name, "kind": kind, "seed": seed, "knn_test_top1": 60.0 + seed, "linear_test_top1": 70.0 - seed,
                 "moved": 0.01 * (seed + 1)} for point in points for kind in study.KINDS for seed in range(2)]
    figure = study.plot(points, measured, {"knn_test_top1": 58.0, "linear_test_top1": 68.0}, tmp_path / "dose_response.png")
    assert figure.is_file() and figure.stat().st_size > 10_000


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_a_stopped_study_reruns_only_the_missing_stages_and_ends_with_the_same_table(study, tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=12, size=16)
    models = tmp_path / "pretrained"
    models.mkdir()
    write_random_pretext_weights(models)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    study.main(_study_args(study, whole, images, models))
    assert (whole / "dose_response.png").is_file() and "no-upper control" in (whole / "dose_response.md").read_text()

    ran: list[str] = []
    original = study.demo.Stages.run

    def stop_after_first_bissl(self, name, command, done, tag="demo"):
        original(self, name, command, done, tag)
        ran.append(name)
        if name.endswith("bissl-seed0: BiSSL"):
            raise KeyboardInterrupt  # as a Ctrl-C between two stages

    monkeypatch.setattr(study.demo.Stages, "run", stop_after_first_bissl)
    with pytest.raises(KeyboardInterrupt):
        study.main(_study_args(study, stopped, images, models))
    assert ran == ["pretrained: probe", "sgd-lr0.05_lam1_alt1/bissl-seed0: BiSSL"]

    ran.clear()
    skipped: list[str] = []

    def record(self, name, command, done, tag="demo"):
        (skipped if done.exists() and name in self.timings else ran).append(name)
        original(self, name, command, done, tag)

    monkeypatch.setattr(study.demo.Stages, "run", record)
    study.main(_study_args(study, stopped, images, models))
    assert skipped == ["pretrained: probe", "sgd-lr0.05_lam1_alt1/bissl-seed0: BiSSL"]
    assert ran == ["sgd-lr0.05_lam1_alt1/bissl-seed0: probe", "sgd-lr0.05_lam1_alt1/bissl-seed0: upper probe",
                   "sgd-lr0.05_lam1_alt1/control-seed0: BiSSL", "sgd-lr0.05_lam1_alt1/control-seed0: probe"]  # no upper probe: no upper level
    assert _scores(stopped) == _scores(whole)
