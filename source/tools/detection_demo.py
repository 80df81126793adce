"""The stages of ``python demo.py --task detection``: BiSSL with an object-detection downstream task on CPU.

1. SimCLR pre-training of a ResNet-18 on FashionMNIST images (labels unused), as the classification demo.
2. BiSSL whose upper level is Faster R-CNN R-C4 on ``fmnistdet`` (FashionMNIST items pasted on
   larger canvases, written in the PASCAL VOC layout by :mod:`source.data.voc_demo_setup`), the
   upper loss the sum of torchvision's four detection losses.
3. Detection fine-tuning of BOTH backbones at the same hyperparameters on the same seeds, scored
   by VOC2007 AP50 on the generated test split, then the paired comparison of ``source.tools.compare``.

``demo.py`` runs the stages (each the real script under torchrun); this module only says what they
are, writes the generated set under the demo's output folder (``<out>/data``: the set and a link
to FashionMNIST), and makes the report. The sizes are far from the paper's (images of 128 px, a
few alternations and epochs), set from CPU time per process measured on loaded cores to take
about 12 minutes on 2 idle ones, and so that fine-tuning learns to detect (docs/detection.md,
"The demo"): the demo shows the detection pipeline working end to end, not the paper's gains.
"""
from __future__ import annotations

import json
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from source.data.voc_demo_setup import build_fashion_mnist_detection
from source.run.errors import MissingInputError

ARCH, IMG_SIZE = "resnet18", 28  # pre-training at FashionMNIST's native size, as the classification demo
PRETRAIN = dict(epochs=3, batch_size=128, samples=1024, lr=1.0, warmup_epochs=1)
# The generated set (128 px canvases with 1-2 items of 48-80 px, source.data.voc_demo_setup): VOC2007
# images split 1/4 train, 1/4 val, 1/2 test, VOC2012 half train, half val: 400 training images.
# Sizing runs: docs/detection.md, "The demo".
DATA = dict(num_images_2007=400, num_images_2012=600, seed=0)
# Detector shared by BiSSL and fine-tuning. The original code's box head (two FC layers; layer4 unused):
# the res5 head runs layer4 on every RoI, about 3x the CPU time of a step at these sizes. Images enter at
# the canvas size (no resize); anchors cover the items' 48-80 px; few sampled RoIs and test
# proposals, since an image holds at most 2 objects.
DETECTOR = dict(head="original", min_size=128, max_size=128, anchor_sizes="32,64,128", rois_per_image=16,
                test_proposals=10)
BISSL = dict(alternations=4, lower_steps=2, upper_steps=2, lam=0.001, p_lr=0.2, p_batch_size=64, d_batch_size=8,
             warmup_epochs=1, d_lr=0.015, d_wd=0.0, cg_iters=2, train_samples=160, eval_samples=24)
# Val and test are capped at eval_samples images (the same ones for both backbones).
FINETUNE = dict(epochs=3, batch_size=8, lr=0.05, wd=1e-4, eval_samples=48)
# Fine-tuning trials per backbone: a trial took 129 s of CPU per process in the sizing run, so 2 seeds keep
# the demo near 11 minutes on 2 idle cores (3 seeds: ~15 minutes; python demo.py --task detection --seeds 3).
SEEDS = 2
PRETEXT_BACKBONE = f"pretext_simclr_arch-{ARCH}_bb.pth"
PRETEXT_PROJECTOR = f"pretext_simclr_arch-{ARCH}_proj.pth"
BISSL_BACKBONE = f"BiSSL-backbone_simclr_arch-{ARCH}_dset-fmnistdet.pth"
# Each step's CPU time and the load it ran at, beside demo.py's timings.json (wall times).
COSTS_FILE = "stage_costs.json"
GENERATION = "0. generating the set"
# Below this CPU time (s) a step did nothing (a finished stage skipped, the set already written): not recorded.
MIN_RECORDED_CPU_S = 0.1


@dataclass
class Stage:
    """One stage: its name, the script and its flags (``demo.py`` adds torchrun and the general flags),
    and the file whose existence says it is done."""

    name: str
    script: str
    args: list
    done: Path


def prepare_data(data_dir: Path, out_dir: Path) -> Path:
    """``<out>/data`` with a link to ``<data_dir>/FashionMNIST`` and the generated ``fmnistdet`` set; returns it."""
    fashion_mnist = data_dir / "FashionMNIST"
    if not (fashion_mnist / "raw").is_dir():
        raise MissingInputError(f"the detection demo needs FashionMNIST in {fashion_mnist / 'raw'} "
                                "(python -m source.data.fashion_mnist_setup --data-dir <data-dir>)")
    demo_data = out_dir / "data"
    demo_data.mkdir(parents=True, exist_ok=True)
    link = demo_data / "FashionMNIST"
    if not link.exists():
        link.symlink_to(fashion_mnist.resolve(), target_is_directory=True)
    build_fashion_mnist_detection(demo_data, DATA["num_images_2007"], DATA["num_images_2012"], seed=DATA["seed"])
    return demo_data


def detector_args() -> list:
    return ["--det-head", DETECTOR["head"], "--det-min-size", DETECTOR["min_size"], "--det-max-size", DETECTOR["max_size"],
            "--det-anchor-sizes", DETECTOR["anchor_sizes"], "--det-rois-per-image", DETECTOR["rois_per_image"],
            "--det-test-proposals", DETECTOR["test_proposals"]]


def stages(out_dir: Path, models: Path, seeds: int) -> list[Stage]:
    """Pre-training, BiSSL and the two fine-tuning runs, in order (run dirs ``<out>/finetune_<origin>``)."""
    pretrain = ["--pretext-type", "simclr", "--dset", "fashionmnist", "--arch", ARCH, "--img-size", IMG_SIZE,
                "--epochs", PRETRAIN["epochs"], "--batch-size", PRETRAIN["batch_size"], "--max-train-samples",
                PRETRAIN["samples"], "--lr", PRETRAIN["lr"], "--warmup-epochs", PRETRAIN["warmup_epochs"]]
    bissl = ["--d-dset", "fmnistdet", "--p-dset", "fashionmnist", "--p-pretext-type", "simclr", "--arch", ARCH,
             "--img-size", IMG_SIZE, "--p-pretrained-backbone-filename", PRETEXT_BACKBONE,
             "--p-pretrained-proj-filename", PRETEXT_PROJECTOR, "--epochs", BISSL["alternations"],
             "--lower-num-iter", BISSL["lower_steps"], "--upper-num-iter", BISSL["upper_steps"],
             "--lower-warmup-alternations", 1, "--lam", BISSL["lam"], "--p-lr", BISSL["p_lr"],
             "--cg-iter-num", BISSL["cg_iters"], "--p-batch-size", BISSL["p_batch_size"],
             "--d-batch-size", BISSL["d_batch_size"], "--d-linear-warmup-epochs", BISSL["warmup_epochs"],
             "--d-lr", BISSL["d_lr"], "--d-wd", BISSL["d_wd"], "--max-train-samples", PRETRAIN["samples"],
             "--d-max-train-samples", BISSL["train_samples"], "--max-eval-samples", BISSL["eval_samples"], *detector_args()]
    result = [Stage("1. SimCLR pre-training", "ssl_pre-training.py", pretrain, models / PRETEXT_BACKBONE),
              Stage("2. BiSSL (detection upper level)", "bissl.py", bissl, models / BISSL_BACKBONE)]
    for origin, weights in (("pretext", PRETEXT_BACKBONE), ("bissl", BISSL_BACKBONE)):
        run_dir = out_dir / f"finetune_{origin}"
        finetune = ["--dset", "fmnistdet", "--pretrained-backbone-filename", weights, "--backbone-origin", origin,
                    "--pretrain-arch", ARCH, "--use-hpo", 0, "--num-runs", seeds, "--epochs", FINETUNE["epochs"],
                    "--batch-size", FINETUNE["batch_size"], "--lr", FINETUNE["lr"], "--wd", FINETUNE["wd"],
                    "--max-eval-samples", FINETUNE["eval_samples"], "--run-dir", run_dir, *detector_args()]
        result.append(Stage(f"3. detection fine-tuning ({origin} backbone, {seeds} seeds)", "fine-tuning.py", finetune,
                            run_dir / "summary.txt"))
    return result


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def measured(out_dir: Path, name: str, processes: int) -> Iterator[None]:
    """Record the CPU time of the block (this process and the children it waited for) per working
    process, and the 1-minute load average at its end, under ``name`` in ``<out>/stage_costs.json``.

    On a machine with a core per process the wall time is about the CPU time per process; on a
    loaded one the wall time grows and the CPU time does not, so the record says what the step
    costs wherever it ran. A block that did nothing (a finished stage skipped) records nothing.
    """
    start = _cpu_seconds()
    yield
    spent = _cpu_seconds() - start
    if spent < MIN_RECORDED_CPU_S:
        return
    path = out_dir / COSTS_FILE
    costs = json.loads(path.read_text()) if path.exists() else {}
    costs[name] = {"cpu_per_process_s": round(spent / processes, 1), "load_1min_at_end": round(os.getloadavg()[0], 1)}
    path.write_text(json.dumps(costs, indent=2))


def _time_line(name: str, seconds: float, costs: dict[str, dict[str, float]]) -> str:
    cost = costs.get(name)
    extra = f" (CPU {cost['cpu_per_process_s'] / 60:.1f} min per process, load {cost['load_1min_at_end']:.1f})" if cost else ""
    return f"{name} {seconds / 60:.1f} min{extra}"


def report(out_dir: Path, timings: dict[str, float], elapsed: float) -> str:
    """The paired comparison of the two fine-tuning runs (test AP50 %), written to ``<out>/demo_results.{md,csv,png}``."""
    from source.tools.compare import csv_report, load_run, markdown_report, plot_comparison

    runs = [load_run(out_dir / "finetune_pretext", "SimCLR"), load_run(out_dir / "finetune_bissl", "SimCLR + BiSSL")]
    costs = json.loads((out_dir / COSTS_FILE).read_text()) if (out_dir / COSTS_FILE).exists() else {}
    lines = [f"fmnistdet (generated VOC-layout detection set), Faster R-CNN {ARCH}-C4 ({DETECTOR['head']} box "
             f"head) at {DETECTOR['min_size']}-{DETECTOR['max_size']} px: detection fine-tuning of the pre-trained (baseline) and the BiSSL backbone "
             "on the same seeds, test AP50 (VOC2007 11-point, %).", "", markdown_report(runs), "",
             "stage wall times (CPU time per process, 1-minute load average at the stage's end; the demo's own "
             "processes count in the load): " + ", ".join(_time_line(name, seconds, costs) for name, seconds in timings.items()),
             f"total stage time {sum(timings.values()) / 60:.1f} min; this invocation {elapsed / 60:.1f} min"
             + (f" (generating the set: CPU {costs[GENERATION]['cpu_per_process_s'] / 60:.1f} min)" if GENERATION in costs else "")]
    table = "\n".join(lines)
    (out_dir / "demo_results.md").write_text(table + "\n")
    (out_dir / "demo_results.csv").write_text(csv_report(runs))
    plot_comparison(runs, out_dir / "demo_results.png")
    return table
