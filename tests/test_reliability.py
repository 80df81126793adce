"""Reliability under faults and bad input: identical ranks, reruns that never mix settings,
run-directory locks, atomic saves, finite checkpoints and clear messages (issue 10).

The expensive part is one real 2-process BiSSL run killed after its 2nd checkpoint and rerun;
everything else runs in-process or in short subprocesses. ``python -m tests.fault_table`` repeats the
whole fault list (random kill -9 moments in every stage, a real full disk, ...) at larger scale.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import source.run.checkpoint as ckpt
from source.maths.models import Projector, build_backbone
from source.run.checkpoint import CheckpointError, DivergedStateError, WeightsError
from source.run.distributed import broadcast_module_, check_ranks_identical
from source.run.errors import UserError
from source.run.runtime import RunDirBusyError, RunDirLock, RunSettingsError, changed_settings, check_writable, move_run_aside
from source.run.tracking import MetricsWriter
from tests.distributed_harness import run_in_processes
from tests.script_helpers import ROOT, command, kill_tree, load_script, make_image_folder, run_script, script_env

SCRIPTS = ("ssl_pre-training.py", "bissl.py", "fine-tuning.py")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=2, per_class=16, size=16)


# --------------------------------------------------------------------------- parse-time validation
INVALID = {
    "ssl_pre-training.py": [("--epochs", "0"), ("--batch-size", "0"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"),
                            ("--wd", "-1e-6"), ("--warmup-epochs", "-1"), ("--seed", "-1"), ("--log-every", "0"),
                            ("--momentum", "1.5"), ("--temperature", "0"), ("--img-crop-min-ratio", "0"),
                            ("--num-workers", "-2"), ("--max-train-samples", "-5")],
    "bissl.py": [("--epochs", "0"), ("--lower-num-iter", "0"), ("--upper-num-iter", "0"), ("--d-lr", "-0.1"),
                 ("--p-lr", "nan"), ("--cg-iter-num", "-1"), ("--lam", "-0.001"), ("--d-batch-size", "0"),
                 ("--p-batch-size", "0"), ("--d-linear-warmup-epochs", "-1"), ("--grad-clip", "0"),
                 ("--val-fraction", "1"), ("--prefetch-factor", "0")],  # (no --log-every: it logs per alternation)
    "fine-tuning.py": [("--epochs", "0"), ("--num-runs", "0"), ("--lr", "0"), ("--batch-size", "0"),
                       ("--hpo-lr-min", "0"), ("--hpo-wd-max", "-1"), ("--seed", "-7")],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_invalid_counts_and_rates_are_refused_naming_the_flag(script, capsys):
    parser = load_script(script).get_args_parser()
    for flag, value in INVALID[script]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([flag, value])
        assert exit_info.value.code == 2, (flag, value)
        assert f"argument {flag}:" in capsys.readouterr().err, (flag, value)
    # Every float flag, including ones added later, refuses non-finite values.
    for action in parser._actions:
        if action.option_strings and getattr(action.type, "__name__", "") == "float":
            with pytest.raises(SystemExit):
                parser.parse_args([action.option_strings[0], "nan"])
    capsys.readouterr()


def test_flag_relations_are_checked_and_the_control_variant_stays_valid(capsys):
    parser = load_script("bissl.py").get_args_parser()
    assert parser.parse_args(["--cg-iter-num", "0"]).cg_iter_num == 0  # x = 0: the no-implicit-gradient control
    assert parser.parse_args(["--lam", "0"]).lam == 0  # damping keeps lam + delta > 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--lam", "0", "--cg-lam-dampening", "0"])
    assert "--lam + --cg-lam-dampening must be > 0" in capsys.readouterr().err
    finetune = load_script("fine-tuning.py").get_args_parser()
    with pytest.raises(SystemExit):
        finetune.parse_args(["--hpo-lr-min", "0.5", "--hpo-lr-max", "0.1"])
    assert "--hpo-lr-min 0.5 is above --hpo-lr-max 0.1" in capsys.readouterr().err


def test_epochs_zero_exits_before_writing_anything(images, tmp_path, capsys):
    precious = tmp_path / "pretext_simclr_arch-resnet18_bb.pth"
    precious.write_bytes(b"trained weights")
    script = load_script("ssl_pre-training.py")  # its __main__: main(get_args_parser().parse_args())
    with pytest.raises(SystemExit) as exit_info:
        script.main(script.get_args_parser().parse_args(pretrain_flags(images, tmp_path, "--epochs", "0")))
    assert exit_info.value.code == 2 and "argument --epochs: must be >= 1, got 0" in capsys.readouterr().err
    assert precious.read_bytes() == b"trained weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == [precious.name]


# --------------------------------------------------------------------------- atomic saves
def test_a_full_disk_leaves_no_temporary_file_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    ckpt.save_atomic({"step": 1}, target)

    def disk_fills_up(obj, handle):
        handle.write(b"x" * 65536)  # part of the file made it to disk
        try:
            handle.write(b"x")  # stands for the write that hit the full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # what torch.save turns it into
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(ckpt.torch, "save", disk_fills_up)
    with pytest.raises(OSError, match=f"no space left on {tmp_path}"):
        ckpt.save_atomic({"step": 2}, target)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pth"]
    assert torch.load(target, weights_only=True) == {"step": 1}

    def interrupted(obj, handle):
        handle.write(b"x" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"step": 3}, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_stale_temporaries_are_swept_but_live_writers_are_left_alone(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    stale = tmp_path / f".checkpoint.pth.tmp{dead_pid}"
    live = tmp_path / f".pretext_bb.pth.tmp{os.getppid()}"  # our parent is alive
    other = tmp_path / f".unrelated.pth.tmp{dead_pid}"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert ckpt.sweep_temporaries(tmp_path, ("pretext_", "checkpoint"), only_dead=True) == [stale]
    assert live.exists() and other.exists()
    assert sorted(ckpt.sweep_temporaries(tmp_path)) == sorted([live, other])


# --------------------------------------------------------------------------- clear messages
def test_corrupt_and_foreign_checkpoints_are_refused_with_the_file_and_the_way_out(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, good)
    cases = {
        "empty.pth": (b"", "is empty"),
        "text.pth": (b"not a checkpoint at all\n" * 10, "not a PyTorch file"),
        "truncated.pth": (good.read_bytes()[: good.stat().st_size // 2], "corrupt or truncated"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save(argparse.Namespace(evil=1), tmp_path / "pickle.pth")  # needs code execution to load
    cases["pickle.pth"] = (None, "only load by executing code")
    torch.save({"model": {}}, tmp_path / "foreign.pth")
    cases["foreign.pth"] = (None, "no 'epoch'")
    for name, (_, reason) in cases.items():
        with pytest.raises(CheckpointError) as error:
            ckpt.load_checkpoint(tmp_path / name, ("model", "epoch"))
        message = str(error.value)
        assert str(tmp_path / name) in message and reason in message and "--resume 0" in message, message
        assert "weights_only=False" not in message
    assert ckpt.load_checkpoint(good, ("model", "epoch"))["epoch"] == 1


def test_weight_files_empty_or_prefixed(tmp_path):
    backbone, _ = build_backbone("resnet18")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="is empty"):
        ckpt.load_weights(backbone, tmp_path / "empty.pth", "pretext backbone")
    other, _ = build_backbone("resnet18", cifar_stem=True)
    torch.save(other.state_dict(), tmp_path / "stem.pth")
    with pytest.raises(WeightsError, match="check --pretrain-arch / --pretrain-cifar-stem"):
        ckpt.load_weights(backbone, tmp_path / "stem.pth", "backbone", flags="--pretrain-arch / --pretrain-cifar-stem")
    source_model, _ = build_backbone("resnet18")
    for prefix in ("module.", "backbone."):  # what DDP and other SSL codebases write
        torch.save({prefix + key: value for key, value in source_model.state_dict().items()}, tmp_path / "prefixed.pth")
        target, _ = build_backbone("resnet18")
        ckpt.load_weights(target, tmp_path / "prefixed.pth", "backbone")
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source_model.state_dict().values()))


def test_wandb_without_an_api_key_says_how_to_fix_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(RuntimeError) as error:
        MetricsWriter(tmp_path / "run", True, {}, "bissl-tests", "online")
    assert "no wandb API key" in str(error.value) and "wandb login" in str(error.value)
    assert "--wandb-mode offline" in str(error.value)


def test_model_dir_that_cannot_be_written_fails_at_start(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="--model-dir .* is not writable"):
        check_writable(tmp_path / "a_file" / "models", "--model-dir")
    check_writable(tmp_path / "models", "--model-dir")
    assert list((tmp_path / "models").iterdir()) == []


# --------------------------------------------------------------------------- finite checkpoints
def test_non_finite_or_exploding_state_is_never_saved():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].running_var.fill_(1e8)  # large statistics alone (inputs in 0-255) are no divergence
    ckpt.check_healthy({"model": model}, "in a test", max_rms=1e4, max_buffer_rms=1e12)
    model[1].running_var[2] = math.inf  # what the last step before a NaN loss can leave behind
    with pytest.raises(DivergedStateError, match=r"model\.1\.running_var is not finite"):
        ckpt.check_healthy({"model": model}, "in a test", max_rms=1e4, max_buffer_rms=1e12)
    model[1].running_var.fill_(1.0)
    with torch.no_grad():
        model[0].weight.fill_(1e19)  # the loss of a BN network can stay finite with such weights
    with pytest.raises(DivergedStateError, match=r"model\.0\.weight has root-mean-square 1e\+19"):
        ckpt.check_healthy({"model": model}, "in a test", max_rms=1e4, max_buffer_rms=1e12)
    with torch.no_grad():
        model[0].weight.fill_(0.1)
    model[1].running_var.fill_(1e22)  # what SGD at lr 1e6 leaves after 6 steps
    with pytest.raises(DivergedStateError, match=r"model\.1\.running_var has root-mean-square 1e\+22"):
        ckpt.check_healthy({"model": model}, "in a test", max_rms=1e4, max_buffer_rms=1e12)


# --------------------------------------------------------------------------- changed flags
def test_changed_settings_are_listed_and_new_flags_match_their_default():
    parser = argparse.ArgumentParser()
    for flag, default in (("--lr", 0.5), ("--batch-size", 16), ("--device", "auto"), ("--new-switch", 0)):
        parser.add_argument(flag, type=type(default), default=default)
    saved = {"lr": 0.5, "batch_size": 16, "device": "cuda"}  # written before --new-switch existed
    assert changed_settings(saved, parser.parse_args(["--device", "cpu"]), parser) == []
    changes = changed_settings(saved, parser.parse_args(["--lr", "0.1", "--batch-size", "32", "--new-switch", "1"]), parser)
    assert changes == ["--batch-size: 16 in the run, 32 now", "--lr: 0.5 in the run, 0.1 now",
                       "--new-switch: not recorded in the run (the flag is newer; it ran as the default 0), 1 now"]
    inputs = {"content of --weights": "a" * 64}
    assert changed_settings(saved, parser.parse_args([]), parser, saved_inputs=inputs, inputs=inputs) == []
    moved = changed_settings(saved, parser.parse_args([]), parser, saved_inputs=inputs, inputs={"content of --weights": "b" * 64})
    assert moved == ["content of --weights: sha256 aaaaaaaaaaaa... in the run, bbbbbbbbbbbb... now"]


def test_decode_cache_flags_may_change_on_resume_and_hvp_precision_may_not():
    """Where images are decoded (issue 20) is how a sweep runs, not what it computes; the HVPs'
    precision changes the implicit gradient, so a BiSSL run cannot continue with another."""
    finetune = load_script("fine-tuning.py").get_args_parser()
    saved = vars(finetune.parse_args([]))
    cache_changed = ["--decode-cache", "off", "--decode-cache-max-gb", "2", "--decode-cache-dir", "/elsewhere",
                     "--decode-cache-side", "200"]
    assert changed_settings(saved, finetune.parse_args(cache_changed), finetune) == []
    assert changed_settings(saved, finetune.parse_args(["--epochs", "3"]), finetune) == ["--epochs: 400 in the run, 3 now"]
    bissl = load_script("bissl.py").get_args_parser()
    saved = vars(bissl.parse_args([]))
    assert changed_settings(saved, bissl.parse_args(["--hvp-precision", "bf16"]), bissl) == [
        "--hvp-precision: 'fp32' in the run, 'bf16' now"]
    del saved["hvp_precision"]  # a run recorded before the flag existed ran in fp32
    assert changed_settings(saved, bissl.parse_args(["--hvp-precision", "fp32"]), bissl) == []


def pretrain_flags(images: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["--pretext-type", "simclr", "--dset", "imagefolder", "--data-dir", str(images), "--arch", "resnet18",
            "--img-size", "16", "--epochs", "1", "--batch-size", "16", "--mlp", "32-16", "--lr", "0.5",
            "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0", "--model-dir", str(model_dir), *extra]


@pytest.mark.slow
def test_pretraining_rerun_with_other_flags_is_refused_and_resume_0_moves_the_run_aside(images, tmp_path):
    script = load_script("ssl_pre-training.py")
    script.main(script.get_args_parser().parse_args(pretrain_flags(images, tmp_path)))
    run_dir = tmp_path / "runs" / "pretext_simclr_arch-resnet18_dset-imagefolder"
    before = (run_dir / "checkpoint.pth").read_bytes()
    with pytest.raises(RunSettingsError) as error:
        script.main(script.get_args_parser().parse_args(pretrain_flags(images, tmp_path, "--lr", "0.1", "--batch-size", "8")))
    assert "--lr: 0.5 in the run, 0.1 now" in str(error.value) and "--batch-size: 16 in the run, 8 now" in str(error.value)
    assert "--resume 0" in str(error.value)
    assert (run_dir / "checkpoint.pth").read_bytes() == before
    # Flags that do not change the result may change.
    script.main(script.get_args_parser().parse_args(pretrain_flags(images, tmp_path, "--num-workers", "1", "--log-every", "3")))
    # --resume 0 starts over without appending to or overwriting the old run.
    rows_before = (run_dir / "metrics.jsonl").read_text()
    script.main(script.get_args_parser().parse_args(pretrain_flags(images, tmp_path, "--lr", "0.1", "--resume", "0")))
    previous = [path for path in run_dir.iterdir() if path.name.startswith("previous-")]
    assert len(previous) == 1 and (previous[0] / "metrics.jsonl").read_text() == rows_before
    assert (previous[0] / "checkpoint.pth").read_bytes() == before
    assert torch.load(run_dir / "checkpoint.pth", weights_only=True)["args"]["lr"] == 0.1


@pytest.mark.slow
def test_finetuning_refuses_other_settings_and_another_backbone_and_fails_when_every_trial_fails(images, tmp_path):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    ckpt.save_atomic(backbone.state_dict(), tmp_path / "bb.pth")
    script = load_script("fine-tuning.py")

    def flags(*extra: str) -> list[str]:
        return ["--dset", "imagefolder", "--data-dir", str(images), "--model-dir", str(tmp_path),
                "--pretrained-backbone-filename", "bb.pth", "--pretrain-arch", "resnet18", "--pretrain-cifar-stem", "1",
                "--pretrain-img-size", "8", "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--num-workers", "0",
                "--use-hpo", "0", "--num-runs", "1", "--lr", "0.01", *extra]

    script.main(script.get_args_parser().parse_args(flags()))
    with pytest.raises(RunSettingsError, match="--epochs: 1 in the run, 2 now"):
        script.main(script.get_args_parser().parse_args(flags("--epochs", "2")))
    torch.manual_seed(1)
    other, _ = build_backbone("resnet18", cifar_stem=True)
    ckpt.save_atomic(other.state_dict(), tmp_path / "bb.pth")  # same name, other weights
    with pytest.raises(RunSettingsError, match="content of --pretrained-backbone-filename: sha256"):
        script.main(script.get_args_parser().parse_args(flags()))
    # A sweep in which every trial diverged is a failure.
    with pytest.raises(UserError, match="every one of the 1 finished trials failed"):
        script.main(script.get_args_parser().parse_args(flags("--lr", "1e6", "--run-dir", str(tmp_path / "diverging"))))


# --------------------------------------------------------------------------- run-directory lock
LOCK_HOLDER = ("import sys, time; from source.run.runtime import RunDirLock; lock = RunDirLock(sys.argv[1]).acquire(); "
               "print('locked', flush=True); time.sleep(120)")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_locked_run_dir_refuses_a_second_run_and_a_killed_holder_leaves_no_stale_lock(images, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], cwd=ROOT, env=script_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusyError, match=f"in use by another run \\(pid {holder.pid} on"):
            RunDirLock(run_dir).acquire()
        script = load_script("ssl_pre-training.py")
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            script.main(script.get_args_parser().parse_args(pretrain_flags(images, tmp_path, "--run-dir", str(run_dir))))
        assert sorted(path.name for path in run_dir.iterdir()) == ["run.lock"]  # the second run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.monotonic()
    RunDirLock(run_dir).acquire().release()
    assert time.monotonic() - started < 2


def test_move_run_aside_keeps_everything(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"c")
    (tmp_path / "wandb").mkdir()
    (tmp_path / "run.lock").write_text("pid 1 on host")
    moved = move_run_aside(tmp_path)
    assert sorted(path.name for path in moved.iterdir()) == ["checkpoint.pth", "wandb"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["run.lock", moved.name])
    assert move_run_aside(tmp_path) is None


# --------------------------------------------------------------------------- identical ranks
def _rank_checks(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)  # as the scripts: every rank seeds differently
    head = nn.Linear(4, 3)
    out = {}
    try:
        check_ranks_identical({"head": head}, "in a test")
    except RuntimeError as error:
        out["error"] = str(error)
    broadcast_module_(head)
    out["fingerprints"] = check_ranks_identical({"head": head}, "after the broadcast")["head"]
    return out


@pytest.mark.multiprocess
def test_rank_fingerprints_catch_a_different_model_and_broadcast_makes_them_equal():
    results = run_in_processes(_rank_checks, world_size=2)
    for result in results:
        assert "ranks hold different models in a test: head" in result["error"]
        assert result["fingerprints"][0] == result["fingerprints"][1]


@pytest.fixture(scope="module")
def pretext_models(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("pretext")
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    ckpt.save_atomic(backbone.state_dict(), models / "pretext_simclr_arch-resnet18_bb.pth")
    ckpt.save_atomic(Projector(dim, "32-16").state_dict(), models / "pretext_simclr_arch-resnet18_proj.pth")
    return models


def bissl_flags(images: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["--d-dset", "imagefolder", "--p-dset", "imagefolder", "--data-dir", str(images), "--p-pretext-type", "simclr",
            "--arch", "resnet18", "--img-size", "16", "--cg-iter-num", "1", "--p-mlp", "32-16",
            "--p-pretrained-backbone-filename", "pretext_simclr_arch-resnet18_bb.pth",
            "--p-pretrained-proj-filename", "pretext_simclr_arch-resnet18_proj.pth",
            "--epochs", "3", "--lower-num-iter", "1", "--upper-num-iter", "2", "--d-linear-warmup-epochs", "1",
            "--p-batch-size", "8", "--d-batch-size", "8", "--device", "cpu", "--num-workers", "0",
            "--model-dir", str(model_dir), *extra]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.long
def test_two_rank_bissl_killed_after_its_second_checkpoint_resumes_to_the_uninterrupted_result(images, pretext_models, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        folder.mkdir()
        for weights in pretext_models.iterdir():
            (folder / weights.name).write_bytes(weights.read_bytes())
    run_script("bissl.py", *bissl_flags(images, straight), nproc=2)

    checkpoint = resumed / "runs" / "BiSSL_simclr_arch-resnet18_dset-imagefolder" / "checkpoint.pth"
    process = subprocess.Popen(command("bissl.py", *bissl_flags(images, resumed), nproc=2), cwd=ROOT, env=script_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, alternation = time.time() + 240, 0
    while time.time() < deadline and process.poll() is None and alternation < 1:  # checkpoint 0, then 1
        time.sleep(0.1)
        try:
            alternation = torch.load(checkpoint, weights_only=True)["alternation"]
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
    kill_tree(process)  # torchrun and both ranks, as a node failure would
    assert 1 <= alternation < 3, f"killed after alternation {alternation}"
    result = run_script("bissl.py", *bissl_flags(images, resumed), nproc=2)
    assert "resumed from" in result.stderr
    for name in ("BiSSL-backbone", "BiSSL-upper-backbone", "BiSSL-upper-head"):
        want = torch.load(straight / f"{name}_simclr_arch-resnet18_dset-imagefolder.pth", weights_only=True)
        got = torch.load(resumed / f"{name}_simclr_arch-resnet18_dset-imagefolder.pth", weights_only=True)
        for key in want:
            assert torch.allclose(want[key].float(), got[key].float(), atol=1e-6, rtol=0), (name, key)
    history = json.loads((resumed / "BiSSL_simclr_arch-resnet18_dset-imagefolder_config.json").read_text())["history"]
    assert [row["alternation"] for row in history] == [1, 2, 3]

    # A rerun with other result-defining flags is refused, listing each one.
    script = load_script("bissl.py")
    with pytest.raises(RunSettingsError) as error:
        script.main(script.get_args_parser().parse_args(bissl_flags(images, resumed, "--d-lr", "0.01", "--lam", "0.01")))
    assert "--d-lr: 0.03 in the run, 0.01 now" in str(error.value) and "--lam: 0.001 in the run, 0.01 now" in str(error.value)
    torch.manual_seed(5)
    (resumed / "pretext_simclr_arch-resnet18_proj.pth").unlink()
    ckpt.save_atomic(Projector(512, "32-16").state_dict(), resumed / "pretext_simclr_arch-resnet18_proj.pth")
    with pytest.raises(RunSettingsError, match="content of --p-pretrained-proj-filename"):
        script.main(script.get_args_parser().parse_args(bissl_flags(images, resumed)))
