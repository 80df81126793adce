"""Build argparse parsers from the dataclasses of ``config_default.py``, refusing bad values at parse time.

Every numeric flag is checked while the command line is parsed, so a bad value stops the run with
``argument --flag: ...`` before anything is read or written: floats must be finite, and values
must lie within the field's bounds (``at_least``/``above``/``at_most``/``below`` in its metadata;
a number without declared bounds must be >= 0, which covers counts, sizes and rates added later).
Relations between flags (``--lam`` + ``--cg-lam-dampening`` > 0, HPO range ends in order, a
curvature probe with at least one Lanczos step, a GLOBAL batch that splits evenly over the
``WORLD_SIZE`` ranks torchrun starts) are checked after parsing, by :class:`ConfigArgumentParser`.
Every parser also has ``--debug`` (:func:`source.run.errors.add_debug_argument`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Iterable
from typing import Any

from source.run.distributed import launched_world_size
from source.run.errors import CommandLineParser, ConfigError, add_debug_argument

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


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, title: str,
                         exclude: Iterable[str] = ()) -> None:
    """Add one ``--kebab-case`` flag per field of ``config_cls`` (but those named in ``exclude``)
    with its default, help and bounds."""
    group = parser.add_argument_group(title)
    for item in dataclasses.fields(config_cls):
        if item.name in exclude:
            continue
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "")
        kind = _flag_type(item.type)
        choices = item.metadata.get("choices")
        parse: Callable[[str], Any] = kind
        if kind in (int, float) and not choices:
            parse = _bounded(kind, item.metadata.get("bounds") or DEFAULT_BOUNDS)
        split = item.metadata.get("split_over_ranks")
        if split and isinstance(parser, ConfigArgumentParser):
            parser.split_over_ranks[item.name] = split
        default, shown = item.default, f"default: {item.default!r}"
        detection = item.metadata.get("detection_default")
        if detection is not None and isinstance(parser, ConfigArgumentParser):
            # Not given -> None here; parse_known_args fills in the default of the dataset's task.
            parser.task_defaults[item.name] = (item.default, detection)
            default, shown = None, f"default: {item.default!r}; for a detection dataset {detection!r}"
        group.add_argument(
            flag,
            dest=item.name,
            type=parse,
            default=default,
            choices=choices,
            help=f"{help_text} ({shown})",
        )


def relation_errors(args: argparse.Namespace, split_over_ranks: Iterable[str] = (),
                    world_size: int = 1) -> list[str]:
    """Problems between flags that no single flag's bounds can see (only flags the script has).

    ``split_over_ranks``: the GLOBAL batch sizes that each of the ``world_size`` ranks takes an
    equal share of (:func:`source.run.runtime.per_rank_batch_size`).
    """
    values = vars(args)
    problems = []
    for name in split_over_ranks:
        if values[name] % world_size != 0:
            problems.append(f"--{name.replace('_', '-')} {values[name]} is the GLOBAL batch size and must be a "
                            f"positive multiple of the world size {world_size}")
    # bissl.py's in-run probe (--curvature-every N > 0) and the curvature tool (the one parser with
    # --probe-batches) run --curvature-iters Lanczos steps; 0 would fail only when the probe starts.
    probing = values.get("curvature_every", 0) > 0 or "probe_batches" in values
    if probing and values.get("curvature_iters", 1) < 1:
        why = f"--curvature-every {values['curvature_every']}" if values.get("curvature_every", 0) > 0 else "the curvature tool"
        problems.append(f"--curvature-iters must be >= 1 when the curvature is probed ({why}), got {values['curvature_iters']}")
    if values.get("probe_batches", 1) < 1:
        problems.append(f"--probe-batches must be >= 1, got {values['probe_batches']}")
    if "lam" in values and "cg_lam_dampening" in values and not values["lam"] + values["cg_lam_dampening"] > 0:
        problems.append(f"--lam + --cg-lam-dampening must be > 0 (the solver divides by it), got "
                        f"{values['lam']:g} + {values['cg_lam_dampening']:g}")
    for name in ("lr", "wd"):
        low, high = values.get(f"hpo_{name}_min"), values.get(f"hpo_{name}_max")
        if low is not None and high is not None and low > high:
            problems.append(f"--hpo-{name}-min {low:g} is above --hpo-{name}-max {high:g}")
    return problems


class ConfigArgumentParser(CommandLineParser):
    """A :class:`CommandLineParser` that also fills in the task's default of the flags that have one
    per task (classification or detection, ``is_detection(namespace)``), checks the relations between
    flags (:func:`relation_errors`) and exits with a usage error before the script does anything."""

    def __init__(self, *args: Any, is_detection: Callable[[argparse.Namespace], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Fields whose metadata says they are GLOBAL batch sizes split over the ranks (True), or are so
        # for detection datasets only ("detection").
        self.split_over_ranks: dict[str, bool | str] = {}
        # Fields with a detection default: name -> (classification default, detection default).
        self.task_defaults: dict[str, tuple[Any, Any]] = {}
        self.is_detection = is_detection

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        detection = self.is_detection is not None and self.is_detection(namespace)
        for name, (classification_default, detection_default) in self.task_defaults.items():
            if getattr(namespace, name) is None:  # not given
                setattr(namespace, name, detection_default if detection else classification_default)
        split = [name for name, when in self.split_over_ranks.items() if when is True or (when == "detection" and detection)]
        problems = relation_errors(namespace, split, launched_world_size())
        if problems:
            self.error("; ".join(problems))
        return namespace, extras


def build_parser(description: str, configs: list[tuple[type, str]], exclude: Iterable[str] = (),
                 is_detection: Callable[[argparse.Namespace], bool] | None = None) -> argparse.ArgumentParser:
    """A parser with one argument group per ``(config class, title)``; later groups may not redefine flags.

    ``exclude``: fields of those classes that this script has no use for, so it does not offer them.
    ``is_detection``: whether parsed flags name a detection dataset (then flags not given that have a
    detection default take it, see ``config_default.opt``).
    """
    parser = ConfigArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, is_detection=is_detection
    )
    for config_cls, title in configs:
        add_config_arguments(parser, config_cls, title, exclude)
    add_debug_argument(parser)
    return parser


def number_list(text: str, flag: str, kind: type = float, minimum: float = 0) -> list:
    """A comma-separated flag value such as ``--linear-wd 1e-5,1e-4`` as a list of ``kind`` (in the
    order given; blanks between commas are skipped); a ConfigError naming ``flag`` unless it holds at
    least one number and every number is >= ``minimum``."""
    what = "whole numbers" if kind is int else "numbers"
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be {what} separated by commas, got {text!r}") from None
    if not values or min(values) < minimum:
        raise ConfigError(f"{flag} needs at least one value, all >= {minimum:g}, got {text!r}")
    return values
