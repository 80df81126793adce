"""Stage 3: fine-tune a backbone on a downstream dataset, over a random (lr, wd) grid or over seeds.

    torchrun --nproc-per-node 4 fine-tuning.py --dset 'pets' --pretrained-backbone-filename 'pretext_simclr_arch-resnet50_bb.pth' --backbone-origin 'pretext' --num-runs 100 --use-hpo 1
    torchrun --nproc-per-node 4 fine-tuning.py --dset 'pets' --pretrained-backbone-filename 'BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth' --backbone-origin 'bissl' --num-runs 100 --use-hpo 1
    torchrun --nproc-per-node 4 fine-tuning.py --dset 'pets' --pretrained-backbone-filename 'BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth' --backbone-origin 'bissl' --num-runs 10 --use-hpo 0

``--use-hpo 1`` runs ``--num-runs`` trials with (lr, wd) drawn log-uniformly from the
``--hpo-*`` ranges; ``--use-hpo 0`` runs ``--num-runs`` seeds at ``--lr``/``--wd`` (set them to the
best pair of the grid). Trial i uses seed ``--seed + i``.

Trials, not batches, are spread over the processes: each process runs whole trials one after
another (trial i on rank ``i mod world size``, on its own GPU), each a single-process training
with ``--batch-size`` images per step. Every finished trial appends one row to
``<run dir>/results.jsonl``; the same command run again (after a crash or when done) runs only
the trials without a row, then prints the summary table (also written to ``summary.txt``;
HPO: plus ``hpo_grid.png``). SIGTERM, SIGINT or SIGUSR1 stops each rank's running trial after the
step it is in and exits with status 75; finished trials stay recorded, the stopped one continues
from its checkpoint at that step in the next run (or, with a train loader whose position cannot be
saved, runs again from its start). A trial whose loss turns NaN/inf is recorded as failed (status
``failed``, with the reason) and left out of the table; it is not rerun. Per-epoch metrics of
trial i go to ``<run dir>/trials/trial-<i>/metrics.jsonl``. ``--save-model 1`` writes each trial's
final backbone and head to ``<model-dir>/finetuned_<origin>_<backbone stem>_dset-<dset>_trial-<i>_{bb,head}.pth``.

Object detection (``--dset voc0712det`` or ``fmnistdet``, source/stages/detection_finetune_run.py):
Faster R-CNN R-C4 around the backbone, scored by VOC2007 AP50 (%) on val (selection) and test. A
detection trial runs on all processes together, data-parallel with the GLOBAL ``--batch-size``, and
trials run one after another; each writes a checkpoint per epoch, so a rerun continues the trial
it was in. Flags not given take the paper's detection values there (50 epochs, batch 16, 50
trials, lr in [1e-4, 1e-1], wd in [1e-6, 1e-2]; ``-h`` shows both defaults); the ``--det-*`` flags
shape the detector (docs/detection.md). ``--save-model 1`` writes ``..._trial-<i>_detector.pth``.
"""
from __future__ import annotations

import argparse
import logging

import torch.distributed as dist

import config_default as cfg
from source.run.cli import build_parser
from source.run.distributed import cleanup_distributed
from source.run.errors import UserError, run_entry_point
from source.run.runtime import amp_dtype, open_run_dir, run_directory, start
from source.run.signals import STOP
from source.stages.detection_finetune import DETECTION_SCORE, is_detection_dataset
from source.stages.detection_finetune_run import load_detection_data, run_detection_sweep
from source.stages.finetune import TrialStopped, score_name
from source.stages.finetune_run import (
    END_OF_SWEEP_TIMEOUT,
    backbone_identity,
    check_run_config,
    eval_loader,
    finish_sweep,
    load_data,
    load_pretrained_backbone,
    log_trial,
    my_pending_trials,
    prepare_run_dir,
    run_name,
    run_trial,
    trial_logger,
    trial_weights_prefix,
)
from source.stages.hpo import RESULTS_FILENAME, ResultsFile, make_trial

logger = logging.getLogger("fine-tuning")


def get_args_parser() -> argparse.ArgumentParser:
    # Trials log once per epoch, so --log-every (a step count) is not offered.
    return build_parser(__doc__, [(cfg.GeneralConfig, "general"), (cfg.FinetuneConfig, "fine-tuning"),
                                  (cfg.DetectionConfig, "detection")],
                        exclude=("log_every",), is_detection=lambda args: is_detection_dataset(args.dset))


def main(args: argparse.Namespace) -> None:
    env = start(args)
    detection = is_detection_dataset(args.dset)
    # Before DataLoader workers start: they leave stop signals to their rank. Classification trials ask for
    # the flag at every step, so a signal during the set-up already waits for the first trial's first step
    # (armed); detection sweeps do not ask, so there a signal keeps its default effect.
    STOP.install([args.model_dir], armed=not detection)
    trial_logger.setLevel(logging.INFO)
    run_dir = run_directory(args, run_name(args))
    dtype = amp_dtype(args.amp, env.device)
    run_lock = open_run_dir(args, env, run_dir, output_prefixes=(trial_weights_prefix(args),))
    # gloo honours a per-group timeout for a barrier on every device type (see END_OF_SWEEP_TIMEOUT).
    end_group = dist.new_group(backend="gloo", timeout=END_OF_SWEEP_TIMEOUT) if env.distributed else None

    data = load_detection_data(args) if detection else load_data(args)
    pretrained = load_pretrained_backbone(args)
    inputs = backbone_identity(args)
    metric = DETECTION_SCORE if detection else score_name(data.splits.multilabel)
    logger.info("%s: %d train / %d val / %d test images, %d classes; backbone %s (%s)", args.dset, len(data.train_set),
                len(data.val_set), len(data.test_set), data.splits.num_classes, args.pretrained_backbone_filename,
                args.backbone_origin)
    results = ResultsFile(run_dir / RESULTS_FILENAME)
    check_run_config(args, run_dir, inputs, get_args_parser())
    if env.is_main:
        prepare_run_dir(args, run_dir, inputs)
    if detection:  # every trial on all ranks together
        run_detection_sweep(args, env, results, run_dir, pretrained, data, dtype)
    else:
        mine = my_pending_trials(args, env, results, run_dir)
        # Worker processes start on first use only; val's stay up across this rank's trials.
        val_loader = eval_loader(data.val_set, args, env.device, persistent=True)
        test_loader = eval_loader(data.test_set, args, env.device, persistent=False)
        for index in mine:
            trial = make_trial(index, args.seed, bool(args.use_hpo), args.lr, args.wd,
                               (args.hpo_lr_min, args.hpo_lr_max), (args.hpo_wd_min, args.hpo_wd_max))
            try:
                row = run_trial(args, env, trial, pretrained, data.train_set, val_loader, test_loader, data.splits, dtype, run_dir)
            except TrialStopped as stopped:
                STOP.exit(f"trial {index}, {stopped} (rank {env.rank})", announce=True,
                          saved="finished trials are recorded, " + ("this one's checkpoint is written" if stopped.checkpointed
                                                                    else "this one runs again from its start"))
            results.append(row)
            log_trial(env, trial, row, metric)

    if end_group is not None:
        dist.barrier(group=end_group)
    failed_sweep = finish_sweep(args, env, run_dir, results, metric)
    if run_lock is not None:
        run_lock.release()
    cleanup_distributed()
    if failed_sweep is not None:
        raise UserError(f"fine-tuning: {failed_sweep}")


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
