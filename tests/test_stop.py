"""Runs that stop when told to (issue 21): ranks that go with their torchrun launcher, a checkpoint
at a step boundary on SIGTERM/SIGINT/SIGUSR1, a second signal that stops at once, Slurm requeue.

The script tests are real 2-process torchrun runs on tiny generated data: the launcher killed with
SIGKILL (nothing else) must leave no process of the run after 15 s and the run-dir lock free, and a
rerun must end where an uninterrupted run ends.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import source.run.signals as signals
from source.maths.models import Projector, build_backbone
from source.run.checkpoint import save_atomic
from source.run.distributed import first_slurm_host, slurm_rendezvous
from source.run.runtime import RunDirLock
from tests.script_helpers import ROOT, command, make_image_folder, run_script, script_env
from tests.stop_helpers import (
    alive,
    assert_same_weights,
    checkpoint_value,
    kill_launcher_only,
    launch,
    rank_of,
    rank_pids,
    result_rows,
    temporaries,
    wait_for,
)

TAG = "simclr_arch-resnet18"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, folder with pretext weights) shared by the cases."""
    images = make_image_folder(tmp_path_factory.mktemp("images"), classes=2, per_class=16, size=16)
    models = tmp_path_factory.mktemp("pretext")
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    save_atomic(backbone.state_dict(), models / f"pretext_{TAG}_bb.pth")
    save_atomic(Projector(dim, "32-16").state_dict(), models / f"pretext_{TAG}_proj.pth")
    return images, models


@dataclass
class Case:
    """One script with tiny flags, how far a run in ``folder`` got, and how to compare two finished runs."""

    script: str
    flags: Callable[[Path, Path], list[str]]  # (images, folder) -> flags
    run_name: str
    progress: Callable[[Path], int]  # folder -> units done (-1: nothing yet)
    total: int
    compare: Callable[[Path, Path], None]  # (uninterrupted folder, resumed folder)

    def run_dir(self, folder: Path) -> Path:
        return folder / "runs" / self.run_name


def _pretrain_flags(images: Path, folder: Path) -> list[str]:
    return ["--pretext-type", "simclr", "--dset", "imagefolder", "--data-dir", str(images), "--arch", "resnet18",
            "--img-size", "16", "--epochs", "3", "--batch-size", "8", "--mlp", "32-16", "--lr", "0.5",
            "--warmup-epochs", "1", "--device", "cpu", "--num-workers", "1", "--model-dir", str(folder), "--log-every", "1"]


def _bissl_flags(images: Path, folder: Path) -> list[str]:
    return ["--d-dset", "imagefolder", "--p-dset", "imagefolder", "--data-dir", str(images), "--p-pretext-type", "simclr",
            "--arch", "resnet18", "--img-size", "16", "--cg-iter-num", "1", "--p-mlp", "32-16",
            "--p-pretrained-backbone-filename", f"pretext_{TAG}_bb.pth", "--p-pretrained-proj-filename", f"pretext_{TAG}_proj.pth",
            "--epochs", "4", "--lower-num-iter", "2", "--upper-num-iter", "2", "--d-linear-warmup-epochs", "1",
            "--p-batch-size", "8", "--d-batch-size", "8", "--device", "cpu", "--num-workers", "0", "--model-dir", str(folder)]


def _finetune_flags(images: Path, folder: Path) -> list[str]:
    return ["--dset", "imagefolder", "--data-dir", str(images), "--model-dir", str(folder),
            "--pretrained-backbone-filename", f"pretext_{TAG}_bb.pth", "--pretrain-arch", "resnet18",
            "--pretrain-img-size", "16", "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--num-workers", "1",
            "--use-hpo", "1", "--num-runs", "6", "--hpo-lr-max", "0.1"]


PRETRAIN_RUN = f"pretext_{TAG}_dset-imagefolder"
BISSL_RUN = f"BiSSL_{TAG}_dset-imagefolder"
FINETUNE_RUN = f"finetune_pretext_pretext_{TAG}_bb_dset-imagefolder_hpo"


def _compare_finetune(want: Path, got: Path) -> None:
    want_rows, got_rows = (result_rows(folder / "runs" / FINETUNE_RUN / "results.jsonl") for folder in (want, got))
    assert got_rows == want_rows
    assert len((got / "runs" / FINETUNE_RUN / "results.jsonl").read_text().splitlines()) == len(want_rows)  # once each


CASES = {
    "ssl_pre-training.py": Case(
        "ssl_pre-training.py", _pretrain_flags, PRETRAIN_RUN,
        lambda folder: checkpoint_value(folder / "runs" / PRETRAIN_RUN / "checkpoint.pth", "epoch"), 3,
        lambda want, got: assert_same_weights(want, got, [f"pretext_{TAG}_bb.pth", f"pretext_{TAG}_proj.pth"])),
    "bissl.py": Case(
        "bissl.py", _bissl_flags, BISSL_RUN,
        lambda folder: checkpoint_value(folder / "runs" / BISSL_RUN / "checkpoint.pth", "alternation"), 4,
        lambda want, got: assert_same_weights(want, got, [f"{name}_{TAG}_dset-imagefolder.pth" for name in
                                                          ("BiSSL-backbone", "BiSSL-upper-backbone", "BiSSL-upper-head")])),
    "fine-tuning.py": Case(
        "fine-tuning.py", _finetune_flags, FINETUNE_RUN,
        lambda folder: len(result_rows(folder / "runs" / FINETUNE_RUN / "results.jsonl")) or -1, 6, _compare_finetune),
}


def _fresh(folder: Path, models: Path) -> Path:
    folder.mkdir()
    for weights in models.iterdir():
        shutil.copy(weights, folder / weights.name)
    return folder


# --------------------------------------------------------------------------- 1. launcher death
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("script", list(CASES))
@pytest.mark.long
def test_killing_the_launcher_stops_every_rank_frees_the_lock_and_a_rerun_resumes(script, inputs, tmp_path):
    images, models = inputs
    case = CASES[script]
    straight, killed = _fresh(tmp_path / "straight", models), _fresh(tmp_path / "killed", models)
    run_script(script, *case.flags(images, straight), nproc=2)

    launcher = launch(script, case.flags(images, killed), 2, tmp_path / "killed.log")
    ranks = rank_pids(launcher, 2)
    assert wait_for(lambda: case.progress(killed) >= 1 or launcher.poll() is not None, 240)
    pids = kill_launcher_only(launcher)
    done = case.progress(killed)
    assert 1 <= done < case.total, f"killed after {done} of {case.total}"
    assert set(ranks) <= set(pids)
    assert wait_for(lambda: not any(alive(pid) for pid in pids), 15), \
        f"still running 15 s after the launcher died: {[pid for pid in pids if alive(pid)]}"
    started = time.monotonic()
    RunDirLock(case.run_dir(killed)).acquire().release()  # the dead rank 0's lock went with it
    assert time.monotonic() - started < 2

    result = run_script(script, *case.flags(images, killed), nproc=2)
    if script != "fine-tuning.py":
        assert "resumed from" in result.stderr
    case.compare(straight, killed)


def test_the_watchdog_kills_a_process_whose_launcher_is_gone(tmp_path):
    # A launcher pid that is not our parent stands for a launcher that died before the check.
    code = ("import time, source.run.signals as s; s.watch_launcher(launcher_pid=999999999, force=True, interval_s=0.1); "
            "time.sleep(30); print('survived')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == -signal.SIGKILL and "survived" not in result.stdout


def test_parent_death_signal_reaches_an_orphan(tmp_path):
    # A child that asked for SIGKILL on its parent's death, under a parent that then dies.
    pid_file = tmp_path / "child.pid"
    child_code = ("import os, sys, time, source.run.signals as s; s.watch_launcher(force=True, interval_s=60); "
                  "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)")
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code, child_code, str(pid_file)], cwd=ROOT, env=script_env())
    try:
        assert wait_for(pid_file.exists, 60)
        time.sleep(0.2)
        child = int(pid_file.read_text())
        assert alive(child)
    finally:
        parent.kill()
        parent.wait()
    # The watchdog polls once a minute here, so only the kernel's parent-death signal can be this fast.
    assert wait_for(lambda: not alive(child), 5), "the orphan kept running"


def test_stop_request_sets_a_flag_once_and_workers_ignore_it():
    request = signals.StopRequest()
    previous = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
    try:
        request.install()
        assert not request.requested and not request.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.requested and request.signum == signal.SIGUSR1
        assert request.agreed() and request.agreed_signum == signal.SIGUSR1
        request.owner = -1  # as in a forked DataLoader worker: the signal is left to the rank
        request.signum = None
        os.kill(os.getpid(), signal.SIGTERM)
        assert not request.requested
        # Before any loop asked for the flag a signal keeps its usual effect (here: KeyboardInterrupt).
        request.install()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------- 2. a checkpoint when told to stop
def _metric_steps(run_dir: Path) -> int:
    """The highest step in a run's metrics.jsonl (0 before the first line)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((int(json.loads(line).get("step", 0)) for line in lines if line.strip()), default=0)


def _signal_one_rank(launcher: subprocess.Popen, rank: int, signum: int) -> None:
    pid = next(pid for pid in rank_pids(launcher, 2) if rank_of(pid) == rank)
    os.kill(pid, signum)


def _stop_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "stopped by SIGTERM at" in line]
    assert len(lines) >= 1, log.read_text()[-3000:]
    return lines[0]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_sigterm_to_one_pretraining_rank_checkpoints_mid_epoch_and_the_rerun_ends_equal(inputs, tmp_path):
    images, models = inputs
    # 32 images, global batch 4: 8 steps per epoch, so the stop lands inside an epoch.
    def flags(folder: Path) -> list[str]:
        return [*_pretrain_flags(images, folder), "--batch-size", "4", "--epochs", "2", "--num-workers", "0"]

    straight, stopped = _fresh(tmp_path / "straight", models), _fresh(tmp_path / "stopped", models)
    run_script("ssl_pre-training.py", *flags(straight), nproc=2)
    run_dir = stopped / "runs" / PRETRAIN_RUN
    log = tmp_path / "stopped.log"
    launcher = launch("ssl_pre-training.py", flags(stopped), 2, log)
    assert wait_for(lambda: _metric_steps(run_dir) >= 2 or launcher.poll() is not None, 240)
    _signal_one_rank(launcher, 1, signal.SIGTERM)
    assert launcher.wait(120) != 0
    text = log.read_text()
    assert f"exitcode  : {signals.EXIT_STOPPED}" in text, text[-3000:]  # torchrun's summary of the ranks
    line = _stop_line(log)
    state = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    step = state["global_step"]
    assert f"global step {step};" in line and "Rerun the same command" in line
    assert 2 <= step < 16 and step % 8 != 0, f"stopped at global step {step}, not inside an epoch"
    assert state["epoch"] == step // 8
    assert not temporaries(stopped)
    assert _metric_steps(run_dir) == step  # nothing trained after the checkpoint

    result = run_script("ssl_pre-training.py", *flags(stopped), nproc=2)
    assert f"resumed from {run_dir / 'checkpoint.pth'} at epoch {step // 8}, step {step}" in result.stderr
    CASES["ssl_pre-training.py"].compare(straight, stopped)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_sigterm_to_one_bissl_rank_checkpoints_after_the_alternation_and_the_rerun_ends_equal(inputs, tmp_path):
    images, models = inputs
    case = CASES["bissl.py"]
    straight, stopped = _fresh(tmp_path / "straight", models), _fresh(tmp_path / "stopped", models)
    run_script("bissl.py", *case.flags(images, straight), nproc=2)
    log = tmp_path / "stopped.log"
    launcher = launch("bissl.py", case.flags(images, stopped), 2, log)
    assert wait_for(lambda: case.progress(stopped) >= 1 or launcher.poll() is not None, 240)  # the warm-up's checkpoint
    _signal_one_rank(launcher, 1, signal.SIGTERM)
    assert launcher.wait(120) != 0
    assert f"exitcode  : {signals.EXIT_STOPPED}" in log.read_text()
    done = case.progress(stopped)
    assert 1 <= done < case.total and f"at alternation {done} of {case.total}" in _stop_line(log)
    assert not temporaries(stopped)
    assert not (stopped / f"BiSSL-backbone_{TAG}_dset-imagefolder.pth").exists()
    result = run_script("bissl.py", *case.flags(images, stopped), nproc=2)
    assert f"after {done} alternations" in result.stderr
    case.compare(straight, stopped)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_sigterm_to_one_finetuning_rank_keeps_finished_trials_and_the_rerun_ends_equal(inputs, tmp_path):
    images, models = inputs
    case = CASES["fine-tuning.py"]
    straight, stopped = _fresh(tmp_path / "straight", models), _fresh(tmp_path / "stopped", models)
    run_script("fine-tuning.py", *case.flags(images, straight), nproc=2)
    log = tmp_path / "stopped.log"
    launcher = launch("fine-tuning.py", case.flags(images, stopped), 2, log)
    assert wait_for(lambda: case.progress(stopped) >= 1 or launcher.poll() is not None, 240)
    _signal_one_rank(launcher, 1, signal.SIGTERM)
    assert launcher.wait(120) != 0
    assert f"exitcode  : {signals.EXIT_STOPPED}" in log.read_text()
    done = case.progress(stopped)
    assert 1 <= done < case.total
    assert "finished trials are recorded, this one's checkpoint is written" in _stop_line(log)
    trials = stopped / "runs" / FINETUNE_RUN / "trials"
    assert list(trials.glob("trial-*/checkpoint.pth")), "no trial checkpoint was written"
    assert not temporaries(stopped)
    run_script("fine-tuning.py", *case.flags(images, stopped), nproc=2)
    case.compare(straight, stopped)
    assert not list(trials.glob("trial-*/checkpoint.pth"))  # continued trials leave none behind


SECOND_SIGNAL = """
import os, signal, sys, time
from pathlib import Path
from source.run.signals import STOP
folder = Path(sys.argv[1])
STOP.install([folder], armed=True)
partial = folder / f".checkpoint.pth.tmp{os.getpid()}"
partial.write_bytes(b"half a checkpoint")  # a save in progress when the second signal comes
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""


def test_a_second_signal_stops_at_once_and_removes_the_partial_save(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", SECOND_SIGNAL, str(tmp_path)], cwd=ROOT, env=script_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # the first one only asks the run to stop at its next boundary
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == -signal.SIGINT
    assert "received SIGINT" in process.stderr.read()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.long
def test_a_second_sigint_stops_a_real_run_at_once_without_a_partial_file(inputs, tmp_path):
    images, models = inputs
    folder = _fresh(tmp_path / "run", models)
    flags = [*_pretrain_flags(images, folder), "--epochs", "50", "--num-workers", "0"]
    log = tmp_path / "run.log"
    process = launch("ssl_pre-training.py", flags, 1, log)
    run_dir = folder / "runs" / PRETRAIN_RUN
    assert wait_for(lambda: _metric_steps(run_dir) >= 1 or process.poll() is not None, 240)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # (two signals before the handler runs count as one)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert process.wait(30) == -signal.SIGINT, log.read_text()[-3000:]
    assert time.monotonic() - started < 10
    assert not temporaries(folder)
    assert not (folder / f"pretext_{TAG}_config.json").exists()  # the run never finished


# --------------------------------------------------------------------------- 3. Slurm
def test_slurm_launch_without_torchrun_finds_its_rendezvous():
    assert first_slurm_host("gpu-node[07-10,12],cpu3") == "gpu-node07"
    assert first_slurm_host("single") == "single"
    environ = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n[4-5]", "SLURM_JOB_ID": "4242"}
    assert slurm_rendezvous(environ) == {"MASTER_ADDR": "n4", "MASTER_PORT": str(20000 + 4242)}
    assert slurm_rendezvous({**environ, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}) == {}  # given ones win
    assert slurm_rendezvous({**environ, "RANK": "3"}) == {}  # torchrun inside Slurm sets its own
    assert slurm_rendezvous({"SLURM_JOB_ID": "1"}) == {}  # not a task that srun started


def _fake_scontrol(folder: Path) -> tuple[dict[str, str], Path]:
    """An environment whose ``scontrol`` records its arguments in the returned file."""
    calls = folder / "scontrol_calls.txt"
    tool = folder / "bin" / "scontrol"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    tool.chmod(0o755)
    return {"PATH": f"{tool.parent}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "777"}, calls


def test_requeue_calls_scontrol_only_inside_a_job(tmp_path, monkeypatch):
    extra, calls = _fake_scontrol(tmp_path)
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    assert signals.requeue_slurm_job() and calls.read_text() == "requeue 777\n"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not signals.requeue_slurm_job() and calls.read_text() == "requeue 777\n"


@pytest.mark.slow
@pytest.mark.long
def test_sigusr1_in_a_slurm_job_checkpoints_requeues_and_the_requeued_run_resumes(inputs, tmp_path):
    images, models = inputs
    extra, calls = _fake_scontrol(tmp_path)
    straight, stopped = _fresh(tmp_path / "straight", models), _fresh(tmp_path / "stopped", models)
    flags = [*_pretrain_flags(images, stopped), "--epochs", "2", "--num-workers", "0"]
    run_dir = stopped / "runs" / PRETRAIN_RUN
    process = subprocess.Popen(command("ssl_pre-training.py", *flags), cwd=ROOT, env={**script_env(), **extra},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: _metric_steps(run_dir) >= 1 or process.poll() is not None, 240)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(120) == signals.EXIT_STOPPED
    assert "stopped by SIGUSR1" in process.stderr.read()
    assert calls.read_text() == "requeue 777\n"
    # The requeued job runs the same command: it continues from the checkpoint.
    result = run_script("ssl_pre-training.py", *flags)
    assert "resumed from" in result.stderr
    run_script("ssl_pre-training.py", *[*_pretrain_flags(images, straight), "--epochs", "2", "--num-workers", "0"])
    CASES["ssl_pre-training.py"].compare(straight, stopped)


# --------------------------------------------------------------------------- fine-tuning trial checkpoint
def _trial_inputs():
    from torch.utils.data import DataLoader, TensorDataset

    from source.data.loader import epoch_loader

    generator = torch.Generator().manual_seed(0)
    points = torch.randn(96, 2, generator=generator)
    labels = (points[:, 0] > 0).long()
    train = epoch_loader(TensorDataset(points[:64], labels[:64]), 8, seed=3, num_workers=0, pin_memory=False,
                         prefetch_factor=2)
    return train, DataLoader(TensorDataset(points[64:80], labels[64:80]), batch_size=8), \
        DataLoader(TensorDataset(points[80:], labels[80:]), batch_size=8)


def _trial(stop=None, checkpoint_path=None):
    from torch import nn

    from source.stages.finetune import fine_tune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    train, val, test = _trial_inputs()
    result = fine_tune(model, train, val, test, lr=0.05, wd=1e-4, momentum=0.9, epochs=3, device=torch.device("cpu"),
                       amp_dtype=None, multilabel=False, stop=stop, checkpoint_path=checkpoint_path)
    return result, model


@pytest.mark.parametrize("stop_after", [5, 16])  # inside epoch 1; after the last step of epoch 2
def test_a_stopped_trial_checkpoints_at_its_step_and_continues_to_the_uninterrupted_result(tmp_path, stop_after):
    from source.stages.finetune import TrialStopped

    want, want_model = _trial()
    path = tmp_path / "trial" / "checkpoint.pth"
    calls = []
    with pytest.raises(TrialStopped) as stopped:
        _trial(stop=lambda: calls.append(1) or len(calls) == stop_after, checkpoint_path=path)
    assert stopped.value.checkpointed and path.is_file()
    state = torch.load(path, weights_only=True)
    assert (state["epoch"] - 1) * 8 + state["steps"] == stop_after
    got, got_model = _trial(checkpoint_path=path)
    assert got.row() == want.row() and got.history == want.history
    for key, value in want_model.state_dict().items():
        assert torch.allclose(value.float(), got_model.state_dict()[key].float(), atol=1e-6, rtol=0), key
    assert not path.exists()  # the finished trial leaves nothing to continue


def test_every_rank_that_start_sets_up_watches_its_launcher(monkeypatch):
    # ssl_pre-training.py, bissl.py, fine-tuning.py and the probe and curvature tools all begin with start().
    import argparse

    import source.run.runtime as runtime

    calls = []
    monkeypatch.setattr(runtime, "watch_launcher", lambda: calls.append("watched"))
    args = argparse.Namespace(omp_num_threads=0, device="cpu", dist_url="env://", world_size=-1, num_workers=0, seed=0)
    runtime.start(args)
    assert calls == ["watched"]
    for tool in ("source/tools/probe.py", "source/tools/curvature.py", "ssl_pre-training.py", "bissl.py", "fine-tuning.py"):
        assert "env = start(args)" in (ROOT / tool).read_text(), tool


LEADER_EXITS_FIRST = """
import ctypes, sys, threading, time
from source.run.runtime import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
# Another thread ends the process 2 s after the main thread has gone: meanwhile the main thread
# is a zombie and the lock is still held, as in a process whose last threads are still exiting.
threading.Thread(target=lambda: (time.sleep(2), ctypes.CDLL(None).exit_group(0))).start()
ctypes.CDLL(None).syscall(60, 0)  # SYS_exit (x86-64): this thread only
"""


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_a_rerun_waits_for_a_dying_holder_instead_of_calling_the_run_dir_busy(tmp_path):
    if os.uname().machine != "x86_64":
        pytest.skip("the thread-only exit syscall number is x86-64's")
    holder = subprocess.Popen([sys.executable, "-c", LEADER_EXITS_FIRST, str(tmp_path)], cwd=ROOT, env=script_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert wait_for(lambda: Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 5)
        assert alive(holder.pid)  # its other thread still runs
        started = time.monotonic()
        RunDirLock(tmp_path).acquire().release()  # waits for the lock instead of "in use by another run"
        assert 0.5 < time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
