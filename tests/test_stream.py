"""BatchStream: endless passes, disjoint rank shards, exact resume from (pass, batch)."""
import pytest
import torch
from torch.utils.data import TensorDataset

from source.data.stream import BatchStream


def dataset(n=10):
    return TensorDataset(torch.arange(n))


def take(stream, count):
    return [next(stream)[0].tolist() for _ in range(count)]


def test_stream_cycles_past_the_end_without_rounding_step_counts():
    stream = BatchStream(dataset(10), 3, seed=1)
    assert stream.batches_per_pass == 3  # the tail item of each pass is dropped, never a step
    batches = take(stream, 7)  # more steps than one pass holds
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    first_pass = sorted(sum(batches[:3], []))
    assert len(set(first_pass)) == 9
    assert batches[:3] != batches[3:6]  # each pass reshuffles
    assert stream.state_dict() == {"pass_index": 2, "batch_index": 1}


def test_rank_shards_are_disjoint_and_cover_the_pass():
    streams = [BatchStream(dataset(12), 2, rank=r, world_size=2, seed=5) for r in range(2)]
    seen = [sum(take(s, 3), []) for s in streams]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_resumed_stream_reads_the_same_batches():
    straight = BatchStream(dataset(11), 2, seed=3)
    expected = take(straight, 9)
    first = BatchStream(dataset(11), 2, seed=3)
    take(first, 4)
    resumed = BatchStream(dataset(11), 2, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, 5) == expected[4:]


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchStream(dataset(3), 2, world_size=2)


class RandomViews(torch.utils.data.Dataset):
    """Item i is (i, a torch draw): what a random augmentation of image i looks like to the loader."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        return index, torch.rand(3)


def take_pairs(stream, count):
    return [next(stream) for _ in range(count)]


def same_batches(first, second):
    return len(first) == len(second) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))


def test_augmentations_repeat_with_any_worker_count_and_after_resume():
    # 4 batches per pass; 11 batches cross two pass boundaries.
    straight = take_pairs(BatchStream(RandomViews(), 6, seed=2, num_workers=0), 11)
    with_workers = take_pairs(BatchStream(RandomViews(), 6, seed=2, num_workers=2), 11)
    assert same_batches(straight, with_workers)
    first = BatchStream(RandomViews(), 6, seed=2, num_workers=2)
    take_pairs(first, 5)
    resumed = BatchStream(RandomViews(), 6, seed=2, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    assert same_batches(take_pairs(resumed, 6), straight[5:])
    # Every sample of a pass drew different numbers, and the next pass draws new ones.
    draws = torch.cat([batch[1] for batch in straight[:8]])
    assert len({tuple(row.tolist()) for row in draws}) == 48


def test_a_position_saved_at_the_end_of_a_pass_resumes_at_the_next_pass():
    straight = BatchStream(dataset(12), 3, seed=4)
    expected = take(straight, 6)
    resumed = BatchStream(dataset(12), 3, seed=4)
    resumed.load_state_dict({"pass_index": 0, "batch_index": 4})  # the old lazy-wrap format
    assert take(resumed, 2) == expected[4:]
