"""The ablation study's pieces: the no-upper-level control of the BiSSL trainer and the variant plan."""
from __future__ import annotations

import pytest
import torch

from experiments.bissl_ablation import configured_solver, plan_variants
from tests.bissl_helpers import make_batches, make_trainer, run_alternations


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_no_upper_level_runs_the_same_lower_steps_and_leaves_the_upper_model_alone():
    lower, upper = make_batches(seed=3, batch=8)
    bissl, control = make_trainer("simclr", batch_norm=True), make_trainer("simclr", batch_norm=True)
    control.settings.upper_level = False
    upper_start, head_start = _flat(control.upper_backbone), _flat(control.head)

    run_alternations(bissl, lower, upper, alternations=1)
    run_alternations(control, lower, upper, alternations=1)
    # Until the first upper step both lower levels see the same θ_D and the same batches.
    assert torch.equal(_flat(bissl.lower_model), _flat(control.lower_model))
    assert control.lower_step_count == bissl.lower_step_count == 2
    assert control.upper_step_count == 0 and bissl.upper_step_count == 2

    bissl, control = make_trainer("simclr", batch_norm=True), make_trainer("simclr", batch_norm=True)
    control.settings.upper_level = False
    run_alternations(bissl, lower, upper, alternations=3)
    _, history = run_alternations(control, lower, upper, alternations=3)
    assert torch.equal(_flat(control.upper_backbone), upper_start) and torch.equal(_flat(control.head), head_start)
    assert all("upper/loss" not in metrics and metrics["lower/loss"] > 0 for metrics in history)
    # After BiSSL's upper steps moved θ_D, the proximity term pulls its lower level elsewhere.
    assert not torch.allclose(_flat(bissl.lower_model), _flat(control.lower_model))


def test_variant_plan_skips_unknown_solvers_and_the_configured_one():
    names = ["bissl", "pretrained", "no-implicit", "no-upper", "solver-layerwise", "solver-global", "solver-minres"]
    variants, notes = plan_variants(names, [], ("layerwise", "global"))
    assert [v.name for v in variants] == ["pretrained", "bissl", "no-implicit", "no-upper", "solver-global"]
    assert {v.name: v.bissl_flags for v in variants} == {
        "pretrained": None, "bissl": (), "no-implicit": ("--cg-iter-num", "0"), "no-upper": ("--upper-level", "0"),
        "solver-global": ("--cg-solver", "global")}
    assert any("solver-minres: skipped" in note for note in notes)
    assert any("solver-layerwise: the configured solver" in note for note in notes)
    # With another configured solver, layerwise becomes a variant of its own.
    variants, _ = plan_variants(names, ["--epochs", "3", "--cg-solver", "global"], ("layerwise", "global", "minres"))
    assert [v.name for v in variants if v.name.startswith("solver-")] == ["solver-layerwise", "solver-minres"]
    assert configured_solver(["--cg-solver=minres"]) == "minres"
    with pytest.raises(ValueError, match="baseline"):
        plan_variants(["bissl"], [], ("layerwise",))
    with pytest.raises(ValueError, match="unknown variant 'bisl'"):
        plan_variants(["pretrained", "bisl"], [], ("layerwise",))


def _ablation_args(ablation, out_dir, data_dir, models):
    flags = ["--scale", "paper", "--out-dir", str(out_dir), "--model-dir", str(models), "--data-dir", str(data_dir),
             "--dset", "imagefolder", "--arch", "resnet18", "--variants", "pretrained,bissl", "--seeds", "2", "--nproc", "1",
             "--bissl-args", "--p-dset imagefolder --img-size 16 --p-mlp 32-16 --epochs 1 --lower-num-iter 1 --upper-num-iter 1 "
                             "--cg-iter-num 1 --d-linear-warmup-epochs 1 --p-batch-size 8 --d-batch-size 8 --num-workers 0",
             "--finetune-args", "--pretrain-img-size 16 --epochs 1 --batch-size 8 --num-workers 0"]
    return ablation.get_args_parser().parse_args(flags)


def _scores(out_dir):
    """ablation.csv without its first column (the run directory, which differs between the two studies)."""
    return [line.split(",", 1)[1] for line in (out_dir / "ablation.csv").read_text().splitlines()]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_a_stopped_ablation_reruns_only_the_missing_stages_and_ends_with_the_same_table(tmp_path, monkeypatch):
    from source.run.scripts import load_script
    from tests.script_helpers import ROOT, make_image_folder, write_random_pretext_weights

    ablation = load_script(ROOT / "experiments" / "bissl_ablation.py")
    images = make_image_folder(tmp_path / "images", classes=2, per_class=12, size=16)
    models = tmp_path / "pretrained"
    models.mkdir()
    write_random_pretext_weights(models)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    ablation.main(_ablation_args(ablation, whole, images, models))

    original, ran, skipped = ablation.demo.Stages.run, [], []

    def stop_after_bissl(self, name, command, done, tag="demo"):
        original(self, name, command, done, tag)
        ran.append(name)
        if name == "bissl: BiSSL":
            raise KeyboardInterrupt  # as a Ctrl-C between two stages

    monkeypatch.setattr(ablation.demo.Stages, "run", stop_after_bissl)
    with pytest.raises(KeyboardInterrupt):
        ablation.main(_ablation_args(ablation, stopped, images, models))
    assert ran == ["pretrained: fine-tuning", "bissl: BiSSL"]

    ran.clear()

    def record(self, name, command, done, tag="demo"):
        (skipped if done.exists() and name in self.timings else ran).append(name)
        original(self, name, command, done, tag)

    monkeypatch.setattr(ablation.demo.Stages, "run", record)
    ablation.main(_ablation_args(ablation, stopped, images, models))
    assert skipped == ["pretrained: fine-tuning", "bissl: BiSSL"] and ran == ["bissl: fine-tuning"]
    assert len(_scores(stopped)) == 5 and _scores(stopped) == _scores(whole)  # header + 2 runs x (final, best-val)
