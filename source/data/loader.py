"""DataLoader construction: per-sample augmentation seeds, worker settings, background prefetching.

Repeatability without giving up speed. Every sample's augmentation is drawn from torch's CPU
generator reseeded with ``sample_seed(seed, epoch, index)`` just before the sample is loaded, so
the views of image ``index`` in epoch (or stream pass) ``epoch`` are a pure function of those
three integers. They do not depend on which worker process loads the sample, how far ahead the
workers prefetch, ``--num-workers``, or where a run was resumed: a run is repeatable from
``--seed`` with any number of workers, and a resumed run reads exactly the views an
uninterrupted one would. Different images, and the same image in different epochs, get
different seeds, so every worker and every rank draws different augmentations. (The seed does
not include the rank: the same image in the same epoch gets the same views whatever the world
size.) Only torch's generator is reseeded; the project's transforms draw from nothing else.

Worker processes (``--num-workers N > 0``) persist across epochs (no re-fork and re-import per
epoch), keep ``prefetch_factor`` batches each in flight and run with one torch thread (PyTorch
sets that for workers), so they do not oversubscribe the cores the model needs. Batches go to
pinned memory when training on CUDA, so the host-to-device copies can be asynchronous.

With ``--num-workers 0`` the main process augments, and a background thread
(:class:`ThreadPrefetcher`) prepares the next batches while the model computes: PIL and numpy
release the GIL in their kernels, so augmentation overlaps the model step instead of adding to
it.

When the model itself runs on the CPU, the loading threads and processes compete with its
intra-op threads, which wait for each other at the end of every parallel operator: one of them
pre-empted by a loader stalls all of them (why ``--num-workers 2`` used to be slower than 0 on a
2-core machine). So the prefetch thread, and worker processes of a CPU run, lower their
scheduling priority by ``BACKGROUND_NICE``: they take the cores whenever the model leaves them
idle (between operators, in its single-threaded parts) and all of them when the training loop
waits for data, but they do not pre-empt the model. (Linux; elsewhere the priority is unchanged.)

The prefetch threads reseed torch's global CPU generator per sample (one at a time, under a lock
shared by all streams of the process), so while they run the training loop must neither draw
from that generator nor set its state (``torch.manual_seed``,
``set_rng_state``, ``torch.random.fork_rng``): the project's models and losses draw nothing (no
dropout), and reading the state for a checkpoint is harmless (augmentations do not depend on it).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK64 = (1 << 64) - 1
# Nice value added to the prefetch thread and, on CPU runs, to the worker processes (0 = off).
BACKGROUND_NICE = 10
# Upper bound of the automatic worker count per GPU process: enough for the paper's setting (see
# docs/data-loading.md); more processes mostly add memory and start-up time.
AUTO_MAX_WORKERS = 16


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele et al., 2014): a bijective 64-bit mix whose nearby inputs
    give unrelated outputs, so seeds (s, e, i) and (s, e, i + 1) start unrelated generators."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in epoch (or stream pass) ``epoch``."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ index)


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed(seed, epoch, index))`` for every index of ``sampler``.

    ``set_epoch`` is forwarded to the wrapped sampler (e.g. ``DistributedSampler``). The pairs are
    made in the main process when a loader iterates, so persistent workers see the current epoch.
    """

    def __init__(self, sampler: Iterable[int], seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.sampler:
            yield index, sample_seed(self.seed, epoch, index)

    def __len__(self) -> int:
        return len(self.sampler)


# The "index" whose sample_seed orders an epoch: beyond any dataset's indices, so the shuffle's
# generator is unrelated to every sample's.
SHUFFLE_INDEX = 1 << 63


class SeededEpochs(Sampler):
    """Yields ``(index, sample_seed(seed, epoch, index))`` over a shuffled ``range(num_items)``, and
    counts the epochs itself: each pass over it is the next epoch (``set_epoch`` moves the count).

    Epoch ``e``'s order is ``torch.randperm`` seeded by ``sample_seed(seed, e, SHUFFLE_INDEX)``, so
    the order and every sample's augmentation are pure functions of ``(seed, e)``: a training run
    that iterates its loader once per epoch (``fine_tune``) repeats with any ``--num-workers``, and a
    run restarted at epoch e gives the same batches after ``set_epoch(e)``. The count advances when
    a pass starts (``__iter__`` is a generator: a DataLoader making an iterator it never reads
    counts nothing).
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True) -> None:
        self.num_items, self.seed, self.shuffle, self.epoch = num_items, seed, shuffle, 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass is epoch ``epoch``, starting after its first ``skip`` items (a resumed run)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = self.epoch + 1, 0
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, SHUFFLE_INDEX))
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        for index in order[skip:]:
            yield index, sample_seed(self.seed, epoch, index)

    def __len__(self) -> int:
        return self.num_items


# Serialises reseed-and-augment across the prefetch threads of one process: bissl.py runs two
# streams (lower, upper; three with --curvature-every) whose threads would otherwise reseed the
# one global generator between each other's draws and make views depend on thread timing.
_AUGMENT_LOCK = threading.Lock()


def _renew_augment_lock() -> None:
    """In a forked child (a DataLoader worker), replace the lock: a prefetch thread of the parent
    may have held it at the moment of the fork, and that thread does not exist in the child, so the
    inherited copy would stay locked forever and the worker would hang in its first item."""
    global _AUGMENT_LOCK
    _AUGMENT_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_renew_augment_lock)


class SeededDataset(Dataset):
    """``dataset`` indexed by ``(index, seed)``: reseeds torch's CPU generator with ``seed``, then
    returns ``dataset[index]`` (whose transform then draws from that seed). Both happen under a
    process-wide lock, so loading threads of several streams cannot interleave their draws."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _AUGMENT_LOCK:
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


@contextlib.contextmanager
def seeded_global_draws(seed: int) -> Iterator[None]:
    """Run a block that draws from torch's global generators (torchvision's detectors sample
    anchors and proposals with ``torch.randperm``) from ``seed``, holding the prefetch threads'
    lock meanwhile: no thread reseeds or draws in between, so the block's draws are a function of
    ``seed`` alone and the threads' augmentations stay those of their sample seeds."""
    with _AUGMENT_LOCK:
        torch.manual_seed(seed)
        yield


class _End:
    """Queue marker: the source iterator is exhausted."""


def lower_priority(nice: int = BACKGROUND_NICE, thread_only: bool = False) -> None:
    """Add ``nice`` to the niceness of this process, or (``thread_only``) of the calling thread
    only: Linux keeps a nice value per thread. Failures are ignored: priority is an optimisation."""
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        if thread_only:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        else:
            os.nice(nice)
    except OSError:
        pass


def _lower_worker_priority(worker_id: int) -> None:
    lower_priority()


def _put(items: queue.Queue, stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _fill(iterator: Iterator, items: queue.Queue, stop: threading.Event) -> None:
    """Thread body. It holds no reference to the ThreadPrefetcher, so dropping that stops it."""
    lower_priority(thread_only=True)
    try:
        for item in iterator:
            if not _put(items, stop, item):
                return
        _put(items, stop, _End())
    except BaseException as error:  # handed to the consumer, raised there
        _put(items, stop, error)


# Every prefetch thread that may still run, with its stop flag. At interpreter exit all are stopped
# and joined, also those whose prefetcher was dropped without close() (a stream going out of scope
# when main() returns): a daemon thread still inside a torch operator while the interpreter tears
# down aborts the process ("terminate called without an active exception") after the run has
# finished and saved.
_PREFETCH_THREADS: dict[threading.Thread, threading.Event] = {}
_PREFETCH_THREADS_LOCK = threading.Lock()
# How long stopping waits for a thread to finish the item it is loading.
JOIN_TIMEOUT_S = 120.0


def _register_thread(thread: threading.Thread, stop: threading.Event) -> None:
    with _PREFETCH_THREADS_LOCK:
        for finished in [t for t in _PREFETCH_THREADS if not t.is_alive()]:
            del _PREFETCH_THREADS[finished]
        _PREFETCH_THREADS[thread] = stop


@atexit.register
def _stop_prefetch_threads() -> None:
    with _PREFETCH_THREADS_LOCK:
        threads = list(_PREFETCH_THREADS.items())
    for _, stop in threads:
        stop.set()
    for thread, _ in threads:
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)


class ThreadPrefetcher:
    """Iterate ``iterable`` in a background thread, keeping up to ``depth`` items ready.

    Items arrive in order; an exception in the thread is re-raised in the consumer at the item
    where it happened. ``close()`` stops the thread after at most the item it is loading and
    waits for it; dropping the prefetcher stops it without waiting, and interpreter exit closes
    every live one. Used when the main process loads the data (``--num-workers 0``).
    """

    def __init__(self, iterable: Iterable, depth: int = 2) -> None:
        self._stop = threading.Event()
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._done = False
        self._thread = threading.Thread(target=_fill, args=(iter(iterable), self._queue, self._stop),
                                        name="prefetch", daemon=True)
        self._thread.start()
        _register_thread(self._thread, self._stop)

    def __iter__(self) -> ThreadPrefetcher:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)

    def __del__(self) -> None:
        self._stop.set()


class PrefetchedLoader:
    """A DataLoader whose iterations run in a :class:`ThreadPrefetcher` (``len`` is the loader's)."""

    def __init__(self, loader: DataLoader, depth: int) -> None:
        self.loader, self.depth = loader, depth

    def __iter__(self) -> ThreadPrefetcher:
        return ThreadPrefetcher(self.loader, self.depth)

    def __len__(self) -> int:
        return len(self.loader)


def seeded_dataloader(
    dataset: Dataset, batch_size: int, sampler: Iterable[tuple[int, int]], *, generator_seed: int, num_workers: int,
    pin_memory: bool, prefetch_factor: int, nice_workers: bool = False, drop_last: bool = True,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """The DataLoader behind every training loader: ``sampler`` yields ``(index, sample seed)``
    pairs, :class:`SeededDataset` augments each sample from its seed. ``num_workers > 0``:
    persistent worker processes with ``prefetch_factor`` batches each in flight (wrap a
    ``num_workers == 0`` loader in a :class:`ThreadPrefetcher` to load ahead in a thread). The
    worker base seed (what ``random``/numpy see in workers) comes from a private generator seeded
    with ``generator_seed``, so building or iterating the loader never draws from the global RNG.
    ``nice_workers`` (for runs whose model trains on the CPU) lowers the workers' priority;
    ``collate_fn`` replaces the default stacking (detection batches are lists)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 here, got {num_workers}")
    if prefetch_factor < 1:
        raise ValueError(f"--prefetch-factor must be >= 1, got {prefetch_factor}")
    workers = num_workers > 0
    return DataLoader(
        SeededDataset(dataset), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        generator=torch.Generator().manual_seed(generator_seed), worker_init_fn=worker_init_fn(nice_workers),
        collate_fn=collate_fn,
    )


def build_loader(
    dataset: Dataset, batch_size: int, sampler: Iterable, *, seed: int, num_workers: int,
    pin_memory: bool, prefetch_factor: int, drop_last: bool = True, nice_workers: bool = False,
) -> DataLoader | PrefetchedLoader:
    """A training loader over ``sampler``'s indices with per-sample augmentation seeds
    (:func:`seeded_dataloader`; with ``num_workers == 0`` each iteration loads
    ``prefetch_factor`` batches ahead in a background thread).

    ``sampler`` is wrapped in :class:`SeededSampler` (reach it as ``loader.sampler`` /
    ``loader.loader.sampler`` to call ``set_epoch``; :func:`loader_sampler` does that).
    """
    loader = seeded_dataloader(dataset, batch_size, SeededSampler(sampler, seed), generator_seed=seed,
                               num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                               nice_workers=nice_workers, drop_last=drop_last)
    return loader if num_workers > 0 else PrefetchedLoader(loader, prefetch_factor)


def epoch_loader(
    dataset: Dataset, batch_size: int, *, seed: int, num_workers: int, pin_memory: bool, prefetch_factor: int,
    drop_last: bool = True, nice_workers: bool = False,
) -> DataLoader | PrefetchedLoader:
    """A shuffled training loader whose passes are successive epochs (:class:`SeededEpochs`):
    order and augmentations are functions of ``(seed, epoch, index)`` alone (fine-tuning trials).
    With ``num_workers == 0`` each pass loads ``prefetch_factor`` batches ahead in a background thread."""
    loader = seeded_dataloader(dataset, batch_size, SeededEpochs(len(dataset), seed), generator_seed=seed,
                               num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                               nice_workers=nice_workers, drop_last=drop_last)
    return loader if num_workers > 0 else PrefetchedLoader(loader, prefetch_factor)


def worker_init_fn(nice_workers: bool):
    """The DataLoader ``worker_init_fn``: lower the worker's priority when ``nice_workers``. (Seeds
    need nothing here: PyTorch seeds random/numpy/torch per worker from the loader's generator,
    and the augmentations are reseeded per sample anyway.)"""
    return _lower_worker_priority if nice_workers else None


def loader_sampler(loader: DataLoader | PrefetchedLoader) -> SeededSampler:
    """The :class:`SeededSampler` of a loader made by :func:`build_loader`."""
    inner = loader.loader if isinstance(loader, PrefetchedLoader) else loader
    assert isinstance(inner.sampler, SeededSampler)
    return inner.sampler


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int, device: torch.device, local_world_size: int) -> int:
    """``--num-workers``; -1 = auto: 0 on CPU (the model step uses every core and the prefetch
    thread overlaps augmentation with it), on CUDA the cores per local process minus one for the
    training process itself, at most ``AUTO_MAX_WORKERS``."""
    if num_workers >= 0:
        return num_workers
    if num_workers != -1:
        raise ValueError(f"--num-workers must be >= 0 or -1 (auto), got {num_workers}")
    if device.type != "cuda":
        return 0
    return max(1, min(AUTO_MAX_WORKERS, available_cpus() // max(1, local_world_size) - 1))

