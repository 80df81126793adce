"""Pretrained weights: fetch the published BiSSL weights, convert anyone's, check a folder.

    python -m source.tools.weights fetch   [--model-dir models]     # download, verify, print commands
    python -m source.tools.weights verify  [--model-dir models]     # the same checks, no download
    python -m source.tools.weights convert IN OUT --arch resnet50 [--part backbone|projector|predictor]

Every file is read with ``torch.load(..., weights_only=True)``: nothing here executes code from
a weights file.

Foreign key layouts (wrappers, ``module.``/``backbone.`` prefixes, a ResNet ``fc.*`` classifier,
missing BatchNorm counters) are mapped onto our modules by
:func:`source.run.state_dict.normalize_state_dict`, the same function that
:func:`source.run.checkpoint.load_weights` uses, so the scripts load a converted and an
unconverted file alike.
A file that matches none of these is refused with the keys that did not fit.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import config_default as cfg
from source.data import DOWNSTREAM_DATASETS
from source.maths.models import ARCHS, Projector, build_backbone
from source.run.checkpoint import load_file, save_atomic
from source.run.errors import CommandLineParser, UserError, add_debug_argument, run_entry_point
from source.run.state_dict import (
    WeightsError,
    candidate_prefixes,
    describe_mismatch,
    normalize_state_dict,
    show_keys,
    unwrap_state_dict,
)

logger = logging.getLogger(__name__)

# The Google Drive folder linked from the original BiSSL READMEs (ICML'25 and NeurIPS'25 versions).
PUBLISHED_FOLDER_URL = "https://drive.google.com/drive/folders/120GUKlcpeh3rhKq9W_-6lSHCKWhQx7gB"

PARTS = ("backbone", "projector", "predictor")

# The original NeurIPS code names some downstream datasets differently.
DATASET_ALIASES = {"cub200": "cub2011", "voc07": "voc2007"}


def _subtree(state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The entries under the shortest prefix chain ending in ``name.`` (e.g. ``head.projector.``),
    or ``state`` itself if there is none."""
    prefix = next((p for p in candidate_prefixes(state) if p.endswith(f"{name}.")), "")
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def infer_mlp(state: Mapping[str, Tensor]) -> tuple[int, str]:
    """(input width, ``--mlp`` spec) of a :class:`~source.maths.models.Projector` state dict, read from
    the shapes of its Linear weights ``<i>.weight`` (out, in) in layer order."""
    linears = sorted((int(key.split(".")[0]), value) for key, value in state.items()
                     if key.split(".")[0].isdigit() and key.endswith(".weight") and value.ndim == 2)
    if not linears:
        raise WeightsError(f"no Linear layer '<i>.weight' of an MLP head among the keys {show_keys(state)}")
    return int(linears[0][1].shape[1]), "-".join(str(int(value.shape[0])) for _, value in linears)


def feature_width(arch: str) -> int:
    """Width of the backbone's output features (512 for resnet18, 2048 for resnet50)."""
    return build_backbone(arch)[1]


def build_part(part: str, arch: str, cifar_stem: bool = False, mlp: str = "", in_dim: int = 0) -> nn.Module:
    """The module a weights file of ``part`` must fit: the backbone, or a projector/predictor
    ``Projector(in_dim or the backbone's width, mlp)``."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: {PARTS}")
    if part == "backbone":
        return build_backbone(arch, cifar_stem)[0]
    return Projector(in_dim or feature_width(arch), mlp)


# --- published file names ----------------------------------------------------------------

_ARCH = r"(?P<arch>[a-z0-9]+)"
_PRETEXT = r"(?P<pretext>simclr|byol)"
NAME_PATTERNS = (
    # ICML'25 code and this codebase: pretext_<type>_arch-<arch>_{bb,proj,pred}.pth, BiSSL-backbone_..._dset-<d>.pth
    (re.compile(rf"pretext_{_PRETEXT}_arch-{_ARCH}_(?P<role>bb|proj|pred)\.pth"), "pretext"),
    (re.compile(rf"BiSSL-backbone_{_PRETEXT}_arch-{_ARCH}_dset-(?P<dset>[\w+]+)\.pth"), "bissl"),
    # NeurIPS'25 code: Pretext_<type>_arch-<arch>_{backbone,head}_id-<run>.pth,
    # BiSSL_<type>_<task>_<dset>_arch-<arch>_lower_backbone_id-<run>.pth
    (re.compile(rf"Pretext_{_PRETEXT}_arch-{_ARCH}_(?P<role>backbone|head)_id-(?P<run>\w+)\.pth"), "pretext"),
    (re.compile(rf"BiSSL_{_PRETEXT}_(?P<task>classification|object_detection)_(?P<dset>[\w+]+?)_arch-{_ARCH}"
                r"_lower_backbone_id-(?P<run>\w+)\.pth"), "bissl"),
)
ROLES = {"bb": "backbone", "backbone": "backbone", "proj": "projector", "pred": "predictor", "head": "head"}


@dataclass
class WeightsName:
    """What a published file's name claims: origin (pretext/bissl), role (backbone, projector,
    predictor, or ``head`` = projector [+ BYOL predictor]), pretext method, architecture, dataset."""

    origin: str
    role: str
    pretext: str
    arch: str
    dset: str = ""
    task: str = "classification"
    run: str = ""


def parse_weights_name(filename: str) -> WeightsName | None:
    """The claims of a published file name, or None for a name in neither naming scheme."""
    for pattern, origin in NAME_PATTERNS:
        match = pattern.fullmatch(filename)
        if match:
            groups = match.groupdict()
            dset = groups.get("dset") or ""
            return WeightsName(origin=origin, role=ROLES[groups.get("role") or "bb"], pretext=groups["pretext"],
                               arch=groups["arch"], dset=DATASET_ALIASES.get(dset, dset),
                               task=groups.get("task") or "classification", run=groups.get("run") or "")
    return None


# --- verification ------------------------------------------------------------------------


@dataclass
class Check:
    """The verdict on one file. ``mlp``/``pred_mlp``: head widths read from the file;
    ``cifar_stem``: the backbone has the 3x3 CIFAR stem."""

    path: Path
    name: WeightsName | None
    ok: bool
    message: str
    mlp: str = ""
    pred_mlp: str = ""
    cifar_stem: bool = False


def _check_fit(obj: Any, module: nn.Module, what: str) -> list[str]:
    """Normalise ``obj`` onto ``module`` and load it strictly; raises WeightsError naming the mismatch."""
    normalized = normalize_state_dict(obj, module.state_dict())
    problem = describe_mismatch(normalized.state, module.state_dict())
    if problem:
        raise WeightsError(f"does not fit a {what}:\n" + problem)
    module.load_state_dict(normalized.state, strict=True)
    return normalized.notes


def _check_head(state: dict[str, Tensor], name: str, in_dim: int, arch: str) -> tuple[str, list[str]]:
    """Verify the MLP under ``name`` (projector or predictor) whose input must be ``in_dim`` wide."""
    sub = _subtree(state, name)
    width, mlp = infer_mlp(sub)
    if width != in_dim:
        raise WeightsError(f"the {name}'s input is {width} wide, but {arch} gives {in_dim} (wrong --arch?)")
    return mlp, _check_fit(sub, Projector(in_dim, mlp), f"{name} {in_dim}-{mlp}")


def verify_file(path: Path, name: WeightsName | None = None) -> Check:
    """Check that ``path`` loads with ``weights_only=True`` and fits the architecture its name claims."""
    path = Path(path)
    name = name if name is not None else parse_weights_name(path.name)
    if path.stat().st_size == 0:
        return Check(path, name, False, "the file is empty (0 bytes): an interrupted download? fetch it again")
    try:
        obj = load_file(path)
    except Exception as error:  # corrupt, truncated, or needs code execution to load
        return Check(path, name, False, f"cannot be loaded with weights_only=True: {str(error).splitlines()[0]}")
    if name is None:
        try:
            state, _ = unwrap_state_dict(obj)
        except WeightsError as error:
            return Check(path, None, False, str(error))
        return Check(path, None, True, f"loads ({len(state)} tensors); the name claims no architecture, so not checked")
    if name.arch not in ARCHS:
        return Check(path, name, False, f"architecture {name.arch!r} is not supported here (valid: {', '.join(ARCHS)})")
    try:
        state, _ = unwrap_state_dict(obj)
        if name.role == "backbone":
            sub = normalize_state_dict(state, build_backbone(name.arch)[0].state_dict()).state
            conv1 = sub.get("conv1.weight")
            cifar_stem = conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3)
            notes = _check_fit(state, build_backbone(name.arch, cifar_stem)[0], f"{name.arch} backbone")
            kind = f"{name.arch} backbone" + (" (CIFAR stem)" if cifar_stem else "")
            return Check(path, name, True, "; ".join([kind, *notes]), cifar_stem=cifar_stem)
        feat = feature_width(name.arch)
        if name.role in ("head", "projector"):
            mlp, notes = _check_head(state, "projector", feat, name.arch)
            pred_mlp = ""
            if name.role == "head" and name.pretext == "byol":
                pred_mlp, pred_notes = _check_head(state, "predictor", int(mlp.split("-")[-1]), name.arch)
                notes += pred_notes
            text = f"projector {feat}-{mlp}" + (f" + predictor {mlp.split('-')[-1]}-{pred_mlp}" if pred_mlp else "")
            return Check(path, name, True, "; ".join([text, *notes]), mlp=mlp, pred_mlp=pred_mlp)
        in_dim, pred_mlp = infer_mlp(_subtree(state, "predictor"))
        notes = _check_fit(_subtree(state, "predictor"), Projector(in_dim, pred_mlp), "predictor")
        return Check(path, name, True, "; ".join([f"predictor {in_dim}-{pred_mlp}", *notes]), pred_mlp=pred_mlp)
    except WeightsError as error:
        return Check(path, name, False, f"does not match its name ({name.role}, {name.arch}): {error}")


# Sub-folders of --model-dir that hold run checkpoints and probe features, not weights.
NOT_WEIGHTS_DIRS = ("runs", "probe_cache")


def verify_folder(model_dir: Path) -> list[Check]:
    """:func:`verify_file` on every ``*.pth`` under ``model_dir`` (recursively, sorted), except
    those in :data:`NOT_WEIGHTS_DIRS`."""
    paths = sorted(Path(model_dir).rglob("*.pth"))
    return [verify_file(path) for path in paths if not set(path.relative_to(model_dir).parts) & set(NOT_WEIGHTS_DIRS)]


# --- commands that use the files ---------------------------------------------------------

EXAMPLE_DSET = "pets"


def _flag(name: str, value: object, default: object) -> str:
    return "" if value == default else f" --{name} {value}"


def usage_commands(checks: list[Check], model_dir: Path) -> list[str]:
    """``bissl.py`` / ``fine-tuning.py`` command lines for the verified files of ``checks``
    (paths relative to ``model_dir``); flags at their defaults are left out."""
    model_dir = Path(model_dir)
    dir_flag = "" if model_dir == Path(cfg.GeneralConfig.model_dir) else f" --model-dir '{model_dir}'"
    good = [check for check in checks if check.ok and check.name is not None]
    lines: list[str] = []
    pretext_sets: dict[tuple[str, str, str], dict[str, Check]] = {}
    for check in good:
        if check.name.origin == "pretext":
            pretext_sets.setdefault((check.name.pretext, check.name.arch, check.name.run), {})[check.name.role] = check
    for (pretext, arch, _), roles in sorted(pretext_sets.items()):
        backbone = roles.get("backbone")
        projector = roles.get("projector") or roles.get("head")
        predictor = roles.get("predictor") or (roles.get("head") if pretext == "byol" else None)
        if backbone is None:
            continue
        rel = backbone.path.relative_to(model_dir).as_posix()
        stem = _flag("cifar-stem", 1, 0) if backbone.cifar_stem else ""
        lines.append(f"# {pretext} {arch} pre-trained backbone ({rel}): BiSSL on {EXAMPLE_DSET} (any downstream set), then fine-tuning")
        if projector is None or (pretext == "byol" and predictor is None):
            lines.append(f"#   (no {pretext} projector{'/predictor' if pretext == 'byol' else ''} file: bissl.py needs one)")
        else:
            command = (f"torchrun --nproc-per-node 4 bissl.py --d-dset '{EXAMPLE_DSET}' --p-pretext-type '{pretext}'"
                       f"{_flag('arch', arch, cfg.BisslConfig.arch)}{stem}"
                       f" --p-pretrained-backbone-filename '{rel}'"
                       f" --p-pretrained-proj-filename '{projector.path.relative_to(model_dir).as_posix()}'")
            if predictor is not None:
                command += f" --p-pretrained-pred-filename '{predictor.path.relative_to(model_dir).as_posix()}'"
            command += _flag("p-mlp", projector.mlp, cfg.BisslConfig.p_mlp) if projector.mlp else ""
            lines.append(command + dir_flag)
        lines.append(f"torchrun --nproc-per-node 4 fine-tuning.py --dset '{EXAMPLE_DSET}' --pretrained-backbone-filename '{rel}'"
                     f" --backbone-origin 'pretext'{_flag('pretrain-arch', arch, cfg.FinetuneConfig.pretrain_arch)}"
                     f"{_flag('pretrain-cifar-stem', 1, 0) if backbone.cifar_stem else ''} --num-runs 100 --use-hpo 1{dir_flag}")
        # BN recalibration: the published backbones' statistics belong to the original's x255 inputs.
        lines.append(f"python -m source.tools.probe --dset '{EXAMPLE_DSET}' --backbone-filename '{rel}'"
                     f"{_flag('arch', arch, cfg.ProbeConfig.arch)}{stem} --recalibrate-bn 1{dir_flag}")
    for check in good:
        name = check.name
        if name.origin != "bissl" or name.role != "backbone":
            continue
        rel = check.path.relative_to(model_dir).as_posix()
        if name.task != "classification" or name.dset not in DOWNSTREAM_DATASETS:
            lines.append(f"# {rel}: {name.task} on {name.dset!r} is not a downstream task of this codebase (classification only)")
            continue
        lines.append(f"torchrun --nproc-per-node 4 fine-tuning.py --dset '{name.dset}' --pretrained-backbone-filename '{rel}'"
                     f" --backbone-origin 'bissl'{_flag('pretrain-arch', name.arch, cfg.FinetuneConfig.pretrain_arch)}"
                     f"{_flag('pretrain-cifar-stem', 1, 0) if check.cifar_stem else ''} --num-runs 100 --use-hpo 1{dir_flag}")
    return lines


# --- fetch -------------------------------------------------------------------------------


class FetchError(UserError, RuntimeError):
    """The published folder could not be downloaded; the message says what to do instead."""


# Older gdown versions list at most 50 files per Drive folder unless remaining_ok=True (and then
# still only the first 50); newer ones have no limit but can resume and retry.
GDOWN_FOLDER_LIMIT = 50
GDOWN_OPTIONS = {"resume": True, "retries": 2, "remaining_ok": True}


def download_published(model_dir: Path, url: str = PUBLISHED_FOLDER_URL) -> None:
    """Download the Google Drive folder ``url`` into ``model_dir`` with gdown (complete files
    already there are skipped where gdown can resume). gdown is optional and imported only here."""
    try:
        import gdown
    except ImportError:
        raise FetchError("fetching needs the optional package gdown: pip install gdown "
                         "(or pip install -r requirements-dev.txt)") from None
    supported = inspect.signature(gdown.download_folder).parameters
    kwargs = {"url": url, "output": str(model_dir), "quiet": False}
    kwargs.update({name: value for name, value in GDOWN_OPTIONS.items() if name in supported})
    how_else = (f"download the folder in a browser from {url} into {model_dir}, then run "
                f"`python -m source.tools.weights verify --model-dir {model_dir}`")
    try:
        files = gdown.download_folder(**kwargs)
    except Exception as error:  # network, Drive quota or page-format errors surface as many types
        raise FetchError(f"gdown could not download {url}: {error}\nOffline or rate-limited by Google Drive? "
                         f"Try again later (files that arrived are kept), or {how_else}") from error
    if files is None:  # older gdown versions report failure this way
        raise FetchError(f"gdown could not download {url} (see its messages above); {how_else}")
    if "remaining_ok" in supported and len(files) >= GDOWN_FOLDER_LIMIT:
        logger.warning("this gdown version fetches at most %d files per Drive folder (pip install -U gdown); "
                       "if a file is missing, %s", GDOWN_FOLDER_LIMIT, how_else)


def _weight_files(model_dir: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for path in Path(model_dir).rglob("*") if path.is_file()}


def report(checks: list[Check], model_dir: Path) -> str:
    """A table of verdicts, then the command lines that use the good files."""
    lines = []
    for check in checks:
        rel = check.path.relative_to(model_dir).as_posix()
        lines.append(f"{'ok ' if check.ok else 'BAD'}  {rel}: {check.message}")
    commands = usage_commands(checks, model_dir)
    if commands:
        lines += ["", "Commands that use them (--nproc-per-node: your GPU count):", *commands]
    return "\n".join(lines)


def fetch(model_dir: Path, url: str = PUBLISHED_FOLDER_URL) -> int:
    """Download the published weights into ``model_dir``, list what arrived, verify every weights
    file and print the commands that use them. Returns the exit status (1 if a file is bad)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    before = _weight_files(model_dir)
    failure = None
    try:
        download_published(model_dir, url)
    except FetchError as error:  # still list and check what did arrive
        failure = error
    after = _weight_files(model_dir)
    arrived = sorted(path for path, size in after.items() if before.get(path) != size)
    print(f"{len(arrived)} new or changed file(s) in {model_dir}:")
    for path in arrived:
        print(f"  {path.relative_to(model_dir).as_posix()} ({after[path] / 2**20:.1f} MiB)")
    status = _verify_and_print(model_dir) if after else 1
    if failure is not None:
        raise failure
    return status


def _verify_and_print(model_dir: Path) -> int:
    checks = verify_folder(model_dir)
    if not checks:
        print(f"no *.pth file in {model_dir}")
        return 1
    print(report(checks, model_dir))
    return 0 if all(check.ok for check in checks) else 1


# --- convert -----------------------------------------------------------------------------


def convert(src: Path, dst: Path, arch: str, part: str = "backbone", cifar_stem: bool = False, mlp: str = "") -> list[str]:
    """Extract the ``part`` (backbone, projector, predictor) of ``arch`` from a weights file of a
    common format and save it as a plain state dict our scripts load. Returns what was changed;
    raises :class:`WeightsError` listing the keys when the file cannot be mapped."""
    src, dst = Path(src), Path(dst)
    try:
        obj = load_file(src)
    except Exception as error:
        raise WeightsError(f"cannot load {src} with weights_only=True (files that need code to load are refused): "
                           f"{str(error).splitlines()[0]}") from error
    state, _ = unwrap_state_dict(obj)
    if part == "backbone":
        module = build_part(part, arch, cifar_stem)
    else:
        in_dim, found = infer_mlp(_subtree(state, part))
        if part == "projector" and in_dim != feature_width(arch):
            raise WeightsError(f"the projector's input is {in_dim} wide, but {arch} gives {feature_width(arch)} (wrong --arch?)")
        module = build_part(part, arch, mlp=mlp or found, in_dim=in_dim)
    normalized = normalize_state_dict(obj, module.state_dict())
    problem = describe_mismatch(normalized.state, module.state_dict())
    if problem:
        done = "".join(f"\n  ({note})" for note in normalized.notes)
        raise WeightsError(f"{src} cannot be mapped onto a {arch} {part}{' (CIFAR stem)' if cifar_stem else ''}:{done}\n{problem}")
    module.load_state_dict(normalized.state, strict=True)
    save_atomic({key: value.detach().clone() for key, value in normalized.state.items()}, dst)
    return normalized.notes


# --- command line ------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download the published BiSSL weights (needs gdown), verify them, print commands")
    fetch_parser.add_argument("--url", default=PUBLISHED_FOLDER_URL, help="Google Drive folder (default: the paper's)")
    verify_parser = commands.add_parser("verify", help="verify the weights files already in --model-dir")
    for sub in (fetch_parser, verify_parser):
        sub.add_argument("--model-dir", default=cfg.GeneralConfig.model_dir, help="where weights live (default: %(default)s)")
    convert_parser = commands.add_parser("convert", help="extract a backbone/projector/predictor state dict from another format")
    convert_parser.add_argument("input", type=Path, help="weights file in any supported format")
    convert_parser.add_argument("output", type=Path, help="plain state dict to write (e.g. models/my_bb.pth)")
    convert_parser.add_argument("--arch", default="resnet50", choices=ARCHS, help="backbone architecture (default: %(default)s)")
    convert_parser.add_argument("--cifar-stem", type=int, default=0, choices=(0, 1), help="1: the 3x3 CIFAR stem (default: 0)")
    convert_parser.add_argument("--part", default="backbone", choices=PARTS, help="what to extract (default: %(default)s)")
    convert_parser.add_argument("--mlp", default="", help="projector/predictor widths (default: read from the file)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Exit status 0, or 1 when a fetched or verified file is not usable; a file that cannot be
    downloaded or converted raises :class:`FetchError`/``WeightsError`` (user errors)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "fetch":
        return fetch(Path(args.model_dir), args.url)
    if args.command == "verify":
        return _verify_and_print(Path(args.model_dir))
    notes = convert(args.input, args.output, args.arch, args.part, bool(args.cifar_stem), args.mlp)
    print(f"wrote the {args.arch} {args.part} to {args.output}")
    for note in notes:
        print(f"  - {note}")
    if not notes:
        print("  - nothing to change: the file was already in our format")
    return 0


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
