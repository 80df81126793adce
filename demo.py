"""The embedded demo: the whole BiSSL pipeline on FashionMNIST, on a laptop CPU, in minutes.

    make demo            # sets everything up, then runs: python demo.py

1. SimCLR pre-training of a ResNet-18 on FashionMNIST images (labels unused).
2. BiSSL towards the downstream task: FashionMNIST classification from few labels per class.
3. Fine-tuning of BOTH the pre-trained and the BiSSL backbone at the same hyperparameters on the
   same seeds, then the paired comparison of ``source.tools.compare`` (per-seed differences, their
   95 % confidence interval and p-values) and a figure joining each seed's two scores.

Every stage is the real entry script run under torchrun, so this is also a smoke test of the
command lines. Everything goes to ``--out-dir`` (nothing else in the checkout is written).
Rerunning after an interruption continues where it stopped: finished stages are skipped and an
interrupted stage resumes from its checkpoint. ``experiments/bissl_ablation.py`` builds on the same
stages.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from source.run.errors import DEBUG_ENV, CommandLineParser, UserError, add_debug_argument, run_entry_point

ROOT = Path(__file__).resolve().parent

# Sized by measurement to stay well inside 15 minutes on 2 CPU cores (see the README).
ARCH, IMG_SIZE = "resnet18", 28  # FashionMNIST's native size
PRETRAIN = dict(epochs=4, batch_size=128, samples=2048, lr=1.0, warmup_epochs=1)
# BiSSL with the paper's lower level (LARS, λ = 0.001) at demo size: the base of the studies in
# experiments/, which vary it.
BISSL = dict(alternations=6, lower_steps=4, upper_steps=2, lam=0.001, p_lr=0.2, p_batch_size=64, d_batch_size=64,
             warmup_epochs=20, warmup_lr=0.03, d_lr=0.03, d_wd=1e-3, cg_iters=3)
# The demo's own BiSSL stage: the lower level of the dose-response study's positive control
# (docs/dose-response.md), the setting with the strongest effect measured. With the paper's LARS
# lower level the lower backbone cannot follow the upper one in a few dozen steps (it moves each
# layer by a fixed share of its norm), so BISSL shows nothing by construction; plain SGD at λ = 1
# pulls it towards the task. 6 alternations instead of the study's 12 to fit 15 minutes: the
# lower backbone already tracks the upper one after 24 such lower steps (lower_level_tracking.md).
DEMO_BISSL = {**BISSL, "upper_steps": 4, "lam": 1.0, "p_optimizer": "sgd", "p_lr": 0.05, "solver": "minres"}
# Val and test images of the demo's fine-tuning: val is scored every epoch, half of a trial's time
# at 1,000.
DEMO_FINETUNE_EVAL_SAMPLES = 500
FINETUNE = dict(epochs=8, batch_size=50, lr=0.03, wd=5e-4)
LABELS_PER_CLASS, NUM_CLASSES, EVAL_SAMPLES = 20, 10, 1000
SEEDS = 10
PRETEXT_BACKBONE = f"pretext_simclr_arch-{ARCH}_bb.pth"
PRETEXT_PROJECTOR = f"pretext_simclr_arch-{ARCH}_proj.pth"
BISSL_BACKBONE = f"BiSSL-backbone_simclr_arch-{ARCH}_dset-fashionmnist.pth"
BISSL_CONFIG = f"BiSSL_simclr_arch-{ARCH}_dset-fashionmnist_config.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="dataset root holding FashionMNIST/raw (default: data)")
    parser.add_argument("--task", default="classification", choices=("classification", "detection"),
                        help="classification: the pipeline above; detection: BiSSL and fine-tuning with Faster R-CNN on a "
                             "generated VOC-layout set (source/tools/detection_demo.py) (default: classification)")
    parser.add_argument("--out-dir", default=None, help="weights, runs and results of the demo "
                                                        "(default: demo_out; demo_detection_out with --task detection)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per stage (default: 2)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"fine-tuning seeds per backbone, the same for both (default: {SEEDS}; 2 with --task detection)")
    parser.add_argument("--device", default="cpu", help="cpu|cuda|auto (default: cpu)")
    add_debug_argument(parser)  # also passed on to every stage (BISSL_DEBUG=1)
    return parser


class Stages:
    """Runs each stage once; remembers finished stages and their wall time in timings.json.

    The time of an interrupted or failed attempt is kept aside (attempts.json) and added to the
    stage's time when it finishes, since the resumed stage only does the rest of the work. The
    code version each stage started with goes to versions.json.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path, self.attempts_path = out_dir / "timings.json", out_dir / "attempts.json"
        self.versions_path = out_dir / "versions.json"
        self.timings: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.attempts: dict[str, float] = json.loads(self.attempts_path.read_text()) if self.attempts_path.exists() else {}
        self.versions: dict[str, str] = json.loads(self.versions_path.read_text()) if self.versions_path.exists() else {}

    def run(self, name: str, command: list[str], done: Path, tag: str = "demo") -> None:
        if done.exists() and name in self.timings:
            print(f"[{tag}] {name}: already done ({self.timings[name]:.0f} s), skipping", flush=True)
            return
        print(f"\n[{tag}] {name}:\n  {' '.join(command)}", flush=True)
        self.versions[name] = code_version()
        self.versions_path.write_text(json.dumps(self.versions, indent=2))
        start = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            result = subprocess.run(command, cwd=ROOT, env=env)
        finally:  # also when interrupted (Ctrl-C)
            self.attempts[name] = self.attempts.get(name, 0.0) + time.perf_counter() - start
            self.attempts_path.write_text(json.dumps(self.attempts, indent=2))
        if result.returncode != 0:
            raise UserError(f"[{tag}] {name} failed (exit {result.returncode}); fix the error above and rerun to resume")
        self.timings[name] = self.attempts.pop(name)
        self.path.write_text(json.dumps(self.timings, indent=2))
        self.attempts_path.write_text(json.dumps(self.attempts, indent=2))


def code_version() -> str:
    """The checkout's commit, marked when tracked files have uncommitted changes ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def torchrun(nproc: int, script: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), script,
            *[str(a) for a in args]]


def general_args(data_dir: Path, model_dir: Path, device: str) -> list:
    """Flags every stage gets: paths, device, no loader workers (2 cores), base seed 0."""
    return ["--data-dir", data_dir, "--model-dir", model_dir, "--device", device, "--num-workers", 0, "--seed", 0]


def study_general_args(scale: str, data_dir: Path, model_dir: Path, device: str) -> list:
    """The flags every stage of a study (experiments/) gets: the demo's at ``scale`` 'demo', else
    the paths, device and base seed 0 with the scripts' own loader workers (paper scale)."""
    if scale == "demo":
        return general_args(data_dir, model_dir, device)
    return ["--data-dir", data_dir, "--model-dir", model_dir, "--device", device, "--seed", 0]


def pretrain_args() -> list:
    return ["--pretext-type", "simclr", "--dset", "fashionmnist", "--arch", ARCH, "--img-size", IMG_SIZE,
            "--epochs", PRETRAIN["epochs"], "--batch-size", PRETRAIN["batch_size"], "--max-train-samples", PRETRAIN["samples"],
            "--lr", PRETRAIN["lr"], "--warmup-epochs", PRETRAIN["warmup_epochs"]]


def bissl_args(settings: dict = BISSL) -> list:
    """bissl.py's flags for ``settings`` (:data:`BISSL`, the studies' base, unless given; a lower
    optimizer or solver is passed only where ``settings`` names one)."""
    chosen = [("--p-optimizer", settings.get("p_optimizer")), ("--cg-solver", settings.get("solver"))]
    return ["--d-dset", "fashionmnist", "--p-dset", "fashionmnist", "--p-pretext-type", "simclr", "--arch", ARCH,
            "--img-size", IMG_SIZE, "--p-pretrained-backbone-filename", PRETEXT_BACKBONE,
            "--p-pretrained-proj-filename", PRETEXT_PROJECTOR,
            "--epochs", settings["alternations"], "--lower-num-iter", settings["lower_steps"],
            "--upper-num-iter", settings["upper_steps"], "--lower-warmup-alternations", 1, "--lam", settings["lam"],
            "--p-lr", settings["p_lr"], "--cg-iter-num", settings["cg_iters"],
            "--p-batch-size", settings["p_batch_size"], "--d-batch-size", settings["d_batch_size"],
            "--d-linear-warmup-epochs", settings["warmup_epochs"], "--d-linear-warmup-lr", settings["warmup_lr"],
            "--d-lr", settings["d_lr"], "--d-wd", settings["d_wd"], "--max-train-samples", PRETRAIN["samples"],
            "--d-max-train-samples", LABELS_PER_CLASS * NUM_CLASSES, "--max-eval-samples", EVAL_SAMPLES,
            *[item for flag, value in chosen if value is not None for item in (flag, value)]]


def finetune_args(origin: str, weights: str, seeds: int, run_dir: Path, epochs: int = FINETUNE["epochs"],
                  eval_samples: int = EVAL_SAMPLES) -> list:
    """Seeds 0 .. seeds-1 (base --seed 0), so runs of different backbones pair seed by seed."""
    return ["--dset", "fashionmnist", "--pretrained-backbone-filename", weights, "--backbone-origin", origin,
            "--pretrain-arch", ARCH, "--pretrain-img-size", IMG_SIZE, "--use-hpo", 0, "--num-runs", seeds,
            "--epochs", epochs, "--batch-size", FINETUNE["batch_size"], "--lr", FINETUNE["lr"], "--wd", FINETUNE["wd"],
            "--max-train-samples", LABELS_PER_CLASS * NUM_CLASSES, "--max-eval-samples", eval_samples, "--run-dir", run_dir]


def main(args: argparse.Namespace) -> None:
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # the stages' scripts inherit it
    start = time.perf_counter()
    out_dir = (ROOT / (args.out_dir or ("demo_detection_out" if args.task == "detection" else "demo_out"))).resolve()
    models = out_dir / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(out_dir)
    if args.task == "detection":
        return run_detection_demo(args, out_dir, stages, start)
    args.seeds = SEEDS if args.seeds is None else args.seeds
    general = general_args(Path(args.data_dir).resolve(), models, args.device)

    stages.run("1. SimCLR pre-training", torchrun(args.nproc, "ssl_pre-training.py", *general, *pretrain_args()),
               models / PRETEXT_BACKBONE)
    stages.run("2. BiSSL", torchrun(args.nproc, "bissl.py", *general, *bissl_args(DEMO_BISSL)), models / BISSL_BACKBONE)
    run_dirs = {}
    for origin, weights in (("pretext", PRETEXT_BACKBONE), ("bissl", BISSL_BACKBONE)):
        run_dirs[origin] = out_dir / f"finetune_{origin}"
        stages.run(f"3. fine-tuning ({origin} backbone, {args.seeds} seeds)", torchrun(
            args.nproc, "fine-tuning.py", *general,
            *finetune_args(origin, weights, args.seeds, run_dirs[origin], eval_samples=DEMO_FINETUNE_EVAL_SAMPLES),
        ), run_dirs[origin] / "summary.txt")
    report(out_dir, run_dirs, stages.timings, models / BISSL_CONFIG, time.perf_counter() - start)


def run_detection_demo(args: argparse.Namespace, out_dir: Path, stages: Stages, start: float) -> None:
    """--task detection: the stages of source.tools.detection_demo, run as the classification ones."""
    from source.tools import detection_demo

    with detection_demo.measured(out_dir, detection_demo.GENERATION, processes=1):
        data_dir = detection_demo.prepare_data(Path(args.data_dir).resolve(), out_dir)
    general = general_args(data_dir, out_dir / "models", args.device)
    seeds = detection_demo.SEEDS if args.seeds is None else args.seeds
    for stage in detection_demo.stages(out_dir, out_dir / "models", seeds):
        with detection_demo.measured(out_dir, stage.name, processes=args.nproc):
            stages.run(stage.name, torchrun(args.nproc, stage.script, *general, *stage.args), stage.done)
    print("\n" + detection_demo.report(out_dir, stages.timings, time.perf_counter() - start))
    print(f"[demo] table: {out_dir / 'demo_results.md'} (csv: demo_results.csv); figure: {out_dir / 'demo_results.png'}")


# What the demo's comparison measures, printed under its table.
WHICH_EFFECT = (
    f"Which effect this is: both backbones are fine-tuned for the same {FINETUNE['epochs']} epochs, but BiSSL's upper "
    f"level has already trained on the same {LABELS_PER_CLASS * NUM_CLASSES} labels ({DEMO_BISSL['warmup_epochs']} "
    f"head warm-up epochs and {DEMO_BISSL['alternations'] * DEMO_BISSL['upper_steps']} upper steps), and the lower "
    "backbone, pulled towards the upper one (lambda = 1), carries that training. The difference is BiSSL plus that "
    "extra downstream training. At equal downstream budget (30 fine-tuning epochs, the pre-trained backbone given "
    "BiSSL's downstream samples as 16 more) the gain of the same setting run for 12 alternations was +0.09 points "
    "[-0.77, +0.95]: docs/dose-response.md, 'Benefit'."
)


def report(out_dir: Path, run_dirs: dict[str, Path], timings: dict[str, float], bissl_config: Path, elapsed: float) -> None:
    from source.tools.compare import csv_report, load_run, markdown_report, plot_comparison

    runs = [load_run(run_dirs["pretext"], "SimCLR"), load_run(run_dirs["bissl"], "SimCLR + BiSSL")]
    lines = [f"FashionMNIST, {LABELS_PER_CLASS} labels per class, {ARCH} at {IMG_SIZE} px: fine-tuning of the pre-trained "
             "(baseline) and the BiSSL backbone on the same seeds.", "", markdown_report(runs), "", WHICH_EFFECT, "",
             "stage times: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items()),
             f"total stage time {sum(timings.values()) / 60:.1f} min; this invocation {elapsed / 60:.1f} min"]
    table = "\n".join(lines)
    print("\n" + table)
    (out_dir / "demo_results.md").write_text(table + "\n")
    (out_dir / "demo_results.csv").write_text(csv_report(runs))
    figure = plot_comparison(runs, out_dir / "demo_results.png")
    curve = plot_bissl_stage(bissl_config, out_dir / "bissl_stage.png")
    print(f"[demo] table: {out_dir / 'demo_results.md'} (csv: demo_results.csv); figures: {figure}"
          + (f", {curve}" if curve else ""))


def plot_bissl_stage(bissl_config: Path, path: Path) -> Path | None:
    """BiSSL's upper-model val accuracy and the backbone distance per alternation (from the config's history)."""
    history = json.loads(bissl_config.read_text()).get("history", []) if bissl_config.exists() else []
    history = [h for h in history if "val/top1" in h]
    if not history:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [h["alternation"] for h in history]
    axes.plot(steps, [h["val/top1"] for h in history], marker="o", label="val top-1 (upper model)")
    axes.set_xlabel("BiSSL alternation")
    axes.set_ylabel("val top-1 (%)")
    twin = axes.twinx()
    twin.plot(steps, [h["distance"] for h in history], color="tab:red", ls="--")
    twin.set_ylabel("‖θ_lower − θ_upper‖ (dashed)", color="tab:red")
    axes.set_title("BiSSL stage")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
