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


@pytest.fixture(autouse=True)
def restore_stop_signal_handlers():
    """Entry scripts called in-process install the stop-signal handler (source.run.signals) in the
    pytest process; put the previous handlers back after each test, so Ctrl-C still stops pytest."""
    import signal

    from source.run.signals import STOP_SIGNALS

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in previous.items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)
