"""Build argparse parsers from the dataclasses of ``config_default.py``."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _flag_type(annotation: Any) -> type:
    """The scalar type argparse should parse for a field annotated ``annotation``."""
    if isinstance(annotation, str):  # postponed annotations: "int", "Optional[float]"
        annotation = {"int": int, "float": float, "str": str, "Optional[float]": float,
                      "Optional[int]": int, "Optional[str]": str}[annotation]
    args = typing.get_args(annotation)
    if args:  # Optional[X]
        return next(arg for arg in args if arg is not type(None))
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, title: str) -> None:
    """Add one ``--kebab-case`` flag per field of ``config_cls`` with its default and help."""
    group = parser.add_argument_group(title)
    for item in dataclasses.fields(config_cls):
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "")
        group.add_argument(
            flag,
            dest=item.name,
            type=_flag_type(item.type),
            default=item.default,
            choices=item.metadata.get("choices"),
            help=f"{help_text} (default: {item.default!r})",
        )


def build_parser(description: str, configs: list[tuple[type, str]]) -> argparse.ArgumentParser:
    """A parser with one argument group per ``(config class, title)``; later groups may not redefine flags."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for config_cls, title in configs:
        add_config_arguments(parser, config_cls, title)
    return parser
