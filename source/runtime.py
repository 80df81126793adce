"""What every entry script does before training: threads, process group, seeds, logging, AMP."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from source.distributed import DistEnv, init_distributed, seed_everything
from source.tracking import setup_logging

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def start(args: argparse.Namespace) -> DistEnv:
    """Set threads, join the process group (if launched by torchrun/Slurm), set up rank-0
    logging and seed ``random``/numpy/torch with ``args.seed + rank``."""
    if args.omp_num_threads > 0:
        torch.set_num_threads(args.omp_num_threads)
    env = init_distributed(args.device, args.dist_url)
    setup_logging(env.is_main)
    seed_everything(args.seed, env.rank)
    logger.info("world size %d, device %s, seed %d (+rank)", env.world_size, env.device, args.seed)
    return env


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``--amp`` -> autocast dtype (None = full precision). auto: bf16 on CUDA, none on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp!r}; valid: auto, {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
    return AMP_DTYPES[amp]


def per_rank_batch_size(global_batch_size: int, world_size: int, flag: str = "--batch-size") -> int:
    """Split a GLOBAL batch over the ranks, refusing sizes that do not divide evenly."""
    if global_batch_size <= 0 or global_batch_size % world_size != 0:
        raise ValueError(
            f"{flag} {global_batch_size} is the GLOBAL batch size and must be a positive multiple of "
            f"the world size {world_size}"
        )
    return global_batch_size // world_size


def run_directory(args: argparse.Namespace, run_name: str) -> Path:
    """``--run-dir`` or ``<model-dir>/runs/<run_name>``: the same command maps to the same folder,
    which is what makes rerunning it resume."""
    return Path(args.run_dir) if args.run_dir else Path(args.model_dir) / "runs" / run_name
