"""Stage 2: BiSSL, the bilevel stage between pre-training and fine-tuning.

    torchrun --nproc-per-node 4 bissl.py --d-dset 'pets' --p-pretext-type 'simclr' \
        --p-pretrained-backbone-filename 'pretext_simclr_arch-resnet50_bb.pth' \
        --p-pretrained-proj-filename 'pretext_simclr_arch-resnet50_proj.pth'

Loads the pretext backbone and head from ``--model-dir``, trains the downstream head alone
(backbone frozen), then runs ``--epochs`` alternations of ``--lower-num-iter`` lower (pretext +
proximity) steps and ``--upper-num-iter`` upper (downstream, implicit-gradient) steps,
evaluating on the downstream val split after each. Writes
``<model-dir>/BiSSL-backbone_<type>_arch-<arch>_dset-<dset>.pth`` (the LOWER backbone, the one to
fine-tune), ``BiSSL-upper-backbone_...pth``, ``BiSSL-upper-head_...pth`` and a config JSON.
Checkpoints after every alternation; rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import config_default as cfg
from source.data import (
    build_downstream_splits,
    build_pretext_dataset,
    downstream_test_transform,
    downstream_train_transform,
    pretext_transform,
    subsample,
)
from source.data.stream import BatchStream
from source.maths.losses import downstream_criterion
from source.maths.models import build_backbone
from source.maths.optim import build_optimizer, warmup_cosine_scheduler
from source.run import checkpoint as ckpt
from source.run.cli import build_parser
from source.run.distributed import barrier, broadcast_module_, check_ranks_identical, cleanup_distributed
from source.run.runtime import (
    amp_dtype,
    changed_settings,
    check_settings_unchanged,
    open_run_dir,
    per_rank_batch_size,
    run_directory,
    start,
)
from source.run.tracking import MetricsWriter
from source.stages.bissl_trainer import BilevelSettings, BisslTrainer
from source.stages.engine import memory_format, peak_memory_metrics
from source.stages.evaluation import evaluate, sharded_eval_loader
from source.stages.pretext import BYOL, build_pretext_model
from source.tools.curvature import probe_next_batch

logger = logging.getLogger("bissl")


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(__doc__, [(cfg.GeneralConfig, "general"), (cfg.BisslConfig, "BiSSL")])


def output_names(args: argparse.Namespace) -> dict[str, str]:
    tag = f"{args.p_pretext_type}_arch-{args.arch}_dset-{args.d_dset}"
    return {
        "lower_backbone": f"BiSSL-backbone_{tag}.pth",
        "upper_backbone": f"BiSSL-upper-backbone_{tag}.pth",
        "head": f"BiSSL-upper-head_{tag}.pth",
        "config": f"BiSSL_{tag}_config.json",
        "run": f"BiSSL_{tag}",
    }


def resolve_upper_lr_wd(args: argparse.Namespace) -> None:
    """Fill --d-lr/--d-wd from the paper's per-dataset table when not given."""
    lr, wd = cfg.UPPER_LR_WD[args.p_pretext_type].get(args.d_dset, cfg.UPPER_LR_WD_FALLBACK)
    args.d_lr = lr if args.d_lr is None else args.d_lr
    args.d_wd = wd if args.d_wd is None else args.d_wd


def upper_steps_per_alternation(upper_num_iter: int, batches_per_pass: int, whole_passes: bool) -> int:
    """Upper steps per alternation: ``--upper-num-iter`` N_U, or with ``whole_passes`` the ICML code's
    rule: a downstream train split of L <= N_U batches is run as floor(N_U / L) whole passes
    (floor(N_U / L) * L steps; e.g. L = 3, N_U = 8 -> 6). With L > N_U both give N_U."""
    if whole_passes and batches_per_pass <= upper_num_iter:
        return upper_num_iter // batches_per_pass * batches_per_pass
    return upper_num_iter


def pretext_weight_files(args: argparse.Namespace) -> dict[str, Path]:
    """The pretext weight files this run starts from, by the flag that names each."""
    model_dir = Path(args.model_dir)
    files = {"--p-pretrained-backbone-filename": model_dir / args.p_pretrained_backbone_filename,
             "--p-pretrained-proj-filename": model_dir / args.p_pretrained_proj_filename}
    if args.p_pretext_type == "byol":
        files["--p-pretrained-pred-filename"] = model_dir / (args.p_pretrained_pred_filename or f"pretext_byol_arch-{args.arch}_pred.pth")
    return files


def load_lower_model(args: argparse.Namespace) -> nn.Module:
    backbone, feat_dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem))
    model = build_pretext_model(args.p_pretext_type, backbone, feat_dim, args.p_mlp, args.p_temperature)
    model_dir = Path(args.model_dir)
    ckpt.load_weights(model.backbone, model_dir / args.p_pretrained_backbone_filename, "pretext backbone", flags="--arch / --cifar-stem")
    ckpt.load_weights(model.projector, model_dir / args.p_pretrained_proj_filename, "pretext projector", flags="--p-mlp (and --arch)")
    if isinstance(model, BYOL):
        pred = args.p_pretrained_pred_filename or f"pretext_byol_arch-{args.arch}_pred.pth"
        ckpt.load_weights(model.predictor, model_dir / pred, "BYOL predictor", flags="--p-mlp")
        model.reset_target()  # the target starts equal to the loaded online network
    return model


def main(args: argparse.Namespace) -> None:
    env = start(args)
    resolve_upper_lr_wd(args)
    names = output_names(args)
    run_dir = run_directory(args, names["run"])
    run_lock = open_run_dir(args, env, run_dir, output_prefixes=[names[key] for key in ("lower_backbone", "upper_backbone", "head", "config")])
    lower_batch = per_rank_batch_size(args.p_batch_size, env.world_size, "--p-batch-size")
    upper_batch = per_rank_batch_size(args.d_batch_size, env.world_size, "--d-batch-size")
    dtype = amp_dtype(args.amp, env.device)
    if dtype == torch.float16:
        raise ValueError("bissl.py supports --amp bf16 or none (fp16 loss scaling does not fit the implicit gradient)")

    data_dir = Path(args.data_dir)
    splits = build_downstream_splits(
        args.d_dset, data_dir, downstream_train_transform(args.img_size, args.img_crop_min_ratio, bool(args.crop_as_original)),
        downstream_test_transform(args.img_size), download=bool(args.download_dataset),
        split_seed=args.seed, val_fraction=args.val_fraction,
    )
    pretext_set = build_pretext_dataset(args.p_dset, data_dir,
                                        pretext_transform(args.img_size, args.img_crop_min_ratio, bool(args.crop_as_original)),
                                        download=bool(args.download_dataset))
    cap = args.max_train_samples or None
    pretext_set = subsample(pretext_set, cap, seed=args.seed, stratify=False)
    upper_train = subsample(splits.train, args.d_max_train_samples or cap, seed=args.seed, stratify=True)
    val_set = subsample(splits.val, args.max_eval_samples or None, seed=args.seed, stratify=True)
    stream_options = dict(rank=env.rank, world_size=env.world_size, num_workers=args.num_workers,
                          pin_memory=env.device.type == "cuda", prefetch_factor=args.prefetch_factor,
                          nice_workers=env.device.type == "cpu")
    lower_stream = BatchStream(pretext_set, lower_batch, seed=args.seed, **stream_options)
    upper_stream = BatchStream(upper_train, upper_batch, seed=args.seed + 1, **stream_options)
    # The curvature probe's own batches, so probing leaves the training batches as they were.
    probe_stream = BatchStream(pretext_set, lower_batch, seed=args.seed + 2, **stream_options) if args.curvature_every else None
    val_loader = sharded_eval_loader(val_set, upper_batch, num_workers=args.num_workers, pin_memory=env.device.type == "cuda",
                                     persistent_workers=True)  # evaluated after every alternation
    logger.info("downstream %s: %d train / %d val, %d classes; pretext %s: %d images",
                args.d_dset, len(upper_train), len(val_set), splits.num_classes, args.p_dset, len(pretext_set))

    layout = memory_format(args.channels_last, env.device)  # conv outputs follow the weights' layout
    lower_model = load_lower_model(args).to(env.device, memory_format=layout)
    upper_backbone, feat_dim = build_backbone(args.arch, cifar_stem=bool(args.cifar_stem))
    upper_backbone.load_state_dict(lower_model.backbone.state_dict())
    upper_backbone.to(env.device, memory_format=layout)
    head = nn.Linear(feat_dim, splits.num_classes).to(env.device)
    # Ranks seed with seed + rank; the head must nevertheless start identical on every rank (and as
    # in a one-process run), so rank 0's initialisation is sent to all.
    broadcast_module_(head)
    # What a resumed run must have started from: the content of every input weights file.
    inputs = {f"content of {flag}": ckpt.file_sha256(path) for flag, path in pretext_weight_files(args).items()}
    criterion = downstream_criterion(splits.multilabel, args.multilabel_loss)
    upper_steps = upper_steps_per_alternation(args.upper_num_iter, upper_stream.batches_per_pass,
                                              bool(args.upper_steps_whole_passes))
    if upper_steps != args.upper_num_iter:
        logger.info("--upper-steps-whole-passes 1: %d upper steps per alternation (%d whole passes of %d batches) instead of %d",
                    upper_steps, upper_steps // upper_stream.batches_per_pass, upper_stream.batches_per_pass, args.upper_num_iter)

    lower_optimizer = build_optimizer(args.p_optimizer, list(lower_model.parameters()), args.p_lr, args.p_wd,
                                      args.p_momentum, eta=cfg.LARS_ETA, exclude_bias_bn=bool(args.p_lars_exclude_bias_bn))
    lower_scheduler = warmup_cosine_scheduler(lower_optimizer, args.lower_warmup_alternations * args.lower_num_iter,
                                              args.epochs * args.lower_num_iter, cfg.FINAL_LR_FACTOR)
    upper_optimizer = build_optimizer(args.d_optimizer, list(upper_backbone.parameters()) + list(head.parameters()),
                                      args.d_lr, args.d_wd, args.d_momentum)
    upper_scheduler = warmup_cosine_scheduler(upper_optimizer, 0, args.epochs * upper_steps, cfg.FINAL_LR_FACTOR)
    settings = BilevelSettings(
        lam=args.lam, cg_damping=args.cg_lam_dampening, cg_iters=args.cg_iter_num,
        cg_solver=args.cg_solver, upper_plain_grad_scale=args.upper_plain_grad_scale,
        grad_clip=args.grad_clip, lower_steps_per_alternation=args.lower_num_iter,
        upper_steps_per_alternation=upper_steps, alternations=args.epochs,
        ma_decay=args.p_ma_decay, ma_use_scheduler=bool(args.p_ma_use_scheduler), cg_verbose=bool(args.cg_verbose),
        upper_level=bool(args.upper_level),
    )
    trainer = BisslTrainer(lower_model, upper_backbone, head, criterion, lower_optimizer, lower_scheduler,
                           upper_optimizer, upper_scheduler, settings, env.device, dtype)
    writer = MetricsWriter(run_dir, env.is_main, vars(args), args.wandb_project, args.wandb_mode)
    checkpoint_path = run_dir / "checkpoint.pth"
    start_alternation, history = 0, []

    models = {"lower model": lower_model, "upper backbone": upper_backbone, "head": head}

    def save_checkpoint(alternation: int) -> None:
        # Collectives: every rank stops together if any model diverged or the ranks drifted apart.
        ckpt.check_healthy(models, f"by alternation {alternation}", cfg.MAX_TENSOR_RMS, cfg.MAX_BUFFER_RMS)
        check_ranks_identical(models, f"after alternation {alternation}")
        rng_states = ckpt.all_rank_rng_states()
        if env.is_main:
            ckpt.save_atomic({"trainer": trainer.state_dict(), "alternation": alternation, "history": history,
                              "lower_stream": lower_stream.state_dict(), "upper_stream": upper_stream.state_dict(),
                              "rng": rng_states, "args": vars(args), "inputs": inputs}, checkpoint_path)
        barrier()

    if args.resume and checkpoint_path.is_file():
        state = ckpt.load_checkpoint(checkpoint_path, ("trainer", "alternation", "history", "lower_stream", "upper_stream",
                                                       "rng", "args"))
        check_settings_unchanged(run_dir, changed_settings(state["args"], args, get_args_parser(),
                                                           saved_inputs=state.get("inputs"), inputs=inputs))
        trainer.load_state_dict(state["trainer"])
        lower_stream.load_state_dict(state["lower_stream"])
        upper_stream.load_state_dict(state["upper_stream"])
        start_alternation, history = state["alternation"], state["history"]
        ckpt.restore_rank_rng_state(state["rng"], env.rank, env.world_size)
        logger.info("resumed from %s after %d alternations", checkpoint_path, start_alternation)
        check_ranks_identical(models, "after resuming")
    else:
        if env.is_main:
            ckpt.write_json_atomic(vars(args), run_dir / "config.json")
        warmup_steps = args.d_linear_warmup_epochs * upper_stream.batches_per_pass
        warmup_optimizer = torch.optim.SGD(head.parameters(), lr=args.d_linear_warmup_lr or args.d_lr,
                                           momentum=args.d_momentum, weight_decay=args.d_wd)
        if args.upper_level:
            trainer.warmup_head(upper_stream, warmup_steps, warmup_optimizer, writer, env.is_main,
                                update_bn_statistics=bool(args.d_linear_warmup_update_bn))
        save_checkpoint(0)

    downstream_model = nn.Sequential(upper_backbone, head)
    progress = tqdm(range(start_alternation, args.epochs), desc="BiSSL alternations", disable=not env.is_main,
                    initial=start_alternation, total=args.epochs, dynamic_ncols=True)
    streams = (lower_stream, upper_stream)
    for alternation in progress:
        started, read, waited = time.perf_counter(), sum(s.samples_read for s in streams), sum(s.wait_s for s in streams)
        metrics = trainer.alternation(lower_stream, upper_stream)
        elapsed = time.perf_counter() - started
        # Samples of both levels (all ranks) per second of lower + upper steps, and the share of that
        # time spent waiting for data; logged, not kept in the history.
        throughput = {"throughput/images_per_s": (sum(s.samples_read for s in streams) - read) * env.world_size / elapsed,
                      "throughput/data_wait_frac": (sum(s.wait_s for s in streams) - waited) / elapsed,
                      **peak_memory_metrics(env.device, "throughput/")}
        if probe_stream is not None and (alternation + 1) % args.curvature_every == 0:
            report = probe_next_batch(lower_model, probe_stream, args.curvature_iters, args.lam + args.cg_lam_dampening,
                                      env.device, seed=args.seed + alternation)
            metrics.update(report.metrics())
        if args.upper_level:  # without one the downstream model never changes: nothing to evaluate
            scores = evaluate(downstream_model, val_loader, env.device, splits.multilabel, dtype)
            metrics.update({f"val/{key}": value for key, value in scores.items()})
        history.append({"alternation": alternation + 1, **metrics})
        writer.log({**metrics, **throughput, "alternation": alternation + 1},
                   trainer.upper_step_count if args.upper_level else trainer.lower_step_count)
        main_score = "val/map" if splits.multilabel else "val/top1"
        progress.set_postfix(lower=f"{metrics['lower/loss']:.3f}", upper=f"{metrics.get('upper/loss', math.nan):.3f}",
                             val=f"{metrics.get(main_score, math.nan):.1f}", dist=f"{metrics['distance']:.3g}",
                             img_s=f"{throughput['throughput/images_per_s']:.0f}")
        save_checkpoint(alternation + 1)

    if env.is_main and args.save_model:
        model_dir = Path(args.model_dir)
        ckpt.save_atomic(lower_model.backbone.state_dict(), model_dir / names["lower_backbone"])
        ckpt.save_atomic(upper_backbone.state_dict(), model_dir / names["upper_backbone"])
        ckpt.save_atomic(head.state_dict(), model_dir / names["head"])
        ckpt.write_json_atomic({**vars(args), "history": history}, model_dir / names["config"])
        logger.info("wrote %s", model_dir / names["lower_backbone"])
    writer.close()
    barrier()
    if run_lock is not None:
        run_lock.release()
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
