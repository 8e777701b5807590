"""Checks: pure judges that turn signals into verdicts. Thresholds live next to their check.

A check never touches a Trainer: it takes numbers (tensors, series) and returns
:class:`Verdict` objects, so it can be tested on synthetic inputs. Callbacks turn verdicts
into findings with ``FlightcheckCallback.report_verdict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flightcheck.findings import Severity


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a check concluded: a finding without the when and the who."""

    check: str
    severity: Severity | str
    message: str
    causes: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()
    target: str | None = None
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", Severity.coerce(self.severity))
        object.__setattr__(self, "causes", tuple(self.causes))
        object.__setattr__(self, "advice", tuple(self.advice))


__all__ = ["Verdict"]
