"""Does fine-tuning BiSSL's backbone beat fine-tuning the backbones it should beat, at equal downstream budget?

    python experiments/bissl_benefit.py                                 # demo scale: the positive control, 10 seeds, 30 epochs
    python experiments/bissl_benefit.py --epochs 8,30,60                 # also short and longer fine-tuning
    python experiments/bissl_benefit.py --point lars:0.2:1:12 --seeds 5   # another grid point of the dose-response study

``experiments/bissl_dose_response.py`` measures *alignment*: whether BiSSL's lower backbone, probed
frozen, is closer to the downstream task than its no-upper control. This study measures the
paper's claim, *benefit*: whether fine-tuning it scores higher. For ONE grid point of the
dose-response study and ONE BiSSL seed, four backbones are fine-tuned by ``fine-tuning.py`` on the
same ``--seeds`` seeds (0 .. N-1, so every comparison pairs them seed by seed), for each value E of
``--epochs``:

  pretrained          the pre-trained backbone, E epochs;
  pretrained+budget   the pre-trained backbone, E + B epochs, where the B extra epochs hold as many
                      downstream samples as BiSSL's upper level trained on (alternations × N_U ×
                      upper batch, rounded up to whole epochs): the downstream budget the BiSSL stage
                      spent, given to plain fine-tuning. The upper level's head warm-up trains the
                      head alone on a frozen backbone and fine-tuning starts from a new head, so it
                      is not counted;
  control             the lower backbone of the no-upper control (``--upper-level 0``: the same lower
                      steps, no downstream signal), E epochs;
  bissl               BiSSL's lower backbone, E epochs.

All four are fine-tuned at the same (lr, wd) (the demo's, or ``--finetune-args``); the upper level
trained on the labels fine-tuning uses (both cap the train split with the same seeded choice:
``bissl.py --seed`` = ``--bissl-seed`` and ``fine-tuning.py``'s base ``--seed 0``, the same labels
for ``--bissl-seed 0``). The table gives each backbone's test top-1 (mean ± std over seeds, final
and best-val model) and BiSSL's paired gain over each of the other three with its 95 % CI and
p-value; the figure joins each seed's scores.

It shares its ``--out-dir`` with the dose-response study: the pre-trained backbone and the point's
BiSSL and control runs are taken from there, and run first (by the dose-response study's code)
when missing. Fine-tuning runs go to ``<out-dir>/benefit/<point>/bissl-seed<s>/e<E>/<arm>/``; a
killed study reruns only the missing trials and ends with the same table (``benefit.md``,
``.csv``, ``.png`` beside them). Demo scale only (FashionMNIST, the demo's fine-tuning
settings): at paper scale the same comparison is the ablation's with each backbone at its own
best HPO pair (docs/dose-response.md).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from source.run.cli import number_list
from source.run.errors import ConfigError, run_entry_point
from source.run.scripts import load_script
from source.run.study import minutes
from source.tools.compare import load_run, paired_difference

ROOT = Path(__file__).resolve().parents[1]
demo = load_script(ROOT / "demo.py")  # the demo's fine-tuning settings and command lines
dose = load_script(ROOT / "experiments" / "bissl_dose_response.py")  # the BiSSL runs this study fine-tunes

MODELS = (("final", "test_final"), ("best-val", "test_best"))


@dataclass(frozen=True)
class Arm:
    """One backbone to fine-tune: where its weights come from and whether it gets the extra budget epochs."""

    name: str
    source: str  # "pretrained", "bissl" or "control"
    budget: bool
    label: str


ARMS = (Arm("pretrained", "pretrained", False, "pre-trained"),
        Arm("pretrained+budget", "pretrained", True, "pre-trained + BiSSL's downstream steps"),
        Arm("control", "control", False, "no-upper control"),
        Arm("bissl", "bissl", False, "BiSSL"))


def get_args_parser() -> argparse.ArgumentParser:
    from source.run.errors import CommandLineParser

    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="dose_response_out",
                        help="the dose-response study's folder, whose runs are reused (default: dose_response_out)")
    parser.add_argument("--model-dir", default="", help="as bissl_dose_response.py: pre-trained weights to start from "
                                                        "(default: <out-dir>/models, pre-trained there if missing)")
    parser.add_argument("--data-dir", default="data", help="dataset root (default: data)")
    parser.add_argument("--point", default="sgd:0.05:1:12",
                        help="ONE dose-response grid point optimizer:lr:lam:alternations (default: sgd:0.05:1:12, the positive control)")
    parser.add_argument("--bissl-seed", type=int, default=0,
                        help="the BiSSL run (and its control) to fine-tune; 0 trains on fine-tuning's labels (default: 0)")
    parser.add_argument("--seeds", type=int, default=10, help="fine-tuning seeds per backbone, 0 .. N-1 (default: 10)")
    parser.add_argument("--epochs", default="30",
                        help="fine-tuning epochs E, comma-separated for several (default: 30; the demo fine-tunes 8)")
    parser.add_argument("--budget-epochs", type=int, default=-1,
                        help="the extra epochs B of 'pretrained+budget' (default: -1 = from the BiSSL run's upper steps, "
                             "upper batch and labels)")
    parser.add_argument("--eval-samples", type=int, default=demo.EVAL_SAMPLES,
                        help="val and test images each trial scores, the same for every backbone (fine-tuning.py "
                             f"--max-eval-samples; 0 = all; val is scored every epoch) (default: {demo.EVAL_SAMPLES}, the demo's)")
    parser.add_argument("--finetune-args", default="", help="extra flags for every fine-tuning run, e.g. \"--lr 0.05\"")
    parser.add_argument("--arms", default=",".join(arm.name for arm in ARMS),
                        help="the backbones this invocation fine-tunes (e.g. to split the study over machines sharing "
                             "--out-dir); the table is made once all four are done (default: all)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per stage (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu|cuda|auto (default: cpu)")
    parser.add_argument("--dose-args", default="",
                        help="extra flags for the dose-response study when it must run the point (e.g. \"--lower-steps 4\")")
    return parser


def selected_arms(text: str) -> list[Arm]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := sorted(set(names) - {arm.name for arm in ARMS}):
        raise ConfigError(f"--arms: unknown arm {unknown[0]!r}; valid: {', '.join(arm.name for arm in ARMS)}")
    return [arm for arm in ARMS if arm.name in names]


def budget_epochs(bissl_config: dict) -> int:
    """Whole epochs of the labelled train set holding the upper level's samples: ⌈T · N_U · upper batch / labels⌉."""
    labels = bissl_config.get("d_max_train_samples") or 0
    if labels <= 0:
        raise ConfigError("the BiSSL run used the whole downstream train split, whose size this study does not know: "
                          "give --budget-epochs")
    samples = bissl_config["epochs"] * bissl_config["upper_num_iter"] * bissl_config["d_batch_size"]
    return math.ceil(samples / labels)


class Benefit:
    """File names and command lines of one benefit study."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        points = dose.parse_points(args.point)
        if len(points) != 1:
            raise ConfigError(f"--point must name ONE grid point, got {len(points)}: {args.point!r}")
        self.point = points[0]
        self.epochs = sorted(set(number_list(args.epochs, "--epochs", int, minimum=1)))
        dose_flags = ["--out-dir", args.out_dir, "--data-dir", args.data_dir, "--points", args.point,
                      "--seeds", str(args.bissl_seed + 1), "--nproc", str(args.nproc), "--device", args.device,
                      *(["--model-dir", args.model_dir] if args.model_dir else []), *shlex.split(args.dose_args)]
        self.study = dose.Study(dose.get_args_parser().parse_args(dose_flags))
        self.runs = {kind: dose.Run(self.point, kind, args.bissl_seed) for kind in dose.KINDS}
        self.folder = self.study.out_dir / "benefit" / self.point.name / f"bissl-seed{args.bissl_seed}"

    def bissl_config(self) -> dict:
        return json.loads((self.study.run_dir(self.runs["bissl"]) / "models" / self.study.bissl_config).read_text())

    def weights(self, arm: Arm) -> tuple[Path, str]:
        """The model folder and file name of the arm's backbone."""
        if arm.source == "pretrained":
            return self.study.model_dir, self.study.backbone
        return self.study.run_dir(self.runs[arm.source]) / "models", self.study.bissl_backbone

    def run_dir(self, epochs: int, arm: Arm) -> Path:
        return self.folder / f"e{epochs}" / arm.name

    def finetune_command(self, epochs: int, arm: Arm, budget: int) -> list[str]:
        model_dir, weights = self.weights(arm)
        origin = "pretext" if arm.source == "pretrained" else "bissl"
        return demo.torchrun(self.args.nproc, "fine-tuning.py",
                             *demo.general_args(self.study.data_dir, model_dir, self.args.device),
                             *demo.finetune_args(origin, weights, self.args.seeds, self.run_dir(epochs, arm),
                                                 epochs=epochs + (budget if arm.budget else 0),
                                                 eval_samples=self.args.eval_samples),
                             *shlex.split(self.args.finetune_args))


def ensure_bissl_runs(benefit: Benefit, runner) -> None:
    """The pre-trained backbone, its probe and the point's BiSSL and control runs (skipped where done)."""
    dose.ensure_pretrained(benefit.study, runner)
    dose.run_all(benefit.study, runner, list(benefit.runs.values()))


def paired(baseline: dict[int, float], other: dict[int, float]) -> str:
    difference = paired_difference(baseline, other)
    if math.isnan(difference.ci_low):
        return f"{difference.mean:+.2f}"
    p_value = "<0.001" if difference.p_value < 0.001 else f"{difference.p_value:.3f}"
    return f"{difference.mean:+.2f} [{difference.ci_low:+.2f}, {difference.ci_high:+.2f}], p {p_value}"


def summary(scores: dict[tuple[int, str, str], dict[int, float]], epochs: list[int], budget: int) -> list[dict[str, str]]:
    """Per fine-tuning length and arm: the epochs it ran, mean ± std per model, and BiSSL − arm paired (final and best-val)."""
    rows = []
    for length in epochs:
        for arm in ARMS:
            row = {"E": str(length), "backbone": arm.label, "fine-tuning epochs": str(length + (budget if arm.budget else 0))}
            for model, key in MODELS:
                values = list(scores[length, arm.name, key].values())
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                row[f"test top-1, {model}"] = f"{mean:.2f} ± {std:.2f}"
            for model, key in MODELS:
                row[f"BiSSL − this, {model}"] = ("" if arm.name == "bissl" else
                                                  paired(scores[length, arm.name, key], scores[length, "bissl", key]))
            row["seeds"] = str(len(scores[length, arm.name, "test_final"]))
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[column] for column in head) + " |" for row in rows]
    return "\n".join(lines)


def csv_rows(scores: dict[tuple[int, str, str], dict[int, float]], epochs: list[int], budget: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["E", "arm", "fine_tuning_epochs", "seed", "test_final", "test_best"])
    for length in epochs:
        for arm in ARMS:
            finals, bests = scores[length, arm.name, "test_final"], scores[length, arm.name, "test_best"]
            for seed in sorted(finals):
                writer.writerow([length, arm.name, length + (budget if arm.budget else 0), seed,
                                 f"{finals[seed]:.4f}", f"{bests[seed]:.4f}" if seed in bests else ""])
    return buffer.getvalue()


def plot(scores: dict[tuple[int, str, str], dict[int, float]], epochs: list[int], path: Path) -> Path:
    """One panel per fine-tuning length: each seed's final test top-1 across the four backbones (grey
    lines, so a paired gain shows as lines rising towards BiSSL), and the mean per backbone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from source.run.checkpoint import save_figure_atomic

    figure = Figure(figsize=(4.2 * len(epochs), 4.2))
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(epochs), squeeze=False)[0]
    for axes, length in zip(panels, epochs):
        per_arm = [scores[length, arm.name, "test_final"] for arm in ARMS]
        for seed in sorted(set.intersection(*(set(s) for s in per_arm))):
            axes.plot(range(len(ARMS)), [s[seed] for s in per_arm], color="grey", alpha=0.4, lw=1)
        axes.plot(range(len(ARMS)), [sum(s.values()) / len(s) for s in per_arm], "o-", color="C3", lw=2, label="mean")
        axes.set_xticks(range(len(ARMS)), [arm.name for arm in ARMS], rotation=20, fontsize=8)
        axes.set_title(f"fine-tuned {length} epochs", fontsize=10)
        axes.set_ylabel("test top-1 (%), final model")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure_atomic(figure, path)


def report(benefit: Benefit, budget: int, started: float) -> str:
    from source.run.checkpoint import write_text_atomic

    scores, trial_seconds = {}, {}
    for length in benefit.epochs:
        for arm in ARMS:
            run = load_run(benefit.run_dir(length, arm))
            for _, key in MODELS:
                scores[length, arm.name, key] = run.scores(key)
            seconds = [row["time_s"] for row in run.rows if row.get("time_s") is not None]
            trial_seconds[f"e{length}/{arm.name}"] = sum(seconds) / len(seconds) if seconds else None
    config = benefit.bissl_config()
    rows = summary(scores, benefit.epochs, budget)
    text = "\n".join([
        f"BiSSL benefit at equal downstream budget: point {benefit.point.name}, BiSSL seed {benefit.args.bissl_seed} "
        f"({config['epochs']} alternations of {config['lower_num_iter']} lower + {config['upper_num_iter']} upper steps, "
        f"upper batch {config['d_batch_size']}, {config['d_max_train_samples']} labels); fine-tuned on seeds "
        f"0..{benefit.args.seeds - 1} at the demo's lr {demo.FINETUNE['lr']:g}, wd {demo.FINETUNE['wd']:g}, batch "
        f"{demo.FINETUNE['batch_size']}{' + ' + benefit.args.finetune_args if benefit.args.finetune_args else ''}; "
        f"'pre-trained + BiSSL's downstream steps' fine-tunes {budget} epochs longer; test on "
        f"{benefit.args.eval_samples or 'all'} images; gains are BiSSL − backbone, paired by seed, 95 % CI and paired-t p.",
        "", markdown(rows), "",
        "mean wall time per fine-tuning trial (min; each rank runs its own trials, machine load not controlled): "
        + ", ".join(f"{name} {minutes(seconds)}" for name, seconds in trial_seconds.items()),
        f"this invocation {(time.perf_counter() - started) / 60:.1f} min.",
    ])
    write_text_atomic(text + "\n", benefit.folder / "benefit.md")
    write_text_atomic(csv_rows(scores, benefit.epochs, budget), benefit.folder / "benefit.csv")
    plot(scores, benefit.epochs, benefit.folder / "benefit.png")
    return text


def main(args: argparse.Namespace) -> None:
    if args.seeds < 2:
        raise ConfigError(f"--seeds must be >= 2 for a paired interval, got {args.seeds}")
    started = time.perf_counter()
    benefit = Benefit(args)
    benefit.study.out_dir.mkdir(parents=True, exist_ok=True)
    runner = dose.StageRunner(benefit.study.out_dir)
    ensure_bissl_runs(benefit, runner)
    budget = args.budget_epochs if args.budget_epochs >= 0 else budget_epochs(benefit.bissl_config())
    for length in benefit.epochs:
        for arm in selected_arms(args.arms):
            run_dir = benefit.run_dir(length, arm)
            runner.run(f"fine-tune {benefit.point.name}/bissl-seed{args.bissl_seed}/e{length}/{arm.name}",
                       benefit.finetune_command(length, arm, budget), run_dir / "summary.txt")
    missing = [f"e{length}/{arm.name}" for length in benefit.epochs for arm in ARMS
               if not (benefit.run_dir(length, arm) / "summary.txt").is_file()]
    if missing:
        print(f"[benefit] no table yet: not fine-tuned: {', '.join(missing)} (run them with --arms)")
        return
    print("\n" + report(benefit, budget, started))
    print(f"[benefit] table: {benefit.folder / 'benefit.md'} (csv: benefit.csv); figure: {benefit.folder / 'benefit.png'}")


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
