"""Where findings go: the JSONL file, TensorBoard text, the console and the user's hook.

Each sink only carries a finding out; judging happens in the checks, never here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from flightcheck.findings import Finding, Severity

log = logging.getLogger("flightcheck")

_LOG_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.ERROR: logging.ERROR}


def configure_console() -> None:
    """Give the ``flightcheck`` logger a handler unless the user configured logging.

    Uses rich's handler when rich is installed. Like Lightning's own logger, it does not
    propagate to the root logger once it has its own handler, so nothing prints twice.
    """
    if log.handlers or logging.getLogger().handlers:
        return
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    except ImportError:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[flightcheck] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class ConsoleSink:
    def emit(self, finding: Finding) -> None:
        log.log(_LOG_LEVEL[finding.severity], finding.format())


class JsonlSink:
    """Appends one JSON object a line and flushes each, so a killed run keeps its findings."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None

    def emit(self, finding: Finding) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._file.write(json.dumps(finding.to_dict(), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink:
    """One text entry per finding under ``flightcheck/findings/<check>`` and a running table."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._rows: list[str] = []

    def emit(self, finding: Finding) -> None:
        self.writer.add_text(f"flightcheck/findings/{finding.check}", finding.format(markdown=True), finding.step)
        message = finding.message.replace("|", "\\|")
        self._rows.append(
            f"| {finding.step} | {finding.severity.value} | {finding.check} | {finding.target or ''} | {message} |"
        )
        table = "| step | severity | check | target | message |\n|---|---|---|---|---|\n" + "\n".join(self._rows)
        self.writer.add_text("flightcheck/findings_table", table, finding.step)
        self.writer.flush()


class HookSink:
    """Calls the user's ``on_finding(finding)``; a failing hook is logged, never raised."""

    def __init__(self, hook: Callable[[Finding], Any]) -> None:
        self.hook = hook

    def emit(self, finding: Finding) -> None:
        try:
            self.hook(finding)
        except Exception as err:  # the user's alerting must not kill their training
            log.warning("flightcheck: on_finding hook raised %r; continuing", err)
