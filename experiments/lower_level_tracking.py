"""How fast can BiSSL's lower level follow θ_D? Per-step movement of θ_P under LARS and SGD, measured.

    python experiments/lower_level_tracking.py --model-dir demo_out/models \\
        --target dose_response_out/runs/sgd-lr0.05_lam1_alt12/bissl-seed0/models/BiSSL-upper-backbone_simclr_arch-resnet18_dset-fashionmnist.pth

BiSSL's lower step minimises L_P(θ_P) + (λ/2)‖θ_P − θ_D‖² with θ_D held fixed. LARS (trust
coefficient η = ``config_default.LARS_ETA``) rescales each layer's update u to ‖u‖ = η‖w‖ before
momentum, so a layer moves by about lr·η·‖w‖ per step (up to 1/(1 − momentum) times that when
successive updates align) however large the proximity gradient is; SGD moves by lr·‖g‖. This
script runs the real lower steps of ``bissl.py`` (``BisslTrainer.lower_step``, demo-scale data,
one process) from the pre-trained backbone towards a FIXED target θ_D (``--target``: an upper
backbone some BiSSL run trained, e.g. ``BiSSL-upper-backbone_*.pth``) for each
``--configs`` entry ``optimizer:lr:lam``, and records per step:

- ``step_ratio``: the median over weight layers of ‖Δw‖ / (lr_t·η·‖w‖), the LARS bound's multiple;
- ``relative_step``: ‖Δθ_P‖/‖θ_P‖ over the whole backbone;
- ``gap``: ‖θ_P − θ_D‖ / ‖θ_0 − θ_D‖, the share of the initial distance to θ_D still left (1 at the start).

The lr follows bissl.py's lower schedule for ``--alternations`` × ``--lower-steps`` steps (warmup
over ``--lower-warmup-alternations``, cosine to 0.001×). Output: ``<out>.json`` (every step) and a
markdown summary on stdout and in ``<out>.md``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import config_default as cfg
from source.run import checkpoint as ckpt
from source.run.distributed import cleanup_distributed
from source.run.errors import CommandLineParser, ConfigError, MissingInputError, run_entry_point
from source.run.runtime import start
from source.run.scripts import load_script
from source.stages.bissl_run import build_data, build_trainer

ROOT = Path(__file__).resolve().parents[1]
demo = load_script(ROOT / "demo.py")


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="folder with the demo's pre-trained SimCLR ResNet-18 backbone and projector")
    parser.add_argument("--target", required=True, help="backbone file θ_D is fixed to (e.g. a BiSSL-upper-backbone_*.pth)")
    parser.add_argument("--data-dir", default="data", help="dataset root holding FashionMNIST/raw (default: data)")
    parser.add_argument("--configs", default="lars:0.2:1,lars:1.0:1,sgd:0.05:1",
                        help="optimizer:lr:lam entries, comma-separated (default: lars:0.2:1,lars:1.0:1,sgd:0.05:1)")
    parser.add_argument("--alternations", type=int, default=12, help="alternations T the lr schedule spans (default: 12)")
    parser.add_argument("--lower-steps", type=int, default=4, help="lower steps per alternation N_L (default: 4)")
    parser.add_argument("--lower-warmup-alternations", type=int, default=1, help="lr warmup, in alternations (default: 1, the demo's)")
    parser.add_argument("--out", default="lower_level_tracking", help="output path without suffix (default: lower_level_tracking)")
    return parser


def parse_configs(text: str) -> list[tuple[str, float, float]]:
    configs = []
    for entry in (part.strip() for part in text.split(",") if part.strip()):
        fields = entry.split(":")
        if len(fields) != 3 or fields[0] not in ("lars", "sgd"):
            raise ConfigError(f"--configs entry {entry!r} must be lars|sgd:lr:lam, e.g. lars:0.2:1")
        try:
            configs.append((fields[0], float(fields[1]), float(fields[2])))
        except ValueError:
            raise ConfigError(f"--configs entry {entry!r}: lr and lam must be numbers") from None
    return configs


def bissl_args(args: argparse.Namespace, optimizer: str, lr: float, lam: float) -> argparse.Namespace:
    """bissl.py's parsed flags at demo scale, with this configuration's lower level."""
    bissl = load_script(ROOT / "bissl.py")
    flags = [*demo.general_args(Path(args.data_dir).resolve(), Path(args.model_dir).resolve(), "cpu"), *demo.bissl_args(),
             "--epochs", args.alternations, "--lower-num-iter", args.lower_steps,
             "--lower-warmup-alternations", args.lower_warmup_alternations,
             "--p-optimizer", optimizer, "--p-lr", lr, "--lam", lam, "--d-linear-warmup-epochs", 0]
    return bissl.get_args_parser().parse_args([str(flag) for flag in flags])


def flat(parameters: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in parameters])


def track(args: argparse.Namespace, optimizer: str, lr: float, lam: float, target: dict) -> list[dict]:
    """Run the lower steps with θ_D fixed at ``target``; one record per step."""
    run_args = bissl_args(args, optimizer, lr, lam)
    env = start(run_args)
    data = build_data(run_args, env)
    trainer = build_trainer(run_args, env, data, None)
    trainer.upper_backbone.load_state_dict(target)
    lower = trainer.lower_backbone_params
    weights = [index for index, p in enumerate(lower) if p.ndim > 1]
    upper = flat(trainer.upper_backbone_params)
    start_gap = float((flat(lower) - upper).norm())
    records = []
    for step in range(args.alternations * args.lower_steps):
        before = [p.detach().clone() for p in lower]
        (view1, view2), _ = next(data.lower_stream)
        metrics = trainer.lower_step(view1, view2)
        bound = [metrics["lower/lr"] * cfg.LARS_ETA * float(before[i].norm()) for i in weights]
        moved = [float((lower[i].detach() - before[i]).norm()) for i in weights]
        whole = float((flat(lower) - torch.cat([b.flatten() for b in before])).norm())
        records.append({"step": step + 1, "lr": metrics["lower/lr"], "loss": metrics["lower/loss"],
                        "step_ratio": statistics.median(m / b for m, b in zip(moved, bound)),
                        "relative_step": whole / float(torch.cat([b.flatten() for b in before]).norm()),
                        "gap": float((flat(lower) - upper).norm()) / start_gap})
    cleanup_distributed()
    return records


def summary(results: dict[str, list[dict]], start_gap: float) -> str:
    marks = sorted({1, 12, 24, 48} | {len(r) for r in results.values()})
    head = ["lower level", "median ‖Δw‖/(lr·η·‖w‖) (steps 2-10)", *[f"gap left after {m} steps" for m in marks]]
    lines = [f"Initial ‖θ_0 − θ_D‖ = {start_gap:.3f}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, records in results.items():
        ratios = statistics.median(r["step_ratio"] for r in records[1:10])
        gaps = [f"{records[m - 1]['gap']:.3f}" if m <= len(records) else "-" for m in marks]
        lines.append("| " + " | ".join([name, f"{ratios:.2f}", *gaps]) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    configs = parse_configs(args.configs)
    target_path = Path(args.target)
    if not target_path.is_file():
        raise MissingInputError(f"--target {target_path}: no such backbone file")
    target = ckpt.load_file(target_path)
    pretrained = torch.load(Path(args.model_dir) / demo.PRETEXT_BACKBONE, weights_only=True)
    start_gap = float(torch.cat([(target[k].double() - pretrained[k].double()).flatten() for k in pretrained
                                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]).norm())
    results, started = {}, time.perf_counter()
    for optimizer, lr, lam in configs:
        results[f"{optimizer} lr {lr:g}, λ {lam:g}"] = track(args, optimizer, lr, lam, target)
    text = summary(results, start_gap) + f"\n\n{time.perf_counter() - started:.0f} s."
    print(text)
    out = Path(args.out)
    ckpt.write_json_atomic({"args": vars(args), "start_gap": start_gap, "results": results}, out.with_suffix(".json"))
    ckpt.write_text_atomic(text + "\n", out.with_suffix(".md"))


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
