"""What every entry script does before training: threads, process group, seeds, logging, AMP,
and taking hold of its run directory (lock, leftovers, settings of an earlier run)."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from source.data.loader import resolve_num_workers
from source.run.checkpoint import sweep_temporaries
from source.run.distributed import DistEnv, broadcast_object, init_distributed, seed_everything
from source.run.errors import ConfigError, UserError
from source.run.signals import STOP, watch_launcher
from source.run.tracking import setup_logging

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def start(args: argparse.Namespace) -> DistEnv:
    """Set threads, join the process group (if launched by torchrun/Slurm; ``--world-size`` other
    than -1 must match it), set up rank-0
    logging, resolve ``--num-workers -1`` (auto) and seed ``random``/numpy/torch with
    ``args.seed + rank``."""
    watch_launcher()  # under torchrun: die with the launcher (before a rendezvous that would wait for it)
    if args.omp_num_threads > 0:
        torch.set_num_threads(args.omp_num_threads)
    env = init_distributed(args.device, args.dist_url)
    if args.world_size not in (-1, env.world_size):
        raise ConfigError(f"--world-size {args.world_size}, but {env.world_size} process(es) were started "
                          "(torchrun --nproc-per-node x --nnodes); pass --world-size -1 to accept any")
    setup_logging(env.is_main)
    args.num_workers = resolve_num_workers(args.num_workers, env.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seed_everything(args.seed, env.rank)
    logger.info("world size %d, device %s, seed %d (+rank)", env.world_size, env.device, args.seed)
    return env


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``--amp`` -> autocast dtype (None = full precision). auto: bf16 on CUDA, none on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"--amp {amp!r}; valid: auto, {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
    return AMP_DTYPES[amp]


def per_rank_batch_size(global_batch_size: int, world_size: int, flag: str = "--batch-size") -> int:
    """Split a GLOBAL batch over the ranks, refusing sizes that do not divide evenly."""
    if global_batch_size <= 0 or global_batch_size % world_size != 0:
        raise ConfigError(
            f"{flag} {global_batch_size} is the GLOBAL batch size and must be a positive multiple of "
            f"the world size {world_size}"
        )
    return global_batch_size // world_size


def run_directory(args: argparse.Namespace, run_name: str) -> Path:
    """``--run-dir`` or ``<model-dir>/runs/<run_name>``: the same command maps to the same folder,
    which is what makes rerunning it resume."""
    return Path(args.run_dir) if args.run_dir else Path(args.model_dir) / "runs" / run_name


# Flags that may differ between a run and its continuation: where things are, how fast they run
# and how they are reported -- never what is computed. AMP is here because "--amp none" is the way
# out of a low-precision overflow; it changes numerics at rounding level only. Every other flag,
# including every flag added later, must match the checkpoint's value for a run to continue.
RESULT_NEUTRAL_FLAGS = frozenset({
    "data_dir", "model_dir", "download_dataset", "device", "num_workers", "prefetch_factor", "channels_last",
    "world_size", "dist_url", "omp_num_threads",
    "run_dir", "resume", "amp", "wandb_project", "wandb_mode", "log_every", "save_model", "cg_verbose",
    # the in-run curvature probe reads its own stream and draws nothing from the global RNG
    "curvature_every", "curvature_iters",
    # bissl.py's alignment metrics and BN-recalibrated val scores: own seeded samples and loaders, models
    # untouched (source/stages/alignment.py); they change what is reported, not the trained weights
    "lower_knn_every", "align_bank_size", "align_query_size", "eval_bn_recalibrate_batches",
    "debug",  # only how errors are shown
    "compile",  # torch.compile: the same computation, fused kernels (rounding-level differences, as AMP's)
    # Where fine-tuning's images are decoded and kept: the same crop/flip choices (per-sample seeds) on
    # the same pixels, except images the cache stores reduced (larger than --decode-cache-side), which
    # differ by a second resampling (source/data/decoded_cache.py: 0.45 grey levels of 255 measured)
    "decode_cache", "decode_cache_max_gb", "decode_cache_dir", "decode_cache_side",
})
LOCK_FILENAME = "run.lock"
# A killed process's DataLoader workers notice their parent is gone within about 5 s.
STALE_LOCK_WAIT_S = 15.0


class RunSettingsError(UserError, ValueError):
    """A run would continue from a checkpoint made with other result-defining settings."""


class RunDirBusyError(UserError, RuntimeError):
    """Another live run holds the run directory's lock."""


class NotWritableError(UserError, PermissionError):
    """A folder the run must write to (``--model-dir``, the run directory) refuses new files."""


def changed_settings(
    saved: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser,
    may_change: Iterable[str] = (), saved_inputs: dict[str, str] | None = None, inputs: dict[str, str] | None = None,
) -> list[str]:
    """One line per result-defining difference between a saved run and this command (empty: none).

    ``saved`` is the old run's ``vars(args)``; every flag of ``args`` not in
    :data:`RESULT_NEUTRAL_FLAGS` or ``may_change`` must equal it. A flag the old run does not
    record (added to the code since) matches when this command leaves it at its default.
    ``inputs`` maps a description of each input file to its content hash; a run that recorded
    none (older code) is not checked.
    """
    neutral = RESULT_NEUTRAL_FLAGS | set(may_change)
    lines = []
    for key, value in sorted(vars(args).items()):
        if key in neutral:
            continue
        flag = "--" + key.replace("_", "-")
        if key in saved:
            if saved[key] != value:
                lines.append(f"{flag}: {saved[key]!r} in the run, {value!r} now")
        elif value != parser.get_default(key):
            lines.append(f"{flag}: not recorded in the run (the flag is newer; it ran as the default "
                         f"{parser.get_default(key)!r}), {value!r} now")
    if saved_inputs:
        for label, digest in sorted((inputs or {}).items()):
            if label in saved_inputs and saved_inputs[label] != digest:
                lines.append(f"{label}: sha256 {saved_inputs[label][:12]}... in the run, {digest[:12]}... now")
    return lines


def check_settings_unchanged(run_dir: Path, changes: list[str]) -> None:
    """Raise :class:`RunSettingsError` listing ``changes`` (from :func:`changed_settings`), if any."""
    if changes:
        raise RunSettingsError(
            f"{run_dir} holds a run made with other settings:\n  " + "\n  ".join(changes)
            + "\nThese decide the result, so the run cannot continue with them changed. Rerun with the old values to "
            "continue it, or start over with --resume 0 (the old run is moved aside, nothing is deleted) or "
            "another --run-dir."
        )


class RunDirLock:
    """An exclusive lock on ``<run_dir>/run.lock`` held for the life of the process.

    ``fcntl.lockf`` (a POSIX record lock) rather than ``flock``: it belongs to the process, so
    DataLoader workers forked after it do not inherit it, and the kernel drops it the moment the
    process dies (kill -9 included) -- a stale lock cannot exist. Locks of one process do not
    conflict with each other, so calling ``main`` twice in one process (tests) works. The file
    holds the holder's pid and host, for the message that refuses a second run.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILENAME
        self._handle: IO[str] | None = None

    def acquire(self) -> RunDirLock:
        if fcntl is None:  # pragma: no cover
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + STALE_LOCK_WAIT_S
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()  # (closing our own descriptor never drops another process's lock)
                if not self._holder_gone(holder) or time.monotonic() > deadline:
                    raise RunDirBusyError(
                        f"{self.path.parent} is in use by another run ({holder or 'holder unknown'}). Two runs in one run "
                        "directory would mix their checkpoints and metrics: wait for it to end (or stop it), or pass "
                        "another --run-dir."
                    ) from None
                time.sleep(0.5)  # its forked children still hold the descriptor for a moment
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        return self

    @staticmethod
    def _holder_gone(holder: str) -> bool:
        """True if the recorded holder was a process on this host that no longer exists."""
        parts = holder.split()
        if len(parts) < 4 or parts[0] != "pid" or parts[2] != "on" or parts[3].rstrip(",") != socket.gethostname():
            return False
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError):
            return False
        # A killed holder is a zombie until reaped; its lock goes once its last thread has exited.
        try:
            return Path(f"/proc/{int(parts[1])}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the lock
            self._handle = None


def move_run_aside(run_dir: Path) -> Path | None:
    """``--resume 0``: move everything of an earlier run in ``run_dir`` (except the lock and older
    moved runs) into ``run_dir/previous-<time>/``; nothing is deleted. Returns that folder."""
    entries = [entry for entry in run_dir.iterdir() if entry.name != LOCK_FILENAME and not entry.name.startswith("previous-")]
    if not entries:
        return None
    target = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        target, suffix = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}", suffix + 1
    target.mkdir()
    for entry in entries:
        os.replace(entry, target / entry.name)
    logger.info("--resume 0: moved the previous run's files to %s", target)
    return target


def check_writable(folder: Path, flag: str) -> None:
    """Fail now, not after training, if ``folder`` (given by ``flag``) cannot take new files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise NotWritableError(f"{flag} {folder} is not writable ({error.strerror or error}); the results could not be "
                              f"saved there at the end. Fix its permissions or pass another {flag}.") from error


def open_run_dir(
    args: argparse.Namespace, env: DistEnv, run_dir: Path, output_prefixes: Iterable[str] = (),
) -> RunDirLock | None:
    """Take hold of ``run_dir`` before anything is written (rank 0; a collective).

    Rank 0 locks it (refusing a second live run), removes temporary files of killed saves (in the
    run directory, and those of this run's outputs in ``--model-dir`` whose writer is dead), moves
    an earlier run aside with ``--resume 0`` and, with ``--save-model 1``, checks that
    ``--model-dir`` is writable. A failure is raised on every rank with the same message.
    """
    lock, failure = None, None
    STOP.watch_folders(run_dir)
    if env.is_main:
        try:
            lock = RunDirLock(run_dir).acquire()
            sweep_temporaries(run_dir)
            if output_prefixes := tuple(output_prefixes):
                sweep_temporaries(Path(args.model_dir), output_prefixes, only_dead=True)
            if not args.resume:
                move_run_aside(run_dir)
            if getattr(args, "save_model", 0):
                check_writable(Path(args.model_dir), "--model-dir")
        except (OSError, RunDirBusyError) as error:
            failure = error
    message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if isinstance(failure, UserError):
        raise failure
    if failure is not None:  # the folder cannot be created, locked or cleaned: permissions, a full disk
        raise NotWritableError(f"cannot take hold of the run directory {run_dir}: {failure}") from failure
    if message is not None:
        # Rank 0 reports the error itself; this rank stops with it (silently: not rank 0).
        raise UserError(f"rank 0 could not open the run directory: {message}")
    return lock
