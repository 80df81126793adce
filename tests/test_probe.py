"""Backbone probe: kNN against a brute-force reference, linear probe on a separable toy set,
BatchNorm recalibration (running statistics only), exact 2-process feature extraction, and the
command end to end with its feature cache."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from source.maths.models import build_backbone
from source.stages.evaluation import ShardedEvalSampler
from source.tools import probe
from tests.distributed_harness import run_in_processes
from tests.script_helpers import make_image_folder


def brute_force_knn(train_x, train_y, x, num_classes, k, temperature):
    """Per query: cosine to every train vector by hand, the k largest vote exp(cos / T) for their class."""
    scores = []
    for query in x.tolist():
        sims = []
        for vector, label in zip(train_x.tolist(), train_y.tolist()):
            dot = sum(a * b for a, b in zip(query, vector))
            norm = math.sqrt(sum(a * a for a in query)) * math.sqrt(sum(b * b for b in vector))
            sims.append((dot / norm, label))
        votes = [0.0] * num_classes
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(sim / temperature)
        scores.append(votes)
    return torch.tensor(scores)


@pytest.mark.parametrize("k", [1, 5, 40])  # 40 > N: every train vector votes
def test_knn_equals_brute_force_reference(k):
    generator = torch.Generator().manual_seed(0)
    train_x, x = torch.randn(30, 6, generator=generator), torch.randn(9, 6, generator=generator)
    train_y = torch.randint(0, 4, (30,), generator=generator)
    scores = probe.knn_scores(train_x, train_y, x, 4, k=k, temperature=0.07, chunk_size=4)
    reference = brute_force_knn(train_x, train_y, x, 4, min(k, 30), 0.07)
    torch.testing.assert_close(scores, reference.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(scores.argmax(1), reference.argmax(1))


def test_linear_probe_beats_chance_on_a_separable_toy_set():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3

    def sample(n: int):
        labels = torch.arange(n) % 3
        return centres[labels] + torch.randn(n, 16, generator=generator), labels

    train, val, test = sample(60), sample(30), sample(60)
    results = probe.probe_features({"train": train, "val": val, "test": test}, 3, k=5, temperature=0.07,
                                   penalties=[1e-4, 1e-2], max_iter=100)
    assert results["linear_test_top1"] > 90.0  # chance: 33%
    assert results["knn_test_top1"] > 90.0
    assert results["linear_wd"] in (1e-4, 1e-2)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4, momentum=0.3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn1d = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.bn1d(self.pool(torch.relu(self.bn2d(self.conv(x)))).flatten(1)) * self.scale


def test_bn_recalibration_changes_running_stats_and_nothing_else():
    torch.manual_seed(0)
    model = TinyNet()
    model.bn2d.running_mean.fill_(5.0)  # statistics of "other inputs"
    model.bn2d.running_var.fill_(9.0)
    model.eval()
    model.bn1d.train()  # a mixed mode must survive
    before = {key: value.clone() for key, value in model.state_dict().items()}
    images = torch.randn(24, 3, 6, 6) + 1.5
    loader = DataLoader(TensorDataset(images, torch.zeros(24)), batch_size=8)

    assert probe.recalibrate_batchnorm(model, loader, torch.device("cpu")) == 3

    # bn2d sees conv(images): its running mean is the average of the 3 batch means, var of the unbiased batch vars.
    with torch.no_grad():
        conv = model.conv(images).transpose(0, 1).reshape(4, 3, -1)  # (C, batch, 8*6*6)
    torch.testing.assert_close(model.bn2d.running_mean, conv.mean(2).mean(1))
    torch.testing.assert_close(model.bn2d.running_var, conv.var(2, unbiased=True).mean(1))
    stats = {"bn2d.running_mean", "bn2d.running_var", "bn2d.num_batches_tracked",
             "bn1d.running_mean", "bn1d.running_var", "bn1d.num_batches_tracked"}
    after = model.state_dict()
    for key in stats:
        assert not torch.equal(after[key], before[key]), key
    for key in set(before) - stats:
        assert torch.equal(after[key], before[key]), key
    assert model.bn2d.momentum == 0.3 and model.bn1d.momentum == 0.1
    assert not model.training and not model.bn2d.training and model.bn1d.training


def _extract_on_ranks(rank, world_size, images, state):
    model = TinyNet()
    model.load_state_dict(state)
    dataset = TensorDataset(images, torch.arange(len(images)))
    loader = DataLoader(dataset, batch_size=2, sampler=ShardedEvalSampler(dataset, rank, world_size))
    features, labels = probe.extract_features(model, loader, torch.device("cpu"))
    batches = probe.recalibrate_batchnorm(model, loader, torch.device("cpu"))
    return features, labels, batches, model.bn2d.running_mean.clone()


@pytest.mark.multiprocess
def test_two_processes_embed_each_sample_once_in_order():
    images = torch.randn(7, 3, 6, 6)  # 7 samples: shards of 4 and 3
    state = TinyNet().state_dict()
    alone = _extract_on_ranks(0, 1, images, state)
    ranks = run_in_processes(_extract_on_ranks, world_size=2, args=(images, state))
    for features, labels, batches, running_mean in ranks:
        assert torch.equal(labels, torch.arange(7))  # every sample once, in dataset order
        torch.testing.assert_close(features, alone[0])
        assert batches == 3  # 2 + 2 batches of <= 2 samples, less the one single-image batch
        torch.testing.assert_close(running_mean, ranks[0][3])  # identical statistics on every rank


@pytest.mark.slow
def test_probe_command_end_to_end_with_cache(tmp_path, monkeypatch):
    data_dir = make_image_folder(tmp_path / "images", classes=3, per_class=10, size=16)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    torch.save({"module." + key: value for key, value in build_backbone("resnet18", cifar_stem=True)[0].state_dict().items()},
               model_dir / "bb.pth")  # a DDP-prefixed file loads too
    argv = ["--arch", "resnet18", "--cifar-stem", "1", "--img-size", "16", "--backbone-filename", "bb.pth",
            "--dset", "imagefolder", "--data-dir", str(data_dir), "--model-dir", str(model_dir), "--num-workers", "0",
            "--batch-size", "8", "--linear-wd", "1e-3", "--linear-max-iter", "20", "--recalibrate-bn", "1"]
    first = probe.main(probe.get_args_parser().parse_args(argv))
    assert first["num_train"] + first["num_val"] + first["num_test"] == 30
    assert len(list((model_dir / "probe_cache").glob("bb_dset-imagefolder_*.pth"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(probe, "extract_features", no_forward)
    second = probe.main(probe.get_args_parser().parse_args(argv))
    assert {k: v for k, v in second.items() if k != "time_s"} == {k: v for k, v in first.items() if k != "time_s"}
    with pytest.raises(ValueError, match="--linear-wd"):
        probe.main(probe.get_args_parser().parse_args([*argv, "--linear-wd", "1e-3,x"]))
    with pytest.raises(SystemExit):  # bounds are checked by the parser
        probe.get_args_parser().parse_args([*argv, "--knn-k", "0"])
