"""De-duplication of findings per ``(check, target)``.

A persisting problem is reported once; it is re-armed when the check says it cleared, and
reported again when it worsens (a higher severity). De-duplicating on the message text
would repeat the warning on every poll, because messages carry changing numbers.
"""

from __future__ import annotations

from typing import Any

from flightcheck.findings import Finding, Severity


class Deduplicator:
    """Remembers which ``(check, target)`` problems are active and how loud they were."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, str | None], Severity] = {}
        self.suppressed = 0

    def offer(self, finding: Finding) -> bool:
        """Whether ``finding`` is news: a new problem, or one that got worse."""
        previous = self._active.get(finding.key)
        if previous is not None and finding.severity.rank <= previous.rank:
            self.suppressed += 1
            return False
        self._active[finding.key] = finding.severity
        return True

    def clear(self, check: str, target: str | None = None) -> bool:
        """Re-arm a problem that is no longer seen; returns whether it was active."""
        return self._active.pop((check, target), None) is not None

    def is_active(self, check: str, target: str | None = None) -> bool:
        return (check, target) in self._active

    def state_dict(self) -> dict[str, Any]:
        return {
            "active": [[c, t, s.value] for (c, t), s in self._active.items()],
            "suppressed": self.suppressed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._active = {(c, t): Severity(s) for c, t, s in state.get("active", [])}
        self.suppressed = int(state.get("suppressed", 0))
