"""Atomic checkpoints, RNG state capture, and strict weight loading with clear errors.

Everything is loaded with ``torch.load(..., weights_only=True)``: loading never executes code.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from source.distributed import gather_objects

logger = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """A weights file is missing or does not fit the model; the message names the mismatch."""


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash never
    leaves a truncated file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def load_file(path: Path) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


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


def load_weights(module: nn.Module, path: Path, what: str) -> None:
    """Load a plain ``state_dict`` file into ``module`` strictly, with errors that name the problem.

    Accepts the paper's published weights (torchvision/timm ResNet keys without ``fc.*``).
    Missing, unexpected and wrongly shaped keys are all listed in one error.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} weights not found: {path} (check --model-dir and the filename flag)")
    try:
        state = load_file(path)
    except Exception as error:  # corrupt file or one that needs code execution to load
        raise WeightsError(f"cannot load {what} weights from {path}: {error}") from error
    # Foreign layouts (wrappers, module./backbone. prefixes, fc.*) are mapped onto the module the
    # same way as `python -m source.weights convert`, so converted and unconverted files load alike.
    from source.weights import normalize_state_dict  # local: source.weights imports this module

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
            f"(check --arch / --cifar-stem / --mlp):\n  missing keys: {show(missing)}\n"
            f"  unexpected keys: {show(unexpected)}\n  shape mismatches: {show(wrong_shape)}"
        )
    module.load_state_dict(state, strict=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module
