"""One error path (source/run/errors.py): a user error prints one ``error: <message>`` line and no
traceback of our own, through the real scripts and tools, with ``python`` and under torchrun with 2
processes; ``--debug`` / ``BISSL_DEBUG=1`` show the traceback; unexpected errors keep theirs."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from source.run.errors import (
    EXIT_USER_ERROR,
    CommandLineParser,
    ConfigError,
    MissingInputError,
    UserError,
    add_debug_argument,
    run_entry_point,
)
from source.run.runtime import RunDirLock
from tests.distributed_harness import free_port
from tests.script_helpers import ROOT, command, load_script, make_image_folder, script_env

# The same messages from two ranks under torchrun: `long` (make test-all), since every run pays two
# interpreters importing torch and torchvision (~7 s each on a CI core); CI checks the one-process runs.
TWO_RANKS = pytest.param(2, marks=pytest.mark.long)


# --- the wrapper, in this process ------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    made = CommandLineParser(prog="tool")
    made.add_argument("--value", type=int, default=0)
    add_debug_argument(made)
    return made


def failing(error: BaseException):
    def main(args: argparse.Namespace) -> None:
        raise error
    return main


def test_a_user_error_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("BISSL_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(failing(ConfigError("--value 3 is odd; give an even number")), parser(), [])
    assert exit_info.value.code == EXIT_USER_ERROR == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --value 3 is odd; give an even number\n" and captured.out == ""


def test_only_rank_0_prints_and_every_rank_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("BISSL_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(failing(UserError("disk full")), parser(), [])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exit_info:  # a bad command line too
        run_entry_point(failing(UserError("unreached")), parser(), ["--value", "x"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        run_entry_point(failing(UserError("unreached")), parser(), ["--value", "x"])
    assert capsys.readouterr().err == "error: argument --value: invalid int value: 'x' (see tool --help)\n"


def test_every_rank_leaves_its_message_for_torchruns_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with pytest.raises(SystemExit):
        run_entry_point(failing(UserError("only this node lacks the data")), parser(), [])
    assert capsys.readouterr().err == ""
    record = json.loads((tmp_path / "error.json").read_text())["message"]
    assert record["message"] == record["extraInfo"]["py_callstack"] == "only this node lacks the data"


@pytest.mark.parametrize("switch", ["flag", "environment"])
def test_debug_re_raises_user_errors(switch, monkeypatch):
    monkeypatch.delenv("BISSL_DEBUG", raising=False)
    argv = ["--debug"] if switch == "flag" else []
    if switch == "environment":
        monkeypatch.setenv("BISSL_DEBUG", "1")
    with pytest.raises(ConfigError, match="odd"):
        run_entry_point(failing(ConfigError("odd")), parser(), argv)


def test_unexpected_errors_keep_their_traceback_and_a_returned_status_is_the_exit_status(monkeypatch):
    monkeypatch.delenv("BISSL_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        run_entry_point(failing(ZeroDivisionError("a bug")), parser(), [])
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(lambda args: 1, parser(), [])
    assert exit_info.value.code == 1
    run_entry_point(lambda args: 0, parser(), [])  # success: returns normally
    run_entry_point(lambda args: {"top1": 50.0}, parser(), [])  # a result is not an exit status


def test_the_exception_classes_users_can_fix_are_user_errors_and_keep_their_old_base():
    from source.data.datasets import DatasetNotFoundError
    from source.run.checkpoint import CheckpointError, DiskFullError, DivergedStateError
    from source.run.runtime import NotWritableError, RunDirBusyError, RunSettingsError
    from source.run.state_dict import WeightsError
    from source.run.tracking import WandbSetupError
    from source.stages.engine import NonFiniteLossError
    from source.tools.weights import FetchError

    for cls, old_base in [(DatasetNotFoundError, FileNotFoundError), (CheckpointError, RuntimeError),
                          (DiskFullError, OSError), (DivergedStateError, RuntimeError), (RunDirBusyError, RuntimeError),
                          (RunSettingsError, ValueError), (WeightsError, RuntimeError), (NonFiniteLossError, RuntimeError),
                          (FetchError, RuntimeError), (ConfigError, ValueError), (NotWritableError, PermissionError),
                          (WandbSetupError, RuntimeError), (MissingInputError, FileNotFoundError)]:
        assert issubclass(cls, UserError) and issubclass(cls, old_base), cls


def test_every_entry_point_runs_through_the_wrapper():
    """The scripts, demo.py and every ``python -m source...`` module end in run_entry_point."""
    main_block = re.compile(r'^if __name__ == "__main__":\n(.*)\Z', flags=re.MULTILINE | re.DOTALL)
    modules = [ROOT / name for name in ("ssl_pre-training.py", "bissl.py", "fine-tuning.py", "demo.py")]
    modules += [path for path in (ROOT / "source").rglob("*.py") if main_block.search(path.read_text())]
    assert {"compare.py", "probe.py", "weights.py", "curvature.py", "fashion_mnist_setup.py"} <= {p.name for p in modules}
    for path in modules:
        assert main_block.search(path.read_text()).group(1).strip() == "run_entry_point(main, get_args_parser())", path


# --- cross-flag constraints, at parse time -----------------------------------------------


def parse_error(parser: argparse.ArgumentParser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_curvature_probes_need_lanczos_steps_and_batches(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    bissl = load_script("bissl.py").get_args_parser()
    assert bissl.parse_args(["--curvature-iters", "0"]).curvature_iters == 0  # no probe: allowed
    assert "--curvature-iters must be >= 1 when the curvature is probed (--curvature-every 3), got 0" in parse_error(
        bissl, ["--curvature-every", "3", "--curvature-iters", "0"], capsys)
    from source.tools import curvature

    tool = curvature.get_args_parser()
    assert "--curvature-iters must be >= 1 when the curvature is probed (the curvature tool), got 0" in parse_error(
        tool, ["--curvature-iters", "0"], capsys)
    assert "--probe-batches must be >= 1, got 0" in parse_error(tool, ["--probe-batches", "0"], capsys)


def test_global_batches_must_split_over_the_launched_ranks(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    bissl = load_script("bissl.py").get_args_parser()
    err = parse_error(bissl, ["--p-batch-size", "9", "--d-batch-size", "6"], capsys)
    assert "--p-batch-size 9 is the GLOBAL batch size and must be a positive multiple of the world size 2" in err
    assert "--d-batch-size" not in err
    pretrain = load_script("ssl_pre-training.py").get_args_parser()
    assert "--batch-size 7 is the GLOBAL" in parse_error(pretrain, ["--batch-size", "7"], capsys)
    # fine-tuning's batch is one trial's (one trial per process): any size
    assert load_script("fine-tuning.py").get_args_parser().parse_args(["--batch-size", "7"]).batch_size == 7
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pretrain.parse_args(["--batch-size", "7"]).batch_size == 7


def test_world_size_flag_must_match_the_processes_started(monkeypatch):
    from source.run.runtime import start

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = load_script("ssl_pre-training.py").get_args_parser().parse_args(["--world-size", "4", "--device", "cpu"])
    with pytest.raises(ConfigError, match="--world-size 4, but 1 process"):
        start(args)


# --- through the real scripts ------------------------------------------------------------


def own_traceback_frames(output: str) -> list[str]:
    """Stack frames in this repository's code (torchrun's own failure summary has frames only in
    torch and the standard library)."""
    frames = re.findall(r'^\s*File "([^"]+)", line \d+', output, flags=re.MULTILINE)
    return [frame for frame in frames if frame.startswith(str(ROOT)) and "site-packages" not in frame]


def run(argv: list[str], debug_env: bool = False, timeout: int = 240) -> subprocess.CompletedProcess:
    env = script_env()
    env.pop("BISSL_DEBUG", None)
    if debug_env:
        env["BISSL_DEBUG"] = "1"
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess, message: str, nproc: int) -> None:
    output = result.stdout + result.stderr
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, output[-4000:]
    assert message in error_lines[0], output[-4000:]
    assert own_traceback_frames(output) == [], output[-4000:]
    if nproc == 1:
        assert result.returncode == EXIT_USER_ERROR and "Traceback" not in output, output[-4000:]
    else:  # torchrun exits 1 and adds its own summary (with its own traceback) naming rank 0's status
        assert result.returncode != 0 and "exitcode  : 2" in output, output[-4000:]


def tool(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=12, size=20)


def pretrain_flags(images: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["--pretext-type", "simclr", "--dset", "imagefolder", "--data-dir", str(images), "--arch", "resnet18",
            "--img-size", "16", "--epochs", "1", "--batch-size", "16", "--mlp", "32-16", "--lr", "0.5",
            "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0", "--model-dir", str(model_dir), *extra]


def finetune_flags(images: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["--dset", "imagefolder", "--data-dir", str(images), "--model-dir", str(model_dir),
            "--pretrained-backbone-filename", "bb.pth", "--pretrain-arch", "resnet18", "--pretrain-img-size", "16",
            "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--num-workers", "0", "--use-hpo", "0",
            "--num-runs", "1", *extra]


@pytest.fixture(scope="module")
def finished_pretraining(images, tmp_path_factory) -> Path:
    """A model dir holding a finished 1-epoch pre-training run (for the resume errors)."""
    model_dir = tmp_path_factory.mktemp("pretrained")
    script = load_script("ssl_pre-training.py")
    script.main(script.get_args_parser().parse_args(pretrain_flags(images, model_dir)))
    return model_dir


PRETRAIN_RUN = Path("runs") / "pretext_simclr_arch-resnet18_dset-imagefolder"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, TWO_RANKS])
def test_missing_dataset(nproc, tmp_path):
    flags = ["--dset", "fashionmnist", "--data-dir", str(tmp_path / "empty"), "--model-dir", str(tmp_path),
             "--arch", "resnet18", "--batch-size", "16", "--device", "cpu", "--num-workers", "0"]
    result = run(command("ssl_pre-training.py", *flags, nproc=nproc))
    assert_one_error_line(result, "dataset 'fashionmnist' not found or incomplete", nproc)
    assert "python -m source.data.fashion_mnist_setup" in result.stderr  # the message says how to fix it


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, TWO_RANKS])
def test_bad_flag_combinations_stop_at_parse_time(nproc, tmp_path):
    result = run(command("bissl.py", "--curvature-every", "2", "--curvature-iters", "0", "--model-dir", str(tmp_path),
                         nproc=nproc))
    assert_one_error_line(result, "--curvature-iters must be >= 1 when the curvature is probed (--curvature-every 2)", nproc)
    if nproc == 2:  # a GLOBAL batch must split evenly over the ranks torchrun starts
        result = run(command("ssl_pre-training.py", "--batch-size", "7", "--model-dir", str(tmp_path), nproc=2))
        assert_one_error_line(result, "--batch-size 7 is the GLOBAL batch size and must be a positive multiple of "
                                      "the world size 2", nproc)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, TWO_RANKS])
def test_changed_settings_on_resume(nproc, images, finished_pretraining):
    result = run(command("ssl_pre-training.py", *pretrain_flags(images, finished_pretraining, "--lr", "0.1"), nproc=nproc))
    assert_one_error_line(result, "holds a run made with other settings:", nproc)
    assert "--lr: 0.5 in the run, 0.1 now" in result.stderr  # the message's further lines are kept


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, TWO_RANKS])
def test_corrupt_checkpoint(nproc, images, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pth").write_bytes(b"not a checkpoint")
    result = run(command("ssl_pre-training.py", *pretrain_flags(images, tmp_path, "--run-dir", str(run_dir)), nproc=nproc))
    assert_one_error_line(result, "checkpoint.pth", nproc)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_corrupt_weights_file(images, tmp_path):
    (tmp_path / "bb.pth").write_bytes(b"these are not weights")
    result = run(command("fine-tuning.py", *finetune_flags(images, tmp_path)))
    assert_one_error_line(result, "bb.pth", 1)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, TWO_RANKS])
def test_busy_run_dir(nproc, images, tmp_path):
    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir).acquire()  # held by this (live) test process
    try:
        result = run(command("ssl_pre-training.py", *pretrain_flags(images, tmp_path, "--run-dir", str(run_dir)),
                             nproc=nproc))
    finally:
        lock.release()
    assert_one_error_line(result, "is in use by another run", nproc)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_tools_report_user_errors_on_one_line(images, tmp_path):
    result = run(tool("source.tools.compare", str(tmp_path / "no_run")))
    assert_one_error_line(result, "is not a fine-tuning run directory", 1)
    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    result = run(tool("source.tools.weights", "convert", str(tmp_path / "garbage.pth"), str(tmp_path / "out.pth"),
                      "--arch", "resnet18"))
    assert_one_error_line(result, "garbage.pth", 1)
    result = run(tool("source.tools.probe", "--dset", "imagefolder", "--data-dir", str(images), "--model-dir", str(tmp_path),
                      "--backbone-filename", "missing.pth", "--arch", "resnet18", "--device", "cpu", "--num-workers", "0"))
    assert_one_error_line(result, "backbone weights not found", 1)
    result = run(tool("source.tools.probe", "--log-every", "5"))  # no longer offered: the probe logs no steps
    assert_one_error_line(result, "unrecognized arguments: --log-every 5", 1)


RANK_1_FAILS = """
import os
from source.run.errors import CommandLineParser, UserError, run_entry_point


def main(args):
    if os.environ["RANK"] == "1":
        raise UserError("only rank 1 lacks its input")


run_entry_point(main, CommandLineParser())
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_an_error_of_another_rank_than_0_shows_in_torchruns_summary(tmp_path):
    script = tmp_path / "rank_1_fails.py"
    script.write_text(RANK_1_FAILS)
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                  str(free_port()), str(script)])
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "traceback : only rank 1 lacks its input" in output, output[-3000:]
    assert not [line for line in output.splitlines() if line.startswith("error:")]  # rank 1 itself stays silent
    assert own_traceback_frames(output) == []


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("switch", ["--debug", "BISSL_DEBUG=1"])
def test_debug_shows_the_traceback(switch, tmp_path):
    flags = ["--dset", "fashionmnist", "--data-dir", str(tmp_path / "empty"), "--model-dir", str(tmp_path),
             "--arch", "resnet18", "--batch-size", "16", "--device", "cpu", "--num-workers", "0"]
    if switch == "--debug":
        flags.append("--debug")
    result = run(command("ssl_pre-training.py", *flags), debug_env=switch != "--debug")
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "source.data.datasets.DatasetNotFoundError: dataset 'fashionmnist' not found" in result.stderr
    assert any(frame.endswith("ssl_pre-training.py") for frame in own_traceback_frames(result.stderr))
