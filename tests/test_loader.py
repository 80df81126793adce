"""Training loaders: per-sample seeds, the same batches with 0 or 2 workers, the prefetch thread."""
import os
import sys
import threading

import pytest
import torch
from torch.utils.data import Dataset

from source.data.loader import (
    BACKGROUND_NICE,
    ThreadPrefetcher,
    build_loader,
    loader_sampler,
    resolve_num_workers,
    sample_seed,
)


class RandomViews(Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        return index, torch.rand(2)


def epoch_batches(loader, epoch):
    loader_sampler(loader).set_epoch(epoch)
    return [(indices.clone(), draws.clone()) for indices, draws in loader]


def test_sample_seeds_differ_for_neighbours_and_repeat():
    seeds = {sample_seed(0, epoch, index) for epoch in range(3) for index in range(1000)}
    assert len(seeds) == 3000
    assert sample_seed(7, 2, 5) == sample_seed(7, 2, 5) != sample_seed(8, 2, 5)


def test_loader_batches_do_not_depend_on_workers_and_change_per_epoch():
    sampler = list(range(20))[::-1]
    results = []
    for workers in (0, 2):
        loader = build_loader(RandomViews(), 4, sampler, seed=3, num_workers=workers, pin_memory=False, prefetch_factor=2)
        results.append([epoch_batches(loader, epoch) for epoch in (0, 1, 0)])
    for zero, two in zip(*results):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(zero, two))
    no_workers = results[0]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(no_workers[0], no_workers[2]))  # epoch 0 again: same draws
    assert not torch.equal(no_workers[0][0][1], no_workers[1][0][1])  # epoch 1: new draws for the same images


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_do_not_depend_on_the_global_rng(workers):
    """The draws are functions of (seed, epoch, index): whatever the global generator holds when
    the loader is built and iterated, the batches are the same."""
    batches = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        loader = build_loader(RandomViews(), 4, range(20), seed=3, num_workers=workers, pin_memory=False, prefetch_factor=2)
        batches.append(epoch_batches(loader, 0))
    assert len(batches[0]) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*batches))


def test_building_and_iterating_a_worker_loader_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    loader = build_loader(RandomViews(), 5, range(20), seed=0, num_workers=2, pin_memory=False, prefetch_factor=2)
    epoch_batches(loader, 0)
    assert torch.equal(torch.get_rng_state(), before)


def test_prefetcher_keeps_order_raises_errors_in_place_and_stops():
    assert list(ThreadPrefetcher(range(50), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise KeyError("bad sample")

    prefetcher = ThreadPrefetcher(failing(), depth=2)
    assert next(prefetcher) == 1
    with pytest.raises(KeyError, match="bad sample"):
        next(prefetcher)
    endless = ThreadPrefetcher(iter(int, 1), depth=2)  # never ends by itself
    next(endless)
    endless.close()
    endless._thread.join(timeout=5)
    assert not endless._thread.is_alive()
    with pytest.raises(ValueError):
        ThreadPrefetcher(range(3), depth=0)


def test_auto_worker_count():
    assert resolve_num_workers(3, torch.device("cpu"), 1) == 3
    assert resolve_num_workers(-1, torch.device("cpu"), 1) == 0
    assert 1 <= resolve_num_workers(-1, torch.device("cuda"), 64) <= 16
    with pytest.raises(ValueError):
        resolve_num_workers(-2, torch.device("cpu"), 1)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_prefetch_thread_yields_the_cores_to_the_training_thread():
    def niceness():
        yield os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert list(ThreadPrefetcher(niceness())) == [min(19, main + BACKGROUND_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main  # the training thread keeps its own


EXIT_WITH_A_BUSY_PREFETCHER = """
import torch
from source.data.loader import ThreadPrefetcher

def batches():
    while True:  # endless torch work, as a BatchStream's loader
        yield torch.randn(64, 3, 32, 32).mul(2).sum()

prefetcher = ThreadPrefetcher(batches(), depth=2)
next(prefetcher)
dropped = ThreadPrefetcher(batches(), depth=2)
next(dropped)
del dropped  # as a stream going out of scope when main() returns: stopped, not joined
print("done")  # exits without closing: the interpreter's exit must stop and join both threads
"""


@pytest.mark.multiprocess
@pytest.mark.long
def test_interpreter_exit_with_a_running_prefetch_thread_is_clean():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", EXIT_WITH_A_BUSY_PREFETCHER], cwd=root,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "done"


def test_two_prefetching_streams_in_one_process_draw_the_same_views_as_one_alone():
    """bissl.py's lower and upper streams load in two threads of one process: their per-sample
    reseeds must not interleave (each stream's views equal those it gives when alone)."""
    from source.data.stream import BatchStream

    class Noisy(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, index: int) -> torch.Tensor:
            draws = [torch.rand(1) for _ in range(200)]  # many draws: a reseed between them shows
            return torch.cat(draws)

    def read(stream: BatchStream, count: int) -> list[torch.Tensor]:
        return [next(stream) for _ in range(count)]

    single = BatchStream(Noisy(), 4, seed=3, prefetch_factor=4)
    alone = read(single, 12)
    first, second = BatchStream(Noisy(), 4, seed=3, prefetch_factor=4), BatchStream(Noisy(), 4, seed=9, prefetch_factor=4)
    together = []
    for _ in range(12):  # both threads fill their queues at the same time
        together.append(next(first))
        next(second)
    for stream in (single, first, second):
        stream.close()
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_evaluating_in_the_main_thread_leaves_a_prefetching_streams_views_alone():
    """bissl.py evaluates after every alternation while its streams' threads load ahead: the
    evaluation loader must not draw from the global generator they reseed per sample (a default
    DataLoader draws its base seed there and changed the views: BiSSL runs did not repeat)."""
    from source.data.stream import BatchStream
    from source.stages.evaluation import sharded_eval_loader

    class Noisy(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.cat([torch.rand(1) for _ in range(200)])

    def read(evaluate: bool) -> list[torch.Tensor]:
        stream, batches = BatchStream(Noisy(), 4, seed=3, prefetch_factor=4), []
        for _ in range(12):
            batches.append(next(stream))
            if evaluate:
                for _ in sharded_eval_loader(list(range(8)), 4):
                    pass
        stream.close()
        return batches

    assert all(torch.equal(a, b) for a, b in zip(read(False), read(True)))


def test_worker_forked_while_a_thread_holds_the_augment_lock_does_not_hang():
    """A DataLoader worker forked while one of the parent's prefetch threads holds the augment lock
    must get a free lock of its own (the holder thread does not exist in the child)."""
    from torch.utils.data import DataLoader

    from source.data import loader as loading

    class Draws(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(2)

    held, release = threading.Event(), threading.Event()

    def hold_lock():
        with loading._AUGMENT_LOCK:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        keys = [(index, 100 + index) for index in range(4)]
        batches = DataLoader(loading.SeededDataset(Draws()), batch_size=2, sampler=keys, num_workers=1,
                             multiprocessing_context="fork", timeout=20)
        values = torch.cat(list(batches))
    finally:
        release.set()
        holder.join()
    torch.manual_seed(100)
    assert torch.equal(values[0], torch.rand(2))
