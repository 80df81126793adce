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
