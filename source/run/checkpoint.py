"""Atomic checkpoints, RNG state capture, and strict weight loading with clear errors.

Everything is loaded with ``torch.load(..., weights_only=True)``: loading never executes code.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from source.run.distributed import gather_objects
from source.run.errors import UserError
from source.run.state_dict import WeightsError, normalize_state_dict

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A run directory's checkpoint cannot be resumed from; the message says which file, what is
    wrong with it and how to start over."""


class DivergedStateError(UserError, RuntimeError):
    """A model holds non-finite or exploding values; it is not saved (raised on every rank)."""


class DiskFullError(UserError, OSError):
    """A save ran out of disk space (ENOSPC/EDQUOT); the partial file was removed."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


# Temporary files of the atomic writers: ".<final name>.tmp<pid>" beside the final file.
_TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _is_disk_full(error: BaseException | None) -> bool:
    """True if ``error`` or an error it was raised from is ENOSPC/EDQUOT (torch.save reports a
    failed write as a RuntimeError raised while handling the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it and ``os.replace`` it into place.

    On any failure (including KeyboardInterrupt) the temporary file is removed, so the folder
    holds either the old complete file or the new one, never a partial file; a full disk is
    reported in plain words rather than as a stream error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(error):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(errno.ENOSPC, f"no space left on {path.parent} while writing {path.name}; the partial file "
                                       f"was removed ({free / 2**20:.1f} MiB free now, not enough) and the previous "
                                       f"{path.name} (if any) is intact: free some space and rerun") from error
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash never
    leaves a truncated file at ``path``, and a failed save leaves no temporary file behind."""
    # torch.save to a Python file object: write errors surface as OSError with their errno.
    _write_atomic(path, lambda handle: torch.save(obj, handle))


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    data = text.encode("utf-8")
    _write_atomic(path, lambda handle: handle.write(data))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_temporaries(folder: Path, prefixes: Iterable[str] = ("",), only_dead: bool = False) -> list[Path]:
    """Remove the temporary files that killed saves left in ``folder`` (names starting with one of
    ``prefixes``); with ``only_dead`` only those whose writer process no longer runs on this host.

    Call it with ``only_dead=False`` only on a folder this process has locked (the run directory).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefixes = tuple(prefixes)
    removed = []
    for entry in folder.iterdir():
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None or not match["name"].startswith(prefixes) or not entry.is_file():
            continue
        if only_dead and (int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"]))):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted saves in %s: %s", len(removed), folder,
                    ", ".join(entry.name for entry in removed))
    return removed


def save_figure_atomic(figure: Any, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically to ``path`` (:func:`_write_atomic`; format from its
    suffix, default PNG)."""
    path = Path(path)
    _write_atomic(path, lambda handle: figure.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=dpi))
    return path


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def load_file(path: Path) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def _load_problem(path: Path) -> tuple[Any, str | None]:
    """(content, None) for a readable weights_only file, else (None, what is wrong with it)."""
    size = path.stat().st_size
    if size == 0:
        return None, "the file is empty (0 bytes; cut short by a crash or a full disk?)"
    try:
        return load_file(path), None
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):  # a complete torch.save file whose pickle needs more than tensors
            return None, ("it holds Python objects that only load by executing code, which is refused "
                          "(weights_only=True): it was not written by this project")
        return None, f"it is not a PyTorch file ({size} bytes; corrupt, truncated or another kind of file)"
    except Exception as error:  # zip/stream errors of a truncated or overwritten file
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return None, f"it is not a readable PyTorch file ({size} bytes; corrupt or truncated: {reason})"


def load_checkpoint(path: Path, required_keys: Iterable[str]) -> dict[str, Any]:
    """Load a run directory's checkpoint, refusing corrupt, foreign and incomplete files with a
    :class:`CheckpointError` that names the file, the problem and how to start over."""
    path = Path(path)
    how = ("Pass --resume 0 to start over (the old run is moved aside, nothing is deleted) or --run-dir to use "
           "another folder.")
    state, problem = _load_problem(path)
    if problem is None:
        if not isinstance(state, dict):
            problem = f"it holds a {type(state).__name__}, not a checkpoint dict"
        elif missing := [key for key in required_keys if key not in state]:
            problem = f"it is not a checkpoint of this script (no {', '.join(repr(key) for key in missing)})"
    if problem is not None:
        raise CheckpointError(f"cannot resume from {path}: {problem}. {how}")
    return state


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes: the identity of an input weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def unhealthy_tensors(modules: dict[str, nn.Module], max_rms: float, max_buffer_rms: float) -> list[str]:
    """Names of non-finite floating-point parameters and buffers, and of those whose root-mean-square
    exceeds ``max_rms`` (parameters) or ``max_buffer_rms`` (buffers): weights can explode while a
    BatchNorm-normalised loss stays finite. Buffers get a far looser bound because BN statistics
    follow the data's scale (the published weights carry statistics of 0-255 inputs)."""
    problems = []
    for name, module in modules.items():
        parameters = {id(param) for param in module.parameters()}
        for key, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if not bool(torch.isfinite(tensor).all()):
                problems.append(f"{name}.{key} is not finite")
            else:
                rms = float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) / tensor.numel() ** 0.5
                limit = max_rms if id(tensor) in parameters else max_buffer_rms
                if rms > limit:
                    problems.append(f"{name}.{key} has root-mean-square {rms:.3g} > {limit:g}")
    return problems


def check_healthy(modules: dict[str, nn.Module], where: str, max_rms: float, max_buffer_rms: float) -> None:
    """Raise :class:`DivergedStateError` on EVERY rank (a collective) if any rank's ``modules``
    hold non-finite or exploding values; called before saving so a checkpoint is always finite."""
    everyone = gather_objects(unhealthy_tensors(modules, max_rms, max_buffer_rms))
    problems = [f"rank {rank}: {problem}" for rank, found in enumerate(everyone) for problem in found]
    if problems:
        shown = "; ".join(problems[:6]) + (f" ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise DivergedStateError(
            f"the model diverged {where} ({shown}); it is NOT saved, so the last checkpoint stays the last finite "
            "state. Start over with a lower learning rate (--resume 0 or another --run-dir)."
        )


def rng_state() -> dict[str, Any]:
    """The RNG states of random, numpy and torch (CPU and CUDA), as weights_only-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rank_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective: call it on every rank)."""
    return gather_objects(rng_state())


def restore_rank_rng_state(states: list[dict[str, Any]], rank: int, world_size: int) -> None:
    """Restore this rank's RNG state from a checkpoint's per-rank list; if the world size
    changed, the streams cannot be matched, so they stay freshly seeded (with a warning)."""
    if len(states) == world_size:
        set_rng_state(states[rank])
    else:
        logger.warning("world size changed since the checkpoint (%d -> %d): RNG streams are reseeded",
                       len(states), world_size)


def load_weights(module: nn.Module, path: Path, what: str, flags: str = "the architecture flags") -> None:
    """Load a plain ``state_dict`` file into ``module`` strictly, with errors that name the problem.

    Accepts the paper's published weights (torchvision/timm ResNet keys without ``fc.*``).
    Missing, unexpected and wrongly shaped keys are all listed in one error, which points to the
    calling script's ``flags`` that decide the model's shape (e.g. ``"--pretrain-arch / --pretrain-cifar-stem"``).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} weights not found: {path} (check --model-dir and the filename flag)")
    state, problem = _load_problem(path)
    if problem is not None:
        raise WeightsError(f"cannot load {what} weights from {path}: {problem}")
    # Foreign layouts (wrappers, module./backbone. prefixes, fc.*) are mapped onto the module the
    # same way as `python -m source.tools.weights convert` (source.run.state_dict), so converted and unconverted files load alike.
    try:
        normalized = normalize_state_dict(state, module.state_dict())
    except WeightsError as error:
        raise WeightsError(f"{what} weights in {path}: {error}") from None
    for note in normalized.notes:
        logger.info("%s weights in %s: %s", what, path, note)
    state = normalized.state
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or wrong_shape:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "") or "none"
        raise WeightsError(
            f"{what} weights in {path} do not match the model "
            f"(check {flags}):\n  missing keys: {show(missing)}\n"
            f"  unexpected keys: {show(unexpected)}\n  shape mismatches: {show(wrong_shape)}"
        )
    module.load_state_dict(state, strict=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module
