"""Scoring a detector over a loader: every image once, in one process and over two gloo ranks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from source.data import voc_demo_setup
from source.data.detection import build_detection_splits, detection_collate
from source.maths.detection_model import build_faster_rcnn_c4
from source.maths.models import build_backbone
from source.stages.detection_evaluation import detection_eval_loader, evaluate_detector
from source.stages.detection_metrics import original_ap50, voc_detection_metrics
from tests.distributed_harness import run_in_processes

FASHION_MNIST = Path(__file__).resolve().parents[1] / "data" / "FashionMNIST"


class ImperfectOracle(nn.Module):
    """A stand-in detector that recognises the images of ``dataset`` by their pixels and returns
    their ground truth with faults: every second object's box (the generated images hold 1-2 objects) is shifted by 60% of its width (a
    miss plus a false positive at IoU 0.5), scores vary with the image and the object."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.targets = {self.key(image): target for image, target in (dataset[i] for i in range(len(dataset)))}

    @staticmethod
    def key(image: torch.Tensor) -> tuple:
        return (*image.shape, round(float(image.double().sum()), 3))

    def forward(self, images):
        outputs = []
        for image in images:
            target = self.targets[self.key(image)]
            boxes = target["boxes"].clone()
            shifted = torch.arange(len(boxes)) % 2 == 1
            boxes[shifted, 0::2] += 0.6 * (boxes[shifted, 2] - boxes[shifted, 0]).unsqueeze(1)
            scores = (float(image.mean()) * 97.0 + torch.arange(len(boxes)) * 0.37) % 1.0
            outputs.append({"boxes": boxes, "scores": scores, "labels": target["labels"].clone()})
        return outputs


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    if not (FASHION_MNIST / "raw").is_dir():
        pytest.skip("FashionMNIST is not in data/FashionMNIST/raw")
    data_dir = tmp_path_factory.mktemp("deteval") / "data"
    data_dir.mkdir()
    (data_dir / "FashionMNIST").symlink_to(FASHION_MNIST, target_is_directory=True)
    voc_demo_setup.build_fashion_mnist_detection(data_dir, num_images=10, num_images_2012=2, seed=1)
    return data_dir


def expected_metrics(dataset, num_classes):
    model = ImperfectOracle(dataset)
    detections = [model([dataset[i][0]])[0] for i in range(len(dataset))]
    annotations = [dataset[i][1] for i in range(len(dataset))]
    return {**voc_detection_metrics(detections, annotations, num_classes), "ap50_original": original_ap50(detections, annotations)}


def test_one_process_scores_every_image(test_set):
    splits = build_detection_splits("fmnistdet", test_set)
    loader = detection_eval_loader(splits.test, batch_size=2)
    got = evaluate_detector(ImperfectOracle(splits.test), loader, torch.device("cpu"), splits.num_classes)
    assert got == expected_metrics(splits.test, splits.num_classes)
    assert 0.1 < got["ap50"] < 1.0  # the faults show
    assert len(splits.test) == 6  # half of the 10 VOC2007 images


def test_a_real_detector_is_scored_and_keeps_its_mode(test_set):
    splits = build_detection_splits("fmnistdet", test_set)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18")
    model = build_faster_rcnn_c4(backbone, splits.num_classes, min_size=64, max_size=96, box_score_thresh=0.0,
                                 rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    model.train()
    got = evaluate_detector(model, detection_eval_loader(splits.test, batch_size=5), torch.device("cpu"), splits.num_classes)
    assert set(got) == {"ap50", "ap75", "ap", "ap50_original"} and all(0.0 <= v <= 1.0 for v in got.values())
    assert got["ap"] <= got["ap50"] and model.training


def test_a_loader_that_may_repeat_images_is_refused(test_set):
    splits = build_detection_splits("fmnistdet", test_set)
    shuffled = DataLoader(splits.test, batch_size=2, shuffle=True, collate_fn=detection_collate)
    with pytest.raises(ValueError, match="detection_eval_loader"):
        evaluate_detector(ImperfectOracle(splits.test), shuffled, torch.device("cpu"), splits.num_classes)


def _two_rank_worker(rank: int, world_size: int, data_dir: Path) -> dict[str, float]:
    splits = build_detection_splits("fmnistdet", data_dir)
    loader = detection_eval_loader(splits.test, batch_size=2)
    assert len(loader.sampler) == len(range(rank, len(splits.test), world_size))
    return evaluate_detector(ImperfectOracle(splits.test), loader, torch.device("cpu"), splits.num_classes)


@pytest.mark.multiprocess
def test_two_ranks_agree_with_one_process(test_set):
    results = run_in_processes(_two_rank_worker, world_size=2, args=(test_set,))
    splits = build_detection_splits("fmnistdet", test_set)
    expected = expected_metrics(splits.test, splits.num_classes)
    assert results[0] == results[1]
    assert {k: v for k, v in results[0].items() if k != "ap50_original"} == {k: v for k, v in expected.items() if k != "ap50_original"}
    # The original averaged per-GPU APs: shards {0, 2, 4} and {1, 3, 5}.
    model = ImperfectOracle(splits.test)
    detections = [model([splits.test[i][0]])[0] for i in range(len(splits.test))]
    annotations = [splits.test[i][1] for i in range(len(splits.test))]
    assert results[0]["ap50_original"] == original_ap50(detections, annotations, shards=[[0, 2, 4], [1, 3, 5]])
