"""Distributed runtime: one place that knows about torchrun, Slurm, backends and devices.

Works under ``torchrun`` (any ``--nproc-per-node``, any number of nodes), under Slurm
(``SLURM_PROCID``/``SLURM_NTASKS``), and as a plain ``python script.py`` (one process, no
process group). nccl is used for CUDA, gloo for CPU.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from source.run.errors import ConfigError

logger = logging.getLogger(__name__)

VALID_DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class DistEnv:
    """What a process needs to know about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Map ``--device`` (auto|cuda|cpu) to a concrete device for this process."""
    if device not in VALID_DEVICES:
        raise ConfigError(f"--device {device!r} is not one of {VALID_DEVICES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launched_world_size() -> int:
    """The number of processes torchrun (``WORLD_SIZE``) or Slurm (``SLURM_NTASKS``) started, 1 for
    a plain ``python`` run; readable before the process group exists (the parser checks with it)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


# MASTER_PORT of a Slurm launch that names none: this base plus the job id modulo the span, so two
# jobs sharing a node rarely collide and every task of one job computes the same port.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``node[03-05,9],gpu1`` -> ``node03`` (zero padding kept)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ConfigError(f"cannot read the first host of SLURM_NODELIST {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.group(1), match.group(2)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def slurm_rendezvous(environ: Mapping[str, str]) -> dict[str, str]:
    """``MASTER_ADDR``/``MASTER_PORT`` for ranks that ``srun`` started without torchrun, where the
    environment lacks them: the first host of ``SLURM_NODELIST`` (as rank 0 runs there) and a port
    derived from ``SLURM_JOB_ID``. Empty outside such a launch or when both are given."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    found = {}
    if "MASTER_ADDR" not in environ and environ.get("SLURM_NODELIST"):
        found["MASTER_ADDR"] = first_slurm_host(environ["SLURM_NODELIST"])
    if "MASTER_PORT" not in environ and environ.get("SLURM_JOB_ID", "").isdigit():
        found["MASTER_PORT"] = str(SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN)
    return found


def init_distributed(device: str = "auto", dist_url: str = "env://", timeout_minutes: int = 30) -> DistEnv:
    """Initialise the process group if launched by torchrun or Slurm; otherwise run alone.

    Rank/world size come from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` or from Slurm's
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``. Under Slurm the rendezvous is
    ``MASTER_ADDR``/``MASTER_PORT`` or ``--dist-url tcp://host:port`` when given, else
    :func:`slurm_rendezvous` (the first node of the job, a port from the job id).
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = launched_world_size()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dist_url == "env://":
            os.environ.update(slurm_rendezvous(os.environ))
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        kwargs = {}
        if torch_device.type == "cuda":
            kwargs["device_id"] = torch_device
        dist.init_process_group(
            backend=backend,
            init_method=dist_url,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup_distributed() -> None:
    """Destroy the process group (if any) so the job exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op in a single process). Returns ``tensor``."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(get_world_size())
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process). Returns ``tensor``."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and keeps this rank's slice.

    Written here because ``torch.distributed.nn.functional.all_gather`` is deprecated.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (N, ...) from all ranks along dim 0 -> (N * world, ...).

    Gradients flow back through the gather: the backward pass sums the incoming gradients over
    ranks and returns each rank its own slice. Requires the same N on every rank.
    """
    if get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (N, ...) from all ranks along dim 0, without autograd."""
    if get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate (N_r, C) tensors of different N_r from all ranks in rank order -> (sum N_r, C).

    Collectives need equal shapes, so the lengths are gathered first, every shard is padded to the
    longest, and the padding is cut off again after the gather.
    """
    if get_world_size() == 1:
        return tensor
    lengths = gather_no_grad(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = gather_no_grad(padded).split(max(lengths))
    return torch.cat([part[:length] for part, length in zip(parts, lengths)])


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed ``random``, numpy and torch with ``seed + rank`` so every rank differs but repeats."""
    effective = seed + rank
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)
    return effective


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean_tensors_(tensors: Sequence[torch.Tensor]) -> None:
    """Average every tensor over ranks in place with ONE flat all_reduce (no-op alone)."""
    if get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    all_reduce_mean_(flat)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def all_reduce_gradients_(params: list[torch.Tensor]) -> None:
    """Average ``.grad`` of ``params`` over ranks (no-op alone).

    Parameters without a gradient count as zero gradients, so every rank takes the same step.
    """
    if get_world_size() == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    all_reduce_mean_tensors_([param.grad for param in params])


def all_reduce_buffers_(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks in place."""
    if get_world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            all_reduce_mean_(buffer.data)


@torch.no_grad()
def fingerprint(module: torch.nn.Module, include_buffers: bool = False) -> float:
    """A float64 fingerprint of ``module``'s parameters (and buffers): sum_i (i+1) * sum_j w_ij * s_j
    with position weights s in [1, 2], so equal tensors give equal values and a changed, swapped or
    permuted entry almost surely does not. Local: no communication."""
    tensors = list(module.parameters()) + (list(module.buffers()) if include_buffers else [])
    total = torch.zeros((), dtype=torch.float64)
    for index, tensor in enumerate(tensors):
        values = tensor.detach().double().flatten().cpu()
        total += (values * torch.linspace(1, 2, values.numel(), dtype=torch.float64)).sum() * (index + 1)
    return float(total)


def parameter_fingerprints(module: torch.nn.Module) -> list[float]:
    """Every rank's :func:`fingerprint` of ``module``'s parameters, in rank order (a collective)."""
    return [float(value) for value in gather_objects(fingerprint(module))]


def check_ranks_identical(modules: dict[str, torch.nn.Module], where: str, include_buffers: bool = True) -> dict[str, list[float]]:
    """Verify that every rank holds the same ``modules`` (a collective; cheap: one float each).

    Returns the fingerprints by module name and rank; raises ``RuntimeError`` on every rank, naming
    the modules that differ, if they do not agree. Alone it checks nothing and returns one value each.
    """
    local = {name: fingerprint(module, include_buffers) for name, module in modules.items()}
    everyone = gather_objects(local)
    by_name = {name: [ranks[name] for ranks in everyone] for name in modules}
    differing = {name: values for name, values in by_name.items() if len(set(values)) > 1}
    if differing:
        raise RuntimeError(
            f"ranks hold different models {where}: "
            + "; ".join(f"{name} (fingerprints by rank {values})" for name, values in differing.items())
            + ". Every rank must start from and apply identical updates; please report this."
        )
    return by_name


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers into every rank's ``module`` in place (no-op alone)."""
    if get_world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)
