"""Every command line quoted in README.md and docs/*.md parses with its script's argument parser.

A command is a line of a fenced code block (with its ``\\`` continuations joined) or an inline
code span that starts with ``python``/``python3`` (any path to it, e.g. ``.venv/bin/python``) or
``torchrun``, after leading ``VAR=value`` assignments; ``&&``, ``;`` and pipes separate commands.
Its arguments go through the ``get_args_parser()`` of the script (``python bissl.py ...``, loaded
by path with ``source.run.scripts.load_script`` because the names have hyphens) or module (``python -m source.tools.compare ...``) it
names; torchrun's own options go through torchrun's parser. So a renamed or removed flag fails
this test instead of the reader.

Conventions the documents follow so their commands can be checked: a placeholder is written
``<...>`` and stands for a value (parsed as ``1``); a lone ``...`` means "further arguments" and
is dropped. Commands that are not BiSSL's (``pip``, ``make``, ``python -m pytest``: a module
outside the repository's own packages) are skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from source.run import scripts

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PYTHON = re.compile(r"^(?:\S*/)?python3?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
INLINE_CODE = re.compile(r"`([^`]+)`")
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Command:
    where: str  # "README.md:42"
    tokens: tuple[str, ...]  # starting with the python executable or "torchrun"


def split_commands(text: str, where: str) -> Iterator[Command]:
    """The python/torchrun commands in one shell line (placeholders filled, ``...`` dropped)."""
    try:
        tokens = shlex.split(PLACEHOLDER.sub("1", text), comments=True)
    except ValueError as error:
        raise AssertionError(f"{where}: cannot split {text!r} like a shell would: {error}") from error
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        while segment and ENV_ASSIGNMENT.match(segment[0]):
            segment.pop(0)
        if segment and (PYTHON.match(segment[0]) or segment[0] == "torchrun"):
            yield Command(where, tuple(t for t in segment if t != "..."))
        segment = []


def extract_commands(markdown: str, name: str) -> list[Command]:
    """Every python/torchrun command in fenced code blocks and inline code spans of ``markdown``."""
    commands: list[Command] = []
    in_fence = False
    pending, pending_line = "", 0
    paragraph: list[tuple[int, str]] = []

    def flush_paragraph() -> None:
        if paragraph:
            text = " ".join(line for _, line in paragraph)
            for span in INLINE_CODE.findall(text):
                commands.extend(split_commands(span, f"{name}:{paragraph[0][0]}"))
            paragraph.clear()

    for number, line in enumerate(markdown.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            flush_paragraph()
            in_fence = not in_fence
            pending = ""
            continue
        if in_fence:
            if not pending:
                pending_line = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands.extend(split_commands(pending + line, f"{name}:{pending_line}"))
            pending = ""
        elif line.strip():
            paragraph.append((number, line.strip()))
        else:
            flush_paragraph()
    flush_paragraph()
    return commands


def documented_commands() -> list[Command]:
    commands: list[Command] = []
    for path in DOCUMENTS:
        commands.extend(extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))))
    return commands


@cache
def load_parser(kind: str, name: str):
    """The ``get_args_parser`` function of a script (``kind`` "script", path from the repository
    root) or module (``kind`` "module")."""
    if kind == "module":
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and (name + ".").startswith(error.name + "."):
                raise AssertionError(f"the module {name} does not exist") from None
            raise  # the module exists but one of its imports does not: a different failure
    else:
        path = ROOT / name
        if not path.is_file():
            raise AssertionError(f"the script {name} does not exist")
        # `python dir/script.py` puts dir first on sys.path; scripts may import their neighbours.
        sys.path.insert(0, str(path.parent))
        try:
            module = scripts.load_script(path)
        finally:
            sys.path.remove(str(path.parent))
    if not hasattr(module, "get_args_parser"):
        raise AssertionError(f"{name} has no get_args_parser(), so its documented command cannot be checked")
    return module.get_args_parser


def no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` (and its sub-command parsers) refuse abbreviated flags: the documents must
    spell each flag in full, so that ``--cg-iter`` cannot keep passing as a prefix of a renamed flag."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                no_abbreviations(sub)


def parse(parser, argv: list[str], what: str) -> None:
    """Run ``argv`` through ``parser``; an argparse error becomes an AssertionError with its message.
    A command without arguments names its tool in prose (`python -m source.tools.compare`):
    that the tool exists and has a parser is all there is to check."""
    if not argv:
        return
    no_abbreviations(parser)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            parser.parse_args(argv)
        except SystemExit as stop:
            if stop.code not in (0, None):  # 0: -h printed the help
                raise AssertionError(f"{what}: {stderr.getvalue().strip().splitlines()[-1:]}") from None


def check_command(command: Command) -> str | None:
    """Parse ``command`` with its target's parser; returns what was checked, or None if skipped."""
    what = f"{command.where}: {' '.join(command.tokens)}"
    try:
        return _check(list(command.tokens), what)
    except AssertionError as error:
        if str(error).startswith(command.where):
            raise
        raise AssertionError(f"{what}: {error}") from None


def _check(tokens: list[str], what: str) -> str | None:
    if len(tokens) == 1:  # `python` or `torchrun` named in prose
        return None
    if tokens[0] != "torchrun":
        rest = tokens[1:]
        if rest[:1] == ["-m"]:
            if len(rest) < 2:
                raise AssertionError(f"{what}: -m without a module")
            module, argv = rest[1], rest[2:]
            if module == "torch.distributed.run":
                tokens = ["torchrun", *argv]
            elif not (ROOT / module.split(".")[0]).is_dir():  # pytest, pip: not this project's
                return None
            else:
                parse(load_parser("module", module)(), argv, what)
                return module
        elif not rest:
            raise AssertionError(f"{what}: python without a script")
        else:
            parse(load_parser("script", rest[0])(), rest[1:], what)
            return rest[0]
    launcher = torchrun_parser()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            launch = launcher.parse_args(tokens[1:])
        except SystemExit:
            raise AssertionError(f"{what}: torchrun refuses its options: {stderr.getvalue().strip().splitlines()[-1:]}") from None
    kind = "module" if launch.module else "script"
    parse(load_parser(kind, launch.training_script)(), list(launch.training_script_args), what)
    return launch.training_script


COMMANDS = documented_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{' '.join(c.tokens[:3])}" for c in COMMANDS])
def test_documented_command_parses(command: Command) -> None:
    check_command(command)


def test_the_documents_quote_commands() -> None:
    """The extraction finds the commands (an empty list would pass every parametrised case)."""
    targets = {check_command(c) for c in COMMANDS} - {None}
    assert {"ssl_pre-training.py", "bissl.py", "fine-tuning.py", "source.tools.compare"} <= targets
    assert len(COMMANDS) >= 15


# The SPEC's command lines, which must keep working unchanged.
PAPER_COMMANDS = [
    "torchrun --nproc-per-node 4 ssl_pre-training.py --pretext-type 'simclr'",
    "torchrun --nproc-per-node 4 bissl.py --d-dset 'pets' --p-pretext-type 'simclr' --p-pretrained-backbone-filename "
    "'pretext_simclr_arch-resnet50_bb.pth' --p-pretrained-proj-filename 'pretext_simclr_arch-resnet50_proj.pth'",
    "torchrun --nproc-per-node 4 fine-tuning.py --dset 'pets' --pretrained-backbone-filename "
    "'pretext_simclr_arch-resnet50_bb.pth' --backbone-origin 'pretext' --num-runs 100 --use-hpo 1",
    "torchrun --nproc-per-node 4 fine-tuning.py --dset 'pets' --pretrained-backbone-filename "
    "'BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth' --backbone-origin 'bissl' --num-runs 100 --use-hpo 1",
    "torchrun --nproc-per-node 4 fine-tuning.py --dset 'pets' --pretrained-backbone-filename "
    "'BiSSL-backbone_simclr_arch-resnet50_dset-pets.pth' --backbone-origin 'bissl' --num-runs 10 --use-hpo 0",
]


def test_readme_quotes_the_papers_command_lines() -> None:
    readme = {c.tokens for c in COMMANDS if c.where.startswith("README.md")}
    for line in PAPER_COMMANDS:
        assert tuple(shlex.split(line)) in readme, f"README.md no longer quotes: {line}"


SAMPLE = """\
Run `python -m source.tools.compare a b --labels 'x,y'` or `make demo`, and
`torchrun --nproc-per-node 2 -m source.tools.probe
--arch resnet18` across a line break.

```bash
pip install -r requirements.txt && .venv/bin/python bench/x.py --quick   # a comment
BISSL_DEBUG=1 torchrun --nnodes 2 --nproc-per-node 4 bissl.py \\
    --lr <best lr> ...
python -m pytest -q tests
| a | table | row |
```
"""


def test_extraction_of_a_sample() -> None:
    found = [c.tokens for c in extract_commands(SAMPLE, "sample.md")]
    assert found == [
        ("python", "-m", "source.tools.compare", "a", "b", "--labels", "x,y"),
        ("torchrun", "--nproc-per-node", "2", "-m", "source.tools.probe", "--arch", "resnet18"),
        (".venv/bin/python", "bench/x.py", "--quick"),
        ("torchrun", "--nnodes", "2", "--nproc-per-node", "4", "bissl.py", "--lr", "1"),
        ("python", "-m", "pytest", "-q", "tests"),
    ]
    assert [c.where for c in extract_commands(SAMPLE, "sample.md")][3] == "sample.md:7"


@pytest.mark.parametrize("line, message", [
    ("torchrun --nproc-per-node 4 bissl.py --d-dset pets --no-such-flag 1", "unrecognized arguments: --no-such-flag"),
    ("python fine-tuning.py --use-hpo maybe", "--use-hpo"),
    ("python -m source.tools.compare run_a --no-such-flag", "unrecognized arguments"),
    ("python -m source.tools.nothing", "does not exist"),
    ("python -m tests.fault_table --kill 3", "unrecognized arguments: --kill"),
    ("python -m source.tools.weights convert a b --cifar 1", "unrecognized arguments: --cifar"),
    ("torchrun --no-such-launcher-option 4 bissl.py", "torchrun refuses"),
    ("python no-such-script.py --epochs 1", "does not exist"),
])
def test_a_bad_command_is_caught(line: str, message: str) -> None:
    (command,) = split_commands(line, "bad.md:1")
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_command(command)


def test_foreign_commands_are_skipped() -> None:
    for line in ("python -m pytest -q tests", "python -m pip install gdown"):
        (command,) = split_commands(line, "x.md:1")
        assert check_command(command) is None


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve() -> None:
    """Every relative link of README.md and docs/ (and bench/RESULTS.md) names a file that exists."""
    broken = []
    for path in [*DOCUMENTS, ROOT / "bench" / "RESULTS.md"]:
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"
