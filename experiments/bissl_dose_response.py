"""BiSSL dose-response: does the lower backbone move towards the downstream task, and how much, against λ and lower-level movement?

    python experiments/bissl_dose_response.py --model-dir demo_out/models               # demo scale, CPU (FashionMNIST)
    python experiments/bissl_dose_response.py --points "sgd:0.05:1:12" --seeds 3         # the positive control alone
    python experiments/bissl_dose_response.py --scale paper --nproc 4 --dset pets --arch resnet50 --model-dir models \\
        --points "lars:1.0:0.001/0.01/0.1/1:500" --probe-args "--img-size 96"          # paper scale, GPUs

From ONE pre-trained backbone, every grid point runs ``bissl.py`` for each seed 0 .. ``--seeds``-1
twice: BiSSL itself and its control ``--upper-level 0`` (the same lower steps on the same pretext
batches at the same λ, with the proximity term to the frozen pre-trained backbone and no upper
level: as many extra pretext steps, no downstream signal). Every lower backbone that comes out
(the file that fine-tuning would get) is then probed (``source.tools.probe``: weighted kNN and a
linear probe, on the whole downstream val and test splits, with the same labelled bank the upper
level trained on): no fine-tuning, so no fine-tuning seed variance. Per point the table gives
the mean and 95 % CI over seeds of each probe score for BiSSL and for the control, the paired
gain BiSSL − control, how far each lower backbone moved from the pre-trained one
(‖θ − θ₀‖/‖θ₀‖ over the parameters), BiSSL's final ‖θ_P − θ_D‖ (what the proximity term still
pulls on), the same probe of BiSSL's upper backbone θ_D (how aligned the backbone that θ_P is
pulled towards was: θ_D far above θ_P says θ_P did not follow it; θ_D no better than the control
says there was nothing to follow), the proximity gradient's norm relative to the pretext
gradient's at the lower steps (``coupling/prox_grad_ratio`` of bissl.py's history, averaged over
alternations: how strongly the upper level pulls), and the wall time of each run with the machine's load while it ran.

A grid point is ``optimizer:lr:lam:alternations`` (the lower optimizer and its peak lr, λ, the
number of alternations T); each field may list values separated by ``/``, which expands to their
product: ``--points "sgd:0.05:0.001/0.1/1/10:12,lars:0.2/1:1:12/48"``. The lower level takes
T·``--lower-steps`` steps.

The seed of a run is ``bissl.py --seed``: it sets the batches, augmentations and head
initialisation, and also which samples the ``--max-train-samples``/``--d-max-train-samples`` caps
keep, so at demo scale the seeds differ in their 200 labels too (the probe's bank is seed 0's).
BiSSL and its control of one seed share all of them.

Every stage is the real script under torchrun, with its own folder under
``--out-dir/runs/<point>/<bissl|control>-seed<s>/``, so a killed study reruns only what is
missing (finished stages are skipped, an interrupted BiSSL run resumes from its checkpoint) and
ends with the same table (``dose_response.md``, ``.csv``) and figure (``dose_response.png``).
``--scale demo`` pre-trains the backbone with ``demo.py``'s settings when ``--model-dir`` has
none; ``--scale paper`` needs it there.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from source.run.errors import ConfigError, MissingInputError, run_entry_point
from source.run.scripts import load_script
from source.run.study import LoadLog, link_pretrained, mean_interval, minutes
from source.stages.bissl_run import output_names
from source.tools.compare import paired_difference

ROOT = Path(__file__).resolve().parents[1]
demo = load_script(ROOT / "demo.py")  # the demo's stage sizes and command lines, reused at --scale demo

DEMO_POINTS = "sgd:0.05:1:12,sgd:0.05:0.001/0.1/10:12,lars:0.2:1:12"
DEMO_STEPS = (4, 4)  # lower, upper steps per alternation at demo scale (the measurement; demo.py has 4, 2)
LOWER_OPTIMIZERS = ("sgd", "lars")
KINDS = ("bissl", "control")
SCORES = ("knn_val_top1", "knn_test_top1", "linear_val_top1", "linear_test_top1")
UPPER_SCORES = ("knn_test_top1", "linear_test_top1")  # of BiSSL's upper backbone θ_D, beside θ_P's
NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm buffers in a backbone file


@dataclass(frozen=True)
class Point:
    """One grid point: the lower optimizer and its lr, λ and the number of alternations."""

    optimizer: str
    lr: float
    lam: float
    alternations: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}-lr{self.lr:g}_lam{self.lam:g}_alt{self.alternations}"

    def bissl_flags(self, lower_steps: int, upper_steps: int) -> list:
        steps = (["--lower-num-iter", lower_steps] if lower_steps else []) + (["--upper-num-iter", upper_steps] if upper_steps else [])
        return ["--p-optimizer", self.optimizer, "--p-lr", self.lr, "--lam", self.lam, "--epochs", self.alternations, *steps]


@dataclass(frozen=True)
class Run:
    """One bissl.py run: a grid point, BiSSL or its no-upper control, and a seed."""

    point: Point
    kind: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.point.name}/{self.kind}-seed{self.seed}"


def parse_points(text: str) -> list[Point]:
    """``optimizer:lr:lam:alternations`` entries separated by commas; ``/`` lists expand to their product."""
    points: list[Point] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        fields = entry.split(":")
        if len(fields) != 4:
            raise ConfigError(f"--points entry {entry!r} must be optimizer:lr:lam:alternations, e.g. sgd:0.05:1:12")
        optimizers, *numbers = (field.split("/") for field in fields)
        if unknown := sorted(set(optimizers) - set(LOWER_OPTIMIZERS)):
            raise ConfigError(f"--points entry {entry!r}: unknown lower optimizer {unknown[0]!r}; valid: {', '.join(LOWER_OPTIMIZERS)}")
        try:
            lrs, lams = [float(v) for v in numbers[0]], [float(v) for v in numbers[1]]
            alternations = [int(v) for v in numbers[2]]
        except ValueError:
            raise ConfigError(f"--points entry {entry!r}: lr and lam must be numbers, alternations an integer") from None
        if min(lrs) <= 0 or min(lams) <= 0 or min(alternations) < 1:
            raise ConfigError(f"--points entry {entry!r}: lr and lam must be > 0 and alternations >= 1")
        for combination in itertools.product(optimizers, lrs, lams, alternations):
            if (point := Point(*combination)) not in points:
                points.append(point)
    if not points:
        raise ConfigError("--points names no grid point")
    return points


def get_args_parser() -> argparse.ArgumentParser:
    from source.run.errors import CommandLineParser

    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="demo", choices=("demo", "paper"),
                        help="demo: demo.py's sizes on FashionMNIST (CPU), 4 lower + 4 upper steps per alternation; "
                             "paper: the scripts' defaults (default: demo)")
    parser.add_argument("--out-dir", default="dose_response_out", help="everything the study writes (default: dose_response_out)")
    parser.add_argument("--model-dir", default="",
                        help="folder with the pre-trained backbone and projector, copied into <out-dir>/models "
                             "(default: <out-dir>/models; demo scale pre-trains there if they are missing)")
    parser.add_argument("--data-dir", default="data", help="dataset root (default: data)")
    parser.add_argument("--points", default=DEMO_POINTS,
                        help=f"grid points optimizer:lr:lam:alternations, comma-separated, '/' lists expand (default: {DEMO_POINTS})")
    parser.add_argument("--seeds", type=int, default=3, help="BiSSL seeds per point, 0 .. N-1, each with its control (default: 3)")
    parser.add_argument("--lower-steps", type=int, default=-1,
                        help=f"lower steps per alternation N_L (default: {DEMO_STEPS[0]} at demo scale, bissl.py's at paper scale)")
    parser.add_argument("--upper-steps", type=int, default=-1,
                        help=f"upper steps per alternation N_U (default: {DEMO_STEPS[1]} at demo scale, bissl.py's at paper scale)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per stage (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu|cuda|auto (default: cpu)")
    parser.add_argument("--dset", default="fashionmnist", help="paper scale: downstream dataset (default: fashionmnist)")
    parser.add_argument("--pretext-type", default="simclr", choices=("simclr", "byol"), help="paper scale (default: simclr)")
    parser.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet50"), help="paper scale (default: resnet50)")
    parser.add_argument("--bissl-args", default="--cg-solver minres",
                        help="extra flags for every bissl.py run (default: '--cg-solver minres'; the demo's K = 3 iterations)")
    parser.add_argument("--probe-args", default="", help="extra flags for every probe, e.g. \"--img-size 96 --batch-size 512\"")
    parser.add_argument("--pretrain-args", default="", help="demo scale: extra flags for the pre-training run")
    parser.add_argument("--report-only", type=int, default=0, choices=(0, 1),
                        help="1: run nothing; the table and figure from the runs of the grid finished so far, the rest listed "
                             "as missing (default: 0)")
    return parser


class Study:
    """File names and command lines of one study (demo or paper scale)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out_dir = Path(args.out_dir).resolve()
        self.given_models = Path(args.model_dir).resolve() if args.model_dir else None
        self.model_dir = self.out_dir / "models"
        self.data_dir = Path(args.data_dir).resolve()
        demo_scale = args.scale == "demo"
        self.arch, self.pretext, self.dset = (demo.ARCH, "simclr", "fashionmnist") if demo_scale else (args.arch, args.pretext_type, args.dset)
        default_steps = DEMO_STEPS if demo_scale else (0, 0)  # 0: leave bissl.py's default
        self.lower_steps = args.lower_steps if args.lower_steps >= 0 else default_steps[0]
        self.upper_steps = args.upper_steps if args.upper_steps >= 0 else default_steps[1]
        self.backbone = f"pretext_{self.pretext}_arch-{self.arch}_bb.pth"
        self.pretext_files = [self.backbone, f"pretext_{self.pretext}_arch-{self.arch}_proj.pth"]
        if self.pretext == "byol":
            self.pretext_files.append(f"pretext_byol_arch-{self.arch}_pred.pth")
        names = output_names(argparse.Namespace(p_pretext_type=self.pretext, arch=self.arch, d_dset=self.dset))  # bissl.py's own
        self.bissl_backbone, self.bissl_upper_backbone, self.bissl_config = (names[key] for key in ("lower_backbone", "upper_backbone", "config"))

    def run_dir(self, run: Run) -> Path:
        return self.out_dir / "runs" / run.point.name / f"{run.kind}-seed{run.seed}"

    def general(self, model_dir: Path) -> list:
        return demo.study_general_args(self.args.scale, self.data_dir, model_dir, self.args.device)

    def pretrain_command(self) -> list[str]:
        return demo.torchrun(self.args.nproc, "ssl_pre-training.py", *self.general(self.model_dir), *demo.pretrain_args(),
                             *shlex.split(self.args.pretrain_args))

    def bissl_command(self, run: Run) -> list[str]:
        if self.args.scale == "demo":
            base = demo.bissl_args()
        else:
            base = ["--d-dset", self.dset, "--p-pretext-type", self.pretext, "--arch", self.arch,
                    "--p-pretrained-backbone-filename", self.pretext_files[0], "--p-pretrained-proj-filename", self.pretext_files[1]]
        run_dir = self.run_dir(run)
        return demo.torchrun(self.args.nproc, "bissl.py", *self.general(run_dir / "models"), *base,
                             *shlex.split(self.args.bissl_args), *run.point.bissl_flags(self.lower_steps, self.upper_steps),
                             "--upper-level", int(run.kind == "bissl"), "--seed", run.seed, "--run-dir", run_dir / "bissl_run")

    def probe_command(self, model_dir: Path, weights: str, probe_dir: Path) -> list[str]:
        if self.args.scale == "demo":  # the bank: the labels the upper level trains on (seed 0's)
            base = ["--arch", self.arch, "--img-size", demo.IMG_SIZE, "--max-train-samples", demo.LABELS_PER_CLASS * demo.NUM_CLASSES]
        else:
            base = ["--arch", self.arch]
        return demo.torchrun(self.args.nproc, "-m", "source.tools.probe", *self.general(model_dir), "--dset", self.dset,
                             "--backbone-filename", weights, *base, "--max-eval-samples", 0, "--run-dir", probe_dir,
                             "--cache-dir", self.out_dir / "probe_cache", *shlex.split(self.args.probe_args))


class StageRunner:
    """``demo.Stages`` (finished stages skipped, wall time kept) plus the load average around each stage that runs."""

    def __init__(self, out_dir: Path) -> None:
        self.stages = demo.Stages(out_dir)
        self.loads = LoadLog(out_dir / "loads.json")

    def run(self, name: str, command: list[str], done: Path) -> None:
        will_run = not (done.exists() and name in self.stages.timings)
        if will_run:
            self.loads.start(name)
        self.stages.run(name, command, done, tag="dose-response")
        if will_run:
            self.loads.end(name)

    def seconds(self, name: str) -> float | None:
        return self.stages.timings.get(name)


def ensure_pretrained(study: Study, runner: StageRunner) -> None:
    """The pre-trained weights in <out-dir>/models: copied from --model-dir, else (demo scale) pre-trained there."""
    if study.given_models is not None and study.given_models != study.model_dir:
        missing = [name for name in study.pretext_files if not (study.given_models / name).is_file()]
        if missing:
            raise MissingInputError(f"pre-trained weights missing in {study.given_models}: {', '.join(missing)} "
                                    "(run ssl_pre-training.py first, or leave --model-dir out to pre-train at demo scale)")
        link_pretrained(study.pretext_files, study.given_models, study.model_dir)
    missing = [name for name in study.pretext_files if not (study.model_dir / name).is_file()]
    if missing and study.args.scale == "paper":
        raise MissingInputError(f"pre-trained weights missing in {study.model_dir}: {', '.join(missing)} (pass --model-dir)")
    if missing or "pre-training" in runner.stages.timings:
        runner.run("pre-training", study.pretrain_command(), study.model_dir / study.backbone)


def backbone_movement(weights: Path, reference: Path) -> float:
    """‖θ − θ₀‖ / ‖θ₀‖ over the backbone's parameters (BatchNorm running statistics left out)."""
    moved, start = torch.load(weights, weights_only=True), torch.load(reference, weights_only=True)
    keys = [key for key in start if not key.endswith(NOT_PARAMETERS)]
    difference = sum(float((moved[key].double() - start[key].double()).pow(2).sum()) for key in keys)
    norm = sum(float(start[key].double().pow(2).sum()) for key in keys)
    return math.sqrt(difference / norm)


def run_all(study: Study, runner: StageRunner, runs: list[Run]) -> None:
    """Pre-trained probe first, then each run's BiSSL stage, the probe of its lower backbone and, for BiSSL
    (not the control, whose upper level never trains), the probe of its upper backbone θ_D: how aligned
    the backbone θ_P was pulled towards was."""
    runner.run("pretrained: probe", study.probe_command(study.model_dir, study.backbone, study.out_dir / "probe_pretrained"),
               study.out_dir / "probe_pretrained" / "probe.json")
    for run in runs:
        run_dir = study.run_dir(run)
        link_pretrained(study.pretext_files, study.model_dir, run_dir / "models")
        runner.run(f"{run.name}: BiSSL", study.bissl_command(run), run_dir / "models" / study.bissl_backbone)
        runner.run(f"{run.name}: probe", study.probe_command(run_dir / "models", study.bissl_backbone, run_dir / "probe"),
                   run_dir / "probe" / "probe.json")
        if run.kind == "bissl":
            runner.run(f"{run.name}: upper probe",
                       study.probe_command(run_dir / "models", study.bissl_upper_backbone, run_dir / "probe_upper"),
                       run_dir / "probe_upper" / "probe.json")


def finished_runs(study: Study, runs: list[Run]) -> list[Run]:
    """The runs whose BiSSL stage and probe are done (--report-only); the others are named on stdout."""
    if not (study.out_dir / "probe_pretrained" / "probe.json").is_file():
        raise MissingInputError(f"no probe of the pre-trained backbone in {study.out_dir}: run the study without --report-only first")
    done = [run for run in runs if (study.run_dir(run) / "probe" / "probe.json").is_file()]
    for run in runs:
        if run not in done:
            print(f"[dose-response] not run yet, left out: {run.name}", flush=True)
    return done


def measure_run(study: Study, runner: StageRunner, run: Run) -> dict:
    """What one run produced: its probe scores (and its upper backbone's, where probed), movement, final
    θ_P–θ_D distance, wall time and load."""
    run_dir = study.run_dir(run)
    results = json.loads((run_dir / "probe" / "probe.json").read_text())["results"]
    upper_probe = run_dir / "probe_upper" / "probe.json"
    upper = json.loads(upper_probe.read_text())["results"] if run.kind == "bissl" and upper_probe.is_file() else {}
    history = json.loads((run_dir / "models" / study.bissl_config).read_text()).get("history", [])
    final_gap = history[-1].get("distance", math.nan) if history and run.kind == "bissl" else math.nan
    ratios = [h["coupling/prox_grad_ratio"] for h in history if "coupling/prox_grad_ratio" in h]
    stage = f"{run.name}: BiSSL"
    return {"point": run.point.name, "kind": run.kind, "seed": run.seed, **{score: results[score] for score in SCORES},
            **{f"upper_{score}": upper.get(score, math.nan) for score in UPPER_SCORES},
            "moved": backbone_movement(run_dir / "models" / study.bissl_backbone, study.model_dir / study.backbone),
            "final_gap": final_gap, "prox_ratio": sum(ratios) / len(ratios) if ratios else math.nan,
            "wall_s": runner.seconds(stage), "load": runner.loads.describe(stage)}


def _interval(values: list[float], digits: int = 2) -> str:
    measured = [value for value in values if not math.isnan(value)]  # NaN: not measured (e.g. an upper probe not run yet)
    if not measured:
        return "-"
    mean, low, high = mean_interval(measured)
    text = f"{mean:.{digits}f}" if math.isnan(low) else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return text if len(measured) == len(values) else f"{text} (n = {len(measured)})"


def _gain(bissl: list[dict], control: list[dict], score: str) -> str:
    if not {r["seed"] for r in bissl} & {r["seed"] for r in control}:
        return "-"
    difference = paired_difference({r["seed"]: r[score] for r in control}, {r["seed"]: r[score] for r in bissl})
    if math.isnan(difference.ci_low):
        return f"{difference.mean:+.2f}"
    return f"{difference.mean:+.2f} [{difference.ci_low:+.2f}, {difference.ci_high:+.2f}]"


def summary_rows(points: list[Point], measured: list[dict], lower_steps: int) -> list[dict[str, str]]:
    """One row per point and kind: mean [95 % CI] over seeds of every score, and BiSSL − control paired."""
    rows = []
    for point in points:
        by_kind = {kind: [m for m in measured if m["point"] == point.name and m["kind"] == kind] for kind in KINDS}
        for kind in KINDS:
            group = by_kind[kind]
            row = {"point": point.name, "lower optimizer": point.optimizer, "lower lr": f"{point.lr:g}", "lam": f"{point.lam:g}",
                   "alternations": str(point.alternations), "lower steps": str(point.alternations * lower_steps) if lower_steps else "-",
                   "run": "BiSSL" if kind == "bissl" else "no-upper control", "seeds": str(len(group))}
            row.update({score: _interval([m[score] for m in group]) for score in SCORES})
            row["moved from pre-trained (%)"] = _interval([100 * m["moved"] for m in group], 3)
            row["final ‖θ_P − θ_D‖"] = _interval([m["final_gap"] for m in group]) if kind == "bissl" else "-"
            for score in UPPER_SCORES:
                row[f"upper backbone θ_D, {score}"] = _interval([m[f"upper_{score}"] for m in group]) if kind == "bissl" else "-"
            row["‖λ(θ_P − θ_D)‖/‖∇L_P‖ (mean over alternations)"] = _interval([m["prox_ratio"] for m in group], 3)
            row["BiSSL − control, kNN test"] = _gain(group, by_kind["control"], "knn_test_top1") if kind == "bissl" else ""
            row["BiSSL − control, linear test"] = _gain(group, by_kind["control"], "linear_test_top1") if kind == "bissl" else ""
            walls = [m["wall_s"] for m in group if m["wall_s"] is not None]
            row["wall (min, mean)"] = minutes(sum(walls) / len(walls)) if walls else "-"
            row["load (1-min avg, start-end)"] = ", ".join(m["load"] for m in group)
            rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]], baseline: dict) -> str:
    columns = [c for c in rows[0] if c not in ("point", "lower optimizer", "lower lr", "lam", "alternations")]
    head = ["lower opt.", "lr", "λ", "T", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blank = {c: "" for c in columns}
    pretrained = {**blank, "run": "pre-trained", "seeds": "-", **{score: f"{baseline[score]:.2f}" for score in SCORES}}
    lines.append("| - | - | - | - | " + " | ".join(pretrained[c] for c in columns) + " |")
    for row in rows:
        lines.append("| " + " | ".join([row["lower optimizer"], row["lower lr"], row["lam"], row["alternations"],
                                         *(row[c] for c in columns)]) + " |")
    return "\n".join(lines)


def csv_table(measured: list[dict], baseline: dict) -> str:
    buffer = io.StringIO()
    fields = ["point", "kind", "seed", *SCORES, *(f"upper_{score}" for score in UPPER_SCORES), "moved", "final_gap", "prox_ratio",
              "wall_s", "load"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerow({"point": "pretrained", "kind": "pretrained", "seed": "", **{s: baseline[s] for s in SCORES},
                     **{f"upper_{s}": "" for s in UPPER_SCORES},
                     "moved": 0.0, "final_gap": "", "prox_ratio": "", "wall_s": "", "load": ""})
    for row in measured:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    return buffer.getvalue()


def _curve(measured: list[dict], names: list[str], kind: str, score: str) -> tuple[list[float], list[float], list[list[float]]]:
    """Per point name: the mean score over seeds, its 95 % CI as error bar lengths, and the mean movement (%)."""
    means, errors, moved = [], [[], []], []
    for name in names:
        group = [m for m in measured if m["point"] == name and m["kind"] == kind]
        mean, low, high = mean_interval([m[score] for m in group])
        means.append(mean)
        errors[0].append(0.0 if math.isnan(low) else mean - low)
        errors[1].append(0.0 if math.isnan(high) else high - mean)
        moved.append(100 * sum(m["moved"] for m in group) / max(len(group), 1))
    return means, moved, errors


def curves(points: list[Point], axis: str) -> dict[str, list[Point]]:
    """The points on one curve of the figure against ``axis`` ("lam" or "alternations"): those that share
    every other setting, sorted along the axis, keyed by the legend label naming the shared settings."""
    groups: dict[str, list[Point]] = {}
    for point in points:
        label = f"{point.optimizer} lr {point.lr:g}, " + (f"T {point.alternations}" if axis == "lam" else f"λ {point.lam:g}")
        groups.setdefault(label, []).append(point)
    return {label: sorted(members, key=lambda point: getattr(point, axis)) for label, members in groups.items()}


def plot(points: list[Point], measured: list[dict], baseline: dict, path: Path) -> Path:
    """kNN and linear test top-1 (mean, 95 % CI over seeds) against λ (left: one curve per lower optimizer,
    lr and T), against the number of alternations T (middle: one curve per lower optimizer, lr and λ) and
    against how far the lower backbone moved from the pre-trained one (right: every point); BiSSL solid and
    filled, its control dashed and open, the pre-trained backbone grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from source.run.checkpoint import save_figure_atomic

    figure = Figure(figsize=(16, 7.5))
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, 3, squeeze=False)
    for row, score in enumerate(("knn_test_top1", "linear_test_top1")):
        by_lam, by_alternations, by_movement = grid[row]
        for axes, axis in ((by_lam, "lam"), (by_alternations, "alternations")):
            for index, (label, members) in enumerate(curves(points, axis).items()):
                names, xs = [point.name for point in members], [getattr(point, axis) for point in members]
                for kind, style, face in (("bissl", "-", f"C{index % 10}"), ("control", "--", "white")):
                    means, _, errors = _curve(measured, names, kind, score)
                    axes.errorbar(xs, means, yerr=errors, ls=style, marker="o", capsize=3, color=f"C{index % 10}",
                                  mfc=face, label=label + ("" if kind == "bissl" else " (no upper)"))
        for index, point in enumerate(points):
            for kind, face in (("bissl", f"C{index % 10}"), ("control", "white")):
                means, moved, errors = _curve(measured, [point.name], kind, score)
                label = f"{point.optimizer} lr {point.lr:g}, λ {point.lam:g}, T {point.alternations}"
                by_movement.errorbar(moved, means, yerr=errors, ls="none", marker="o", capsize=3, color=f"C{index % 10}",
                                     mfc=face, label=label + ("" if kind == "bissl" else " (no upper)"))
        name = ("kNN" if score.startswith("knn") else "linear probe") + " test top-1 (%)"
        for axes, xlabel in ((by_lam, "λ"), (by_alternations, "alternations T"),
                             (by_movement, "lower backbone moved from the pre-trained one, ‖θ − θ₀‖/‖θ₀‖ (%)")):
            axes.axhline(baseline[score], color="grey", lw=1, label="pre-trained")
            axes.set_xlabel(xlabel)
            axes.set_ylabel(name)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=6)
        by_lam.set_xscale("log")
        by_alternations.set_xscale("log", base=2)
    figure.suptitle("BiSSL lower backbone, probed: mean and 95 % CI over seeds (filled BiSSL, open no-upper control)")
    figure.tight_layout()
    return save_figure_atomic(figure, path)


def report(study: Study, runner: StageRunner, points: list[Point], runs: list[Run], started: float) -> None:
    from source.run.checkpoint import write_text_atomic

    baseline = json.loads((study.out_dir / "probe_pretrained" / "probe.json").read_text())["results"]
    measured = [measure_run(study, runner, run) for run in runs]
    rows = summary_rows(points, measured, study.lower_steps)
    steps = f"{study.lower_steps} lower + {study.upper_steps} upper steps per alternation" if study.lower_steps else "bissl.py's steps"
    total = sum(runner.stages.timings.values())
    text = "\n".join([
        f"BiSSL dose-response ({study.args.scale} scale, {study.arch}, {study.dset}): {len(points)} points x "
        f"{'up to ' if study.args.report_only else ''}{study.args.seeds} seeds (column 'seeds': the runs finished), "
        f"BiSSL and its no-upper control each; {steps}; bissl.py extra flags: {study.args.bissl_args or '-'}; "
        f"torchrun --nproc-per-node {study.args.nproc}, device {study.args.device}.",
        f"Probe on the whole val ({baseline['num_val']}) and test ({baseline['num_test']}) splits with a bank of "
        f"{baseline['num_train']} labelled train images; scores are top-1 %, mean [95 % CI over seeds]; the gain is paired by seed.",
        "", markdown_table(rows, baseline), "",
        f"Pre-trained probe {minutes(runner.seconds('pretrained: probe'))} min; each run's probe is not in its wall time. "
        f"Total stage time {total / 60:.1f} min; this invocation {(time.perf_counter() - started) / 60:.1f} min.",
    ])
    print("\n" + text)
    write_text_atomic(text + "\n", study.out_dir / "dose_response.md")
    write_text_atomic(csv_table(measured, baseline), study.out_dir / "dose_response.csv")
    figure = plot(points, measured, baseline, study.out_dir / "dose_response.png")
    print(f"[dose-response] table: {study.out_dir / 'dose_response.md'} (csv: dose_response.csv); figure: {figure}")


def main(args: argparse.Namespace) -> None:
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    points = parse_points(args.points)
    started = time.perf_counter()
    study = Study(args)
    study.out_dir.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(study.out_dir)
    runs = [Run(point, kind, seed) for point in points for seed in range(args.seeds) for kind in KINDS]
    if args.report_only:
        runs = finished_runs(study, runs)
    else:
        ensure_pretrained(study, runner)
        run_all(study, runner, runs)
    report(study, runner, points, runs, started)


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
