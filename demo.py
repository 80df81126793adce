"""The embedded demo: the whole BiSSL pipeline on FashionMNIST, on a laptop CPU, in minutes.

    make demo            # sets everything up, then runs: python demo.py

1. SimCLR pre-training of a ResNet-18 on FashionMNIST images (labels unused).
2. BiSSL towards the downstream task: FashionMNIST classification from few labels per class.
3. Fine-tuning of BOTH the pre-trained and the BiSSL backbone at the same hyperparameters over
   several seeds, then a table (baseline vs BiSSL, val and test accuracy, mean ± std, time per
   stage) and a figure (per-seed test accuracies and BiSSL's val curve).

Every stage is the real entry script run under torchrun, so this is also a smoke test of the
command lines. Rerunning after an interruption continues where it stopped: finished stages are
skipped and an interrupted stage resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Sized so the three stages take about 10 minutes on 2 CPU cores (see the README for a measured run).
ARCH, IMG_SIZE = "resnet18", 28  # FashionMNIST's native size
PRETRAIN = dict(epochs=4, batch_size=128, samples=2048, lr=1.0, warmup_epochs=1)
BISSL = dict(alternations=6, lower_steps=4, upper_steps=2, lam=0.001, p_lr=0.2, p_batch_size=64, d_batch_size=64,
             warmup_epochs=20, warmup_lr=0.03, d_lr=0.03, d_wd=1e-3, cg_iters=3)
FINETUNE = dict(epochs=8, batch_size=50, lr=0.03, wd=5e-4)
LABELS_PER_CLASS, NUM_CLASSES, EVAL_SAMPLES = 20, 10, 1000


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="dataset root holding FashionMNIST/raw (default: data)")
    parser.add_argument("--out-dir", default="demo_out", help="weights, runs and results of the demo (default: demo_out)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per stage (default: 2)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per backbone (default: 3)")
    parser.add_argument("--device", default="cpu", help="cpu|cuda|auto (default: cpu)")
    return parser


class Stages:
    """Runs each stage once; remembers finished stages and their wall time in timings.json."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "timings.json"
        self.timings: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, command: list[str], done: Path) -> None:
        if done.exists() and name in self.timings:
            print(f"[demo] {name}: already done ({self.timings[name]:.0f} s), skipping", flush=True)
            return
        print(f"\n[demo] {name}:\n  {' '.join(command)}", flush=True)
        start = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run(command, cwd=ROOT, env=env)
        if result.returncode != 0:
            sys.exit(f"[demo] {name} failed (exit {result.returncode}); fix the error above and rerun to resume")
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.path.write_text(json.dumps(self.timings, indent=2))


def torchrun(nproc: int, script: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), script,
            *[str(a) for a in args]]


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out_dir = (ROOT / args.out_dir).resolve()
    models = out_dir / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(out_dir)
    general = ["--data-dir", Path(args.data_dir).resolve(), "--model-dir", models, "--device", args.device,
               "--num-workers", 0, "--seed", 0]
    pretext_bb = f"pretext_simclr_arch-{ARCH}_bb.pth"
    bissl_bb = f"BiSSL-backbone_simclr_arch-{ARCH}_dset-fashionmnist.pth"

    stages.run("1. SimCLR pre-training", torchrun(
        args.nproc, "ssl_pre-training.py", *general, "--pretext-type", "simclr", "--dset", "fashionmnist",
        "--arch", ARCH, "--img-size", IMG_SIZE, "--epochs", PRETRAIN["epochs"], "--batch-size", PRETRAIN["batch_size"],
        "--max-train-samples", PRETRAIN["samples"], "--lr", PRETRAIN["lr"], "--warmup-epochs", PRETRAIN["warmup_epochs"],
    ), models / pretext_bb)

    stages.run("2. BiSSL", torchrun(
        args.nproc, "bissl.py", *general, "--d-dset", "fashionmnist", "--p-dset", "fashionmnist",
        "--p-pretext-type", "simclr", "--arch", ARCH, "--img-size", IMG_SIZE,
        "--p-pretrained-backbone-filename", pretext_bb, "--p-pretrained-proj-filename", f"pretext_simclr_arch-{ARCH}_proj.pth",
        "--epochs", BISSL["alternations"], "--lower-num-iter", BISSL["lower_steps"], "--upper-num-iter", BISSL["upper_steps"],
        "--lower-warmup-alternations", 1, "--lam", BISSL["lam"], "--p-lr", BISSL["p_lr"], "--cg-iter-num", BISSL["cg_iters"],
        "--p-batch-size", BISSL["p_batch_size"], "--d-batch-size", BISSL["d_batch_size"],
        "--d-linear-warmup-epochs", BISSL["warmup_epochs"], "--d-linear-warmup-lr", BISSL["warmup_lr"], "--d-lr", BISSL["d_lr"], "--d-wd", BISSL["d_wd"],
        "--max-train-samples", PRETRAIN["samples"], "--d-max-train-samples", LABELS_PER_CLASS * NUM_CLASSES,
        "--max-eval-samples", EVAL_SAMPLES,
    ), models / bissl_bb)

    run_dirs = {}
    for origin, weights in (("pretext", pretext_bb), ("bissl", bissl_bb)):
        run_dirs[origin] = out_dir / f"finetune_{origin}"
        stages.run(f"3. fine-tuning ({origin} backbone, {args.seeds} seeds)", torchrun(
            args.nproc, "fine-tuning.py", *general, "--dset", "fashionmnist", "--pretrained-backbone-filename", weights,
            "--backbone-origin", origin, "--pretrain-arch", ARCH, "--pretrain-img-size", IMG_SIZE,
            "--use-hpo", 0, "--num-runs", args.seeds, "--epochs", FINETUNE["epochs"], "--batch-size", FINETUNE["batch_size"],
            "--lr", FINETUNE["lr"], "--wd", FINETUNE["wd"], "--max-train-samples", LABELS_PER_CLASS * NUM_CLASSES,
            "--max-eval-samples", EVAL_SAMPLES, "--run-dir", run_dirs[origin],
        ), run_dirs[origin] / "summary.txt")

    report(out_dir, run_dirs, stages.timings, models / f"BiSSL_simclr_arch-{ARCH}_dset-fashionmnist_config.json",
           time.perf_counter() - start)


def report(out_dir: Path, run_dirs: dict[str, Path], timings: dict[str, float], bissl_config: Path, elapsed: float) -> None:
    rows = {origin: [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines() if line.strip()]
            for origin, path in run_dirs.items()}
    lines = [
        f"FashionMNIST, {LABELS_PER_CLASS} labels per class, {ARCH} at {IMG_SIZE} px, "
        f"{len(rows['pretext'])} seeds per backbone (top-1 %, mean ± std)",
        f"{'backbone':<22}{'val (final)':>16}{'test (final)':>16}{'test (best val)':>18}",
    ]
    for origin, label in (("pretext", "SimCLR (baseline)"), ("bissl", "SimCLR + BiSSL")):
        ok = [r for r in rows[origin] if r.get("status", "ok") == "ok"]
        lines.append(f"{label:<22}{mean_std([r['final_val'] for r in ok]):>16}"
                     f"{mean_std([r['test_final'] for r in ok]):>16}{mean_std([r['test_best'] for r in ok]):>18}")
    lines.append("stage times: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items()))
    lines.append(f"total stage time {sum(timings.values()) / 60:.1f} min; this invocation {elapsed / 60:.1f} min")
    table = "\n".join(lines)
    print("\n" + table)
    (out_dir / "demo_results.txt").write_text(table + "\n")
    figure = plot(rows, bissl_config, out_dir / "demo_results.png")
    print(f"[demo] table: {out_dir / 'demo_results.txt'}; figure: {figure}")


def plot(rows: dict[str, list[dict]], bissl_config: Path, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(bissl_config.read_text()).get("history", []) if bissl_config.exists() else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for position, (origin, label) in enumerate((("pretext", "SimCLR"), ("bissl", "SimCLR + BiSSL"))):
        scores = [r["test_final"] for r in rows[origin] if r.get("status", "ok") == "ok"]
        left.scatter([position] * len(scores), scores, label=label, zorder=3)
        if scores:
            left.hlines(statistics.mean(scores), position - 0.2, position + 0.2, colors="k")
    left.set_xticks([0, 1], ["SimCLR", "SimCLR + BiSSL"])
    left.set_xlim(-0.6, 1.6)
    left.set_ylabel("test top-1 (%) after fine-tuning")
    left.set_title("per-seed test accuracy (line: mean)")
    if history:
        right.plot([h["alternation"] for h in history], [h["val/top1"] for h in history], marker="o", label="val top-1 (upper model)")
        right.set_xlabel("BiSSL alternation")
        right.set_ylabel("val top-1 (%)")
        twin = right.twinx()
        twin.plot([h["alternation"] for h in history], [h["distance"] for h in history], color="tab:red", ls="--",
                  label="‖θ_lower − θ_upper‖")
        twin.set_ylabel("backbone distance", color="tab:red")
        right.set_title("BiSSL stage")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    figs = ROOT / "figs"
    figs.mkdir(exist_ok=True)
    fig.savefig(figs / "demo_results.png", dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(get_args_parser().parse_args())
