"""Build argparse parsers from the dataclasses of ``config_default.py``, refusing bad values at parse time.

Every numeric flag is checked while the command line is parsed, so a bad value stops the run with
``argument --flag: ...`` before anything is read or written: floats must be finite, and values
must lie within the field's bounds (``at_least``/``above``/``at_most``/``below`` in its metadata;
a number without declared bounds must be >= 0, which covers counts, sizes and rates added later).
Relations between flags (``--lam`` + ``--cg-lam-dampening`` > 0, HPO range ends in order) are
checked after parsing, by :class:`ConfigArgumentParser`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

# Bounds of a number flag whose field declares none.
DEFAULT_BOUNDS = {"at_least": 0}


def _flag_type(annotation: Any) -> type:
    """The scalar type argparse should parse for a field annotated ``annotation``."""
    if isinstance(annotation, str):  # postponed annotations: "int", "Optional[float]"
        annotation = {"int": int, "float": float, "str": str, "Optional[float]": float,
                      "Optional[int]": int, "Optional[str]": str}[annotation]
    args = typing.get_args(annotation)
    if args:  # Optional[X]
        return next(arg for arg in args if arg is not type(None))
    return annotation


def _bounded(kind: type, bounds: dict[str, float]) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses non-finite and out-of-bounds values."""
    tests = {
        "at_least": (lambda value, bound: value >= bound, ">="),
        "above": (lambda value, bound: value > bound, ">"),
        "at_most": (lambda value, bound: value <= bound, "<="),
        "below": (lambda value, bound: value < bound, "<"),
    }

    def parse(text: str) -> Any:
        value = kind(text)  # ValueError -> argparse: "invalid int value: 'x'"
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        for name, bound in bounds.items():
            holds, sign = tests[name]
            if not holds(value, bound):
                wanted = " and ".join(f"{tests[n][1]} {b:g}" for n, b in bounds.items() if math.isfinite(b))
                raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid <type> value" message
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, title: str) -> None:
    """Add one ``--kebab-case`` flag per field of ``config_cls`` with its default, help and bounds."""
    group = parser.add_argument_group(title)
    for item in dataclasses.fields(config_cls):
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "")
        kind = _flag_type(item.type)
        choices = item.metadata.get("choices")
        parse: Callable[[str], Any] = kind
        if kind in (int, float) and not choices:
            parse = _bounded(kind, item.metadata.get("bounds") or DEFAULT_BOUNDS)
        group.add_argument(
            flag,
            dest=item.name,
            type=parse,
            default=item.default,
            choices=choices,
            help=f"{help_text} (default: {item.default!r})",
        )


def relation_errors(args: argparse.Namespace) -> list[str]:
    """Problems between flags that no single flag's bounds can see (only flags the script has)."""
    values = vars(args)
    problems = []
    if "lam" in values and "cg_lam_dampening" in values and not values["lam"] + values["cg_lam_dampening"] > 0:
        problems.append(f"--lam + --cg-lam-dampening must be > 0 (the solver divides by it), got "
                        f"{values['lam']:g} + {values['cg_lam_dampening']:g}")
    for name in ("lr", "wd"):
        low, high = values.get(f"hpo_{name}_min"), values.get(f"hpo_{name}_max")
        if low is not None and high is not None and low > high:
            problems.append(f"--hpo-{name}-min {low:g} is above --hpo-{name}-max {high:g}")
    return problems


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also checks the relations between flags (:func:`relation_errors`)
    and exits with argparse's usage error, before the script does anything."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        problems = relation_errors(namespace)
        if problems:
            self.error("; ".join(problems))
        return namespace, extras


def build_parser(description: str, configs: list[tuple[type, str]]) -> argparse.ArgumentParser:
    """A parser with one argument group per ``(config class, title)``; later groups may not redefine flags."""
    parser = ConfigArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for config_cls, title in configs:
        add_config_arguments(parser, config_cls, title)
    return parser
