"""Runs that stop when told to: workers that go with their launcher, and a checkpoint on a stop signal.

**Launcher death.** Under torchrun every rank is a child of the launcher, in a session of its own, so
a ``kill -9`` of the launcher (the OOM killer, a lost login node) would leave the ranks training,
writing checkpoints and holding the run-directory lock. :func:`watch_launcher` asks Linux to send
the rank ``SIGKILL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and, as a second line (other
systems, or a parent that died before the request), polls the parent pid from a thread. SIGKILL,
not SIGTERM: a rank whose launcher is gone must not write anything more (SIGTERM would start the
graceful stop below, whose checkpoint needs every other rank), and everything it leaves is safe:
saves are atomic (a temporary file of a dead pid is swept by the next run), the run-dir lock is a
``fcntl`` lock the kernel drops with the process, and DataLoader workers exit within seconds of
their rank (PyTorch's workers watch their parent). Plain ``python`` runs are not watched: a run
started with ``nohup`` is meant to outlive its shell.

**Stop signals.** :class:`StopRequest` handles SIGTERM (``scancel``, a time limit, torchrun passing
on its own SIGTERM/SIGINT), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's ``--signal`` warning before the
end of a job). The first one only sets a flag; the training loops ask :meth:`StopRequest.agreed` at
every step (or alternation) boundary, one small ``all_reduce(MAX)`` of that flag, so every rank
stops at the same boundary even if the signal reached only one of them. The run then writes its
checkpoint there, prints one line saying where it stopped and how to continue, and exits with
:data:`EXIT_STOPPED`. A second signal stops the process at once (the signal's default action),
after removing the temporary file of a save it interrupted, so no partial file is left. A stop by
SIGUSR1 inside a Slurm job (``SLURM_JOB_ID`` set) requeues the job (``scontrol requeue``), and the
requeued job, running the same command in the same run directory, resumes on its own.

Until a loop first asks for the flag (setting up, or code without such a loop, e.g. a detection
sweep), a signal keeps its usual effect: the process ends (SIGINT: ``KeyboardInterrupt``).
The handler ignores signals in processes forked from the rank (DataLoader workers inherit it):
a signal sent to the whole process group or session (torchrun's ``killpg``, Slurm) must not kill
the workers under a rank that is still finishing its step; they go with their rank.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

logger = logging.getLogger(__name__)

# Exit status of a run stopped by a signal after writing its checkpoint: 75 is EX_TEMPFAIL of
# sysexits.h ("temporary failure; the user is invited to retry"), which is what it is: rerunning
# the same command continues the run. (Under torchrun the launcher itself exits with 1 and names
# the ranks' status 75 in its failure summary.)
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# How often the watchdog thread compares the parent pid with the launcher's.
WATCH_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# The parent when this module was first imported (at the script's start): the launcher's pid,
# recorded before any later check, so a launcher that dies before prctl is noticed too.
_LAUNCHER_PID = os.getppid()


def launched_by_torchrun() -> bool:
    """True in a rank that torchrun started (it sets ``TORCHELASTIC_RUN_ID`` for its workers)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)`` for the calling process; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(launcher_pid: int, interval_s: float) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_launcher(launcher_pid: int | None = None, force: bool = False, interval_s: float = WATCH_INTERVAL_S) -> None:
    """Make this process die (SIGKILL) within about ``interval_s`` of its launcher, under torchrun
    (or anywhere with ``force``). ``launcher_pid``: the parent's pid recorded at start-up."""
    if not (force or launched_by_torchrun()):
        return
    launcher = _LAUNCHER_PID if launcher_pid is None else launcher_pid
    # (The kernel sends it when the THREAD that forked us ends; torchrun forks its ranks from its
    # main thread, which ends only with the launcher. The watchdog below covers everything else.)
    _set_parent_death_signal(signal.SIGKILL)
    # Recheck after the request: a launcher that died before it would send nothing.
    if os.getppid() != launcher or launcher == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(launcher, interval_s), name="launcher-watch", daemon=True).start()


class StopRequest:
    """A run's stop flag, set by the first stop signal (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal received by this process
        self.polled = False  # whether a training loop has asked for the flag since install()
        self.stop_agreed = False  # set once the ranks agreed to stop
        self.agreed_signum = 0  # the signal that stopped the run (on any rank), once agreed
        self.owner = os.getpid()
        self.temporary_folders: list[Path] = []

    def install(self, temporary_folders: typing.Iterable[Path] = (), armed: bool = False) -> StopRequest:
        """Handle the stop signals in this process (main thread only; elsewhere nothing changes).
        ``temporary_folders``: where a save interrupted by a second signal leaves its temporary file.
        ``armed``: the caller's loop will ask for the flag, so a signal before its first question
        already waits for it (else the first question arms the handler)."""
        self.signum, self.stop_agreed, self.agreed_signum, self.owner = None, False, 0, os.getpid()
        self.polled = armed
        self.temporary_folders = [Path(folder) for folder in temporary_folders]
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._handle)
        return self

    def watch_folders(self, *folders: Path) -> None:
        """Add folders whose temporary files of this process a second signal removes."""
        self.temporary_folders.extend(Path(folder) for folder in folders)

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self.owner:
            return  # a DataLoader worker of the rank: it goes with its rank
        if not self.polled:
            # No loop asks for the flag (yet, or in this code path, e.g. setting up): nothing would
            # stop at a boundary, so the signal does what it would do without this handler.
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)
            self._die(signum)
        if self.signum is None:
            self.signum = signum
            os.write(2, f"received {signal.Signals(signum).name}: stopping at the next step boundary after a "
                        "checkpoint (send it again to stop at once)\n".encode())
            return
        # The second signal: stop now. The handler runs in the main thread, the one that saves, so
        # a save it interrupted is paused here: removing its temporary file leaves no partial file.
        self._die(signum)

    def _die(self, signum: int) -> None:
        """Remove this process's temporary files and end it by ``signum``'s default action."""
        for folder in self.temporary_folders:
            for partial in folder.glob(f".*.tmp{os.getpid()}"):
                partial.unlink(missing_ok=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal (local; no communication). Asking arms the
        handler: until a loop asks, a signal has its default effect."""
        self.polled = True
        return self.signum is not None

    def agreed(self, device: object = "cpu") -> bool:
        """Collective: True on every rank if any rank received a stop signal. One ``all_reduce(MAX)``
        of a one-element tensor (on ``device``, which the backend must accept) per call."""
        self.polled = True
        if self.stop_agreed:
            return True
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            # One process: nothing to agree on, and no device tensor whose .item() would sync a GPU every step.
            if self.signum:
                self.stop_agreed, self.agreed_signum = True, int(self.signum)
            return self.stop_agreed
        flag = torch.tensor([float(self.signum or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.stop_agreed, self.agreed_signum = True, int(flag.item())
        return self.stop_agreed

    def exit(self, where: str, announce: bool, saved: str = "the checkpoint is written") -> typing.NoReturn:
        """End a stopped run: one line saying where it stopped (if ``announce``; rank 0 usually), a
        Slurm requeue after SIGUSR1 (from global rank 0), exit status :data:`EXIT_STOPPED`."""
        signum = self.agreed_signum or self.signum or 0
        name = signal.Signals(signum).name if signum else "a stop signal"
        if announce:
            print(f"stopped by {name} at {where}; {saved}. Rerun the same command to continue "
                  f"(exit status {EXIT_STOPPED}).", file=sys.stderr, flush=True)
        if signum == signal.SIGUSR1 and _global_rank() == 0:
            requeue_slurm_job()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(EXIT_STOPPED)


def _global_rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return 0


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` inside a Slurm job (else nothing); True if it succeeded."""
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"could not requeue Slurm job {job}: {error}", file=sys.stderr, flush=True)
        return False
    if result.returncode != 0:
        print(f"could not requeue Slurm job {job}: {result.stderr.strip()}", file=sys.stderr, flush=True)
        return False
    print(f"requeued Slurm job {job}: it continues from the checkpoint when it starts again", file=sys.stderr, flush=True)
    return True


# The stop flag of this process's run (one run per process at a time).
STOP = StopRequest()
