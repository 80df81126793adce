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
