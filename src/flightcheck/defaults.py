"""The recommended set of callbacks, and gathering the findings of a run."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flightcheck.findings import Finding

# (override key, class name, module, on by default)
_DEFAULT_SET: tuple[tuple[str, str, str, bool], ...] = (
    ("preflight", "Preflight", "flightcheck.callbacks.preflight", True),
    ("nonfinite_guard", "NonFiniteGuard", "flightcheck.callbacks.nonfinite_guard", True),
    ("gradient_monitor", "GradientMonitor", "flightcheck.callbacks.gradient_monitor", True),
    ("loss_curve", "LossCurveMonitor", "flightcheck.callbacks.loss_curve", True),
    ("prediction_stability", "PredictionStability", "flightcheck.callbacks.prediction_stability", True),
    ("activation_monitor", "ActivationMonitor", "flightcheck.callbacks.activation_monitor", False),
)


def default_callbacks(
    *, on_finding: Callable[[Finding], Any] | None = None, **overrides: bool | Mapping[str, Any]
) -> list[Any]:
    """The recommended flightcheck callbacks, tuned so that a healthy run stays quiet.

    Args:
        on_finding: called with every new finding (on global rank 0), by every callback.
        **overrides: per callback, ``False`` to leave it out, ``True`` to include it with
            its defaults (``activation_monitor`` is opt-in), or a dict of its arguments.
            Keys: ``preflight``, ``nonfinite_guard``, ``gradient_monitor``, ``loss_curve``,
            ``prediction_stability``, ``activation_monitor``.

    Example::

        trainer = L.Trainer(callbacks=flightcheck.default_callbacks(
            preflight={"on_fail": "warn"}, activation_monitor=True))
    """
    known = {key for key, *_ in _DEFAULT_SET}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"default_callbacks() got unknown override(s) {unknown}; accepted: {sorted(known)}")
    callbacks = []
    for key, cls_name, module, on_by_default in _DEFAULT_SET:
        choice = overrides.get(key, on_by_default)
        if choice is False:
            continue
        if choice is True:
            kwargs: dict[str, Any] = {}
        elif isinstance(choice, Mapping):
            kwargs = dict(choice)
        else:
            raise TypeError(
                f"default_callbacks({key}=...) takes True, False or a dict of arguments, got {type(choice).__name__}"
            )
        if on_finding is not None:
            kwargs.setdefault("on_finding", on_finding)
        cls = getattr(importlib.import_module(module), cls_name)
        accepted = _arguments(cls)
        unknown_args = sorted(str(k) for k in kwargs if k not in accepted)
        if unknown_args:
            raise TypeError(
                f"default_callbacks({key}={{...}}) got unknown argument(s) {unknown_args} for {cls_name}; "
                f"accepted: {sorted(accepted)}"
            )
        callbacks.append(cls(**kwargs))
    return callbacks


def _arguments(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def findings(trainer: Any) -> list[Finding]:
    """Every finding the flightcheck callbacks of ``trainer`` reported, in step order."""
    from flightcheck.callbacks.base import FlightcheckCallback

    gathered: list[Finding] = []
    for callback in getattr(trainer, "callbacks", []) or []:
        if isinstance(callback, FlightcheckCallback):
            gathered.extend(callback.findings)
    return sorted(gathered, key=lambda f: (f.step, f.source != "preflight"))
