"""The errors flightcheck raises on purpose. Every other failure inside a check is contained."""

from __future__ import annotations

from typing import Any


class FlightcheckError(RuntimeError):
    """Base of the errors flightcheck raises on purpose; fault isolation never swallows them."""


class PreflightError(FlightcheckError):
    """The pre-flight found the model or data broken; ``report`` holds every check's row."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteError(FlightcheckError):
    """Raised by ``NonFiniteGuard(action="raise")``; ``finding`` says what went non-finite."""

    def __init__(self, message: str, finding: Any = None) -> None:
        super().__init__(message)
        self.finding = finding
