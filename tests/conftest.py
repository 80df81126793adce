"""Fixtures and marker handling shared by the test files.

Markers (registered in pyproject.toml): ``slow`` (over ~5 s), ``multiprocess`` (starts processes:
the 2-process gloo harness, entry scripts under python or torchrun), ``gpu`` (needs CUDA; skipped
here without it). ``make test-fast`` deselects all three; ``make test`` runs everything.
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    needs_cuda = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_cuda)


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch intra-op thread (small float64 solves are faster and their
    rounding is the same on every machine), then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
