"""Helpers for the stop tests (issue 21): launch a script, wait for its progress, kill the launcher
only or signal one rank, and check that no process of the run is left."""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tests.script_helpers import ROOT, command, descendants, script_env


def alive(pid: int) -> bool:
    """Whether any thread of process ``pid`` runs (a zombie, dead but not yet reaped by its new
    parent, does not count; a zombie main thread whose other threads still exit does)."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue
    return any(state != "Z" for state in states)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def launch(script: str, args: list[str], nproc: int, log: Path) -> subprocess.Popen:
    """Start ``script`` (under torchrun when ``nproc > 1``), stdout and stderr into ``log``."""
    handle = open(log, "w")
    return subprocess.Popen(command(script, *args, nproc=nproc), cwd=ROOT, env=script_env(), stdout=handle,
                            stderr=subprocess.STDOUT)


def rank_pids(launcher: subprocess.Popen, nproc: int, timeout: float = 120) -> list[int]:
    """The pids of the ranks torchrun started (its children running the script)."""
    def ranks() -> list[int]:
        return [pid for pid in descendants(launcher.pid) if _parent(pid) == launcher.pid]
    assert wait_for(lambda: len(ranks()) >= nproc, timeout), f"torchrun started {ranks()}"
    return ranks()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def rank_of(pid: int) -> int:
    """The ``RANK`` torchrun gave the process ``pid``."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(item for item in environ if item.startswith(b"RANK=")).split(b"=", 1)[1])


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (SigCgt of /proc/PID/status):
    a signal before that does what the OS does without one (the script has not reached its loop)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signum - 1) & 1)


def temporaries(folder: Path) -> list[Path]:
    """Temporary files of atomic saves (``.<name>.tmp<pid>``) anywhere under ``folder``."""
    return [path for path in folder.rglob(".*.tmp*") if path.is_file()]


def kill_launcher_only(launcher: subprocess.Popen) -> list[int]:
    """SIGKILL the launcher alone (as the OOM killer would); returns every pid that ran below it
    just before (ranks and their DataLoader workers), recorded before they are re-parented."""
    below = descendants(launcher.pid)
    os.kill(launcher.pid, 9)
    launcher.wait()
    return below


def checkpoint_value(path: Path, key: str) -> int:
    """``key`` of the checkpoint at ``path`` (-1 while it does not exist or is being replaced)."""
    try:
        return int(torch.load(path, weights_only=True)[key])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def result_rows(path: Path) -> dict[int, dict]:
    """The rows of a fine-tuning ``results.jsonl`` by trial, without the fields that vary by run (time, rank)."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["trial"]] = {key: value for key, value in row.items() if key not in ("time_s", "rank")}
    return rows


def assert_same_weights(want_dir: Path, got_dir: Path, names: list[str], atol: float = 1e-6) -> None:
    for name in names:
        want = torch.load(want_dir / name, weights_only=True)
        got = torch.load(got_dir / name, weights_only=True)
        assert want.keys() == got.keys(), name
        for key in want:
            assert torch.allclose(want[key].float(), got[key].float(), atol=atol, rtol=0), (name, key)
