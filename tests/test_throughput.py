"""Throughput reporting (images/s, data-wait share) and the --channels-last layout choice."""
import time

import pytest
import torch

from source.stages.engine import Throughput, memory_format


def test_throughput_counts_images_and_waiting_time():
    meter = Throughput()
    time.sleep(0.05)
    meter.add(10, wait_s=0.025)
    first = meter.interval("train/")
    assert set(first) == {"train/images_per_s", "train/data_wait_frac"}
    assert 10 / 0.5 < first["train/images_per_s"] <= 10 / 0.05  # 10 images in >= 50 ms (slack for a busy machine)
    assert 0.025 / 0.5 < first["train/data_wait_frac"] <= 0.5
    time.sleep(0.05)
    meter.add(30, wait_s=0.0)
    second = meter.interval()
    assert second["data_wait_frac"] == 0.0  # the interval restarted
    assert meter.overall()["images_per_s"] <= 40 / 0.1


def test_channels_last_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format("auto", cpu) == torch.contiguous_format
    assert memory_format("auto", cuda) == torch.channels_last
    assert memory_format("1", cpu) == torch.channels_last and memory_format("0", cuda) == torch.contiguous_format
    with pytest.raises(ValueError, match="channels-last"):
        memory_format("yes", cpu)
