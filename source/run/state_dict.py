"""State-dict key normalisation: map a weights file's keys onto the module that loads it.

The one place that understands foreign key layouts; used by :func:`source.run.checkpoint.load_weights`
(so the scripts load a converted and an unconverted file alike) and by
``python -m source.tools.weights convert``/``verify``:

- wrappers: ``{"state_dict": ...}`` (Lightning, MoCo), ``{"model": ...}``, ``{"module": ...}``;
- prefixes: ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``model.``, ``backbone.``,
  ``encoder.``, ``encoder_q.``/``base_encoder.`` (MoCo), ``head.``, ``projector.``, ``predictor.``
  and chains of them. When a file holds several sub-models (solo-learn: ``backbone.*`` +
  ``projector.*`` + ``classifier.*``; the original NeurIPS code's BYOL head: ``projector.*`` +
  ``predictor.*``) the one whose keys are exactly the target module's is taken and the rest is
  reported as dropped;
- a ResNet classifier ``fc.*`` (torchvision/timm ImageNet models) is dropped for a backbone;
- BatchNorm ``num_batches_tracked`` counters missing from old files are added as 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from source.run.errors import UserError


class WeightsError(UserError, RuntimeError):
    """A weights file is missing or does not fit the model; the message names the mismatch."""


WRAPPER_KEYS = ("state_dict", "model", "module")
# "encoder_q" / "base_encoder": MoCo v2 / v3 query encoders (their fc.* projector is dropped as a classifier).
PREFIX_NAMES = ("module", "_orig_mod", "model", "backbone", "encoder", "encoder_q", "base_encoder", "head", "projector",
                "predictor")
MAX_PREFIX_DEPTH = 3
CLASSIFIER_PREFIX = "fc."  # torchvision/timm ResNet ImageNet classifier
BN_COUNTER = "num_batches_tracked"


@dataclass
class Normalized:
    """A state dict mapped onto a target module, and what was done to get there.

    ``fits``: the keys are exactly the target's (shapes are checked by the caller).
    ``notes``: one line per change (wrapper taken, prefix stripped, keys dropped or added).
    """

    state: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)
    fits: bool = False


def show_keys(keys: Iterable[str], limit: int = 8) -> str:
    """The first ``limit`` keys, sorted and comma-separated, with the total when there are more."""
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return (text + f" ... ({len(keys)} in all)" if len(keys) > limit else text) or "none"


def unwrap_state_dict(obj: Any) -> tuple[dict[str, Tensor], list[str]]:
    """The ``{name: tensor}`` dict inside ``obj``, descending through ``state_dict``/``model``/``module``
    wrapper entries (in that order of preference); raises :class:`WeightsError` if there is none."""
    notes: list[str] = []
    while isinstance(obj, Mapping):
        if obj and all(isinstance(value, Tensor) for value in obj.values()):
            return dict(obj), notes
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if wrapper is None:
            not_tensors = [str(key) for key, value in obj.items() if not isinstance(value, Tensor)]
            raise WeightsError(
                "no state dict found: expected {name: tensor} or a wrapper entry "
                f"{' / '.join(repr(k) for k in WRAPPER_KEYS)}; top-level entries that are not tensors: "
                f"{show_keys(not_tensors)}" if obj else "the file holds an empty dict"
            )
        notes.append(f"took the {wrapper!r} entry of the checkpoint (other entries: {show_keys(k for k in obj if k != wrapper)})")
        obj = obj[wrapper]
    raise WeightsError(f"the file holds a {type(obj).__name__}, not a state dict")


def candidate_prefixes(keys: Iterable[str]) -> list[str]:
    """Prefixes made only of :data:`PREFIX_NAMES` components that some key starts with, shortest first."""
    found: set[str] = set()
    for key in keys:
        parts = key.split(".")
        for depth in range(1, min(MAX_PREFIX_DEPTH, len(parts) - 1) + 1):
            if parts[depth - 1] not in PREFIX_NAMES:
                break
            found.add(".".join(parts[:depth]) + ".")
    return sorted(found, key=lambda prefix: (prefix.count("."), prefix))


def _fit(sub: dict[str, Tensor], expected: set[str], drop_classifier: bool) -> tuple[bool, set[str], set[str]]:
    """Does ``sub`` fit ``expected`` after dropping ``fc.*`` (if allowed) and adding missing BN counters?
    Returns (fits, dropped classifier keys, BN counters to add)."""
    dropped = {key for key in sub if drop_classifier and key.startswith(CLASSIFIER_PREFIX)}
    keys = set(sub) - dropped
    counters = {key for key in expected - keys if key.endswith(BN_COUNTER)}
    return (keys | counters) == expected, dropped, counters


def normalize_state_dict(obj: Any, expected: Mapping[str, Tensor] | Iterable[str]) -> Normalized:
    """Map a loaded weights object onto a module whose ``state_dict()`` keys are ``expected``.

    Tries the keys as they are, then the sub-dict under each candidate prefix (shortest first);
    the first that fits exactly wins. If several prefixes of the same length fit, the shapes
    (when ``expected`` is a state dict) decide; if they cannot, the file is ambiguous and refused.
    If nothing fits, the unwrapped state is returned with ``fits=False`` (under the prefix that
    covers the most expected keys), so the caller's strict check can list what is missing and
    unexpected.
    """
    state, notes = unwrap_state_dict(obj)
    shapes = {key: tuple(value.shape) for key, value in expected.items()} if isinstance(expected, Mapping) else {}
    expected = set(expected)
    drop_classifier = not any(key.startswith(CLASSIFIER_PREFIX) for key in expected)

    candidates = [""] + candidate_prefixes(state)
    fitting: list[tuple[str, dict[str, Tensor], set[str], set[str]]] = []
    for prefix in candidates:
        if fitting and prefix.count(".") > fitting[0][0].count("."):
            break  # a shorter prefix already fits
        sub = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        ok, dropped, counters = _fit(sub, expected, drop_classifier)
        if ok:
            fitting.append((prefix, sub, dropped, counters))
    if len(fitting) > 1 and shapes:  # e.g. a BYOL head: projector.* and predictor.* share their keys
        fitting = [fit for fit in fitting if all(tuple(fit[1][key].shape) == shapes[key] for key in expected - fit[3])]
    if len(fitting) > 1:
        raise WeightsError(
            f"ambiguous weights: the keys under each of {', '.join(repr(f[0]) for f in fitting)} fit the model; "
            "extract the one you mean with `python -m source.tools.weights convert`"
        )
    if not fitting:
        best = max(candidates, key=lambda p: (len({k[len(p):] for k in state if k.startswith(p)} & expected), -len(p)))
        sub = {key[len(best):]: value for key, value in state.items() if key.startswith(best)}
        if best:
            notes.append(f"kept the keys under {best!r} (prefix stripped); they still do not fit")
        return Normalized(sub, notes, fits=False)

    prefix, sub, dropped, counters = fitting[0]
    if prefix:
        others = sorted(key for key in state if not key.startswith(prefix))
        notes.append(f"stripped the prefix {prefix!r}" + (f"; dropped the other {len(others)} keys: {show_keys(others, 4)}" if others else ""))
    if dropped:
        notes.append(f"dropped the classifier {show_keys(dropped)}")
    for key in dropped:
        del sub[key]
    if counters:
        notes.append(f"added {len(counters)} missing BatchNorm {BN_COUNTER} counters (set to 0)")
        for key in counters:
            sub[key] = torch.tensor(0, dtype=torch.long)
    return Normalized(sub, notes, fits=True)


def describe_mismatch(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """'' if ``state`` has exactly the keys and shapes of ``expected``; else the missing,
    unexpected and wrongly shaped keys, one kind per line."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    wrong_shape = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                   for key in set(expected) & set(state) if tuple(state[key].shape) != tuple(expected[key].shape)]
    if not (missing or unexpected or wrong_shape):
        return ""
    return (f"missing keys: {show_keys(missing)}\nunexpected keys: {show_keys(unexpected)}\n"
            f"shape mismatches: {show_keys(wrong_shape)}")
