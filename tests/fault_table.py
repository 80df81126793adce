"""Fault table: run the three entry scripts under the faults users meet and print pass/fail.

    python -m tests.fault_table [--kills 3] [--seed 0] [--out bench/results/fault_table.md]

One invocation produces the whole table (every stage and the bad-input rows; ``--stages`` picks a
subset for a quick look) and writes it with what it was measured on: date, commit, load average,
CPU count and the command line.

Each stage (pre-training, BiSSL, fine-tuning) first runs uninterrupted on tiny generated data
(ResNet-18, 16 px, CPU) as the reference; then every fault is applied to a fresh copy and the
outcome is checked: a killed run (kill -9 of the whole process tree at a random moment, several
times, one and two processes, a single rank; also the torchrun launcher alone, whose ranks must be
gone within 15 s with the run-dir lock free; SIGTERM to one rank at a random moment after its handler is installed, which must stop the run with a
checkpoint and exit status 75; SIGINT twice, which must stop a run at once without a partial file) must, when rerun with the same command, end with
the reference's weights (to 1e-6) or, for fine-tuning, each trial's reference row exactly once;
bad situations (corrupt or foreign checkpoint, full disk, changed flags, a second run in the same
run directory, read-only --model-dir, NaN or exploding weights, --epochs 0, wandb without a key,
every trial failing) must fail with a message that names the problem and lose nothing saved.
The real full disk and read-only folder use a private mount namespace (``unshare -rm``) and are
skipped where that is not allowed. Runtime on 2 idle cores: about 10-15 minutes before the three
stop rows of issue 21 were added (each adds one run and its rerun per stage; not timed since).

Not a pytest test module (its name does not start with ``test_``): it runs for minutes and its
kill moments are random, so it is a harness to run by hand, from the repository root.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from source.maths.models import Projector, build_backbone
from source.run.checkpoint import save_atomic
from source.run.runtime import RunDirBusyError, RunDirLock
from source.run.signals import EXIT_STOPPED
from tests.script_helpers import ROOT, command, descendants, kill_tree, make_image_folder, script_env
from tests.stop_helpers import alive, catches, rank_of, wait_for

TAG = "simclr_arch-resnet18"
BISSL_TAG = f"{TAG}_dset-imagefolder"


class Stage:
    """One entry script with the tiny flags of this table, its outputs and how to compare them."""

    def __init__(self, name: str, script: str, flags: Callable[[Path], list[str]], outputs: list[str], run_name: str) -> None:
        self.name, self.script, self.flags, self.outputs, self.run_name = name, script, flags, outputs, run_name

    def run_dir(self, folder: Path) -> Path:
        return folder / "runs" / self.run_name


def pretrain_flags(images: Path) -> Callable[[Path], list[str]]:
    return lambda folder: ["--pretext-type", "simclr", "--dset", "imagefolder", "--data-dir", str(images), "--arch", "resnet18",
                           "--img-size", "16", "--epochs", "4", "--batch-size", "16", "--mlp", "32-16", "--lr", "0.5",
                           "--warmup-epochs", "1", "--device", "cpu", "--num-workers", "0", "--model-dir", str(folder),
                           "--log-every", "1"]


def bissl_flags(images: Path) -> Callable[[Path], list[str]]:
    return lambda folder: ["--d-dset", "imagefolder", "--p-dset", "imagefolder", "--data-dir", str(images),
                           "--p-pretext-type", "simclr", "--arch", "resnet18", "--img-size", "16", "--cg-iter-num", "1",
                           "--p-mlp", "32-16", "--p-pretrained-backbone-filename", f"pretext_{TAG}_bb.pth",
                           "--p-pretrained-proj-filename", f"pretext_{TAG}_proj.pth", "--epochs", "4", "--lower-num-iter", "1",
                           "--upper-num-iter", "2", "--d-linear-warmup-epochs", "1", "--p-batch-size", "8",
                           "--d-batch-size", "8", "--device", "cpu", "--num-workers", "0", "--model-dir", str(folder)]


def finetune_flags(images: Path) -> Callable[[Path], list[str]]:
    return lambda folder: ["--dset", "imagefolder", "--data-dir", str(images), "--model-dir", str(folder),
                           "--pretrained-backbone-filename", f"pretext_{TAG}_bb.pth", "--pretrain-arch", "resnet18",
                           "--pretrain-img-size", "16", "--batch-size", "8", "--epochs", "2", "--device", "cpu",
                           "--num-workers", "0", "--use-hpo", "1", "--num-runs", "4", "--hpo-lr-max", "0.1"]


def launch(stage: Stage, folder: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(command(stage.script, *stage.flags(folder), *extra, nproc=nproc), cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(stage: Stage, folder: Path, *extra: str, nproc: int = 1, timeout: int = 900) -> tuple[int, str]:
    process = launch(stage, folder, *extra, nproc=nproc)
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def fresh(base: Path, seeds: Path, name: str) -> Path:
    folder = base / name
    shutil.copytree(seeds, folder)
    return folder


def same_outputs(stage: Stage, want: Path, got: Path) -> str:
    """'' if ``got`` ends where ``want`` did, else what differs."""
    if stage.name.startswith("fine-tuning"):
        def rows(folder: Path) -> list[dict]:
            lines = (stage.run_dir(folder) / "results.jsonl").read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        keep = ("trial", "seed", "lr", "wd", "status", "best_val", "best_epoch", "final_val", "test_final", "test_best")
        reference = sorted((tuple(row.get(key) for key in keep) for row in rows(want)), key=lambda row: row[0])
        result = [tuple(row.get(key) for key in keep) for row in rows(got)]
        if len(result) != len({row[0] for row in result}):
            return f"trials ran more than once: {sorted(row[0] for row in result)}"
        result.sort(key=lambda row: row[0])
        return "" if result == reference else f"rows differ: {result} vs {reference}"
    for name in stage.outputs:
        if not (got / name).exists():
            return f"{name} missing"
        a, b = torch.load(want / name, weights_only=True), torch.load(got / name, weights_only=True)
        worst = max(float((a[key].double() - b[key].double()).abs().max()) for key in a)
        if worst > 1e-6:
            return f"{name}: max |diff| {worst:.3g}"
    return ""


def leftovers(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*.tmp*"))


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool, str]] = []

    def add(self, stage: str, fault: str, ok: bool, detail: str = "") -> None:
        self.rows.append((stage, fault, ok, detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {stage}: {fault}  {detail}", flush=True)

    def markdown(self) -> str:
        lines = ["| stage | fault | result | detail |", "|---|---|---|---|"]
        lines += [f"| {stage} | {fault} | {'pass' if ok else '**FAIL**'} | {detail.replace('|', '/')[:160]} |"
                  for stage, fault, ok, detail in self.rows]
        passed = sum(ok for *_, ok, _ in self.rows)
        return "\n".join(lines) + f"\n\n{passed} of {len(self.rows)} passed\n"


def kill_and_resume(table: Table, stage: Stage, base: Path, seeds: Path, reference: Path, duration: float,
                    rng: random.Random, label: str, nproc: int = 1, rank_only: bool = False) -> None:
    folder = fresh(base, seeds, f"{stage.name}-{label}".replace(" ", "_").replace("#", "").replace(",", ""))
    delay = rng.uniform(0.3, 0.95) * duration
    process = launch(stage, folder, nproc=nproc)
    time.sleep(delay)
    if rank_only:  # kill one rank (the last-started worker), let torchrun notice
        workers = [pid for pid in descendants(process.pid) if pid != process.pid]
        victim = workers[-1] if workers else process.pid
        started = time.monotonic()
        subprocess.run(["kill", "-9", str(victim)], check=False)
        try:
            process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            kill_tree(process)
            table.add(stage.name, label, False, "the other rank did not stop within 120 s")
            return
        stop_s = time.monotonic() - started
    else:
        kill_tree(process)
    code, output = run(stage, folder, nproc=nproc)
    difference = same_outputs(stage, reference, folder) if code == 0 else f"rerun failed ({code}): {output[-400:]}"
    left = leftovers(folder)
    detail = f"killed at {delay:.1f} s" + (f", job stopped {stop_s:.1f} s after the rank died" if rank_only else "")
    table.add(stage.name, label, not difference and not left, detail + (f"; {difference}" if difference else "")
              + (f"; leftover temporaries {left}" if left else ""))


def rerun_and_compare(stage: Stage, folder: Path, reference: Path, nproc: int) -> str:
    """Rerun the stopped run; '' if it then ends where ``reference`` did, else what went wrong."""
    code, output = run(stage, folder, nproc=nproc)
    difference = same_outputs(stage, reference, folder) if code == 0 else f"rerun failed ({code}): {output[-400:]}"
    left = leftovers(folder)
    return "; ".join(part for part in (difference, f"leftover temporaries {left}" if left else "") if part)


def launcher_killed(table: Table, stage: Stage, base: Path, seeds: Path, reference: Path, duration: float,
                    rng: random.Random) -> None:
    """kill -9 of torchrun alone: every rank (and DataLoader worker) must stop within 15 s, the lock be free."""
    folder = fresh(base, seeds, f"{stage.name}-launcher-killed".replace(" ", "_"))
    delay = rng.uniform(0.3, 0.95) * duration
    process = launch(stage, folder, nproc=2)
    time.sleep(delay)
    below = descendants(process.pid)
    os.kill(process.pid, 9)
    process.wait()
    started = time.monotonic()
    gone = wait_for(lambda: not any(alive(pid) for pid in below), 15, interval=0.05)
    gone_s = time.monotonic() - started
    left_running = [pid for pid in below if alive(pid)]
    for pid in left_running:  # do not leave them to the rest of the table
        os.kill(pid, 9)
    try:
        RunDirLock(stage.run_dir(folder)).acquire().release()
        lock_free = True
    except RunDirBusyError:
        lock_free = False
    difference = rerun_and_compare(stage, folder, reference, 2)
    detail = (f"killed at {delay:.1f} s; {len(below)} processes gone after {gone_s:.1f} s"
              if gone else f"still running after 15 s: {left_running}")
    table.add(stage.name, "torchrun launcher killed (kill -9, ranks left alone)", gone and lock_free and not difference,
              detail + ("" if lock_free else "; run-dir lock still held") + (f"; {difference}" if difference else ""))


def one_rank_sigterm(table: Table, stage: Stage, base: Path, seeds: Path, reference: Path, duration: float,
                     rng: random.Random) -> None:
    """SIGTERM to rank 1 only: the run checkpoints, exits with EXIT_STOPPED (or had already finished), and resumes."""
    folder = fresh(base, seeds, f"{stage.name}-sigterm-one-rank".replace(" ", "_"))
    process = launch(stage, folder, nproc=2)
    launched = time.monotonic()

    def rank_one() -> int | None:
        ranks = [pid for pid in descendants(process.pid) if alive(pid)]
        return next((pid for pid in ranks if _rank_or_none(pid) == 1), None)

    # A random moment of the run once rank 1 handles SIGTERM: before its handler is installed (imports,
    # process-group set-up) the signal ends the process as it would without one, before any training.
    wait_for(lambda: (pid := rank_one()) is not None and catches(pid, 15), 120, interval=0.05)
    # Early in the run: the handler is installed only after imports and set-up, which under load take
    # much of ``duration`` (the 1-process reference), and a signal after the end tests nothing.
    time.sleep(rng.uniform(0.05, 0.4) * duration)
    delay = time.monotonic() - launched
    victim = rank_one()
    if victim is not None:
        os.kill(victim, 15)
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        table.add(stage.name, "SIGTERM to one rank", False, "the run did not stop within 120 s")
        return
    stop_s = time.monotonic() - started
    stopped = f"exitcode  : {EXIT_STOPPED}" in output and "stopped by SIGTERM at" in output
    finished = process.returncode == 0
    difference = rerun_and_compare(stage, folder, reference, 2)
    detail = (f"signalled at {delay:.1f} s, stopped with status {EXIT_STOPPED} {stop_s:.1f} s later" if stopped
              else f"rank 1 had ended before the signal at {delay:.1f} s (exit {process.returncode}): nothing tested"
              if victim is None else f"exit {process.returncode} (signalled at {delay:.1f} s): {output[-300:]}")
    table.add(stage.name, "SIGTERM to one rank", (stopped or finished) and victim is not None and not difference,
              detail + (f"; {difference}" if difference else ""))


def _rank_or_none(pid: int) -> int | None:
    try:
        return rank_of(pid)
    except (OSError, StopIteration, ValueError):
        return None


def second_sigint(table: Table, stage: Stage, base: Path, seeds: Path, reference: Path, duration: float,
                  rng: random.Random) -> None:
    """SIGINT twice: the process stops at once (by SIGINT), no partial file is left, the rerun resumes."""
    folder = fresh(base, seeds, f"{stage.name}-second-sigint".replace(" ", "_"))
    delay = rng.uniform(0.3, 0.95) * duration
    process = launch(stage, folder)
    time.sleep(delay)
    process.send_signal(2)
    time.sleep(0.5)  # two signals before the handler runs count as one
    process.send_signal(2)
    started = time.monotonic()
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(process)
    stop_s = time.monotonic() - started
    at_once = process.returncode == -2 and stop_s < 10
    left = leftovers(folder)
    difference = rerun_and_compare(stage, folder, reference, 1)
    table.add(stage.name, "SIGINT twice", (at_once or process.returncode == 0) and not left and not difference,
              f"signalled at {delay:.1f} s; exit {process.returncode} {stop_s:.1f} s after the second"
              + (f"; partial files {left}" if left else "") + (f"; {difference}" if difference else ""))


def expect_failure(table: Table, stage: Stage, label: str, code: int, output: str, needles: list[str], extra_ok: bool = True,
                   detail: str = "") -> None:
    missing = [needle for needle in needles if needle not in output]
    ok = code != 0 and not missing and extra_ok
    message = next((line for line in reversed(output.splitlines()) if line.strip()), "")[:160]
    table.add(stage.name, label, ok, (detail + "; " if detail else "") + (f"missing {missing}; " if missing else "")
              + f"exit {code}: {message}")


def shell_command(stage: Stage, folder: Path, *extra: str) -> str:
    return " ".join(shlex.quote(part) for part in command(stage.script, *stage.flags(folder), *extra))


def in_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=900)


def bad_input(table: Table, base: Path, seeds: Path, pre: Stage, finetune: Stage) -> None:
    """Stage-independent bad input: divergence, --epochs 0, wandb without a key, an all-failed sweep."""
    folder = fresh(base, seeds, "nan")
    code, output = run(pre, folder, "--lr", "1e30", "--epochs", "2")
    finite = True
    if (pre.run_dir(folder) / "checkpoint.pth").exists():
        state = torch.load(pre.run_dir(folder) / "checkpoint.pth", weights_only=True)["model"]
        finite = all(bool(torch.isfinite(value.double()).all()) for value in state.values() if value.is_floating_point())
    expect_failure(table, pre, "NaN / diverging run (--lr 1e30)", code, output, ["diverged" if "diverged" in output else "non-finite"],
                   finite, f"last checkpoint finite: {finite}")
    folder = fresh(base, seeds, "explode")
    code, output = run(pre, folder, "--optimizer", "sgd", "--lr", "1e6", "--epochs", "2")
    expect_failure(table, pre, "SGD at lr 1e6 (exploding weights)", code, output,
                   ["diverged" if "diverged" in output else "non-finite loss"])
    folder = fresh(base, seeds, "epochs0")
    before = sorted(path.name for path in folder.iterdir())
    code, output = run(pre, folder, "--epochs", "0")
    expect_failure(table, pre, "--epochs 0", code, output, ["--epochs: must be >= 1"], sorted(p.name for p in folder.iterdir()) == before)
    code, output = run(pre, fresh(base, seeds, "wandb"), "--wandb-project", "x", "--wandb-mode", "online", "--epochs", "1")
    expect_failure(table, pre, "wandb online without an API key", code, output, ["wandb login", "--wandb-mode offline"])
    code, output = run(finetune, fresh(base, seeds, "all-failed"), "--hpo-lr-min", "1e5", "--hpo-lr-max", "1e6",
                       "--num-runs", "2", "--epochs", "1")
    expect_failure(table, finetune, "every HPO trial diverges", code, output, ["finished trials failed"])



STAGES = ("pre-training", "BiSSL", "fine-tuning", "bad-input")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="random kill -9 moments per stage (one process) (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments (default: 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fault_table.md",
                        help="the table's file (default: bench/results/fault_table.md)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {', '.join(STAGES)} (default: all, the whole table)")
    return parser


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def header(options: argparse.Namespace, load_before: tuple[float, float, float]) -> str:
    """What the table was measured on, so that it can be read (and rerun) later."""
    selected = options.stages.split(",")
    scope = "the whole table" if set(selected) >= set(STAGES) else f"stages {', '.join(selected)} only"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# Fault table (tests/fault_table.py)\n\n"
            f"    python -m tests.fault_table {shlex.join(sys.argv[1:])}\n\n"
            f"One invocation, {scope}: {when}, commit {commit()}, {os.cpu_count()} CPU cores, CPU, ResNet-18 at 16 px; "
            f"load average {' / '.join(f'{x:.2f}' for x in load_before)} before and "
            f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} after (1 / 5 / 15 min).\n\n")


def main(options: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    unknown = set(options.stages.split(",")) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    rng = random.Random(options.seed)
    base = Path(tempfile.mkdtemp(prefix="bissl-faults-"))
    images = make_image_folder(base / "images", classes=2, per_class=16, size=16)
    seeds = base / "seeds"
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    save_atomic(backbone.state_dict(), seeds / f"pretext_{TAG}_bb.pth")
    save_atomic(Projector(dim, "32-16").state_dict(), seeds / f"pretext_{TAG}_proj.pth")
    stages = [
        Stage("pre-training", "ssl_pre-training.py", pretrain_flags(images), [f"pretext_{TAG}_bb.pth", f"pretext_{TAG}_proj.pth"],
              f"pretext_{TAG}_dset-imagefolder"),
        Stage("BiSSL", "bissl.py", bissl_flags(images), [f"BiSSL-backbone_{BISSL_TAG}.pth", f"BiSSL-upper-backbone_{BISSL_TAG}.pth",
                                                          f"BiSSL-upper-head_{BISSL_TAG}.pth"], f"BiSSL_{BISSL_TAG}"),
        Stage("fine-tuning", "fine-tuning.py", finetune_flags(images), [],
              f"finetune_pretext_pretext_{TAG}_bb_dset-imagefolder_hpo"),
    ]
    table = Table()
    started = time.monotonic()
    selected = options.stages.split(",")
    for stage in stages:
        if stage.name not in selected:
            continue
        for nproc in (1, 2):
            reference = fresh(base, seeds, f"{stage.name}-reference-{nproc}")
            clock = time.monotonic()
            code, output = run(stage, reference, nproc=nproc)
            duration = time.monotonic() - clock
            table.add(stage.name, f"uninterrupted reference, {nproc} process(es)", code == 0, f"{duration:.0f} s"
                      + ("" if code == 0 else f": {output[-400:]}"))
            if code != 0:
                continue
            kills = options.kills if nproc == 1 else 1
            for index in range(kills):
                kill_and_resume(table, stage, base, seeds, reference, duration, rng, f"kill -9 #{index + 1}, {nproc} proc", nproc)
            if nproc == 2:
                kill_and_resume(table, stage, base, seeds, reference, duration, rng, "one rank killed", 2, rank_only=True)
                launcher_killed(table, stage, base, seeds, reference, duration, rng)
                one_rank_sigterm(table, stage, base, seeds, reference, duration, rng)
                continue
            second_sigint(table, stage, base, seeds, reference, duration, rng)
            # The 1-process reference's run dir is done: reuse copies of it for the bad situations.
            done = reference
            checkpoint = stage.run_dir(done) / ("results.jsonl" if stage.name == "fine-tuning" else "checkpoint.pth")
            if stage.name != "fine-tuning":
                for fault, damage, needles in (
                    ("truncated checkpoint", lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 3]),
                     ["cannot resume from", "corrupt or truncated", "--resume 0"]),
                    ("empty checkpoint", lambda path: path.write_bytes(b""), ["is empty", "--resume 0"]),
                    ("foreign pickle as checkpoint", lambda path: torch.save(argparse.Namespace(x=1), path),
                     ["executing code", "--resume 0"]),
                ):
                    folder = fresh(base, done, f"{stage.name}-{fault}".replace(" ", "_"))
                    target = stage.run_dir(folder) / "checkpoint.pth"
                    damage(target)
                    saved = {name: (folder / name).read_bytes() for name in stage.outputs}
                    code, output = run(stage, folder)
                    intact = all((folder / name).read_bytes() == data for name, data in saved.items())
                    expect_failure(table, stage, fault, code, output, needles, intact, "outputs intact" if intact else "outputs changed")
                    code, output = run(stage, folder, "--resume", "0")
                    moved = any(path.name.startswith("previous-") for path in stage.run_dir(folder).iterdir())
                    table.add(stage.name, f"{fault}: --resume 0 starts over", code == 0 and moved and not same_outputs(stage, done, folder),
                              f"exit {code}, old run moved aside: {moved}")
            # Changed result-defining flags.
            changed = {"pre-training": ["--lr", "0.1"], "BiSSL": ["--lam", "0.01", "--d-lr", "0.01"],
                       "fine-tuning": ["--epochs", "3"]}[stage.name]
            folder = fresh(base, done, f"{stage.name}-changed".replace(" ", "_"))
            before = checkpoint.read_bytes() if checkpoint.exists() else b""
            code, output = run(stage, folder, *changed)
            after = (stage.run_dir(folder) / checkpoint.name).read_bytes()
            expect_failure(table, stage, f"rerun with {' '.join(changed)}", code, output,
                           ["other settings", changed[0], "--resume 0"], after == before)
            code, output = run(stage, folder, "--num-workers", "1")
            table.add(stage.name, "rerun with a result-neutral flag (--num-workers 1)", code == 0, f"exit {code}")
            # Two runs launched into one run directory at once.
            folder = fresh(base, seeds, f"{stage.name}-concurrent".replace(" ", "_"))
            first, second = launch(stage, folder), launch(stage, folder)
            outputs = [process.communicate(timeout=900)[0] for process in (first, second)]
            codes = [first.returncode, second.returncode]
            refused = [output for output in outputs if "in use by another run" in output]
            difference = same_outputs(stage, done, folder) if 0 in codes else "no run finished"
            table.add(stage.name, "two runs in one run dir", sorted(codes)[0] == 0 and codes.count(0) == 1 and len(refused) == 1
                      and not difference, f"exit codes {codes}; {difference or 'the finished one equals the reference'}")
            # Full disk under the run directory (a real tmpfs in a private mount namespace).
            if shutil.which("unshare") and stage.name != "fine-tuning":
                folder = fresh(base, seeds, f"{stage.name}-full-disk".replace(" ", "_"))
                run_dir = stage.run_dir(folder)
                run_dir.mkdir(parents=True)
                result = in_namespace(f"mount -t tmpfs -o size=40m tmpfs '{run_dir}' && {shell_command(stage, folder)}; "
                                      f"echo EXIT=$?; ls -a '{run_dir}'")
                if "EXIT=" not in result.stdout:
                    table.add(stage.name, "full disk", True, f"skipped: no private mount namespace ({result.stderr[-200:]})")
                else:
                    listing = result.stdout.split("EXIT=")[-1].split()[1:]
                    temporaries = [name for name in listing if ".tmp" in name]
                    expect_failure(table, stage, "full disk (40 MB tmpfs run dir)", 0 if "EXIT=0" in result.stdout else 1,
                                   result.stderr + result.stdout, ["no space left on"], not temporaries,
                                   f"temporaries left: {temporaries}")
                # Read-only --model-dir (the run dir elsewhere): refused at start, before any training.
                folder = fresh(base, seeds, f"{stage.name}-read-only".replace(" ", "_"))
                run_dir = base / f"{stage.name}-read-only-run".replace(" ", "_")
                result = in_namespace(f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' && "
                                      f"{shell_command(stage, folder, '--run-dir', str(run_dir))}")
                trained = (run_dir / "checkpoint.pth").exists()
                expect_failure(table, stage, "read-only --model-dir", result.returncode, result.stderr + result.stdout,
                               ["--model-dir", "not writable"], not trained,
                               "no training happened" if not trained else "it trained first")
    if "bad-input" in selected:
        bad_input(table, base, seeds, stages[0], stages[2])

    text = table.markdown() + f"\nwall time {time.monotonic() - started:.0f} s, kill moments seeded with --seed {options.seed}\n"
    print("\n" + text)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(header(options, load_before) + text)
    print(f"written to {options.out}")
    if not options.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(ok for *_, ok, _ in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
