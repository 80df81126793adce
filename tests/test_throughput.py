"""Throughput reporting (images/s, data-wait share) and the --channels-last layout choice.

The meter reads ``time.perf_counter``; the tests drive it with a fake clock, so they check its
arithmetic exactly and do not depend on how busy the machine is (bench/bench_throughput_meter.py
compares it with real time)."""
from types import SimpleNamespace

import pytest
import torch

from source.stages import engine
from source.stages.engine import Throughput, memory_format


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=fake))  # engine's clock only
    return fake


def test_throughput_counts_images_and_waiting_time(clock):
    meter = Throughput()
    clock.now += 0.5
    meter.add(10, wait_s=0.125)
    first = meter.interval("train/")
    assert first == {"train/images_per_s": pytest.approx(20.0), "train/data_wait_frac": pytest.approx(0.25)}

    clock.now += 2.0
    meter.add(30, wait_s=0.0)
    meter.add(10, wait_s=0.5)
    second = meter.interval()
    # The interval restarted: only the last 2 s and its 40 images count.
    assert second == {"images_per_s": pytest.approx(20.0), "data_wait_frac": pytest.approx(0.25)}
    assert meter.overall() == {"images_per_s": pytest.approx(50 / 2.5), "data_wait_frac": pytest.approx(0.625 / 2.5)}

    clock.now += 1.0
    assert meter.interval() == {"images_per_s": 0.0, "data_wait_frac": 0.0}  # nothing since the last report
    assert meter.overall()["images_per_s"] == pytest.approx(50 / 3.5)


def test_wait_share_is_capped_and_a_zero_interval_does_not_divide_by_zero(clock):
    meter = Throughput()
    clock.now += 1.0
    meter.add(4, wait_s=3.0)  # waits measured around the clock's reads can exceed the interval
    assert meter.interval()["data_wait_frac"] == 1.0
    meter.add(4, wait_s=0.0)
    assert meter.interval()["images_per_s"] == pytest.approx(4 / 1e-9)  # no time passed: the floor, not a crash


def test_channels_last_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format("auto", cpu) == torch.contiguous_format
    assert memory_format("auto", cuda) == torch.channels_last
    assert memory_format("1", cpu) == torch.channels_last and memory_format("0", cuda) == torch.contiguous_format
    with pytest.raises(ValueError, match="channels-last"):
        memory_format("yes", cpu)
