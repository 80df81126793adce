"""Every benchmark in bench/ runs with --quick and writes its JSON with a finite headline ratio.

The figures of a --quick run mean nothing (tiny sizes); this only keeps the scripts working as
the code under them changes. ``make bench`` runs them at full size."""
import json
import math
import subprocess
import sys

import pytest

from tests.script_helpers import ROOT, script_env

BENCHMARKS = sorted(path.name for path in (ROOT / "bench").glob("bench_*.py"))
NEEDS = {"bench_augment.py": "lightly"}  # its reference pipeline, from requirements-dev.txt


def test_every_benchmark_is_found():
    assert {"bench_augment.py", "bench_pretrain_throughput.py", "bench_solvers.py", "bench_upper_step.py",
            "bench_throughput_meter.py", "bench_finetune_loader.py", "bench_finetune_throughput.py"} <= set(BENCHMARKS)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("script", BENCHMARKS)
@pytest.mark.long
def test_benchmark_runs_quick_and_writes_a_finite_ratio(script, tmp_path):
    if script in NEEDS:
        pytest.importorskip(NEEDS[script], reason=f"{script} compares with {NEEDS[script]} (pip install -r requirements-dev.txt)")
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out)], cwd=ROOT,
                            env=script_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    record = json.loads(out.read_text())
    assert record["bench"] == script.removeprefix("bench_").removesuffix(".py")
    assert record["quick"] is True
    assert isinstance(record["ratio"], float) and math.isfinite(record["ratio"]) and record["ratio"] > 0, record["ratio"]
    assert f"ratio {record['ratio']:.3f}" in result.stdout  # printed as well as written


def test_the_finetune_bench_times_the_scripts_own_step_on_its_own_batch(tmp_path, monkeypatch, one_torch_thread):
    """bench_finetune_throughput's bare step is fine-tuning.py's trial 0 at the same flags: its model,
    optimizer settings, loss and the first batch of the trial's train loader (shape and values)."""
    import torch

    from source.stages.finetune_data import trial_train_loader
    from source.stages.finetune_run import load_data
    from tests.script_helpers import load_script, make_image_folder

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = __import__("bench_finetune_throughput")
    tree = make_image_folder(tmp_path / "images", classes=3, per_class=10, size=20)
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(bench.build_backbone("resnet18")[0].state_dict(), tmp_path / "models" / "backbone.pth")
    args = bench.get_args_parser().parse_args(["--batch-size", "4", "--amp", "none", "--device", "cpu"])
    flags = bench.script_flags(args, tree, tmp_path / "models", tmp_path / "run", 16, torch.device("cpu"), workers=2)
    bare = bench.BareStep(flags, steps=2)

    script_args = load_script("fine-tuning.py").get_args_parser().parse_args(flags)
    data = load_data(script_args)
    assert bare.model.head.out_features == data.splits.num_classes == 3
    group = bare.training.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, script_args.optimizer_momentum, script_args.wd)
    assert isinstance(bare.training.criterion, torch.nn.CrossEntropyLoss) and bare.amp_dtype is None
    script_args.num_workers = 0
    images, targets = next(iter(trial_train_loader(script_args, bench.DistEnv(0, 1, 0, torch.device("cpu")), data.train_set, 0)))
    assert bare.batch[0].shape == (4, 3, 16, 16) and torch.equal(bare.batch[0], images) and torch.equal(bare.batch[1], targets)
    assert bare.run(2) > 0
