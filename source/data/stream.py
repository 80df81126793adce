"""Endless, resumable, rank-sharded streams of batches.

The BiSSL alternations draw a fixed number of batches per level regardless of epoch
boundaries, so each level reads from a stream that cycles over its dataset for as long as
needed (no silent rounding of step counts). A stream's position is two integers (pass, batch),
saved in checkpoints, so a resumed run reads exactly the batches an uninterrupted one would,
with the same augmentations (per-sample seeds, see ``source.data.loader``), whatever
``num_workers``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from source.data.loader import ThreadPrefetcher, sample_seed, seeded_dataloader


def pass_indices(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, pass_index: int) -> list[int]:
    """Rank ``rank``'s dataset indices of pass ``pass_index``, in order: a permutation seeded with
    ``seed + pass_index``, cut to whole global batches, every ``world_size``-th index from ``rank``."""
    generator = torch.Generator().manual_seed(seed + pass_index)
    order = torch.randperm(num_samples, generator=generator)
    order = order[: num_samples // (batch_size * world_size) * batch_size * world_size]
    return order[rank::world_size].tolist()


class _StreamIndices:
    """A stream's ``(index, sample seed)`` pairs from a (pass, batch) position on, forever. (It
    copies the stream's settings instead of pointing back at it: no reference cycle keeps a
    dropped stream's worker processes alive.)"""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 pass_index: int, batch_index: int) -> None:
        self.settings = (num_samples, batch_size, rank, world_size, seed)
        self.pass_index, self.batch_index = pass_index, batch_index

    def __iter__(self) -> Iterator[tuple[int, int]]:
        batch_size, seed = self.settings[1], self.settings[4]
        pass_index, batch_index = self.pass_index, self.batch_index
        while True:
            for index in pass_indices(*self.settings, pass_index)[batch_index * batch_size :]:
                yield index, sample_seed(seed, pass_index, index)
            pass_index, batch_index = pass_index + 1, 0


class BatchStream:
    """Batches of ``batch_size`` (per rank) from ``dataset``, pass after pass.

    Pass k shuffles all indices with ``seed + k`` (the same permutation on every rank), drops the
    tail that does not fill a batch on every rank, and gives rank r every world_size-th index,
    like ``DistributedSampler(drop_last=True)``. Sample i of pass k is augmented from the seed
    ``sample_seed(seed, k, i)``. One DataLoader serves the whole stream: ``num_workers > 0``
    persistent worker processes keep ``prefetch_factor`` batches each in flight;
    ``num_workers == 0`` loads in a background thread ``prefetch_factor`` batches ahead;
    ``nice_workers`` lowers the worker processes' priority (for CPU runs, see ``source.data.loader``);
    ``collate_fn`` replaces the default stacking (e.g. ``detection_collate``).
    ``wait_s`` accumulates the time ``next()`` waited for data (the input-pipeline stall) and
    ``samples_read`` the samples it returned (this rank), for throughput reports.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
        num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2, nice_workers: bool = False,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        per_pass = len(dataset) // (batch_size * world_size)
        if per_pass == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch_factor >= 1, got {num_workers}, {prefetch_factor}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.prefetch_factor, self.nice_workers, self.collate_fn = prefetch_factor, nice_workers, collate_fn
        self.batches_per_pass = per_pass
        self.pass_index, self.batch_index = 0, 0
        self.wait_s, self.samples_read = 0.0, 0
        self._iterator: Iterator | None = None

    def _open(self) -> Iterator:
        loader = seeded_dataloader(
            self.dataset, self.batch_size,
            _StreamIndices(len(self.dataset), self.batch_size, self.rank, self.world_size, self.seed,
                           self.pass_index, self.batch_index),
            generator_seed=self.seed * 1_000_003 + self.pass_index, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor, nice_workers=self.nice_workers,
            collate_fn=self.collate_fn,
        )
        return iter(loader) if self.num_workers > 0 else ThreadPrefetcher(loader, self.prefetch_factor)

    def close(self) -> None:
        """Stop loading ahead: join the prefetch thread, or let the worker processes shut down.
        The position is kept; the next ``next()`` reopens the loader there."""
        if isinstance(self._iterator, ThreadPrefetcher):
            self._iterator.close()
        self._iterator = None  # worker processes shut down with their iterator

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._open()
        start = time.perf_counter()
        batch = next(self._iterator)
        self.wait_s += time.perf_counter() - start
        self.samples_read += self.batch_size
        self.batch_index += 1
        if self.batch_index == self.batches_per_pass:
            self.pass_index, self.batch_index = self.pass_index + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.pass_index, self.batch_index = int(state["pass_index"]), int(state["batch_index"])
        if self.batch_index >= self.batches_per_pass:  # a position saved at the end of a pass
            self.pass_index, self.batch_index = self.pass_index + 1, 0
