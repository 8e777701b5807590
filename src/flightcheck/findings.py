"""The findings record: the one currency every flightcheck check reports in.

A :class:`Finding` says what was seen (with the numbers), the likely causes and what to
try. Tests, dashboards and alert filters match on ``check``, so the names in
:data:`PREFLIGHT_CHECKS` and :data:`INFLIGHT_CHECKS` are a stable public contract.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

PREFLIGHT_CHECKS: tuple[str, ...] = (
    "init_loss",
    "overfit_batch",
    "gradient_flow",
    "batch_independence",
    "input_scale",
    "nonfinite_input",
    "target_shape",
    "label_range",
    "class_imbalance",
    "output_activation",
    "input_dependence",
    "weight_init",
    "train_mode",
    "target_leakage",
    "causal_leakage",
    "split_overlap",
)

INFLIGHT_CHECKS: tuple[str, ...] = (
    "nonfinite",
    "grad_explosion",
    "grad_vanishing",
    "grad_spike",
    "weight_growth",
    "update_ratio",
    "gradient_flow",
    "dead_units",
    "saturation",
    "prediction_collapse",
    "prediction_instability",
    "prediction_stagnation",
    "loss_divergence",
    "loss_oscillation",
    "loss_plateau",
    "loss_spike",
    "overfitting",
    "underfitting",
    "train_mode",
)

#: Reported when a check itself fails: the check steps aside and says so, training goes on.
INTERNAL_ERROR = "internal_error"

CHECKS: frozenset[str] = frozenset(PREFLIGHT_CHECKS) | frozenset(INFLIGHT_CHECKS) | {INTERNAL_ERROR}


class Severity(str, enum.Enum):
    """How loud a finding is. Ordered: ``INFO < WARNING < ERROR``."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]

    @classmethod
    def coerce(cls, value: Severity | str) -> Severity:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"severity must be one of {[s.value for s in cls]}, got {value!r}"
            ) from None


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing a check saw.

    Args:
        check: a stable name from the check vocabulary (``flightcheck.CHECKS``).
        severity: ``info``, ``warning`` or ``error``.
        message: one sentence, what was seen, with the numbers.
        causes: the likely causes, most likely first.
        advice: what to try next.
        step: the trainer's global step (pre-flight uses 0).
        epoch: the trainer's epoch.
        source: ``preflight`` or the name of the monitor that reported it.
        data: the figures behind the message (JSON-serialisable).
        target: what the finding is about (a layer, a metric); findings are
            de-duplicated per ``(check, target)``.
    """

    check: str
    severity: Severity
    message: str
    causes: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()
    step: int = 0
    epoch: int = 0
    source: str = ""
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    target: str | None = None

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}; known checks: {sorted(CHECKS)}")
        object.__setattr__(self, "severity", Severity.coerce(self.severity))
        object.__setattr__(self, "causes", tuple(self.causes))
        object.__setattr__(self, "advice", tuple(self.advice))
        object.__setattr__(self, "data", jsonable(dict(self.data)))

    @property
    def key(self) -> tuple[str, str | None]:
        """The de-duplication key: a persisting problem is reported once per key."""
        return (self.check, self.target)

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity.value,
            "message": self.message,
            "causes": list(self.causes),
            "advice": list(self.advice),
            "step": int(self.step),
            "epoch": int(self.epoch),
            "source": self.source,
            "data": dict(self.data),
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Finding:
        return cls(
            check=d["check"],
            severity=Severity(d["severity"]),
            message=d["message"],
            causes=tuple(d.get("causes", ())),
            advice=tuple(d.get("advice", ())),
            step=int(d.get("step", 0)),
            epoch=int(d.get("epoch", 0)),
            source=d.get("source", ""),
            data=d.get("data", {}),
            target=d.get("target"),
        )

    def format(self, markdown: bool = False) -> str:
        """A human-readable block: headline, then causes and advice."""
        where = f" [{self.target}]" if self.target else ""
        head = f"{self.severity.value.upper()} {self.check}{where} (step {self.step}): {self.message}"
        lines = [f"**{head}**" if markdown else head]
        bullet = "- " if markdown else "    - "
        if self.causes:
            lines.append("Likely causes:" if markdown else "  likely causes:")
            lines.extend(bullet + c for c in self.causes)
        if self.advice:
            lines.append("Try:" if markdown else "  try:")
            lines.extend(bullet + a for a in self.advice)
        return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """Turn tensors, numpy scalars, tuples and non-finite floats into plain JSON values.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the JSONL file
    stays valid JSON (``json.dumps`` would otherwise write the non-standard ``NaN``).
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Sequence):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)
