"""The demo's BiSSL stage is the dose-response study's positive control, and the studies keep their base."""
from __future__ import annotations

import pytest

from source.run.scripts import load_script
from tests.script_helpers import ROOT


@pytest.fixture(scope="module")
def demo():
    return load_script(ROOT / "demo.py")


def _bissl_flags(demo, flags):
    parser = load_script(ROOT / "bissl.py").get_args_parser()
    return vars(parser.parse_args([str(flag) for flag in [*demo.general_args("data", "models", "cpu"), *flags]]))


def test_the_demo_runs_the_positive_control_and_the_studies_keep_the_papers_lower_level(demo, tmp_path):
    demo_run = _bissl_flags(demo, demo.bissl_args(demo.DEMO_BISSL))
    base = _bissl_flags(demo, demo.bissl_args())
    assert (base["p_optimizer"], base["lam"], base["epochs"], base["upper_num_iter"], base["cg_solver"]) == ("lars", 0.001, 6, 2, "layerwise")
    assert "--p-optimizer" not in demo.bissl_args()  # the studies' command lines are as before
    changed = {key for key in demo_run if demo_run[key] != base[key]}
    assert changed == {"p_optimizer", "p_lr", "lam", "upper_num_iter", "cg_solver"}

    # ... and equals the dose-response study's BiSSL run of point sgd:0.05:1:6, seed 0 (the study's
    # flags come last, so they win), but for where the study writes its run.
    study = load_script(ROOT / "experiments" / "bissl_dose_response.py")
    run = study.Run(study.parse_points("sgd:0.05:1:6")[0], "bissl", 0)
    args = study.Study(study.get_args_parser().parse_args(["--out-dir", str(tmp_path)]))
    command = [str(part) for part in args.bissl_command(run)]
    study_run = _bissl_flags(demo, command[command.index("bissl.py") + 1:])
    differing = {key for key in demo_run if demo_run[key] != study_run[key]}
    assert differing == {"model_dir", "run_dir", "data_dir"}, differing


def test_the_demo_says_which_effect_its_table_shows(demo):
    assert "same 200 labels" in demo.WHICH_EFFECT and "24 upper steps" in demo.WHICH_EFFECT
    assert "equal downstream budget" in demo.WHICH_EFFECT and "docs/dose-response.md" in demo.WHICH_EFFECT
