"""bissl.py's coupling and alignment metrics (issue 19): each against a direct computation, and none of
them changing training -- the trained weights, buffers, optimizer states, stream positions and RNG
states of a run are bit-identical with the metrics on and off."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from source.maths.coupling import proximity_gradient_ratio, relative_distance
from source.run.errors import ConfigError
from source.run.runtime import changed_settings
from source.stages import bissl_trainer
from source.stages.alignment import KnnAlignment, build_knn_alignment, recalibrated_copy, recalibration_loader
from source.stages.evaluation import sharded_eval_loader
from tests.bissl_helpers import make_batches, make_trainer, run_alternations
from tests.distributed_harness import run_in_processes
from tests.script_helpers import load_script, run_script
from tests.test_bissl_script import bissl_args
from tests.test_probe import brute_force_knn


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


# --- coupling -----------------------------------------------------------------------------------


def test_relative_distance_is_the_norm_of_the_flattened_difference_over_the_lower_norm():
    trainer = make_trainer("simclr", batch_norm=True)
    lower, upper = make_batches(0, 8, alternations=1)
    _, history = run_alternations(trainer, lower, upper, alternations=1)
    lower_params, upper_params = list(trainer.lower_model.backbone.parameters()), list(trainer.upper_backbone.parameters())
    want = torch.linalg.vector_norm(flat(lower_params) - flat(upper_params)) / torch.linalg.vector_norm(flat(lower_params))
    assert want > 0
    torch.testing.assert_close(relative_distance(lower_params, upper_params), want)
    assert history[-1]["coupling/relative_distance"] == pytest.approx(float(want), rel=1e-12)
    assert history[-1]["coupling/relative_distance"] == pytest.approx(history[-1]["distance"] / float(
        torch.linalg.vector_norm(flat(lower_params))), rel=1e-6)


@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_prox_grad_ratio_equals_the_ratio_of_separately_computed_gradients(kind):
    """‖λ(θ_P − θ_D)‖ / ‖∇_θP L_P‖ with ∇L_P from its own autograd.grad on a copy of the lower model."""
    trainer = make_trainer(kind, batch_norm=True)
    lower, upper = make_batches(0, 8)
    run_alternations(trainer, lower, upper, alternations=1)  # θ_P ≠ θ_D from here on
    (view1, view2), _ = lower[3]
    reference = copy.deepcopy(trainer.lower_model).train()
    pretext = torch.autograd.grad(reference(view1, view2), list(reference.backbone.parameters()))
    difference = flat(trainer.lower_model.backbone.parameters()) - flat(trainer.upper_backbone.parameters())
    want = trainer.settings.lam * torch.linalg.vector_norm(difference) / torch.linalg.vector_norm(flat(pretext))
    assert 1e-3 < want < 1e3  # both terms count: the check can tell them apart
    got = trainer.lower_step(view1, view2)["coupling/prox_grad_ratio"]
    assert got == pytest.approx(float(want), rel=1e-4)


def test_prox_grad_ratio_reads_the_total_gradient_and_handles_lam_zero():
    torch.manual_seed(0)
    lower = [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    upper = [torch.randn(3, 2), torch.randn(4)]
    pretext = [torch.randn(3, 2), torch.randn(4)]
    for p, u, g in zip(lower, upper, pretext):
        p.grad = g + 0.3 * (p.detach() - u)
    want = 0.3 * torch.linalg.vector_norm(flat(lower) - flat(upper)) / torch.linalg.vector_norm(flat(pretext))
    torch.testing.assert_close(proximity_gradient_ratio(lower, upper, 0.3), want.double(), rtol=1e-6, atol=0)
    for p, g in zip(lower, pretext):
        p.grad = g.clone()
    assert float(proximity_gradient_ratio(lower, upper, 0.0)) == 0.0


def test_prox_grad_ratio_is_the_alternation_mean_and_changes_no_weight(monkeypatch):
    """The logged value is the mean of the lower steps' ratios; with the metric replaced by a constant
    the run's parameters and BN buffers are bit-identical (the gradients are only read)."""
    lower, upper = make_batches(0, 8, alternations=2)
    measured = make_trainer("simclr", batch_norm=True)
    steps = []
    original_step = measured.lower_step
    monkeypatch.setattr(measured, "lower_step", lambda *views: steps.append(original_step(*views)) or steps[-1])
    weights_on, history = run_alternations(measured, lower, upper, alternations=2)
    per_alternation = measured.settings.lower_steps_per_alternation
    for index, metrics in enumerate(history):
        ratios = [step["coupling/prox_grad_ratio"] for step in steps[index * per_alternation:(index + 1) * per_alternation]]
        assert metrics["coupling/prox_grad_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)
    assert history[-1]["coupling/prox_grad_ratio"] > 0

    monkeypatch.setattr(bissl_trainer, "proximity_gradient_ratio", lambda *args: torch.zeros(()))
    unmeasured = make_trainer("simclr", batch_norm=True)
    weights_off, history_off = run_alternations(unmeasured, lower, upper, alternations=2)
    assert history_off[-1]["coupling/prox_grad_ratio"] == 0.0  # the stub was used
    assert torch.equal(weights_on, weights_off)
    for got, want in zip(measured.lower_model.buffers(), unmeasured.lower_model.buffers()):
        assert torch.equal(got, want)


# --- kNN alignment ------------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """conv -> BN -> pool: features (N, 4) that depend on the BN running statistics in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)


def tiny_backbone(seed: int) -> TinyBackbone:
    torch.manual_seed(seed)
    model = TinyBackbone()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.train()


def labelled_images(count: int, seed: int, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    images = torch.randn(count, 3, 5, 5, generator=generator) + labels.view(-1, 1, 1, 1) * 0.7
    return images, labels


def alignment(bank, queries, every: int = 2, alternations: int = 5) -> KnnAlignment:
    return KnnAlignment(sharded_eval_loader(TensorDataset(*bank), 4), sharded_eval_loader(TensorDataset(*queries), 4),
                        num_classes=3, every=every, alternations=alternations)


def test_knn_alignment_equals_a_brute_force_loop_and_changes_nothing():
    bank, queries = labelled_images(30, 0), labelled_images(9, 1)
    lower, upper = tiny_backbone(0), tiny_backbone(3)
    states = [copy.deepcopy(model.state_dict()) for model in (lower, upper)]
    rng = torch.get_rng_state()

    scores = alignment(bank, queries).measure(lower, upper, torch.device("cpu"))

    for model, key in ((lower, "align/lower_knn_top1"), (upper, "align/upper_knn_top1")):
        reference = copy.deepcopy(model).eval()
        with torch.no_grad():
            votes = brute_force_knn(reference(bank[0]), bank[1], reference(queries[0]), 3, 20, 0.07)  # k = 20 of 30
        want = 100.0 * float((votes.argmax(1) == queries[1]).float().mean())
        assert scores[key] == pytest.approx(want)
    assert scores["align/lower_knn_top1"] != scores["align/upper_knn_top1"]  # two models, two scores
    for model, state in zip((lower, upper), states):
        assert model.training and model.bn.training  # modes given back
        assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())  # no running-stat update
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG untouched


def test_knn_alignment_is_due_every_n_alternations_and_after_the_last():
    assert [done for done in range(1, 6) if KnnAlignment(None, None, 3, every=2, alternations=5).due(done)] == [2, 4, 5]
    assert [done for done in range(1, 5) if KnnAlignment(None, None, 3, every=2, alternations=4).due(done)] == [2, 4]


def test_knn_alignment_refuses_a_multilabel_dataset():
    args = load_script("bissl.py").get_args_parser().parse_args(["--lower-knn-every", "1", "--d-dset", "voc2007"])
    with pytest.raises(ConfigError, match="multi-label"):
        build_knn_alignment(args, None, None, None, 20, True, torch.contiguous_format)


def _alignment_on_ranks(rank, world_size, bank, queries, states):
    lower, upper = TinyBackbone(), TinyBackbone()
    lower.load_state_dict(states[0])
    upper.load_state_dict(states[1])
    scores = alignment(bank, queries).measure(lower, upper, torch.device("cpu"))
    dataset = TensorDataset(*bank)
    loader = recalibration_loader(dataset, batches=2, global_batch=6, seed=3, rank=rank, world_size=world_size)
    recalibrated = recalibrated_copy(upper, loader, torch.device("cpu"))
    return scores, recalibrated.bn.running_mean, recalibrated.bn.running_var


@pytest.mark.multiprocess
def test_two_processes_log_the_one_process_values_on_every_rank():
    bank, queries = labelled_images(13, 0), labelled_images(7, 1)  # odd sizes: uneven shards
    states = [tiny_backbone(seed).state_dict() for seed in (0, 1)]
    alone = _alignment_on_ranks(0, 1, bank, queries, states)
    ranks = run_in_processes(_alignment_on_ranks, world_size=2, args=(bank, queries, states))
    for scores, mean, var in ranks:
        assert scores == alone[0]
        # two per-rank batches of 3 per global batch instead of one of 6: the same images, so the same
        # mean; the variances are those of the smaller batches, as in training, and agree across ranks
        torch.testing.assert_close(mean, alone[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(var, ranks[0][2])


# --- BN recalibration of the val evaluation -----------------------------------------------------


def test_recalibration_batches_are_fixed_seeded_global_batches_split_over_ranks():
    dataset = TensorDataset(torch.arange(10).float().view(10, 1), torch.zeros(10))
    rng = torch.get_rng_state()
    alone = [batch[0].flatten().tolist() for batch in recalibration_loader(dataset, 3, 4, seed=5, rank=0, world_size=1)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert [len(batch) for batch in alone] == [4, 4, 4]
    assert sorted(alone[0] + alone[1] + alone[2][:2]) == list(range(10))  # one whole pass, then the next order
    again = [batch[0].flatten().tolist() for batch in recalibration_loader(dataset, 3, 4, seed=5, rank=0, world_size=1)]
    assert again == alone  # the same batches every alternation
    ranks = [[batch[0].flatten().tolist() for batch in recalibration_loader(dataset, 3, 4, seed=5, rank=r, world_size=2)]
             for r in (0, 1)]
    assert [ranks[0][b] + ranks[1][b] for b in range(3)] == alone  # rank r takes its slice of each global batch


def test_recalibrated_copy_holds_the_average_batch_statistics_and_leaves_the_model_alone():
    images, labels = labelled_images(12, 2)
    model = nn.Sequential(tiny_backbone(0), nn.Linear(4, 3))
    before = copy.deepcopy(model.state_dict())
    loader = recalibration_loader(TensorDataset(images, labels), batches=3, global_batch=4, seed=0, rank=0, world_size=1)

    recalibrated = recalibrated_copy(model, loader, torch.device("cpu"))

    batches = [batch for batch, _ in loader]
    with torch.no_grad():  # BN's input per batch: (C, batch, H*W)
        inputs = [model[0].conv(batch).transpose(0, 1).reshape(4, -1) for batch in batches]
    torch.testing.assert_close(recalibrated[0].bn.running_mean, torch.stack([x.mean(1) for x in inputs]).mean(0))
    torch.testing.assert_close(recalibrated[0].bn.running_var, torch.stack([x.var(1) for x in inputs]).mean(0))
    assert recalibrated[0].bn.momentum == model[0].bn.momentum == 0.1
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert torch.equal(recalibrated[0].conv.weight, model[0].conv.weight) and recalibrated[0].conv.weight is not model[0].conv.weight


# --- the script -----------------------------------------------------------------------------------

METRIC_FLAGS = ("--lower-knn-every", "--align-bank-size", "--align-query-size", "--eval-bn-recalibrate-batches")


def test_the_metric_flags_may_change_on_resume():
    parser = load_script("bissl.py").get_args_parser()
    saved = vars(parser.parse_args([]))
    changed = parser.parse_args([argument for flag in METRIC_FLAGS for argument in (flag, "3")])
    assert changed_settings(saved, changed, parser) == []
    assert changed_settings(saved, parser.parse_args(["--lam", "0.5"]), parser)  # the check itself still works


def state_equal(a, b) -> bool:
    """Nested dicts/lists of tensors and numbers, compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def bissl_inputs(tmp_path_factory):
    from tests.script_helpers import make_image_folder, write_random_pretext_weights

    images = make_image_folder(tmp_path_factory.mktemp("images"), classes=2, per_class=20, size=16)
    models = tmp_path_factory.mktemp("models")
    write_random_pretext_weights(models)
    return images, models


@pytest.mark.multiprocess
@pytest.mark.long  # two 2-process bissl.py runs: about 4 min on 2 loaded cores, over what CI can spend
def test_metrics_leave_a_two_process_run_bit_identical(bissl_inputs, tmp_path):
    """Two ranks (torchrun, gloo), two alternations: with every metric on (kNN after each alternation,
    val on a BN-recalibrated copy) the checkpoint -- weights, BN buffers, optimizer and scheduler
    states, both streams' positions, every rank's RNG states, so the batches that would follow --
    and the saved backbones equal those of the run without them."""
    images, models = bissl_inputs
    runs = {}
    for name, extra in (("off", []), ("on", ["--lower-knn-every", "1", "--align-bank-size", "10",
                                             "--align-query-size", "5", "--eval-bn-recalibrate-batches", "2"])):
        model_dir = tmp_path / name
        model_dir.mkdir()
        for weights in models.glob("pretext_simclr_*"):
            (model_dir / weights.name).write_bytes(weights.read_bytes())
        run_script("bissl.py", *bissl_args(images, model_dir, run_dir=model_dir / "run"), "--lower-num-iter", "1",
                   "--upper-num-iter", "1", "--cg-iter-num", "1", *extra, nproc=2)
        runs[name] = model_dir
    checkpoints = {name: torch.load(folder / "run" / "checkpoint.pth", weights_only=True) for name, folder in runs.items()}
    for key in ("trainer", "lower_stream", "upper_stream", "rng", "alternation"):
        assert state_equal(checkpoints["on"][key], checkpoints["off"][key]), key
    for output in runs["off"].glob("BiSSL-*backbone*.pth"):
        assert state_equal(torch.load(output, weights_only=True), torch.load(runs["on"] / output.name, weights_only=True))

    rows = [json.loads(line) for line in (runs["on"] / "run" / "metrics.jsonl").read_text().splitlines()]
    aligned = [row["alternation"] for row in rows if "align/lower_knn_top1" in row]
    assert aligned == [0, 1, 2]  # after the head warmup and after each alternation
    assert all(0 <= row[key] <= 100 for row in rows if "align/lower_knn_top1" in row
               for key in ("align/lower_knn_top1", "align/upper_knn_top1"))
    for rows_of in (rows, [json.loads(line) for line in (runs["off"] / "run" / "metrics.jsonl").read_text().splitlines()]):
        coupled = [row for row in rows_of if "coupling/relative_distance" in row]
        assert len(coupled) == 2 and all(row["coupling/relative_distance"] > 0 for row in coupled)
        # (the first lower step starts from θ_P = θ_D: no proximity gradient yet)
        assert coupled[0]["coupling/prox_grad_ratio"] == 0 < coupled[1]["coupling/prox_grad_ratio"]
