"""Shared helpers for tests that run the entry scripts as real processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from source.run import scripts
from tests.distributed_harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """The entry script ``name`` (``"fine-tuning.py"``) at the repository root, executed afresh as a module."""
    return scripts.load_script(ROOT / name)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    """A class-folder tree of random RGB PNGs (with class-dependent colour so labels are learnable)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] = np.clip(pixels[..., c % 3].astype(int) + 80, 0, 255)
            Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return root


def script_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_SILENT="true")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def command(script: str, *args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(ROOT / script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), str(ROOT / script), *args]


def run_script(script: str, *args: str, nproc: int = 1, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command(script, *args, nproc=nproc), cwd=ROOT, env=script_env(), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launched command and everything it started (torchrun puts its ranks in sessions
    of their own, so a process-group kill would miss them), as a node failure would."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    process.wait()


def write_random_pretext_weights(models: Path) -> None:
    """Seeded random ResNet-18 pretext weights in ``models``: backbone and projector (``32-16``) for
    SimCLR and BYOL, and BYOL's predictor, named as ssl_pre-training.py names them. The standard
    stem keeps 16 px images cheap (4x4 maps in the double backward)."""
    import torch

    from source.maths.models import Projector, build_backbone
    from source.run.checkpoint import save_atomic

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    projector = Projector(dim, "32-16")
    for kind in ("simclr", "byol"):
        save_atomic(backbone.state_dict(), models / f"pretext_{kind}_arch-resnet18_bb.pth")
        save_atomic(projector.state_dict(), models / f"pretext_{kind}_arch-resnet18_proj.pth")
    save_atomic(Projector(16, "32-16").state_dict(), models / "pretext_byol_arch-resnet18_pred.pth")


def model_dirs_with_pretext_weights(models: Path, *folders: Path) -> None:
    """Create each of ``folders`` holding a copy of the SimCLR pretext weights in ``models`` (one
    run's --model-dir each, so runs compared with each other start from the same files)."""
    for folder in folders:
        folder.mkdir()
        for weights in models.glob("pretext_simclr_*"):
            (folder / weights.name).write_bytes(weights.read_bytes())
