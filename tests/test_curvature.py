"""Tests for source/maths/curvature.py (the CLI: source/tools/curvature.py): Ritz values vs ``eigvalsh``.

The reference Hessian of a tiny SimCLR model's loss w.r.t. its backbone is formed with
``torch.autograd.functional.hessian`` (float64), so the probe's extremes can be checked exactly.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from source.maths.curvature import CurvatureReport, lanczos, probe_lower_model, ritz_values
from source.stages.pretext import SimCLR

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _symmetric(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return (m + m.T) / 2


def test_lanczos_to_full_dimension_recovers_every_eigenvalue():
    matrix = _symmetric(10, 0)
    shapes = [(4,), (2, 3)]

    def matvec(p):
        flat = matrix @ torch.cat([t.reshape(-1) for t in p])
        return (flat[:4], flat[4:].reshape(2, 3))

    start = (torch.ones(4, dtype=torch.float64), torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3))
    alphas, betas = lanczos(matvec, start, 10)
    assert alphas.shape == (10,) and betas.shape == (9,)
    torch.testing.assert_close(ritz_values(alphas, betas), torch.linalg.eigvalsh(matrix), rtol=1e-10, atol=1e-10)
    assert [tuple(t.shape) for t in start] == shapes


def test_lanczos_stops_on_an_invariant_subspace():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    start = (torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64),)  # lies in a 2-d invariant subspace
    alphas, betas = lanczos(lambda p: (matrix @ p[0],), start, 4)
    torch.testing.assert_close(ritz_values(alphas, betas), torch.tensor([1.0, 2.0], dtype=torch.float64))


def _tiny_simclr() -> SimCLR:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Tanh())
    return SimCLR(backbone, 4, "6-3", temperature=0.5).double()


def _exact_hessian(model: SimCLR, views) -> torch.Tensor:
    names = [name for name, _ in model.backbone.named_parameters()]
    params = [p.detach() for p in model.backbone.parameters()]
    sizes = [p.numel() for p in params]

    def loss(flat):
        pieces = [part.reshape(p.shape) for part, p in zip(flat.split(sizes), params)]
        return functional_call(model.backbone, dict(zip(names, pieces)), (views[0],)), \
            functional_call(model.backbone, dict(zip(names, pieces)), (views[1],))

    def scalar(flat):
        from source.maths.losses import nt_xent_loss

        z1, z2 = loss(flat)
        return nt_xent_loss(model.projector(z1), model.projector(z2), model.temperature, gather_across_ranks=False)

    flat = torch.cat([p.reshape(-1) for p in params])
    return torch.autograd.functional.hessian(scalar, flat)


def test_probe_extremes_match_eigvalsh_of_the_exact_hessian():
    model = _tiny_simclr().train()
    gen = torch.Generator().manual_seed(1)
    views = tuple(torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=gen) for _ in range(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hessian = _exact_hessian(copy.deepcopy(model), views)  # a copy: its forward passes move BN statistics
    eigenvalues = torch.linalg.eigvalsh(hessian)
    n = hessian.shape[0]  # 12*4 + 4 + 4 + 4 = 60
    assert eigenvalues[0] < 0 < eigenvalues[-1]  # an indefinite Hessian: the interesting case
    lam_plus_delta = 0.5 * float(-eigenvalues[0])

    full = probe_lower_model(model, views, n, lam_plus_delta)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing moved
    assert abs(full.min - float(eigenvalues[0])) < 1e-8 * float(eigenvalues.abs().max())
    assert abs(full.max - float(eigenvalues[-1])) < 1e-8 * float(eigenvalues.abs().max())
    tolerance = 1e-9 * float(eigenvalues.abs().max())  # BN makes some eigenvalues exactly 0 (± rounding)
    assert sum(v < -tolerance for v in full.ritz) == int((eigenvalues < -tolerance).sum()) > 0
    assert full.num_indefinite == int((eigenvalues < -lam_plus_delta).sum())
    assert math.isclose(full.min_lam_plus_delta, float(-eigenvalues[0]), rel_tol=1e-8)
    assert full.a_min < 0  # A = I + H/(lam + delta) is indefinite at half the needed damping

    partial = probe_lower_model(model, views, 20, lam_plus_delta)  # fewer steps than unknowns
    assert len(partial.ritz) == 20
    scale = float(eigenvalues.abs().max())
    assert partial.min >= float(eigenvalues[0]) - 1e-9 * scale  # Ritz values lie inside the spectrum
    assert partial.max <= float(eigenvalues[-1]) + 1e-9 * scale
    assert abs(partial.max - float(eigenvalues[-1])) < 0.05 * scale  # and the extremes converge first


def test_report_numbers():
    report = CurvatureReport(ritz=[-30.0, -5.0, 0.5, 200.0], lam_plus_delta=10.001)
    assert report.num_negative == 2 and report.num_indefinite == 1
    assert report.min_lam_plus_delta == 30.0
    assert math.isclose(report.a_min, 1 - 30 / 10.001)
    metrics = report.metrics()
    assert metrics["curvature/ritz_min"] == -30.0 and metrics["curvature/ritz_max"] == 200.0
    assert CurvatureReport(ritz=[1.0, 2.0], lam_plus_delta=1.0).min_lam_plus_delta == 0.0


def test_probe_during_training_changes_nothing_and_bissl_logs_it(tmp_path):
    """The in-run probe draws nothing from the global RNG (its stream is seeded per sample, its
    Lanczos start vector comes from a private generator) and leaves the model as it was."""
    from source.maths.curvature import probe_next_batch

    model = _tiny_simclr().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = torch.Generator().manual_seed(1)
    batch = (torch.rand(8, 3, 2, 2, dtype=torch.float64, generator=fixed),
             torch.rand(8, 3, 2, 2, dtype=torch.float64, generator=fixed))

    torch.manual_seed(5)
    rng = torch.get_rng_state()
    report = probe_next_batch(model, iter([(batch, None)]), 5, 10.001, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(report.ritz) == 5 and report.min <= report.max
    assert report.ritz == probe_next_batch(model, iter([(batch, None)]), 5, 10.001, torch.device("cpu")).ritz


@pytest.mark.multiprocess
@pytest.mark.slow
def test_bissl_script_with_minres_and_the_probe(tmp_path):
    from source.maths.models import Projector, build_backbone
    from source.run.checkpoint import save_atomic
    from tests.script_helpers import make_image_folder, run_script

    images = make_image_folder(tmp_path / "images", classes=2, per_class=8, size=16)
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    save_atomic(backbone.state_dict(), models / "bb.pth")
    save_atomic(Projector(dim, "16-8").state_dict(), models / "proj.pth")
    run_script("bissl.py", "--d-dset", "imagefolder", "--p-dset", "imagefolder", "--data-dir", str(images),
               "--arch", "resnet18", "--img-size", "16", "--p-mlp", "16-8", "--p-pretrained-backbone-filename", "bb.pth",
               "--p-pretrained-proj-filename", "proj.pth", "--epochs", "1", "--lower-num-iter", "1", "--upper-num-iter", "2",
               "--d-linear-warmup-epochs", "1", "--p-batch-size", "4", "--d-batch-size", "4", "--device", "cpu",
               "--num-workers", "0", "--model-dir", str(models), "--run-dir", str(tmp_path / "run"),
               "--cg-solver", "minres", "--cg-iter-num", "2", "--curvature-every", "1", "--curvature-iters", "3",
               "--omp-num-threads", "1")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if "curvature/ritz_min" in row][-1]
    assert final["curvature/ritz_min"] <= final["curvature/ritz_max"]
    assert final["cg/hvps"] == 2  # MINRES: no extra product for its residual
    assert 0 < final["cg/true_rel_residual"] <= 1  # MINRES never does worse than x = 0
