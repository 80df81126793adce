"""Time one detection training step on the CPU: our Faster R-CNN R-C4 against torchvision's own.

    python bench/bench_detection_step.py --threads 2 --arch resnet50 --images 2 --repeats 5
    python bench/bench_detection_step.py --quick      # seconds: checks that the bench runs

Ours is :func:`source.maths.detection_model.build_faster_rcnn_c4` around :func:`source.maths.models.build_backbone`
(the trunk and the res5 head share the backbone's modules). The reference is built the way
torchvision builds ``fasterrcnn_resnet50_fpn``, from its parts only, with the same trunk and sizes
and no FPN: ``IntermediateLayerGetter`` over a torchvision ResNet up to ``layer3`` (stride 16), the
same ``AnchorGenerator``, ``MultiScaleRoIAlign`` and image resize, and for the box head the
ResNet's ``layer4`` + average pooling in an ``nn.Sequential`` (``--head res5``, the default) or
``TwoMLPHead`` (``--head original``). Both models start from the same weights (the reference
loads ours), take the same images (real FashionMNIST items pasted on canvases, as the generated
``fmnistdet`` set, from ``--data-dir``) and targets, and torch is reseeded before every step so
both sample the same anchors and RoIs. A step is forward (the four losses), backward and an SGD
update. After one warm-up step each, the two models alternate for ``--repeats`` rounds in the
same process, so drift in machine load reaches both alike.

The ratio is our median step time over torchvision's (<= 1: ours is no slower).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from report import add_json_argument, write_report
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from source.data.voc_demo_setup import compose_image, load_fashion_mnist
from source.maths.detection_model import (
    DEFAULT_ANCHOR_SIZES,
    DEFAULT_ASPECT_RATIOS,
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_SIZE,
    DEFAULT_ROI_OUTPUT_SIZE,
    ORIGINAL_HEAD_WIDTH,
    ROI_SAMPLING_RATIO,
    build_faster_rcnn_c4,
)
from source.maths.models import build_backbone

NAME = "detection_step"
# Classes of the generated set (FashionMNIST's), background excluded.
NUM_CLASSES = 10


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet50"))
    parser.add_argument("--head", default="res5", choices=("res5", "original"), help="box head of both models")
    parser.add_argument("--images", type=int, default=2, help="images per step")
    parser.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE, help="short side after the resize (paper: 196)")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="long-side cap (paper: 320)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model, after one warm-up each")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data",
                        help="holds FashionMNIST/raw (default: the repository's data/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 1 image at 64-96 px, 1 repeat: only checks that the bench runs")
    add_json_argument(parser, NAME)
    return parser


class _Res5Head(nn.Sequential):
    """The reference's res5 box head: layer4, global average pooling, flatten (R, C5)."""

    def __init__(self, layer4: nn.Module) -> None:
        super().__init__(layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def torchvision_reference(resnet: nn.Module, head: str, min_size: int, max_size: int) -> FasterRCNN:
    """Faster R-CNN C4 from torchvision parts only, as ``fasterrcnn_resnet50_fpn`` is assembled but without FPN."""
    trunk = IntermediateLayerGetter(resnet, return_layers={"layer3": "0"})
    trunk.out_channels = resnet.layer3[-1].conv1.in_channels
    if head == "res5":
        box_head: nn.Module = _Res5Head(resnet.layer4)
        representation = resnet.layer4[-1].conv1.in_channels
    else:
        box_head = TwoMLPHead(trunk.out_channels * DEFAULT_ROI_OUTPUT_SIZE**2, ORIGINAL_HEAD_WIDTH)
        representation = ORIGINAL_HEAD_WIDTH
    return FasterRCNN(
        trunk, num_classes=None, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(sizes=DEFAULT_ANCHOR_SIZES, aspect_ratios=DEFAULT_ASPECT_RATIOS),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=DEFAULT_ROI_OUTPUT_SIZE, sampling_ratio=ROI_SAMPLING_RATIO),
        box_head=box_head, box_predictor=FastRCNNPredictor(representation, NUM_CLASSES + 1),
    )


def generated_batch(data_dir: Path, images: int, seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``images`` canvases of real FashionMNIST items with their boxes, as the fmnistdet set draws them."""
    items, labels = load_fashion_mnist(data_dir, train=True)
    rng = np.random.default_rng(seed)
    batch, targets = [], []
    for _ in range(images):
        image, objects = compose_image(rng, items[:1000], labels[:1000])
        batch.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
        targets.append({"boxes": torch.tensor([o["box"] for o in objects], dtype=torch.float32),
                        "labels": torch.tensor([o["label"] + 1 for o in objects])})
    return batch, targets


def timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: list[torch.Tensor],
               targets: list[dict[str, torch.Tensor]], seed: int) -> tuple[float, float]:
    """Seconds and loss of one forward + backward + SGD step (torch reseeded first: the same sampled anchors/RoIs)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, loss.item()


def main(args: argparse.Namespace) -> dict:
    if args.quick:
        args.arch, args.images, args.min_size, args.max_size, args.repeats = "resnet18", 1, 64, 96, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone, _ = build_backbone(args.arch)
    ours = build_faster_rcnn_c4(backbone, NUM_CLASSES, head=args.head, min_size=args.min_size, max_size=args.max_size)
    reference_resnet, _ = build_backbone(args.arch)
    reference = torchvision_reference(reference_resnet, args.head, args.min_size, args.max_size)
    # The same weights: the two models name the same tensors differently, in the same order.
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert [tuple(v.shape) for v in ours_state.values()] == [tuple(v.shape) for v in reference_state.values()]
    reference.load_state_dict(dict(zip(reference_state, ours_state.values())))
    images, targets = generated_batch(args.data_dir, args.images, args.seed)
    print(f"{args.arch} C4, head {args.head}, {args.images} image(s) per step at {args.min_size}-{args.max_size} px, "
          f"{args.threads} thread(s); load average {os.getloadavg()}")

    models = {"ours": ours, "torchvision": reference}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    first_loss: dict[str, float] = {}
    for model in models.values():
        model.train()
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up
        for name, model in models.items():
            seconds, loss = timed_step(model, optimizers[name], images, targets, args.seed + round_index)
            if round_index > 0:
                times[name].append(seconds)
            else:
                first_loss[name] = loss
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["ours"] / medians["torchvision"]
    figures = {"arch": args.arch, "head": args.head, "images_per_step": args.images, "min_size": args.min_size,
               "max_size": args.max_size, "threads": args.threads, "repeats": args.repeats,
               **{f"{name}_median_step_s": value for name, value in medians.items()},
               # Same weights, images and draws: equal first losses show the two models compute the same thing.
               **{f"{name}_first_loss": value for name, value in first_loss.items()},
               **{f"{name}_step_s": values for name, values in times.items()}}
    for name, value in medians.items():
        print(f"  {name}: median {value * 1000:.0f} ms per step ({args.images / value:.2f} images/s), first loss {first_loss[name]:.6f}")
    print(f"load average after: {os.getloadavg()}")
    write_report(args, NAME, ratio, "our median training-step time over torchvision's (<= 1: ours no slower)", figures)
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
