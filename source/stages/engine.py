"""Training loops shared by the entry scripts."""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from source.run.distributed import all_reduce_mean_, get_world_size
from source.run.errors import ConfigError, UserError
from source.run.tracking import MetricsWriter

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """Raised (on every rank at once) when a loss is NaN or infinite."""


def check_finite(loss_value: float, where: str) -> None:
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"non-finite loss ({loss_value}) {where}; stopping. The last checkpoint is intact: rerun with "
            "--amp none to continue it in full precision, or start over with a lower learning rate (--resume 0 or "
            "another --run-dir; a run never continues with a changed learning rate)."
        )


def make_grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 do not need loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def memory_format(channels_last: str, device: torch.device) -> torch.memory_format:
    """``--channels-last`` -> the memory format of the backbones and their input batches.

    ``1``: ``torch.channels_last`` (NHWC), what fast GPU convolutions (cuDNN, tensor cores)
    want; ``0``: the default contiguous NCHW; ``auto``: channels_last on CUDA, contiguous on CPU,
    where oneDNN's convolutions gained nothing on the ResNets we measured (bench/RESULTS.md).
    """
    if channels_last not in ("auto", "0", "1"):
        raise ValueError(f"--channels-last {channels_last!r}; valid: auto, 0, 1")
    use = device.type == "cuda" if channels_last == "auto" else channels_last == "1"
    return torch.channels_last if use else torch.contiguous_format


def check_compile_available(device: torch.device) -> None:
    """ConfigError unless ``torch.compile`` can generate code here: its default backend (inductor)
    builds C++ kernels on CPU, which needs a C++ compiler, and Triton kernels on CUDA."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("--compile 1 on CUDA needs Triton (pip install triton), which torch.compile generates its "
                          "GPU kernels with; run with --compile 0")
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if device.type == "cpu" and not any(name and shutil.which(name) for name in compilers):
        raise ConfigError("--compile 1 on CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX), which "
                          "torch.compile builds its CPU kernels with; install one or run with --compile 0")


def compile_modules(enabled: bool, device: torch.device, *modules: nn.Module) -> None:
    """``--compile 1``: compile each module's forward in place (``nn.Module.compile``: its state_dict
    keys, and so checkpoints and weight files, stay those of the eager module); the backward pass
    follows from the compiled graph. Nothing when ``enabled`` is false."""
    if not enabled:
        return
    check_compile_available(device)
    for module in modules:
        module.compile()


class Throughput:
    """Images per second and the share of wall time spent waiting for the next batch, both since
    the start (``overall``) and since the previous report (``interval``).

    The wait is what the input pipeline costs the training loop: zero when the next batch is
    always ready (workers or the prefetch thread kept up), the whole loading time when not.
    """

    def __init__(self) -> None:
        self.start = self.interval_start = time.perf_counter()
        self.images = self.interval_images = 0
        self.wait_s = self.interval_wait_s = 0.0

    def add(self, images: int, wait_s: float) -> None:
        self.images += images
        self.interval_images += images
        self.wait_s += wait_s
        self.interval_wait_s += wait_s

    @staticmethod
    def _rates(images: int, wait_s: float, elapsed: float, prefix: str) -> dict[str, float]:
        elapsed = max(elapsed, 1e-9)
        return {f"{prefix}images_per_s": images / elapsed, f"{prefix}data_wait_frac": min(1.0, wait_s / elapsed)}

    def overall(self, prefix: str = "") -> dict[str, float]:
        return self._rates(self.images, self.wait_s, time.perf_counter() - self.start, prefix)

    def interval(self, prefix: str = "") -> dict[str, float]:
        now = time.perf_counter()
        rates = self._rates(self.interval_images, self.interval_wait_s, now - self.interval_start, prefix)
        self.interval_start, self.interval_images, self.interval_wait_s = now, 0, 0.0
        return rates


def peak_memory_metrics(device: torch.device, prefix: str = "") -> dict[str, float]:
    """This rank's peak GPU memory allocated by tensors since the previous call (GiB), after which
    the peak is reset; ``{}`` off CUDA. Logged per epoch / alternation, it shows how close a
    setting runs to the card's limit (the BiSSL upper phase keeps the Hessian graph alive)."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {f"{prefix}peak_memory_gib": peak}


def train_pretext_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int,
    global_step: int,
    after_step: Callable[[int], None] | None,
    writer: MetricsWriter,
    log_every: int,
    show_progress: bool,
    memory_format: torch.memory_format = torch.contiguous_format,
    stop: Callable[[], bool] | None = None,
) -> tuple[float, int]:
    """One epoch of self-supervised training; returns (mean loss, global step after the epoch).

    ``model(view1, view2)`` returns the loss. ``after_step(step)`` runs after every optimizer step
    (the BYOL target update). The loss is averaged over ranks every step so that a non-finite
    value stops all ranks together. Throughput (images/s, one image = its two views, all ranks;
    and the share of time spent waiting for data) shows in the progress bar, in the metrics every
    ``log_every`` steps (``train/``, since the previous line) and at the end (``epoch/``).
    ``stop()`` is asked after every step (a collective: every rank asks it at the same steps); True
    ends the epoch there, so the returned step falls short of the epoch's end.
    """
    model.train()
    total_loss, num_steps = 0.0, 0
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True, leave=False)
    throughput = Throughput()
    ready = time.perf_counter()
    for (view1, view2), _ in progress:
        fetched = time.perf_counter()
        view1 = view1.to(device, non_blocking=True, memory_format=memory_format)
        view2 = view2.to(device, non_blocking=True, memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(view1, view2)
        loss_value = all_reduce_mean_(loss.detach().float().clone()).item()
        check_finite(loss_value, f"at epoch {epoch}, step {global_step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        global_step += 1
        if after_step is not None:
            after_step(global_step)
        total_loss += loss_value
        num_steps += 1
        throughput.add(view1.shape[0] * get_world_size(), fetched - ready)
        overall = throughput.overall()
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{overall['images_per_s']:.0f}",
                             data_wait=f"{overall['data_wait_frac']:.0%}", refresh=False)
        if global_step % log_every == 0:
            writer.log({"train/loss": loss_value, "train/lr": lr, **throughput.interval("train/"), "epoch": epoch},
                       global_step)
        if stop is not None and stop():
            break
        ready = time.perf_counter()
    if num_steps == 0:
        raise ConfigError("the training loader produced no batch: the dataset is smaller than one global batch")
    writer.log({**throughput.overall("epoch/"), **peak_memory_metrics(device, "epoch/"), "epoch": epoch}, global_step)
    return total_loss / num_steps, global_step

