"""The benefit study (experiments/bissl_benefit.py): its arms, its budget arithmetic and its paired table."""
from __future__ import annotations

import json

import pytest

from source.run.errors import ConfigError
from source.run.scripts import load_script
from tests.script_helpers import ROOT


@pytest.fixture(scope="module")
def benefit():
    return load_script(ROOT / "experiments" / "bissl_benefit.py")


def _benefit(benefit, tmp_path, *flags):
    return benefit.Benefit(benefit.get_args_parser().parse_args(["--out-dir", str(tmp_path), *flags]))


def test_budget_epochs_hold_the_upper_levels_samples(benefit):
    # 12 alternations x 4 upper steps x batch 64 = 3,072 samples of 200 labels: 15.36 epochs -> 16
    assert benefit.budget_epochs({"epochs": 12, "upper_num_iter": 4, "d_batch_size": 64, "d_max_train_samples": 200}) == 16
    assert benefit.budget_epochs({"epochs": 5, "upper_num_iter": 2, "d_batch_size": 20, "d_max_train_samples": 200}) == 1
    with pytest.raises(ConfigError, match="--budget-epochs"):
        benefit.budget_epochs({"epochs": 12, "upper_num_iter": 4, "d_batch_size": 64, "d_max_train_samples": 0})


def test_epochs_and_point_are_checked(benefit, tmp_path):
    assert _benefit(benefit, tmp_path, "--point", "sgd:0.05:1:12", "--epochs", "30, 8,30").epochs == [8, 30]
    for bad in ("", "0", "a"):
        with pytest.raises(ConfigError, match="--epochs"):
            _benefit(benefit, tmp_path, "--point", "sgd:0.05:1:12", "--epochs", bad)
    with pytest.raises(ConfigError, match="ONE grid point"):
        _benefit(benefit, tmp_path, "--point", "sgd:0.05:0.1/1:12")


def test_each_arm_fine_tunes_its_backbone_and_only_the_budget_arm_longer(benefit, tmp_path):
    study = _benefit(benefit, tmp_path, "--point", "sgd:0.05:1:12", "--seeds", "4", "--bissl-seed", "1")
    commands = {arm.name: study.finetune_command(30, arm, budget=16) for arm in benefit.ARMS}

    def flag(command, name):
        return command[len(command) - 1 - command[::-1].index(name) + 1]  # the last occurrence counts in argparse

    runs = tmp_path / "runs" / "sgd-lr0.05_lam1_alt12"
    assert flag(commands["pretrained"], "--model-dir") == str(tmp_path / "models")
    assert flag(commands["control"], "--model-dir") == str(runs / "control-seed1" / "models")
    assert flag(commands["bissl"], "--model-dir") == str(runs / "bissl-seed1" / "models")
    assert flag(commands["bissl"], "--pretrained-backbone-filename") == flag(commands["control"], "--pretrained-backbone-filename")
    assert {name: flag(command, "--epochs") for name, command in commands.items()} == {
        "pretrained": "30", "pretrained+budget": "46", "control": "30", "bissl": "30"}
    assert {flag(command, "--num-runs") for command in commands.values()} == {"4"}
    assert {flag(command, "--seed") for command in commands.values()} == {"0"}  # paired: the same seeds 0..3
    assert {flag(command, "--backbone-origin") for command in commands.values()} == {"pretext", "bissl"}
    assert flag(commands["bissl"], "--run-dir").endswith("benefit/sgd-lr0.05_lam1_alt12/bissl-seed1/e30/bissl")


def _fake_run(path, scores):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"use_hpo": 0}))
    rows = [{"trial": seed, "seed": seed, "status": "ok", "test_final": final, "test_best": final - 1.0, "best_val": 0.0,
             "time_s": 60.0 * (seed + 1)}
            for seed, final in enumerate(scores)]
    (path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_report_pairs_bissl_with_every_other_backbone_by_seed(benefit, tmp_path):
    study = _benefit(benefit, tmp_path, "--seeds", "3", "--epochs", "30")
    values = {"pretrained": (70.0, 71.0, 72.0), "pretrained+budget": (71.0, 71.0, 71.0), "control": (69.0, 70.0, 71.0),
              "bissl": (72.0, 74.0, 76.0)}
    for arm in benefit.ARMS:
        _fake_run(study.run_dir(30, arm), values[arm.name])
    bissl_models = study.study.run_dir(study.runs["bissl"]) / "models"
    bissl_models.mkdir(parents=True)
    (bissl_models / study.study.bissl_config).write_text(json.dumps(
        {"epochs": 12, "lower_num_iter": 4, "upper_num_iter": 4, "d_batch_size": 64, "d_max_train_samples": 200}))
    text = benefit.report(study, budget=16, started=0.0)
    rows = {row["backbone"]: row for row in benefit.summary(
        {(30, arm.name, key): dict(enumerate(v if key == "test_final" else [x - 1.0 for x in v]))
         for arm in benefit.ARMS for v in [values[arm.name]] for key in ("test_final", "test_best")}, [30], 16)}
    # BiSSL − pre-trained per seed 2, 3, 4: mean 3, sd 1, CI 3 ± 4.302653/√3 = 3 ± 2.484
    assert rows["pre-trained"]["BiSSL − this, final"].startswith("+3.00 [+0.52, +5.48]")
    assert rows["pre-trained + BiSSL's downstream steps"]["fine-tuning epochs"] == "46"
    assert rows["pre-trained + BiSSL's downstream steps"]["test top-1, final"] == "71.00 ± 0.00"
    assert rows["BiSSL"]["BiSSL − this, final"] == "" and rows["BiSSL"]["test top-1, final"] == "74.00 ± 2.00"
    assert "| 30 | pre-trained | 30 | 71.00 ± 1.00 |" in text
    assert (study.folder / "benefit.csv").read_text().splitlines()[1] == "30,pretrained,30,0,70.0000,69.0000"
    assert (study.folder / "benefit.png").stat().st_size > 0
    assert "e30/bissl 2.0" in text  # mean trial time: 1, 2 and 3 minutes


def test_arms_select_what_one_invocation_fine_tunes(benefit):
    assert [arm.name for arm in benefit.selected_arms("bissl, control")] == ["control", "bissl"]  # in the table's order
    with pytest.raises(ConfigError, match="unknown arm 'budget'"):
        benefit.selected_arms("pretrained,budget")
