"""The pre-flight report: one row per check (pass, warn, fail, skipped and why, internal error)."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from typing import Any

from flightcheck.checks import Verdict
from flightcheck.findings import Severity, jsonable


class Status(str, enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIPPED = "skipped"
    ERROR = "error"  # the check itself failed; reported as an internal_error finding


@dataclasses.dataclass
class CheckRow:
    """One check's outcome."""

    check: str
    status: Status
    message: str = ""
    seconds: float = 0.0
    verdicts: list[Verdict] = dataclasses.field(default_factory=list)
    traceback: str = ""  # for ``error`` rows: where the check failed

    @classmethod
    def from_verdicts(cls, check: str, verdicts: Sequence[Verdict], seconds: float) -> CheckRow:
        if not verdicts:
            return cls(check, Status.PASS, "ok", seconds)
        worst = max(verdicts, key=lambda v: Severity.coerce(v.severity).rank)
        status = {Severity.ERROR: Status.FAIL, Severity.WARNING: Status.WARN, Severity.INFO: Status.PASS}[
            Severity.coerce(worst.severity)
        ]
        extra = sum(1 for v in verdicts if v is not worst and Severity.coerce(v.severity) != Severity.INFO)
        message = worst.message + (f" (+{extra} more)" if extra else "")
        return cls(check, status, message, seconds, list(verdicts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status.value,
            "message": self.message,
            "seconds": round(self.seconds, 4),
            **({"traceback": self.traceback} if self.traceback else {}),
            "verdicts": [
                {
                    "severity": Severity.coerce(v.severity).value,
                    "message": v.message,
                    "target": v.target,
                    "causes": list(v.causes),
                    "advice": list(v.advice),
                    "data": jsonable(dict(v.data)),
                }
                for v in self.verdicts
            ],
        }


@dataclasses.dataclass
class PreflightReport:
    """Every check's row, the time taken and the memory the snapshot needed.

    ``report.failed`` says whether any check failed; ``report["init_loss"]`` is that check's row;
    ``str(report)`` is the table printed to the console.
    """

    rows: list[CheckRow] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    snapshot_bytes: int = 0
    skipped: str | None = None  # why the whole pre-flight did not run
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(r.status is Status.FAIL for r in self.rows)

    @property
    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if r.status is Status.FAIL]

    def __getitem__(self, check: str) -> CheckRow:
        for row in self.rows:
            if row.check == check:
                return row
        raise KeyError(f"no row for check {check!r}; rows: {[r.check for r in self.rows]}")

    def __contains__(self, check: object) -> bool:
        return any(r.check == check for r in self.rows)

    def summary(self) -> str:
        if self.skipped:
            return f"pre-flight skipped: {self.skipped}"
        counts = {s: sum(1 for r in self.rows if r.status is s) for s in Status}
        parts = [f"{n} {s.value}" for s, n in counts.items() if n]
        return f"pre-flight: {', '.join(parts) or 'no checks'} in {self.seconds:.2f} s"

    def to_text(self, width: int = 100) -> str:
        lines = [self.summary()]
        if self.rows:
            name_w = max(len(r.check) for r in self.rows)
            for r in self.rows:
                message = r.message if len(r.message) <= width else r.message[: width - 3] + "..."
                lines.append(f"  {r.check:<{name_w}}  {r.status.value:<7}  {r.seconds:6.2f}s  {message}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [f"**{self.summary()}**", ""]
        if self.rows:
            lines += ["| check | status | time (s) | details |", "| --- | --- | --- | --- |"]
            for r in self.rows:
                message = r.message.replace("|", "\\|").replace("\n", " ")
                lines.append(f"| `{r.check}` | {r.status.value} | {r.seconds:.2f} | {message} |")
        if self.snapshot_bytes:
            lines += ["", f"Snapshot: {self.snapshot_bytes / 2**20:.2f} MiB."]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "failed": self.failed,
            "seconds": round(self.seconds, 4),
            "snapshot_bytes": self.snapshot_bytes,
            "skipped": self.skipped,
            "info": jsonable(self.info),
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def __str__(self) -> str:
        return self.to_text()


__all__ = ["CheckRow", "PreflightReport", "Status"]
