"""Object-detection scores: PASCAL VOC2007 AP50 / AP75 / AP, and the original BiSSL code's AP50.

:func:`voc_detection_metrics` follows the rules of the VOC devkit's ``VOCevaldet.m`` (Everingham
et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010), which detectron2's
``PascalVOCDetectionEvaluator`` re-implements for VOC2007:

* per class, the detections of all images are ranked by decreasing score and matched greedily:
  a detection's candidate is the ground-truth (GT) box of its class, in its image, with the
  highest IoU (the first one on ties); if that IoU >= the threshold and the box is not
  ``difficult`` and not yet matched, the detection is a true positive (TP) and the box becomes
  matched; if the box is already matched, a false positive (FP, a duplicate); if the box is
  ``difficult`` the detection is ignored (neither TP nor FP); if the IoU is below the threshold, a
  FP. Difficult boxes never count as positives (N_pos counts the non-difficult GT boxes).
  A detection whose best box is matched is a FP even if another box would still be free: that is
  the devkit's rule, not a fallback to the next-best box.
* precision P = TP / (TP + FP) and recall R = TP / N_pos along the ranking; AP is VOC2007's
  11-point interpolation AP = (1/11) sum_{t in {0, 0.1, ..., 1}} max_{R >= t} P (0 where no
  point reaches recall t).
* ``ap50`` / ``ap75`` average that AP over classes at IoU 0.5 / 0.75; ``ap`` averages the class
  mean over IoU 0.50, 0.55, ..., 0.95, as detectron2 reports "AP" for VOC2007.

Decisions where the devkit says nothing or its ports differ:

* **Pixel convention.** The devkit measures boxes in inclusive 1-based pixel indices, so widths
  are ``xmax - xmin + 1``. :mod:`source.data.detection` turns an annotation (xmin, ymin, xmax,
  ymax) into torchvision's continuous coordinates (xmin - 1, ymin - 1, xmax, ymax), as
  detectron2's VOC loader does; in those coordinates the devkit's "+1" IoU is exactly the plain
  continuous IoU (detectron2 adds the 1 back to a detection's xmin/ymin before calling the
  devkit code, which gives the same number). So IoUs here are torchvision's ``box_iou`` in
  float64, with no "+1".
* **Threshold test**: IoU >= threshold, as ``VOCevaldet.m`` (the Python ports use ``>``; with
  real-valued IoUs the two differ only on exact equality).
* **Full precision**: detectron2 passes detections to the devkit code through text files with
  scores rounded to 3 decimals and coordinates to 0.1 px; here nothing is rounded, so its figures
  can differ from ours in the last digits.
* **Recall levels** are exactly t = j / 10 (the ports' ``np.arange(0, 1.1, 0.1)`` carries float
  noise: its 0.3 is 0.30000000000000004), as :func:`source.stages.evaluation.average_precision_11pt`.
* **Equal scores**: matching takes tied detections in image order, then the order within the
  image; the precision-recall curve is read only after the last detection of each run of equal
  scores, so the AP does not depend on how ties are ordered (the devkit's sort leaves that open).
* **A class without any non-difficult GT box** in the evaluated images has no defined AP: its
  per-class AP is NaN and it is left out of the class mean (on the VOC2007 test set every class
  has GT, so this changes nothing there; on small generated sets it does not punish a class that
  happens to be absent). If no class has GT the metrics are undefined and a ``ValueError`` is raised.

Scores are fractions in [0, 1] (detectron2 prints percentages).

:func:`original_ap50` reproduces the evaluator of the original BiSSL code (``eval_object_detector_ap50``)
so results can be compared with the paper's: class-agnostic matching, trapezoid-rule area under
the PR curve, difficult boxes as ordinary ones, and per-shard APs averaged.
:func:`gather_detection_results` collects every rank's predictions so that each test image is
scored exactly once.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from source.run.distributed import gather_objects

__all__ = [
    "AP_IOU_THRESHOLDS", "voc07_eleven_point_ap", "voc_average_precisions", "voc_detection_metrics",
    "original_ap50", "gather_detection_results",
]

# IoU thresholds of the "ap" score: 0.50, 0.55, ..., 0.95 (detectron2's VOC "AP"), as exact fractions.
AP_IOU_THRESHOLDS = tuple(k / 100 for k in range(50, 100, 5))
# VOC2007's 11 recall levels 0, 0.1, ..., 1.
_RECALL_LEVELS = np.arange(11) / 10
# The original evaluator's defaults: it kept detections scoring above 0.05, at most 100 per image.
ORIGINAL_SCORE_THRESHOLD = 0.05
ORIGINAL_TOP_K = 100
# The original evaluator's guard against 0 / 0 in recall and precision.
_ORIGINAL_EPS = 1e-16

Boxes = Mapping[str, torch.Tensor]


def voc07_eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP = (1/11) sum_{t in {0, 0.1, ..., 1}} max_{i : recall_i >= t} precision_i.

    A recall level no point reaches contributes 0.

    Args:
        recall: (K,) recall at each point of the ranking.
        precision: (K,) precision at the same points.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.shape != precision.shape or recall.ndim != 1:
        raise ValueError(f"need recall (K,) and precision (K,), got {recall.shape} and {precision.shape}")
    reached = recall[None, :] >= _RECALL_LEVELS[:, None]  # (11, K)
    interpolated = np.where(reached, precision[None, :], 0.0).max(axis=1, initial=0.0)  # (11,)
    return float(interpolated.mean())


def _as_cpu(target: Boxes, keys: Sequence[str], where: str) -> dict[str, torch.Tensor]:
    missing = [key for key in keys if key not in target]
    if missing:
        raise ValueError(f"{where} lacks {missing}; it needs {list(keys)}")
    out = {key: torch.as_tensor(target[key]).detach().cpu() for key in keys}
    boxes = out["boxes"].to(torch.float64)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be (N, 4) xyxy, got shape {tuple(out['boxes'].shape)}")
    out["boxes"] = boxes
    for key in keys:
        if key != "boxes" and out[key].reshape(-1).shape[0] != boxes.shape[0]:
            raise ValueError(f"{where}: {key} has {out[key].numel()} entries for {boxes.shape[0]} boxes")
        if key != "boxes":
            out[key] = out[key].reshape(-1)
    return out


def _check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
        raise ValueError(f"{where}: labels must lie in 1..{num_classes} (0 is the background), got {sorted(set(labels.tolist()))}")


def _match_image_class(
    boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_difficult: torch.Tensor, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's greedy assignment inside one image and class, at every threshold at once.

    Args:
        boxes: (D, 4) detections, already in ranking order.
        gt_boxes: (G, 4) GT boxes of the class; gt_difficult: (G,) bool.
        thresholds: (T,) IoU thresholds.

    Returns:
        tp, fp: (D, T) bool.
    """
    num_detections, num_thresholds = boxes.shape[0], thresholds.shape[0]
    if gt_boxes.shape[0] == 0:
        return np.zeros((num_detections, num_thresholds), bool), np.ones((num_detections, num_thresholds), bool)
    iou = box_iou(boxes, gt_boxes).numpy()  # (D, G), float64
    best = iou.argmax(axis=1)  # (D,) first box of the highest IoU
    best_iou = iou[np.arange(num_detections), best]  # (D,)
    difficult = gt_difficult.numpy().astype(bool)
    matched = np.zeros((num_thresholds, gt_boxes.shape[0]), bool)  # (T, G)
    tp = np.zeros((num_detections, num_thresholds), bool)
    fp = np.zeros((num_detections, num_thresholds), bool)
    for d in range(num_detections):
        hit = best_iou[d] >= thresholds  # (T,)
        fp[d] = ~hit
        if difficult[best[d]]:
            continue  # overlapping a difficult box: ignored where it is a hit
        taken = matched[:, best[d]]
        tp[d] = hit & ~taken
        fp[d] |= hit & taken
        matched[:, best[d]] |= tp[d]
    return tp, fp


def voc_average_precisions(
    detections: Sequence[Boxes], annotations: Sequence[Boxes], num_classes: int,
    iou_thresholds: Sequence[float] = AP_IOU_THRESHOLDS,
) -> np.ndarray:
    """VOC2007 11-point AP of every class at every IoU threshold (the rules in the module docstring).

    Args:
        detections: one dict per image: ``boxes`` (D, 4) xyxy in pixels, ``scores`` (D,),
            ``labels`` (D,) in 1..num_classes.
        annotations: one dict per image, same order: ``boxes`` (G, 4), ``labels`` (G,) in
            1..num_classes, ``difficult`` (G,) bool.
        num_classes: the number of object classes C (background excluded).
        iou_thresholds: the T thresholds.

    Returns:
        (T, C) float64; column c - 1 is class c; NaN for a class without non-difficult GT.
    """
    if len(detections) != len(annotations):
        raise ValueError(f"{len(detections)} detection entries for {len(annotations)} annotated images; need one per image")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    num_thresholds = thresholds.shape[0]
    # Per class: lists over images of scores (D,), tp (D, T), fp (D, T), in ranking order.
    scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    tps: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    fps: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    num_positives = np.zeros(num_classes, dtype=np.int64)
    for index, (detection, annotation) in enumerate(zip(detections, annotations)):
        det = _as_cpu(detection, ("boxes", "scores", "labels"), f"detections[{index}]")
        gt = _as_cpu(annotation, ("boxes", "labels", "difficult"), f"annotations[{index}]")
        _check_labels(det["labels"], num_classes, f"detections[{index}]")
        _check_labels(gt["labels"], num_classes, f"annotations[{index}]")
        gt_difficult = gt["difficult"].to(torch.bool)
        num_positives += np.bincount(gt["labels"][~gt_difficult].numpy() - 1, minlength=num_classes)
        det_scores = det["scores"].to(torch.float64)
        for label in torch.unique(det["labels"]).tolist():
            mine = (det["labels"] == label).nonzero().view(-1)
            order = mine[torch.sort(-det_scores[mine], stable=True).indices]
            of_class = gt["labels"] == label
            tp, fp = _match_image_class(det["boxes"][order], gt["boxes"][of_class], gt_difficult[of_class], thresholds)
            scores[label - 1].append(det_scores[order].numpy())
            tps[label - 1].append(tp)
            fps[label - 1].append(fp)
    aps = np.full((num_thresholds, num_classes), np.nan)
    for c in range(num_classes):
        if num_positives[c] == 0:
            continue
        if not scores[c]:
            aps[:, c] = 0.0
            continue
        class_scores = np.concatenate(scores[c])
        # Stable: tied detections keep image order, then their order inside the image (the matching order).
        ranking = np.argsort(-class_scores, kind="stable")
        class_scores = class_scores[ranking]
        tp = np.cumsum(np.concatenate(tps[c])[ranking], axis=0)  # (D, T)
        fp = np.cumsum(np.concatenate(fps[c])[ranking], axis=0)
        last_of_tie = np.append(class_scores[1:] != class_scores[:-1], True)  # (D,)
        tp, fp = tp[last_of_tie], fp[last_of_tie]
        recall = tp / num_positives[c]
        precision = tp / np.maximum(tp + fp, 1)  # 0 where every detection so far was ignored
        for t in range(num_thresholds):
            aps[t, c] = voc07_eleven_point_ap(recall[:, t], precision[:, t])
    return aps


def voc_detection_metrics(detections: Sequence[Boxes], annotations: Sequence[Boxes], num_classes: int) -> dict[str, float]:
    """PASCAL VOC2007 detection scores, as fractions in [0, 1].

    ``ap50`` / ``ap75``: the mean over classes of the 11-point AP at IoU 0.5 / 0.75; ``ap``: the
    mean of that class mean over IoU 0.50:0.05:0.95. Classes without non-difficult GT are left
    out of the class means (see the module docstring for this and the other rules).

    Args:
        detections: one dict per image: ``boxes`` (D, 4) xyxy in pixels (torchvision's
            continuous coordinates), ``scores`` (D,), ``labels`` (D,) in 1..num_classes.
        annotations: one dict per image, same order: ``boxes`` (G, 4), ``labels`` (G,),
            ``difficult`` (G,) bool.
        num_classes: the number of object classes (20 for VOC; the background 0 not counted).
    """
    aps = voc_average_precisions(detections, annotations, num_classes, AP_IOU_THRESHOLDS)  # (10, C)
    present = ~np.isnan(aps[0])
    if not present.any():
        raise ValueError("detection AP is undefined: no class has a non-difficult ground-truth box in the evaluated images")
    class_means = aps[:, present].mean(axis=1)  # (10,)
    return {
        "ap50": float(class_means[AP_IOU_THRESHOLDS.index(0.5)]),
        "ap75": float(class_means[AP_IOU_THRESHOLDS.index(0.75)]),
        "ap": float(class_means.mean()),
    }


def _original_image_stats(detection: Boxes, annotation: Boxes, iou_threshold: float, score_threshold: float, top_k: int) -> tuple[np.ndarray, ...]:
    """One image as the original evaluator saw it: (tp (D,), scores (D,), labels (D,), gt labels (G,))."""
    det = _as_cpu(detection, ("boxes", "scores", "labels"), "detection")
    gt = _as_cpu(annotation, ("boxes", "labels"), "annotation")
    keep = det["scores"] > score_threshold if score_threshold > 0 else torch.ones_like(det["scores"], dtype=torch.bool)
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep].to(torch.float64), det["labels"][keep]
    if scores.numel() > top_k:  # only then re-ordered by score; otherwise the model's order is kept
        best = torch.sort(-scores, stable=True).indices[:top_k]
        boxes, scores, labels = boxes[best], scores[best], labels[best]
    tp = np.zeros(boxes.shape[0], bool)
    if boxes.shape[0] and gt["boxes"].shape[0]:
        # Class-agnostic: a detection takes the first free GT box of ANY class with IoU >= threshold.
        free = (box_iou(boxes, gt["boxes"]) >= iou_threshold).numpy()  # (D, G)
        for d in range(boxes.shape[0]):
            candidates = np.flatnonzero(free[d])
            if candidates.size:
                tp[d] = True
                free[:, candidates[0]] = False
    return tp, scores.numpy(), labels.numpy(), gt["labels"].numpy()


def _original_shard_ap(stats: Sequence[tuple[np.ndarray, ...]]) -> float:
    tp = np.concatenate([s[0] for s in stats]) if stats else np.zeros(0, bool)
    scores = np.concatenate([s[1] for s in stats]) if stats else np.zeros(0)
    labels = np.concatenate([s[2] for s in stats]) if stats else np.zeros(0, np.int64)
    gt_labels = np.concatenate([s[3] for s in stats]) if stats else np.zeros(0, np.int64)
    aps = []
    for label in np.unique(gt_labels):  # only classes with GT in this shard
        mine = labels == label
        ranking = np.argsort(-scores[mine], kind="stable")
        hits = tp[mine][ranking]
        true_positives = np.cumsum(hits)
        false_positives = np.cumsum(~hits)
        recall = np.concatenate([[0.0], true_positives / (np.sum(gt_labels == label) + _ORIGINAL_EPS)])
        precision = np.concatenate([[1.0], true_positives / (true_positives + false_positives + _ORIGINAL_EPS)])
        # Trapezoid rule over the PR points, (0, 1) prepended, as torch.trapz(precision, recall).
        aps.append(float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2)))
    return float(np.mean(aps)) if aps else float("nan")


def original_ap50(
    detections: Sequence[Boxes], annotations: Sequence[Boxes], shards: Sequence[Sequence[int]] | None = None,
    iou_threshold: float = 0.5, score_threshold: float = ORIGINAL_SCORE_THRESHOLD, top_k: int = ORIGINAL_TOP_K,
) -> float:
    """AP50 as the original BiSSL code computed it, as a fraction (the original printed 100x this).

    Read from the authors' ``eval_object_detector_ap50`` (NeurIPS-version code), per shard:

    1. per image, keep detections scoring above ``score_threshold``; if more than ``top_k`` are
       left, keep the ``top_k`` best (re-ordered by score); otherwise keep the model's order;
    2. per image, class-agnostic matching in that order: a detection is a TP if some not yet
       matched GT box of *any* class has IoU >= ``iou_threshold`` (the first such box by index
       is then taken), else a FP; ``difficult`` is not used (difficult boxes are ordinary GT);
    3. per class present among the shard's GT labels: the detections predicted as that class,
       ranked by score, give recall = TP / (N_gt + 1e-16) and precision = TP / (TP + FP + 1e-16);
       with (0, 1) prepended the AP is the trapezoid-rule area under precision(recall). Recall can
       exceed 1 (a detection of class c may be matched to a box of another class). Classes
       without GT in the shard are skipped; a class with GT but no detection scores 0;
    4. the mean over those classes, then, with ``shards``, the plain mean over shards (the
       original all-reduced each GPU's AP and divided by the number of GPUs).

    Args:
        detections, annotations: as :func:`voc_detection_metrics` (``difficult`` is not read).
        shards: lists of image indices, one per GPU of the original run (its DistributedSampler
            shards); None scores all images as one shard. A shard without GT gives NaN, as the
            original's mean over no class did.
    """
    if len(detections) != len(annotations):
        raise ValueError(f"{len(detections)} detection entries for {len(annotations)} annotated images; need one per image")
    stats = [_original_image_stats(d, a, iou_threshold, score_threshold, top_k) for d, a in zip(detections, annotations)]
    if shards is None:
        return _original_shard_ap(stats)
    if not shards:
        raise ValueError("shards must hold at least one shard of image indices (or be None)")
    return float(np.mean([_original_shard_ap([stats[i] for i in shard]) for shard in shards]))


def gather_detection_results(
    indices: Sequence[int], detections: Sequence[Boxes], annotations: Sequence[Boxes], num_images: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Every rank's predictions and annotations, merged on every rank in dataset-index order.

    Each rank passes the dataset indices of the images it scored (e.g. its
    :class:`source.stages.evaluation.ShardedEvalSampler` shard) with their detections and
    annotations; the tensors travel on the CPU through :func:`source.run.distributed.gather_objects`.
    An index seen twice (a padding sampler such as ``DistributedSampler``) is an error, and with
    ``num_images`` so is a missing one: every test image is scored exactly once. Call on every
    rank (a collective); in one process it only sorts and checks.

    Returns:
        (detections, annotations), one entry per image, ordered by dataset index.
    """
    if not len(indices) == len(detections) == len(annotations):
        raise ValueError(f"need one detection and annotation per index: {len(indices)} indices, {len(detections)} detections, {len(annotations)} annotations")
    local = [
        (int(index), {k: torch.as_tensor(v).detach().cpu() for k, v in det.items()}, {k: torch.as_tensor(v).detach().cpu() for k, v in ann.items()})
        for index, det, ann in zip(indices, detections, annotations)
    ]
    merged: dict[int, tuple[dict, dict]] = {}
    for part in gather_objects(local):
        for index, det, ann in part:  # type: ignore[union-attr]
            if index in merged:
                raise ValueError(f"image {index} was scored twice; evaluate with a sampler that visits every image once (ShardedEvalSampler)")
            merged[index] = (det, ann)
    if num_images is not None and sorted(merged) != list(range(num_images)):
        missing = sorted(set(range(num_images)) - set(merged))
        raise ValueError(f"scored {len(merged)} images, expected indices 0..{num_images - 1}; missing {missing[:10]}")
    order = sorted(merged)
    return [merged[i][0] for i in order], [merged[i][1] for i in order]
