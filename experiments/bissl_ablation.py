"""BiSSL ablation: what the implicit gradient, the upper level and the extra pretext steps each contribute.

    python experiments/bissl_ablation.py                                     # demo scale, CPU (FashionMNIST)
    python experiments/bissl_ablation.py --scale paper --nproc 4 --dset pets --model-dir models \\
        --finetune-args "--lr 0.05 --wd 0.001"                         # paper scale, GPUs

From ONE pre-trained backbone, every variant is fine-tuned on the same ``--seeds`` seeds
(0 .. N-1, so the comparison pairs them seed by seed):

  (a) ``pretrained``   the pre-trained backbone itself (the baseline);
  (b) ``bissl``        BiSSL as configured (``bissl.py`` with ``--bissl-args``);
  (c) ``no-implicit``  BiSSL with x = 0 (``--cg-iter-num 0``): the upper level still trains θ_D,
                       but the lower level feels the downstream task only through the proximity term;
  (d) ``no-upper``     the control: the same lower steps on the same pretext batches (images and
                       augmentations, which follow per-sample seeds) with the
                       proximity term to the frozen pre-trained backbone, and no upper level at
                       all (``--upper-level 0``): as many extra pretext steps as BiSSL, no downstream signal;
  (e) ``solver-<name>`` BiSSL with each implicit-gradient solver (``--cg-solver <name>``); a solver
                       the current ``bissl.py`` does not offer is skipped with a message, and the
                       configured solver is the ``bissl`` run itself.

Every stage is the real script under torchrun (as in ``demo.py``), with its own run directory
under ``--out-dir/<variant>/``, so a killed study reruns only what is missing: finished stages
are skipped, an interrupted BiSSL run resumes from its checkpoint, an interrupted fine-tuning
runs only its missing trials. The table (``ablation.md``, ``ablation.csv``, ``ablation.png``)
comes from ``source.tools.compare``: per variant mean ± std over the seeds and the paired difference to
(a) with its 95 % CI, plus the wall time of each variant's stages.

``--scale demo`` uses ``demo.py``'s stage sizes (pre-training it first if ``--model-dir`` has no
pre-trained weights); ``--scale paper`` uses the scripts' defaults (the paper's) and needs the
pre-trained weights in ``--model-dir``. ``--pretrain-args``/``--bissl-args``/``--finetune-args`` are
appended to the pre-training, BiSSL and fine-tuning command lines of every variant (a flag given twice: the last one counts).
All variants are fine-tuned at the same (lr, wd), chosen by you; the paper's protocol tunes them
per backbone (README.md, "Comparing backbones"; docs/evidence.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import config_default as cfg
from source.run.errors import run_entry_point
from source.run.scripts import load_script
from source.run.study import link_pretrained, minutes
from source.tools.compare import csv_report, load_run, markdown_report, plot_comparison

ROOT = Path(__file__).resolve().parents[1]
demo = load_script(ROOT / "demo.py")  # the demo's stage sizes and command lines, reused at --scale demo

DEFAULT_VARIANTS = "pretrained,bissl,no-implicit,no-upper,solver-layerwise,solver-global,solver-minres"


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: a name, what ``bissl.py`` gets on top of the configured flags
    (``None``: no BiSSL stage, fine-tune the pre-trained backbone), and what it stands for."""

    name: str
    bissl_flags: tuple[str, ...] | None
    description: str


def solver_choices() -> tuple[str, ...]:
    """The implicit-gradient solvers the current ``bissl.py`` offers (``--cg-solver`` choices)."""
    field = next(f for f in dataclasses.fields(cfg.BisslConfig) if f.name == "cg_solver")
    return tuple(field.metadata.get("choices") or (field.default,))


def configured_solver(bissl_args: list[str]) -> str:
    """The solver of the plain ``bissl`` variant: the last ``--cg-solver`` in the extra flags, else the default."""
    solver = cfg.BisslConfig.cg_solver
    for index, token in enumerate(bissl_args):
        if token == "--cg-solver" and index + 1 < len(bissl_args):
            solver = bissl_args[index + 1]
        elif token.startswith("--cg-solver="):
            solver = token.split("=", 1)[1]
    return solver


def plan_variants(names: list[str], bissl_args: list[str], solvers: tuple[str, ...]) -> tuple[list[Variant], list[str]]:
    """The variants to run, in order, and a message for each one left out (unknown, or the same run as ``bissl``)."""
    configured = configured_solver(bissl_args)
    variants, notes = [], []
    for name in names:
        if name == "pretrained":
            variants.append(Variant(name, None, "(a) pre-trained backbone"))
        elif name == "bissl":
            variants.append(Variant(name, (), f"(b) BiSSL as configured ({configured})"))
        elif name == "no-implicit":
            variants.append(Variant(name, ("--cg-iter-num", "0"), "(c) BiSSL, implicit gradient x = 0"))
        elif name == "no-upper":
            variants.append(Variant(name, ("--upper-level", "0"), "(d) same lower steps, no upper level"))
        elif name.startswith("solver-"):
            solver = name.removeprefix("solver-")
            if solver not in solvers:
                notes.append(f"{name}: skipped, bissl.py offers no --cg-solver {solver!r} (it has: {', '.join(solvers)})")
            elif solver == configured and "bissl" in names:
                notes.append(f"{name}: the configured solver, i.e. the 'bissl' run")
            else:
                variants.append(Variant(name, ("--cg-solver", solver), f"(e) BiSSL, --cg-solver {solver}"))
        else:
            raise ValueError(f"unknown variant {name!r}; valid: pretrained, bissl, no-implicit, no-upper, solver-<name>")
    if not any(variant.name == "pretrained" for variant in variants):
        raise ValueError("the 'pretrained' variant is the baseline of the comparison and must be included")
    variants.sort(key=lambda variant: variant.name != "pretrained")  # the baseline first
    return variants, notes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="demo", choices=("demo", "paper"),
                        help="demo: demo.py's stage sizes on FashionMNIST (CPU); paper: the scripts' defaults (default: demo)")
    parser.add_argument("--out-dir", default="ablation_out", help="everything the study writes (default: ablation_out)")
    parser.add_argument("--model-dir", default="",
                        help="folder with the pre-trained backbone and projector (default: <out-dir>/models; "
                             "demo scale pre-trains there if they are missing)")
    parser.add_argument("--data-dir", default="data", help="dataset root (default: data)")
    parser.add_argument("--seeds", type=int, default=10, help="fine-tuning seeds per variant, 0 .. N-1 (default: 10)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default: {DEFAULT_VARIANTS})")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per stage (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu|cuda|auto (default: cpu)")
    parser.add_argument("--dset", default="fashionmnist", help="paper scale: downstream dataset (default: fashionmnist)")
    parser.add_argument("--pretext-type", default="simclr", choices=("simclr", "byol"), help="paper scale (default: simclr)")
    parser.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet50"), help="paper scale (default: resnet50)")
    parser.add_argument("--pretrain-args", default="", help="demo scale: extra flags for the pre-training run")
    parser.add_argument("--bissl-args", default="", help="extra flags for every bissl.py run, e.g. \"--epochs 100\"")
    parser.add_argument("--finetune-args", default="", help="extra flags for every fine-tuning.py run, e.g. \"--lr 0.05 --wd 0.001\"")
    return parser


class Study:
    """File names and command lines of one study (demo or paper scale)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out_dir = Path(args.out_dir).resolve()
        self.model_dir = Path(args.model_dir).resolve() if args.model_dir else self.out_dir / "models"
        self.data_dir = Path(args.data_dir).resolve()
        if args.scale == "demo":
            self.arch, self.pretext, self.dset = demo.ARCH, "simclr", "fashionmnist"
        else:
            self.arch, self.pretext, self.dset = args.arch, args.pretext_type, args.dset
        self.backbone = f"pretext_{self.pretext}_arch-{self.arch}_bb.pth"
        self.pretext_files = [self.backbone, f"pretext_{self.pretext}_arch-{self.arch}_proj.pth"]
        if self.pretext == "byol":
            self.pretext_files.append(f"pretext_byol_arch-{self.arch}_pred.pth")
        self.bissl_backbone = f"BiSSL-backbone_{self.pretext}_arch-{self.arch}_dset-{self.dset}.pth"
        self.pretrain_extra = shlex.split(args.pretrain_args)
        self.bissl_extra = shlex.split(args.bissl_args)
        self.finetune_extra = shlex.split(args.finetune_args)

    def general(self, model_dir: Path) -> list:
        return demo.study_general_args(self.args.scale, self.data_dir, model_dir, self.args.device)

    def pretrain_command(self) -> list[str]:
        return demo.torchrun(self.args.nproc, "ssl_pre-training.py", *self.general(self.model_dir), *demo.pretrain_args(),
                             *self.pretrain_extra)

    def bissl_command(self, variant: Variant, model_dir: Path) -> list[str]:
        if self.args.scale == "demo":
            base = demo.bissl_args()
        else:
            base = ["--d-dset", self.dset, "--p-pretext-type", self.pretext, "--arch", self.arch,
                    "--p-pretrained-backbone-filename", self.pretext_files[0], "--p-pretrained-proj-filename", self.pretext_files[1]]
        return demo.torchrun(self.args.nproc, "bissl.py", *self.general(model_dir), *base, *self.bissl_extra,
                             *variant.bissl_flags, "--run-dir", model_dir.parent / "bissl_run")

    def finetune_command(self, variant: Variant, model_dir: Path, run_dir: Path) -> list[str]:
        origin, weights = ("pretext", self.backbone) if variant.bissl_flags is None else ("bissl", self.bissl_backbone)
        if self.args.scale == "demo":
            base = demo.finetune_args(origin, weights, self.args.seeds, run_dir)
        else:
            base = ["--dset", self.dset, "--pretrained-backbone-filename", weights, "--backbone-origin", origin,
                    "--pretrain-arch", self.arch, "--use-hpo", 0, "--num-runs", self.args.seeds, "--run-dir", run_dir]
        return demo.torchrun(self.args.nproc, "fine-tuning.py", *self.general(model_dir), *base, *self.finetune_extra)


def main(args: argparse.Namespace) -> None:
    if args.seeds < 2:
        raise SystemExit(f"--seeds must be >= 2 for a confidence interval, got {args.seeds}")
    study = Study(args)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    try:
        variants, notes = plan_variants(names, study.bissl_extra, solver_choices())
    except ValueError as error:
        raise SystemExit(f"bissl_ablation: {error}") from error
    for note in notes:
        print(f"[ablation] {note}", flush=True)
    study.out_dir.mkdir(parents=True, exist_ok=True)
    stages = demo.Stages(study.out_dir)
    started = time.perf_counter()

    missing = [name for name in study.pretext_files if not (study.model_dir / name).is_file()]
    if missing and args.scale == "paper":
        raise SystemExit(f"bissl_ablation: pre-trained weights missing in {study.model_dir}: {', '.join(missing)} "
                         "(run ssl_pre-training.py first or pass --model-dir)")
    if missing or "pre-training" in stages.timings:  # weights given in --model-dir are used as they are
        stages.run("pre-training", study.pretrain_command(), study.model_dir / study.backbone, tag="ablation")

    run_dirs, wall = {}, {}
    for variant in variants:
        variant_dir = study.out_dir / variant.name
        model_dir = study.model_dir if variant.bissl_flags is None else variant_dir / "models"
        if variant.bissl_flags is not None:
            link_pretrained(study.pretext_files, study.model_dir, model_dir)
            stages.run(f"{variant.name}: BiSSL", study.bissl_command(variant, model_dir), model_dir / study.bissl_backbone,
                       tag="ablation")
        run_dirs[variant.name] = variant_dir / "finetune"
        stages.run(f"{variant.name}: fine-tuning", study.finetune_command(variant, model_dir, run_dirs[variant.name]),
                   run_dirs[variant.name] / "summary.txt", tag="ablation")
        wall[variant.name] = (stages.timings.get(f"{variant.name}: BiSSL"), stages.timings.get(f"{variant.name}: fine-tuning"))

    runs = [load_run(run_dirs[variant.name], variant.name) for variant in variants]
    extra = {
        "what": {variant.name: variant.description for variant in variants},
        "BiSSL stage (min)": {name: minutes(bissl) for name, (bissl, _) in wall.items()},
        "fine-tuning (min)": {name: minutes(finetune) for name, (_, finetune) in wall.items()},
    }
    lines = [f"BiSSL ablation ({args.scale} scale): {len(variants)} variants x {args.seeds} seeds, "
             f"torchrun --nproc-per-node {args.nproc}, device {args.device}", "",
             markdown_report(runs, extra_columns=extra), "",
             *[f"- {note}" for note in notes],
             *(["Code at the start of each stage: " + "; ".join(
                 f"{version} ({', '.join(name for name in stages.versions if stages.versions[name] == version)})"
                 for version in dict.fromkeys(stages.versions.values())) + "."] if stages.versions else []),
             f"Pre-training (shared): {minutes(stages.timings.get('pre-training'))} min. "
             f"Total stage time {sum(stages.timings.values()) / 60:.1f} min; this invocation {(time.perf_counter() - started) / 60:.1f} min."]
    text = "\n".join(lines)
    print("\n" + text)
    (study.out_dir / "ablation.md").write_text(text + "\n")
    (study.out_dir / "ablation.csv").write_text(csv_report(runs))
    print(f"[ablation] table: {study.out_dir / 'ablation.md'}; figure: {plot_comparison(runs, study.out_dir / 'ablation.png')}")


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
