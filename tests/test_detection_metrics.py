"""The VOC2007 detection evaluator against hand-computed cases and an independent devkit-style loop,
the original BiSSL evaluator's AP50, and the gathering of predictions across ranks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from source.stages.detection_metrics import (
    gather_detection_results,
    original_ap50,
    voc07_eleven_point_ap,
    voc_average_precisions,
    voc_detection_metrics,
)
from tests.distributed_harness import run_in_processes


def gt(boxes, labels, difficult=None):
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    difficult = [False] * len(boxes) if difficult is None else difficult
    return {"boxes": boxes, "labels": torch.as_tensor(labels, dtype=torch.int64), "difficult": torch.as_tensor(difficult, dtype=torch.bool)}


def det(boxes, scores, labels):
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.as_tensor(scores, dtype=torch.float32),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
    }


FAR = [200.0, 200.0, 220.0, 220.0]  # a box that overlaps no ground truth in these tests


def test_perfect_detector_scores_one():
    annotations = [gt([[0, 0, 10, 10], [20, 20, 40, 50]], [1, 3]), gt([[5, 5, 30, 25]], [2])]
    detections = [det(a["boxes"], [0.9] * len(a["labels"]), a["labels"]) for a in annotations]
    assert voc_detection_metrics(detections, annotations, num_classes=3) == {"ap50": 1.0, "ap75": 1.0, "ap": 1.0}
    assert original_ap50(detections, annotations) == pytest.approx(1.0)


def test_known_precision_recall_curve():
    # 4 GT boxes of one class; ranked detections: TP, FP, TP, TP, FP (one box never found).
    boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]
    annotations = [gt(boxes, [1, 1, 1, 1])]
    detections = [det([boxes[0], FAR, boxes[1], boxes[2], FAR], [0.9, 0.8, 0.7, 0.6, 0.5], [1] * 5)]
    # precision 1, 1/2, 2/3, 3/4, 3/5 at recall 1/4, 1/4, 1/2, 3/4, 3/4: the best precision at
    # recall >= t is 1 for t <= 0.2 (3 levels), 3/4 for 0.3 <= t <= 0.7 (5 levels), 0 above (3 levels).
    expected = (3 * 1.0 + 5 * 0.75 + 3 * 0.0) / 11
    assert voc_detection_metrics(detections, annotations, 1)["ap50"] == pytest.approx(expected, abs=1e-12)
    # The original integrates the same curve with the trapezoid rule from (0, 1).
    recall = [0, 0.25, 0.25, 0.5, 0.75, 0.75]
    precision = [1, 1, 0.5, 2 / 3, 0.75, 0.6]
    trapezoid = sum((recall[i + 1] - recall[i]) * (precision[i + 1] + precision[i]) / 2 for i in range(5))
    assert original_ap50(detections, annotations) == pytest.approx(trapezoid, abs=1e-9)


def test_eleven_point_ap_uses_exact_recall_levels():
    # Recall exactly 0.3 must reach the level 0.3 (np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004).
    assert voc07_eleven_point_ap(np.array([0.3]), np.array([1.0])) == pytest.approx(4 / 11)


def test_difficult_box_is_neither_positive_nor_false_positive():
    annotations = [gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1], difficult=[False, True])]
    # The detection of the difficult box ranks first and is ignored; without that rule it would be
    # a false positive ahead of the true one and AP would be 1/2 (and recall would need 2 boxes).
    detections = [det([[50, 50, 60, 60], [0, 0, 10, 10], FAR], [0.95, 0.9, 0.7], [1, 1, 1])]
    assert voc_detection_metrics(detections, annotations, 1)["ap50"] == pytest.approx(1.0)
    as_ordinary = [gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
    assert voc_detection_metrics(detections, as_ordinary, 1)["ap50"] == pytest.approx(1.0)  # both found
    missed_difficult = [det([[0, 0, 10, 10]], [0.9], [1])]
    assert voc_detection_metrics(missed_difficult, annotations, 1)["ap50"] == pytest.approx(1.0)  # not a positive
    assert voc_detection_metrics(missed_difficult, as_ordinary, 1)["ap50"] == pytest.approx(6 / 11)


def test_class_with_only_difficult_boxes_is_left_out():
    annotations = [gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 2], difficult=[False, True])]
    detections = [det([[0, 0, 10, 10], FAR], [0.9, 0.8], [1, 2])]
    aps = voc_average_precisions(detections, annotations, 2, (0.5,))
    assert aps[0, 0] == 1.0 and np.isnan(aps[0, 1])
    assert voc_detection_metrics(detections, annotations, 2)["ap50"] == 1.0
    with pytest.raises(ValueError, match="no class has a non-difficult"):
        voc_detection_metrics(detections, [gt([[0, 0, 10, 10]], [1], [True])], 2)


def test_duplicate_detection_is_a_false_positive():
    annotations = [gt([[0, 0, 10, 10], [20, 0, 30, 10]], [1, 1])]
    detections = [det([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 0, 30, 10]], [0.9, 0.8, 0.7], [1, 1, 1])]
    # TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 1 for t <= 0.5 (6 levels), 2/3 above (5).
    assert voc_detection_metrics(detections, annotations, 1)["ap50"] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_best_box_already_taken_gives_a_false_positive():
    # The devkit assigns each detection to its highest-IoU box only; if that box is taken the
    # detection is a FP even though another box overlaps it enough.
    annotations = [gt([[0, 0, 10, 10], [0, 0, 10, 12]], [1, 1])]
    detections = [det([[0, 0, 10, 10], [0, 0, 10, 10.2]], [0.9, 0.8], [1, 1])]  # both closest to box 0
    assert voc_detection_metrics(detections, annotations, 1)["ap50"] == pytest.approx(6 / 11)


def test_wrong_class_detection_is_a_false_positive_but_a_hit_for_the_original():
    annotations = [gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 2])]
    detections = [det([[0, 0, 10, 10]], [0.9], [2])]  # on the class-1 box, labelled 2
    assert voc_detection_metrics(detections, annotations, 2)["ap50"] == 0.0
    # Class-agnostic matching makes it a TP of class 2 (AP 1); class 1 has no detection (AP 0).
    assert original_ap50(detections, annotations) == pytest.approx(0.5)


def test_ap75_below_ap50_for_an_iou_between_them():
    annotations = [gt([[0, 0, 10, 10]], [1])]
    detections = [det([[0, 0, 10, 15]], [0.9], [1])]  # IoU = 100 / 150 = 2/3
    metrics = voc_detection_metrics(detections, annotations, 1)
    assert metrics["ap50"] == 1.0 and metrics["ap75"] == 0.0
    assert metrics["ap"] == pytest.approx(0.4)  # hit at IoU 0.50, 0.55, 0.60, 0.65 of the 10 thresholds


def test_tied_scores_do_not_change_the_ap():
    annotations = [gt([[0, 0, 10, 10]], [1])]
    tp_first = [det([[0, 0, 10, 10], FAR], [0.5, 0.5], [1, 1])]
    fp_first = [det([FAR, [0, 0, 10, 10]], [0.5, 0.5], [1, 1])]
    assert voc_detection_metrics(tp_first, annotations, 1) == voc_detection_metrics(fp_first, annotations, 1)


def test_bad_inputs_are_refused():
    annotations = [gt([[0, 0, 10, 10]], [1])]
    with pytest.raises(ValueError, match="one per image"):
        voc_detection_metrics([], annotations, 1)
    with pytest.raises(ValueError, match=r"1\.\.1"):
        voc_detection_metrics([det([[0, 0, 1, 1]], [0.5], [0])], annotations, 1)


def test_original_averages_per_shard_aps():
    annotations = [gt([[0, 0, 10, 10]], [1]), gt([[0, 0, 10, 10], [20, 0, 30, 10]], [1, 1])]
    detections = [det([[0, 0, 10, 10]], [0.9], [1]), det([[0, 0, 10, 10]], [0.8], [1])]
    # Shard APs 1 and 1/2 (trapezoid under precision 1 up to recall 1/2) average to 3/4; pooled,
    # 2 of 3 boxes are found at precision 1: 2/3.
    assert original_ap50(detections, annotations, shards=[[0], [1]]) == pytest.approx(0.75)
    assert original_ap50(detections, annotations) == pytest.approx(2 / 3)


def test_original_applies_its_score_threshold_and_ignores_difficult():
    annotations = [gt([[0, 0, 10, 10], [20, 0, 30, 10]], [1, 1], difficult=[False, True])]
    detections = [det([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.04], [1, 1])]
    assert original_ap50(detections, annotations) == pytest.approx(0.5)  # the 0.04 detection is dropped
    assert original_ap50(detections, annotations, score_threshold=0.0) == pytest.approx(1.0)


# --- an independent reference: the devkit's loop, literally, in VOC's 1-based pixel indices ---


def devkit_average_precision(images, cls, threshold):
    """VOCevaldet.m for one class: GT in inclusive 1-based pixels, detections written as detectron2
    writes them (xmin + 1, ymin + 1), IoU with the "+1" widths, IoU >= threshold."""
    npos = sum(int(np.sum((g["labels"] == cls) & ~g["difficult"])) for g, _ in images)
    if npos == 0:
        return None
    found = [np.zeros(len(g["labels"]), bool) for g, _ in images]
    entries = [(s, i, b) for i, (_, d) in enumerate(images) for s, b, lab in zip(d["scores"], d["boxes"], d["labels"]) if lab == cls]
    entries.sort(key=lambda e: -e[0])
    tp, fp = [], []
    for _, i, box in entries:
        bb = [box[0] + 1, box[1] + 1, box[2], box[3]]
        g = images[i][0]
        ovmax, jmax = -np.inf, -1
        for j in range(len(g["labels"])):
            if g["labels"][j] != cls:
                continue
            gb = g["voc_boxes"][j]
            iw = min(bb[2], gb[2]) - max(bb[0], gb[0]) + 1
            ih = min(bb[3], gb[3]) - max(bb[1], gb[1]) + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (gb[2] - gb[0] + 1) * (gb[3] - gb[1] + 1) - iw * ih
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax >= threshold:
            if not g["difficult"][jmax]:
                tp.append(0 if found[i][jmax] else 1)
                fp.append(1 if found[i][jmax] else 0)
                found[i][jmax] = True
            else:
                tp.append(0)
                fp.append(0)
        else:
            tp.append(0)
            fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for k in range(11):
        reached = prec[rec >= k / 10]
        ap += (reached.max() if reached.size else 0.0) / 11
    return ap


def random_scene(rng, num_images, num_classes):
    images = []
    for _ in range(num_images):
        count = rng.integers(0, 5)
        xmin = rng.integers(1, 80, count)
        ymin = rng.integers(1, 80, count)
        voc = np.stack([xmin, ymin, xmin + rng.integers(3, 40, count), ymin + rng.integers(3, 40, count)], 1).astype(np.float64).reshape(-1, 4)
        labels = rng.integers(1, num_classes + 1, count)
        difficult = rng.random(count) < 0.2
        continuous = voc.copy()
        continuous[:, :2] -= 1  # torchvision coordinates of the VOC annotation
        boxes, scores, det_labels = [], [], []
        for box, label in zip(continuous, labels):
            for _ in range(rng.integers(0, 3)):  # 0-2 jittered detections per object, sometimes mislabelled
                size = box[2:] - box[:2]
                jitter = rng.normal(0, 0.15, 4) * np.concatenate([size, size])
                boxes.append(box + jitter)
                det_labels.append(label if rng.random() < 0.8 else rng.integers(1, num_classes + 1))
        for _ in range(rng.integers(0, 3)):  # background detections
            corner = rng.uniform(0, 100, 2)
            boxes.append(np.concatenate([corner, corner + rng.uniform(2, 40, 2)]))
            det_labels.append(rng.integers(1, num_classes + 1))
        boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
        scores = rng.random(len(boxes))
        images.append((
            {"voc_boxes": voc, "boxes": continuous, "labels": labels, "difficult": difficult},
            {"boxes": boxes, "scores": scores, "labels": np.array(det_labels, dtype=np.int64)},
        ))
    return images


def as_torch(images):
    """(detections, annotations) of a random scene, as the evaluator takes them."""
    annotations = [{"boxes": torch.from_numpy(g["boxes"]), "labels": torch.from_numpy(g["labels"]), "difficult": torch.from_numpy(g["difficult"])}
                   for g, _ in images]
    detections = [{k: torch.from_numpy(v) for k, v in d.items()} for _, d in images]
    return detections, annotations


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_the_devkit_loop_on_random_scenes(seed):
    num_classes = 3
    rng = np.random.default_rng(seed)
    images = random_scene(rng, num_images=12, num_classes=num_classes)
    detections, annotations = as_torch(images)
    thresholds = [k / 100 for k in range(50, 100, 5)]
    expected = np.array([[devkit_average_precision(images, c, t) for c in range(1, num_classes + 1)] for t in thresholds], dtype=float)
    present = ~np.isnan(expected[0])
    means = expected[:, present].mean(axis=1)
    got = voc_detection_metrics(detections, annotations, num_classes)
    assert got["ap50"] == pytest.approx(means[0], abs=1e-12)
    assert got["ap75"] == pytest.approx(means[5], abs=1e-12)
    assert got["ap"] == pytest.approx(means.mean(), abs=1e-12)
    np.testing.assert_allclose(voc_average_precisions(detections, annotations, num_classes), expected, atol=1e-12)
    assert 0 < got["ap50"] < 1  # the scene exercises both hits and misses


# --- gathering across ranks ---


def test_gather_in_one_process_orders_and_checks():
    anns = [gt([[0, 0, 1, 1]], [1]), gt([[0, 0, 2, 2]], [1])]
    dets = [det([[0, 0, 1, 1]], [0.5], [1]), det([[0, 0, 2, 2]], [0.5], [1])]
    got_dets, got_anns = gather_detection_results([1, 0], dets, anns, num_images=2)
    assert torch.equal(got_anns[0]["boxes"], anns[1]["boxes"]) and torch.equal(got_dets[1]["boxes"], dets[0]["boxes"])
    with pytest.raises(ValueError, match="scored twice"):
        gather_detection_results([0, 0], dets, anns)
    with pytest.raises(ValueError, match="missing"):
        gather_detection_results([0, 1], dets, anns, num_images=3)


def _gather_worker(rank: int, world_size: int) -> dict[str, float]:
    rng = np.random.default_rng(7)
    images = random_scene(rng, num_images=7, num_classes=2)
    mine = list(range(rank, len(images), world_size))  # ShardedEvalSampler's shard
    dets, anns = as_torch([images[i] for i in mine])
    all_dets, all_anns = gather_detection_results(mine, dets, anns, num_images=len(images))
    return voc_detection_metrics(all_dets, all_anns, 2)


@pytest.mark.multiprocess
def test_two_ranks_score_every_image_once():
    results = run_in_processes(_gather_worker, world_size=2)
    rng = np.random.default_rng(7)
    images = random_scene(rng, num_images=7, num_classes=2)
    expected = voc_detection_metrics(*as_torch(images), 2)
    assert results[0] == results[1] == expected
