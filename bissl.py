"""Stage 2: BiSSL, the bilevel stage between pre-training and fine-tuning.

    torchrun --nproc-per-node 4 bissl.py --d-dset 'pets' --p-pretext-type 'simclr' \
        --p-pretrained-backbone-filename 'pretext_simclr_arch-resnet50_bb.pth' \
        --p-pretrained-proj-filename 'pretext_simclr_arch-resnet50_proj.pth'

Loads the pretext backbone and head from ``--model-dir``, trains the downstream head alone
(backbone frozen), then runs ``--epochs`` alternations of ``--lower-num-iter`` lower (pretext +
proximity) steps and ``--upper-num-iter`` upper (downstream, implicit-gradient) steps,
evaluating on the downstream val split after each (``--eval-bn-recalibrate-batches K``: on a copy with
re-estimated BatchNorm statistics) and logging how strongly the two backbones are coupled
(``coupling/*``) and, with ``--lower-knn-every N``, how well each one's features fit the downstream
classes (``align/*``; docs/evidence.md). Writes
``<model-dir>/BiSSL-backbone_<type>_arch-<arch>_dset-<dset>.pth`` (the LOWER backbone, the one to
fine-tune), ``BiSSL-upper-backbone_...pth``, ``BiSSL-upper-head_...pth`` and a config JSON.
With ``--d-dset voc0712det`` or ``fmnistdet`` the upper level is Faster R-CNN R-C4 trained on the sum
of its four losses and scored by val AP50 (``--det-*`` flags, docs/detection.md).
Checkpoints after every alternation; rerunning the same command resumes. SIGTERM, SIGINT or SIGUSR1
stops the run at the end of the alternation it is in (or of the head warm-up), after its checkpoint,
with exit status 75.
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import config_default as cfg
from source.run import checkpoint as ckpt
from source.run.cli import build_parser
from source.run.distributed import barrier, cleanup_distributed
from source.run.errors import ConfigError, run_entry_point
from source.run.runtime import amp_dtype, open_run_dir, run_directory, start
from source.run.signals import STOP
from source.run.tracking import MetricsWriter
from source.stages.bissl_run import (
    OUTPUT_FILES,
    BisslCheckpoint,
    build_data,
    build_trainer,
    log_start_alignment,
    output_names,
    progress_postfix,
    resolve_upper_lr_wd,
    run_alternation,
    save_outputs,
    warm_up_head,
)
from source.stages.detection_finetune import is_detection_dataset


def get_args_parser() -> argparse.ArgumentParser:
    # Metrics are written once per alternation, so --log-every (a step count) is not offered.
    return build_parser(__doc__, [(cfg.GeneralConfig, "general"), (cfg.BisslConfig, "BiSSL"), (cfg.DetectionConfig, "detection")],
                        exclude=("log_every",), is_detection=lambda args: is_detection_dataset(args.d_dset))


def main(args: argparse.Namespace) -> None:
    env = start(args)
    STOP.install([args.model_dir], armed=True)  # before DataLoader workers start: they leave signals to their rank
    resolve_upper_lr_wd(args)
    names = output_names(args)
    run_dir = run_directory(args, names["run"])
    run_lock = open_run_dir(args, env, run_dir, output_prefixes=[names[key] for key in OUTPUT_FILES])
    dtype = amp_dtype(args.amp, env.device)
    if dtype == torch.float16:
        raise ConfigError("bissl.py supports --amp bf16 or none (fp16 loss scaling does not fit the implicit gradient)")

    data = build_data(args, env)
    trainer = build_trainer(args, env, data, dtype)
    writer = MetricsWriter(run_dir, env.is_main, vars(args), args.wandb_project, args.wandb_mode)
    checkpoint = BisslCheckpoint(run_dir / "checkpoint.pth", args, env, trainer, data)
    if args.resume and checkpoint.exists():
        start_alternation, history = checkpoint.resume(get_args_parser())
    else:
        start_alternation, history = 0, []
        if env.is_main:
            ckpt.write_json_atomic(vars(args), run_dir / "config.json")
        warm_up_head(args, env, trainer, data, writer)
        log_start_alignment(env, trainer, data, writer, dtype)
        checkpoint.save(0, history)
        if STOP.agreed(env.device):
            writer.close()
            STOP.exit(f"the end of the head warm-up ({checkpoint.path})", announce=env.is_main)

    progress = tqdm(range(start_alternation, args.epochs), desc="BiSSL alternations", disable=not env.is_main,
                    initial=start_alternation, total=args.epochs, dynamic_ncols=True)
    for alternation in progress:
        metrics, throughput = run_alternation(args, env, trainer, data, alternation, dtype)
        history.append({"alternation": alternation + 1, **metrics})
        writer.log({**metrics, **throughput, "alternation": alternation + 1},
                   trainer.upper_step_count if args.upper_level else trainer.lower_step_count)
        progress.set_postfix(**progress_postfix(metrics, throughput, data.splits.multilabel))
        checkpoint.save(alternation + 1, history)
        # The alternation is the step here: one checkpoint holds the whole bilevel state between two.
        if STOP.agreed(env.device) and alternation + 1 < args.epochs:
            writer.close()
            STOP.exit(f"alternation {alternation + 1} of {args.epochs} ({checkpoint.path})", announce=env.is_main)

    if env.is_main and args.save_model:
        save_outputs(args, trainer, names, history)
    writer.close()
    barrier()
    if run_lock is not None:
        run_lock.release()
    cleanup_distributed()


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
