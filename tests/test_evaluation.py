"""Tests for source/stages/evaluation.py: top-k counts, 11-point mAP, and exact distributed evaluation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from source.stages.evaluation import (
    ShardedEvalSampler,
    average_precision_11pt,
    evaluate,
    mean_average_precision_11pt,
    topk_correct,
)
from tests.distributed_harness import run_in_processes

NUM_FEATURES, NUM_CLASSES = 4, 6


# ---------------------------------------------------------------- top-k


def test_topk_correct_hand_example():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # target 3 has the highest score: rank 1
            [2.0, 1.0, 0.0, -1.0, -2.0, -3.0],  # target 5 is last: rank 6
            [2.0, 1.0, 0.0, -1.0, -2.0, -3.0],  # target 4: rank 5
            [0.3, 0.1, 0.6, 0.2, 0.5, 0.4],  # target 4: rank 2
        ]
    )
    targets = torch.tensor([3, 5, 4, 4])
    assert topk_correct(logits, targets, (1, 2, 5)).tolist() == [1, 2, 3]
    # k larger than the number of classes is clipped to it: every target is in the top 6.
    assert topk_correct(logits, targets, (1, 10)).tolist() == [1, 4]
    assert topk_correct(logits, targets).dtype == torch.int64


def test_topk_correct_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_correct(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), (0,))
    with pytest.raises(ValueError, match="targets"):
        topk_correct(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- 11-point AP


def test_average_precision_hand_example():
    # Six samples ranked by score: labels 1 0 1 0 0 1 (3 positives).
    #   rank 1: TP 1, P = 1/1, R = 1/3
    #   rank 2: TP 1, P = 1/2, R = 1/3
    #   rank 3: TP 2, P = 2/3, R = 2/3
    #   rank 4: TP 2, P = 2/4, R = 2/3
    #   rank 5: TP 2, P = 2/5, R = 2/3
    #   rank 6: TP 3, P = 3/6, R = 1
    # Interpolated precision p(t) = max P over ranks with R >= t:
    #   t = 0.0, 0.1, 0.2, 0.3 (R = 1/3 >= t at every rank): max(1, 1/2, 2/3, 1/2, 2/5, 1/2) = 1
    #   t = 0.4, 0.5, 0.6 (ranks 3-6, R >= 2/3):                max(2/3, 1/2, 2/5, 1/2) = 2/3
    #   t = 0.7, 0.8, 0.9, 1.0 (rank 6 only, R = 1):            1/2
    # AP = (4 * 1 + 3 * 2/3 + 4 * 1/2) / 11 = 8/11
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = torch.tensor([1, 0, 1, 0, 0, 1])
    assert average_precision_11pt(scores, labels) == pytest.approx(8 / 11, abs=1e-12)
    # Only the order of the samples by score matters, not their order in the tensor.
    permutation = torch.tensor([4, 0, 5, 2, 1, 3])
    assert average_precision_11pt(scores[permutation], labels[permutation]) == pytest.approx(8 / 11, abs=1e-12)


def test_average_precision_groups_tied_scores():
    # Scores 0.9, 0.5, 0.5, 0.1 with labels 1, {0, 1}, 0; 2 positives. Thresholds:
    #   s = 0.9: TP 1 of 1 predicted, P = 1,   R = 1/2
    #   s = 0.5: TP 2 of 3 predicted, P = 2/3, R = 1
    #   s = 0.1: TP 2 of 4 predicted, P = 1/2, R = 1
    # p(t) = 1 for t <= 0.5 (6 levels), max(2/3, 1/2) = 2/3 for t >= 0.6 (5 levels)
    # AP = (6 + 5 * 2/3) / 11 = 28/33, whichever of the tied samples comes first. (Ranking the
    # tied positive first one at a time would give P = 1 at R = 1 and AP = 1.)
    for labels in ([1, 0, 1, 0], [1, 1, 0, 0]):
        ap = average_precision_11pt(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor(labels))
        assert ap == pytest.approx(28 / 33, abs=1e-12)


def _brute_force_ap(scores: list[float], labels: list[int]) -> float:
    """The definition, one threshold and one recall level at a time."""
    num_positives = sum(labels)
    points = []
    for threshold in set(scores):
        predicted = [label for score, label in zip(scores, labels) if score >= threshold]
        points.append((sum(predicted) / num_positives, sum(predicted) / len(predicted)))
    total = 0.0
    for level in range(11):
        total += max([precision for recall, precision in points if recall >= level / 10], default=0.0)
    return total / 11


def test_average_precision_matches_definition_on_random_data():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 8, (25,), generator=generator).float()  # many ties
        labels = (torch.rand(25, generator=generator) < 0.4).long()
        labels[0] = 1
        expected = _brute_force_ap(scores.tolist(), labels.tolist())
        assert average_precision_11pt(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_mean_average_precision_skips_classes_without_positives():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    targets = torch.stack(
        [
            torch.tensor([1, 0, 1, 0, 0, 1]),  # AP 8/11 (hand example above)
            torch.tensor([1, 1, 0, 0, 0, 0]),  # positives ranked first: AP 1
            torch.tensor([0, 0, 0, 0, 0, 0]),  # no positives: left out
        ],
        dim=1,
    )
    assert mean_average_precision_11pt(scores[:, None].expand(6, 3), targets) == pytest.approx(19 / 22, abs=1e-12)
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision_11pt(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="without positive"):
        average_precision_11pt(torch.zeros(3), torch.zeros(3))


# ---------------------------------------------------------------- sampler and evaluate


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_sharded_sampler_visits_each_sample_once(world_size):
    dataset = list(range(7))
    shards = [list(ShardedEvalSampler(dataset, rank, world_size)) for rank in range(world_size)]
    assert [len(ShardedEvalSampler(dataset, rank, world_size)) for rank in range(world_size)] == list(map(len, shards))
    assert sorted(index for shard in shards for index in shard) == dataset
    with pytest.raises(ValueError, match="rank"):
        ShardedEvalSampler(dataset, world_size, world_size)


def make_model(out_features: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(NUM_FEATURES, out_features)


def make_data(num_samples: int, multilabel: bool) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(num_samples, NUM_FEATURES, generator=generator)
    if multilabel:
        targets = (torch.rand(num_samples, 3, generator=generator) < 0.5).long()
        targets[0] = 1  # every class has a positive even in a one-sample set
    else:
        targets = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
        # The model's best class at even indices and its worst at 1 and 5, so that neither top-1
        # nor top-5 is 0 % or 100 % and a miscounted sample shows.
        with torch.no_grad():
            logits = make_model(NUM_CLASSES)(inputs)
        targets[::2] = logits.argmax(dim=1)[::2]
        targets[1::4] = logits.argmin(dim=1)[1::4]
    return TensorDataset(inputs, targets)


def reference_metrics(dataset: TensorDataset, multilabel: bool) -> dict[str, float]:
    """Metrics straight from their formulas over the whole dataset in one process."""
    inputs, targets = dataset.tensors
    with torch.no_grad():
        logits = make_model(targets.shape[1] if multilabel else NUM_CLASSES)(inputs)
    if multilabel:
        return {
            "loss": F.binary_cross_entropy_with_logits(logits, targets.float()).item(),
            "map": 100 * mean_average_precision_11pt(logits, targets),
            "num_samples": len(targets),
        }
    ranks = (logits > logits.gather(1, targets[:, None])).sum(dim=1)  # 0 = target scored highest
    return {
        "loss": F.cross_entropy(logits, targets).item(),
        "top1": 100 * (ranks < 1).double().mean().item(),
        "top5": 100 * (ranks < 5).double().mean().item(),
        "num_samples": len(targets),
    }


def assert_same_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    assert got["num_samples"] == expected["num_samples"]
    for key in expected:
        # Counts and ranks are exact; only the order of the loss summation differs across ranks.
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


def _evaluate_sharded(num_samples: int, multilabel: bool, rank: int, world_size: int) -> dict[str, float]:
    dataset = make_data(num_samples, multilabel)
    loader = DataLoader(dataset, batch_size=3, sampler=ShardedEvalSampler(dataset))
    assert len(loader.sampler) == len(range(rank, num_samples, world_size))
    out_features = dataset.tensors[1].shape[1] if multilabel else NUM_CLASSES
    return evaluate(make_model(out_features), loader, torch.device("cpu"), multilabel)


def _distributed_worker(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    results = {
        "single_7": _evaluate_sharded(7, False, rank, world_size),  # shards of 4 and 3
        "multi_7": _evaluate_sharded(7, True, rank, world_size),
        "single_1": _evaluate_sharded(1, False, rank, world_size),  # rank 1 has no sample at all
        "multi_1": _evaluate_sharded(1, True, rank, world_size),
    }
    # One model per process (one fine-tuning trial each): every rank scores the whole set alone.
    for multilabel in (False, True):
        dataset = make_data(7, multilabel)
        out_features = dataset.tensors[1].shape[1] if multilabel else NUM_CLASSES
        results[f"local_{multilabel}"] = evaluate(
            make_model(out_features), DataLoader(dataset, batch_size=3), torch.device("cpu"), multilabel,
            distributed=False,
        )
    # What torch's DistributedSampler would feed: 7 samples padded to 8 by repeating sample 0.
    dataset = make_data(7, False)
    padded = list(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False))
    loader = DataLoader(dataset, batch_size=3, sampler=padded)
    results["padded_7"] = evaluate(make_model(NUM_CLASSES), loader, torch.device("cpu"), False)
    return results


@pytest.mark.multiprocess
def test_two_rank_evaluation_counts_every_sample_once():
    per_rank = run_in_processes(_distributed_worker, world_size=2)
    for name, num_samples, multilabel in (
        ("single_7", 7, False), ("multi_7", 7, True), ("single_1", 1, False), ("multi_1", 1, True)
    ):
        expected = reference_metrics(make_data(num_samples, multilabel), multilabel)
        for rank_results in per_rank:  # every rank reports the same global metrics
            assert_same_metrics(rank_results[name], expected)
        # A one-process evaluate() agrees too.
        dataset = make_data(num_samples, multilabel)
        out_features = dataset.tensors[1].shape[1] if multilabel else NUM_CLASSES
        alone = evaluate(make_model(out_features), DataLoader(dataset, batch_size=3), torch.device("cpu"), multilabel)
        assert_same_metrics(alone, expected)

    # distributed=False communicates nothing: each rank's own full pass, 7 samples and not 14.
    for multilabel in (False, True):
        expected = reference_metrics(make_data(7, multilabel), multilabel)
        for rank_results in per_rank:
            assert_same_metrics(rank_results[f"local_{multilabel}"], expected)

    # With DistributedSampler's padding the same comparison fails: 8 samples counted, loss moved.
    padded = per_rank[0]["padded_7"]
    expected = reference_metrics(make_data(7, False), False)
    assert padded["num_samples"] == 8
    assert padded["loss"] != pytest.approx(expected["loss"], rel=1e-6)
    assert 0 < expected["top1"] < 100 and 0 < expected["top5"] < 100  # so a repeated sample shifts them
    assert padded["top1"] != pytest.approx(expected["top1"], rel=1e-6)


def test_evaluate_refuses_a_padding_distributed_sampler():
    dataset = make_data(7, False)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    loader = DataLoader(dataset, batch_size=3, sampler=sampler)
    with pytest.raises(ValueError, match="ShardedEvalSampler"):
        evaluate(make_model(NUM_CLASSES), loader, torch.device("cpu"), False)


def test_evaluate_restores_each_module_mode_and_supports_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.BatchNorm1d(8), nn.Linear(8, NUM_CLASSES))
    model.train()
    model[1].eval()  # e.g. a frozen backbone inside a model that is training
    running_mean = model[1].running_mean.clone()
    dataset = make_data(7, False)
    loader = DataLoader(dataset, batch_size=3)
    metrics = evaluate(model, loader, torch.device("cpu"), False)
    assert model.training and model[0].training and model[2].training
    assert not model[1].training
    assert torch.equal(model[1].running_mean, running_mean)  # BN ran in eval mode
    assert metrics["num_samples"] == 7

    low_precision = evaluate(model, loader, torch.device("cpu"), False, amp_dtype=torch.bfloat16)
    assert low_precision["num_samples"] == 7
    assert low_precision["loss"] == pytest.approx(metrics["loss"], rel=0.05)
    assert not model[1].training and model.training
