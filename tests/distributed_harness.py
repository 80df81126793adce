"""Run a function in N real gloo processes (CPU) and collect what each returns.

Usage in a test::

    results = run_in_processes(my_fn, world_size=2, args=(x,))

``my_fn(rank, world_size, *args)`` must be a module-level function (it is pickled); the
process group is initialised before it runs and destroyed after. Exceptions in any rank fail
the test with that rank's traceback.
"""
from __future__ import annotations

import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        # Plain pickle: tensors travel by value, not as shared memory that dies with the worker.
        queue.put((rank, "ok", pickle.dumps(result)))
    except Exception:  # reported to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_in_processes(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world_size):
        rank, status, payload = queue.get(timeout=timeout)
        if status == "error":
            errors.append(f"rank {rank}:\n{payload}")
        results[rank] = pickle.loads(payload) if status == "ok" else payload
    for proc in procs:
        proc.join(timeout=60)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]
