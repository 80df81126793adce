"""Endless, resumable, rank-sharded streams of batches.

The BiSSL alternations draw a fixed number of batches per level regardless of epoch
boundaries, so each level reads from a stream that cycles over its dataset for as long as
needed (no silent rounding of step counts). A stream's position is two integers (pass, batch),
saved in checkpoints, so a resumed run reads exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class BatchStream:
    """Batches of ``batch_size`` (per rank) from ``dataset``, pass after pass.

    Pass k shuffles all indices with ``seed + k`` (the same permutation on every rank), drops the
    tail that does not fill a batch on every rank, and gives rank r every world_size-th index,
    like ``DistributedSampler(drop_last=True)``. Data-loader worker seeds come from a private
    generator, so creating a loader mid-pass does not disturb the global RNG that the (main
    process) augmentations use: with ``num_workers=0`` a resumed stream is bit-identical.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
        num_workers: int = 0, pin_memory: bool = False,
    ) -> None:
        per_pass = len(dataset) // (batch_size * world_size)
        if per_pass == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.batches_per_pass = per_pass
        self.pass_index, self.batch_index = 0, 0
        self._iterator: Iterator | None = None

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.pass_index)
        order = torch.randperm(len(self.dataset), generator=generator)
        order = order[: self.batches_per_pass * self.batch_size * self.world_size]
        mine = order[self.rank :: self.world_size]
        return mine[self.batch_index * self.batch_size :].tolist()

    def _open(self) -> Iterator:
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self._indices(), drop_last=True,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.pass_index),
        )
        return iter(loader)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Any:
        if self.batch_index >= self.batches_per_pass:
            self.pass_index, self.batch_index, self._iterator = self.pass_index + 1, 0, None
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator)
        self.batch_index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_index, self.batch_index = int(state["pass_index"]), int(state["batch_index"])
        self._iterator = None
