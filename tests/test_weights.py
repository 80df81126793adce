"""Pretrained weights: key normalisation (every format, every refusal), load_weights on foreign
layouts, file verification, fetch with the download replaced, and the convert command."""
from __future__ import annotations

import logging
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision

from source.maths.models import Projector, build_backbone
from source.run.checkpoint import WeightsError, load_weights
from source.run.errors import EXIT_USER_ERROR, run_entry_point
from source.stages.bissl_run import load_lower_model
from source.stages.finetune_run import load_pretrained_backbone
from source.tools import weights
from tests.script_helpers import load_script

ARCH = "resnet18"  # the small one keeps the files (and the tests) light


def run_tool(argv: list[str]) -> int:
    """The exit status of ``python -m source.tools.weights <argv>`` (its entry point, in this process)."""
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(weights.main, weights.get_args_parser(), argv)
    return exit_info.value.code


@pytest.fixture(scope="module")
def backbone_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: value.clone() for key, value in build_backbone(ARCH)[0].state_dict().items()}


def head_state(prefix: str, in_dim: int = 512, mlp: str = "64-32") -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in Projector(in_dim, mlp).state_dict().items()}


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


def assert_same(state: dict, reference: dict) -> None:
    assert set(state) == set(reference)
    for key in reference:
        assert torch.equal(state[key], reference[key]), key


# --- normalisation: every accepted format ---------------------------------------------------

FORMATS = {
    "plain": lambda s: s,
    "ddp module. prefix": lambda s: prefixed(s, "module."),
    "backbone. prefix": lambda s: prefixed(s, "backbone."),
    "encoder. prefix": lambda s: prefixed(s, "encoder."),
    "state_dict wrapper": lambda s: {"state_dict": s, "epoch": 3},
    "model wrapper": lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    "module wrapper": lambda s: {"module": s},
    "lightning (solo-learn)": lambda s: {
        "epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.1.0",
        "state_dict": {**prefixed(s, "backbone."), **head_state("projector."),
                       "classifier.weight": torch.zeros(10, 512), "classifier.bias": torch.zeros(10)},
    },
    "ddp + backbone. chain": lambda s: prefixed(s, "module.backbone."),
    "torchvision full model with fc": lambda s: {**s, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)},
    "old file without BN counters": lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_normalize_maps_every_format_onto_the_backbone(fmt, backbone_state):
    result = weights.normalize_state_dict(FORMATS[fmt](backbone_state), backbone_state)
    assert result.fits
    expected = dict(backbone_state)
    if fmt == "old file without BN counters":
        for key in expected:
            if key.endswith("num_batches_tracked"):
                expected[key] = torch.tensor(0)
    assert_same(result.state, expected)
    assert bool(result.notes) == (fmt != "plain")  # every change is reported


def test_normalize_reports_what_it_dropped(backbone_state):
    result = weights.normalize_state_dict(FORMATS["lightning (solo-learn)"](backbone_state), backbone_state)
    text = "\n".join(result.notes)
    assert "'state_dict' entry" in text and "'backbone.'" in text
    assert "classifier.weight" in text and "projector.0.weight" in text
    result = weights.normalize_state_dict(FORMATS["torchvision full model with fc"](backbone_state), backbone_state)
    assert "fc.bias, fc.weight" in "\n".join(result.notes)


def test_real_torchvision_resnet_loads_without_its_classifier(tmp_path):
    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    backbone, _ = build_backbone(ARCH)
    load_weights(backbone, tmp_path / "resnet18.pth", "test backbone")
    assert torch.equal(backbone.conv1.weight, model.conv1.weight)


def test_byol_head_of_the_original_code_splits_into_projector_and_predictor():
    # The NeurIPS code saves head = Sequential(projector=..., predictor=...) in one file.
    head = {**head_state("projector.", 512, "64-32"), **head_state("predictor.", 32, "64-32")}
    projector = weights.normalize_state_dict(head, Projector(512, "64-32").state_dict())
    predictor = weights.normalize_state_dict(head, Projector(32, "64-32").state_dict())
    assert projector.fits and predictor.fits
    assert_same(projector.state, {k[len("projector."):]: v for k, v in head.items() if k.startswith("projector.")})
    assert_same(predictor.state, {k[len("predictor."):]: v for k, v in head.items() if k.startswith("predictor.")})


# --- normalisation: refusals ---------------------------------------------------------------

def test_unknown_prefix_is_not_guessed(backbone_state):
    result = weights.normalize_state_dict(prefixed(backbone_state, "student."), backbone_state)
    assert not result.fits
    assert weights.describe_mismatch(result.state, backbone_state).count("student.") > 0


def test_ambiguous_file_is_refused(backbone_state):
    both = {**prefixed(backbone_state, "backbone."), **prefixed(backbone_state, "encoder.")}
    with pytest.raises(WeightsError, match="ambiguous.*'backbone.'.*'encoder.'"):
        weights.normalize_state_dict(both, backbone_state)


@pytest.mark.parametrize("obj, message", [
    ([1, 2], "holds a list, not a state dict"),
    ({}, "empty dict"),
    ({"epoch": 3, "args": {"lr": 0.1}}, "top-level entries that are not tensors: args, epoch"),
])
def test_objects_without_a_state_dict_are_refused(obj, message, backbone_state):
    with pytest.raises(WeightsError, match=message):
        weights.normalize_state_dict(obj, backbone_state)


# --- load_weights (what all three scripts call) ----------------------------------------------

@pytest.mark.parametrize("prefix", ["module.", "backbone."])
def test_load_weights_strips_prefixes_and_logs_it(prefix, tmp_path, backbone_state, caplog):
    torch.save(prefixed(backbone_state, prefix), tmp_path / "bb.pth")
    backbone, _ = build_backbone(ARCH)
    with caplog.at_level(logging.INFO, logger="source.run.checkpoint"):
        load_weights(backbone, tmp_path / "bb.pth", "pretext backbone")
    assert_same(backbone.state_dict(), backbone_state)
    assert f"stripped the prefix '{prefix}'" in caplog.text


def test_load_weights_still_lists_keys_that_do_not_fit(tmp_path, backbone_state):
    torch.save(prefixed(backbone_state, "student."), tmp_path / "bb.pth")
    with pytest.raises(WeightsError, match=r"missing keys: bn1\.bias.*\n.*unexpected keys: student\."):
        load_weights(build_backbone(ARCH)[0], tmp_path / "bb.pth", "pretext backbone")


def test_load_weights_never_unpickles_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv1.weight": Payload()}, protocol=2))
    with pytest.raises(WeightsError, match="cannot load"):
        load_weights(build_backbone(ARCH)[0], tmp_path / "evil.pth", "pretext backbone")


# --- verification ----------------------------------------------------------------------------

def test_verify_accepts_real_files_and_reads_their_shape(tmp_path, backbone_state):
    torch.save(prefixed(backbone_state, "module."), tmp_path / f"Pretext_simclr_arch-{ARCH}_backbone_id-x1.pth")
    torch.save(head_state("projector."), tmp_path / f"Pretext_simclr_arch-{ARCH}_head_id-x1.pth")
    cifar = build_backbone(ARCH, cifar_stem=True)[0].state_dict()
    torch.save(cifar, tmp_path / f"pretext_simclr_arch-{ARCH}_bb.pth")
    checks = {check.path.name: check for check in weights.verify_folder(tmp_path)}
    assert all(check.ok for check in checks.values()), [c.message for c in checks.values()]
    assert checks[f"Pretext_simclr_arch-{ARCH}_head_id-x1.pth"].mlp == "64-32"
    assert checks[f"pretext_simclr_arch-{ARCH}_bb.pth"].cifar_stem
    assert not checks[f"Pretext_simclr_arch-{ARCH}_backbone_id-x1.pth"].cifar_stem


def test_verify_flags_broken_empty_and_mismatched_files(tmp_path, backbone_state):
    good = tmp_path / "good.pth"
    torch.save(backbone_state, good)
    (tmp_path / f"pretext_simclr_arch-{ARCH}_bb.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / f"pretext_byol_arch-{ARCH}_bb.pth").write_bytes(b"")
    torch.save(backbone_state, tmp_path / "BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth")  # resnet18 inside
    torch.save(head_state("projector.", 2048), tmp_path / f"pretext_simclr_arch-{ARCH}_proj.pth")  # a resnet50 head
    checks = {check.path.name: check for check in weights.verify_folder(tmp_path)}
    assert checks["good.pth"].ok and "not checked" in checks["good.pth"].message
    assert not checks[f"pretext_simclr_arch-{ARCH}_bb.pth"].ok
    assert "weights_only=True" in checks[f"pretext_simclr_arch-{ARCH}_bb.pth"].message
    assert "empty" in checks[f"pretext_byol_arch-{ARCH}_bb.pth"].message
    mismatch = checks["BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth"]
    assert not mismatch.ok and "resnet50" in mismatch.message and "layer1.0.conv3.weight" in mismatch.message
    assert "2048 wide, but resnet18 gives 512" in checks[f"pretext_simclr_arch-{ARCH}_proj.pth"].message


def test_published_names_of_both_code_versions_parse():
    name = weights.parse_weights_name("BiSSL_byol_classification_cub200_arch-resnet50_lower_backbone_id-6lt5gn5i.pth")
    assert (name.origin, name.role, name.pretext, name.arch, name.dset) == ("bissl", "backbone", "byol", "resnet50", "cub2011")
    name = weights.parse_weights_name("BiSSL_simclr_object_detection_voc07+12detection_arch-resnet50_lower_backbone_id-ex0h4thd.pth")
    assert name.task == "object_detection"
    name = weights.parse_weights_name("pretext_byol_arch-resnet50_pred.pth")
    assert (name.origin, name.role) == ("pretext", "predictor")
    assert weights.parse_weights_name("random.pth") is None


# --- fetch (download replaced) ---------------------------------------------------------------

def fake_download(files: dict[str, object]):
    def download(model_dir: Path, url: str = weights.PUBLISHED_FOLDER_URL) -> None:
        for name, obj in files.items():
            path = Path(model_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(obj, bytes):
                path.write_bytes(obj)
            else:
                torch.save(obj, path)
    return download


def test_fetch_lists_verifies_and_prints_the_commands(tmp_path, monkeypatch, capsys, backbone_state):
    byol_head = {**head_state("projector."), **head_state("predictor.", 32, "64-32")}
    monkeypatch.setattr(weights, "download_published", fake_download({
        f"Pretext_simclr_arch-{ARCH}_backbone_id-hb1.pth": backbone_state,
        f"Pretext_simclr_arch-{ARCH}_head_id-hb1.pth": head_state("projector."),
        f"Pretext_byol_arch-{ARCH}_backbone_id-by1.pth": backbone_state,
        f"Pretext_byol_arch-{ARCH}_head_id-by1.pth": byol_head,
        f"BiSSL_simclr_classification_pets_arch-{ARCH}_lower_backbone_id-iz1.pth": backbone_state,
        f"BiSSL_simclr_classification_pets_arch-{ARCH}_config_id-iz1.json": b"{}",
    }))
    assert weights.fetch(tmp_path / "models") == 0
    out = capsys.readouterr().out
    assert "6 new or changed file(s)" in out and f"BiSSL_simclr_classification_pets_arch-{ARCH}_config_id-iz1.json" in out
    assert "BAD" not in out
    dir_flag = f" --model-dir '{tmp_path / 'models'}'"
    assert (f"torchrun --nproc-per-node 4 bissl.py --d-dset 'pets' --p-pretext-type 'simclr' --arch {ARCH} "
            f"--p-pretrained-backbone-filename 'Pretext_simclr_arch-{ARCH}_backbone_id-hb1.pth' "
            f"--p-pretrained-proj-filename 'Pretext_simclr_arch-{ARCH}_head_id-hb1.pth' --p-mlp 64-32{dir_flag}") in out
    assert (f"--p-pretrained-proj-filename 'Pretext_byol_arch-{ARCH}_head_id-by1.pth' "
            f"--p-pretrained-pred-filename 'Pretext_byol_arch-{ARCH}_head_id-by1.pth'") in out
    assert (f"torchrun --nproc-per-node 4 fine-tuning.py --dset 'pets' --pretrained-backbone-filename "
            f"'BiSSL_simclr_classification_pets_arch-{ARCH}_lower_backbone_id-iz1.pth' --backbone-origin 'bissl' "
            f"--pretrain-arch {ARCH} --num-runs 100 --use-hpo 1{dir_flag}") in out


def test_fetch_fails_on_a_broken_download(tmp_path, monkeypatch, capsys, backbone_state):
    monkeypatch.setattr(weights, "download_published", fake_download({
        f"pretext_simclr_arch-{ARCH}_bb.pth": b"<html>Google Drive quota exceeded</html>",
    }))
    assert weights.fetch(tmp_path) == 1
    assert f"BAD  pretext_simclr_arch-{ARCH}_bb.pth: cannot be loaded with weights_only=True" in capsys.readouterr().out


def test_fetch_calls_gdown_with_what_its_version_supports(tmp_path, monkeypatch, capsys, backbone_state):
    calls = []

    def download_folder(url=None, id=None, output=None, quiet=False, resume=False):  # gdown 6: no remaining_ok
        calls.append(dict(url=url, output=output, resume=resume))
        torch.save(backbone_state, Path(output) / f"pretext_simclr_arch-{ARCH}_bb.pth")
        return [str(Path(output) / f"pretext_simclr_arch-{ARCH}_bb.pth")]

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download_folder=download_folder))
    assert weights.main(weights.get_args_parser().parse_args(["fetch", "--model-dir", str(tmp_path)])) == 0
    assert calls == [dict(url=weights.PUBLISHED_FOLDER_URL, output=str(tmp_path), resume=True)]
    assert f"ok   pretext_simclr_arch-{ARCH}_bb.pth: {ARCH} backbone" in capsys.readouterr().out


def test_fetch_reports_a_failed_download_after_checking_what_arrived(tmp_path, monkeypatch, capsys, backbone_state):
    def download_folder(url=None, output=None, quiet=False):
        torch.save(backbone_state, Path(output) / f"pretext_simclr_arch-{ARCH}_bb.pth")
        raise OSError("Failed to download the following files: ...")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download_folder=download_folder))
    assert run_tool(["fetch", "--model-dir", str(tmp_path)]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert f"ok   pretext_simclr_arch-{ARCH}_bb.pth" in captured.out
    assert "gdown could not download" in captured.err and "in a browser" in captured.err


def test_fetch_without_gdown_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)  # makes `import gdown` raise ImportError
    with pytest.raises(weights.FetchError, match="pip install gdown"):
        weights.download_published(tmp_path)


# --- convert ---------------------------------------------------------------------------------

def test_convert_writes_a_file_the_scripts_load(tmp_path, backbone_state, capsys):
    checkpoint = FORMATS["lightning (solo-learn)"](backbone_state)
    torch.save(checkpoint, tmp_path / "solo.ckpt")
    assert weights.main(weights.get_args_parser().parse_args(
        ["convert", str(tmp_path / "solo.ckpt"), str(tmp_path / "bb.pth"), "--arch", ARCH])) == 0
    assert "stripped the prefix 'backbone.'" in capsys.readouterr().out
    converted = torch.load(tmp_path / "bb.pth", weights_only=True)
    assert_same(converted, backbone_state)
    assert weights.main(weights.get_args_parser().parse_args(
        ["convert", str(tmp_path / "solo.ckpt"), str(tmp_path / "proj.pth"), "--arch", ARCH, "--part", "projector"])) == 0
    projector = {k[len("projector."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("projector.")}
    assert_same(torch.load(tmp_path / "proj.pth", weights_only=True), projector)


def test_convert_refuses_what_it_cannot_map_and_lists_the_keys(tmp_path, backbone_state, capsys):
    torch.save(prefixed(backbone_state, "student."), tmp_path / "other.pth")
    assert run_tool(["convert", str(tmp_path / "other.pth"), str(tmp_path / "out.pth"), "--arch", ARCH]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "cannot be mapped onto a resnet18 backbone" in err and "unexpected keys: student.bn1.bias" in err
    assert not (tmp_path / "out.pth").exists()
    torch.save(backbone_state, tmp_path / "r18.pth")
    assert run_tool(["convert", str(tmp_path / "r18.pth"), str(tmp_path / "out.pth"), "--arch", "resnet50"]) == EXIT_USER_ERROR
    assert "layer1.0.conv3.weight" in capsys.readouterr().err


# --- the entry scripts load foreign layouts ----------------------------------------------------

def test_fine_tuning_loads_a_ddp_backbone(tmp_path, backbone_state):
    torch.save({"state_dict": prefixed(backbone_state, "module.")}, tmp_path / "ddp_bb.pth")
    script = load_script("fine-tuning.py")
    args = script.get_args_parser().parse_args(["--model-dir", str(tmp_path), "--pretrain-arch", ARCH,
                                                "--pretrained-backbone-filename", "ddp_bb.pth"])
    assert_same(load_pretrained_backbone(args), backbone_state)


def test_bissl_loads_the_original_codes_byol_backbone_and_head(tmp_path, backbone_state):
    # NeurIPS-code files: a backbone and one head file holding projector.* and predictor.*;
    # the head file is passed as both the projector and the predictor file.
    head = {**head_state("projector.", 512, "64-32"), **head_state("predictor.", 32, "64-32")}
    torch.save(prefixed(backbone_state, "backbone."), tmp_path / "bb.pth")
    torch.save(head, tmp_path / "head.pth")
    script = load_script("bissl.py")
    args = script.get_args_parser().parse_args([
        "--model-dir", str(tmp_path), "--arch", ARCH, "--p-pretext-type", "byol", "--p-mlp", "64-32",
        "--p-pretrained-backbone-filename", "bb.pth", "--p-pretrained-proj-filename", "head.pth",
        "--p-pretrained-pred-filename", "head.pth"])
    model = load_lower_model(args)
    assert_same(model.backbone.state_dict(), backbone_state)
    assert_same(model.projector.state_dict(), {k[10:]: v for k, v in head.items() if k.startswith("projector.")})
    assert_same(model.predictor.state_dict(), {k[10:]: v for k, v in head.items() if k.startswith("predictor.")})
