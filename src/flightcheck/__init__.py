"""flightcheck: Lightning callbacks that catch training bugs before and during ``Trainer.fit``.

    import lightning as L
    import flightcheck

    trainer = L.Trainer(callbacks=flightcheck.default_callbacks())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flightcheck.errors import FlightcheckError, NonFiniteError, PreflightError
from flightcheck.findings import CHECKS, INFLIGHT_CHECKS, PREFLIGHT_CHECKS, Finding, Severity

__version__ = "0.1.0"

# Public callbacks, imported on first use so that ``import flightcheck`` stays light.
_LAZY = {
    "Preflight": "flightcheck.callbacks.preflight",
    "GradientMonitor": "flightcheck.callbacks.gradient_monitor",
    "NonFiniteGuard": "flightcheck.callbacks.nonfinite_guard",
    "PredictionStability": "flightcheck.callbacks.prediction_stability",
    "LossCurveMonitor": "flightcheck.callbacks.loss_curve",
    "ActivationMonitor": "flightcheck.callbacks.activation_monitor",
    "FlightcheckCallback": "flightcheck.callbacks.base",
}

if TYPE_CHECKING:  # pragma: no cover
    from flightcheck.callbacks.activation_monitor import ActivationMonitor
    from flightcheck.callbacks.base import FlightcheckCallback
    from flightcheck.callbacks.gradient_monitor import GradientMonitor
    from flightcheck.callbacks.loss_curve import LossCurveMonitor
    from flightcheck.callbacks.nonfinite_guard import NonFiniteGuard
    from flightcheck.callbacks.prediction_stability import PredictionStability
    from flightcheck.callbacks.preflight import Preflight


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flightcheck' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


from flightcheck.defaults import default_callbacks, findings  # noqa: E402

__all__ = [
    "CHECKS",
    "INFLIGHT_CHECKS",
    "PREFLIGHT_CHECKS",
    "ActivationMonitor",
    "Finding",
    "FlightcheckCallback",
    "FlightcheckError",
    "GradientMonitor",
    "LossCurveMonitor",
    "NonFiniteError",
    "NonFiniteGuard",
    "PredictionStability",
    "Preflight",
    "PreflightError",
    "Severity",
    "default_callbacks",
    "findings",
]
