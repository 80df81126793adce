"""Stage 1: conventional self-supervised pre-training (SimCLR or BYOL) of a ResNet backbone.

    torchrun --nproc-per-node 4 ssl_pre-training.py --pretext-type 'simclr'

Writes ``<model-dir>/pretext_<type>_arch-<arch>_{bb,proj[,pred]}.pth`` (plain state_dicts) and
``..._config.json``. Rerunning the same command after an interruption resumes from the run
directory's last checkpoint. SIGTERM, SIGINT or SIGUSR1 stops the run after the step it is in, with a
checkpoint there (mid-epoch: the next run continues the epoch), exit status 75.
"""
from __future__ import annotations

import argparse
import logging

import config_default as cfg
from source.run import checkpoint as ckpt
from source.run.cli import build_parser
from source.run.distributed import barrier, cleanup_distributed
from source.run.errors import run_entry_point
from source.run.runtime import amp_dtype, open_run_dir, per_rank_batch_size, run_directory, start
from source.run.signals import STOP
from source.run.tracking import MetricsWriter
from source.stages.engine import compile_modules, make_grad_scaler, train_pretext_epoch
from source.stages.pretext_run import (
    PretextCheckpoint,
    build_loader,
    build_model,
    build_optimization,
    byol_target_update,
    output_stem,
    record_final_state,
    save_outputs,
    start_epoch,
    wrap_distributed,
)

logger = logging.getLogger("ssl_pre-training")


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(
        __doc__, [(cfg.GeneralConfig, "general"), (cfg.PretrainConfig, "pre-training")]
    )


def main(args: argparse.Namespace) -> None:
    env = start(args)
    STOP.install([args.model_dir], armed=True)  # before DataLoader workers start: they leave signals to their rank
    batch_size = per_rank_batch_size(args.batch_size, env.world_size)  # fail before touching data
    run_dir = run_directory(args, f"{output_stem(args)}_dset-{args.dset}")
    run_lock = open_run_dir(args, env, run_dir, output_prefixes=(f"{output_stem(args)}_",))
    loader, sampler = build_loader(args, env)
    model, layout = build_model(args, env)
    steps_per_epoch = len(loader)
    optimizer, scheduler = build_optimization(args, model, steps_per_epoch)
    dtype = amp_dtype(args.amp, env.device)
    scaler = make_grad_scaler(env.device, dtype)

    checkpoint = PretextCheckpoint(run_dir / "checkpoint.pth", args, env, model, optimizer, scheduler, scaler)
    resumed = args.resume and checkpoint.path.is_file()
    epochs_done, global_step = checkpoint.resume(get_args_parser(), steps_per_epoch) if resumed else (0, 0)
    ddp_model = wrap_distributed(model, env)
    compile_modules(bool(args.compile), env.device, ddp_model)
    after_step = byol_target_update(args, model, args.epochs * steps_per_epoch)
    writer = MetricsWriter(run_dir, env.is_main, vars(args), args.wandb_project, args.wandb_mode)
    if env.is_main:
        ckpt.write_json_atomic(vars(args), run_dir / "config.json")
    for epoch in range(epochs_done, args.epochs):
        start_epoch(sampler, epoch, global_step - epoch * steps_per_epoch, batch_size)
        mean_loss, global_step = train_pretext_epoch(
            ddp_model, loader, optimizer, scheduler, scaler, device=env.device, amp_dtype=dtype,
            epoch=epoch, global_step=global_step, after_step=after_step, writer=writer,
            log_every=args.log_every, show_progress=env.is_main, memory_format=layout,
            stop=lambda: STOP.agreed(env.device),
        )
        if global_step < (epoch + 1) * steps_per_epoch:  # stopped by a signal mid-epoch
            checkpoint.save(epoch, global_step)
        else:
            writer.log({"epoch/loss": mean_loss, "epoch": epoch}, global_step)
            logger.info("epoch %d/%d: loss %.4f", epoch + 1, args.epochs, mean_loss)
            checkpoint.save(epoch + 1, global_step)
        if STOP.stop_agreed and global_step < args.epochs * steps_per_epoch:  # (done anyway: finish)
            writer.close()
            STOP.exit(f"epoch {epoch + 1}, step {global_step - epoch * steps_per_epoch} of {steps_per_epoch} "
                      f"(global step {global_step}; {checkpoint.path})", announce=env.is_main)

    record_final_state(args, env, model, run_dir)
    if env.is_main and args.save_model:
        save_outputs(args, model)
    writer.close()
    barrier()
    if run_lock is not None:
        run_lock.release()
    cleanup_distributed()


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
