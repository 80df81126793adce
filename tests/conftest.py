"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch intra-op thread (small float64 solves are faster and their
    rounding is the same on every machine), then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
