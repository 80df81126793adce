"""The stages of ``python demo.py --task detection``: BiSSL with an object-detection downstream task on CPU.

1. SimCLR pre-training of a ResNet-18 on FashionMNIST images (labels unused), as the classification demo.
2. BiSSL whose upper level is Faster R-CNN R-C4 on ``fmnistdet`` (FashionMNIST items pasted on
   larger canvases, written in the PASCAL VOC layout by :mod:`source.data.voc_demo_setup`), the
   upper loss the sum of torchvision's four detection losses.
3. Detection fine-tuning of BOTH backbones at the same hyperparameters on the same seeds, scored
   by VOC2007 AP50 on the generated test split, then the paired comparison of ``source.tools.compare``.

``demo.py`` runs the stages (each the real script under torchrun); this module only says what they
are, writes the generated set under the demo's output folder (``<out>/data``: the set and a link
to FashionMNIST), and makes the report. The sizes are far from the paper's (images of 64-96 px,
a few alternations and epochs): the demo shows the detection pipeline working end to end, not
the paper's gains.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from source.data.voc_demo_setup import build_fashion_mnist_detection
from source.run.errors import MissingInputError

ARCH, IMG_SIZE = "resnet18", 28  # pre-training at FashionMNIST's native size, as the classification demo
PRETRAIN = dict(epochs=3, batch_size=128, samples=1024, lr=1.0, warmup_epochs=1)
# The generated set: VOC2007 images split 1/4 train, 1/4 val, 1/2 test; VOC2012 half train, half val.
DATA = dict(num_images_2007=160, num_images_2012=48, seed=0)
# Detector sizes shared by BiSSL and fine-tuning: the generated canvases resized to 64..96 px,
# fewer sampled RoIs and test proposals than the paper's (CPU time).
DETECTOR = dict(min_size=64, max_size=96, anchor_sizes="16,32,64", rois_per_image=64, test_proposals=100)
BISSL = dict(alternations=4, lower_steps=2, upper_steps=2, lam=0.001, p_lr=0.2, p_batch_size=64, d_batch_size=8,
             warmup_epochs=2, d_lr=0.015, d_wd=0.0, cg_iters=2, eval_samples=24)
FINETUNE = dict(epochs=4, batch_size=8, lr=0.01, wd=1e-4, eval_samples=48)
SEEDS = 3
PRETEXT_BACKBONE = f"pretext_simclr_arch-{ARCH}_bb.pth"
PRETEXT_PROJECTOR = f"pretext_simclr_arch-{ARCH}_proj.pth"
BISSL_BACKBONE = f"BiSSL-backbone_simclr_arch-{ARCH}_dset-fmnistdet.pth"


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
    return ["--det-min-size", DETECTOR["min_size"], "--det-max-size", DETECTOR["max_size"],
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
             "--max-eval-samples", BISSL["eval_samples"], *detector_args()]
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


def report(out_dir: Path, timings: dict[str, float], elapsed: float) -> str:
    """The paired comparison of the two fine-tuning runs (test AP50 %), written to ``<out>/demo_results.{md,csv,png}``."""
    from source.tools.compare import csv_report, load_run, markdown_report, plot_comparison

    runs = [load_run(out_dir / "finetune_pretext", "SimCLR"), load_run(out_dir / "finetune_bissl", "SimCLR + BiSSL")]
    lines = [f"fmnistdet (generated VOC-layout detection set), Faster R-CNN {ARCH}-C4 at {DETECTOR['min_size']}-"
             f"{DETECTOR['max_size']} px: detection fine-tuning of the pre-trained (baseline) and the BiSSL backbone "
             "on the same seeds, test AP50 (VOC2007 11-point, %).", "", markdown_report(runs), "",
             "stage times: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items()),
             f"total stage time {sum(timings.values()) / 60:.1f} min; this invocation {elapsed / 60:.1f} min"]
    table = "\n".join(lines)
    (out_dir / "demo_results.md").write_text(table + "\n")
    (out_dir / "demo_results.csv").write_text(csv_report(runs))
    plot_comparison(runs, out_dir / "demo_results.png")
    return table
