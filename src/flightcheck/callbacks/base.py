"""The shell every flightcheck callback shares: reporting, de-duplication, fault isolation.

Subclasses gather inputs at the right Lightning hook, call pure checks, and hand what they
judged to :meth:`FlightcheckCallback.report`. Every Lightning hook a subclass defines is
wrapped so that an internal failure becomes one ``internal_error`` finding and the callback
steps aside: a monitor must never be the reason a user's run dies. Only
:class:`FlightcheckError` (an explicit ``raise`` action, a failed pre-flight) propagates.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from flightcheck._compat import Callback
from flightcheck.checks import Verdict
from flightcheck.errors import FlightcheckError
from flightcheck.findings import INTERNAL_ERROR, Finding, Severity
from flightcheck.reporting.dedup import Deduplicator
from flightcheck.reporting.hub import ReportHub, attach_hub, detach_hub, hub_for

log = logging.getLogger("flightcheck")

OnFinding = Callable[[Finding], Any]


_HOOK_NAMES = frozenset(
    name for name, _ in inspect.getmembers(Callback, inspect.isfunction) if name.startswith("on_")
) | {"setup", "teardown"}


def _guard(hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def guarded(self: FlightcheckCallback, *args: Any, **kwargs: Any) -> Any:
        if self._failed and hook.__name__ not in ("teardown",):
            return None
        try:
            return hook(self, *args, **kwargs)
        except FlightcheckError:
            raise
        except Exception as err:  # noqa: BLE001 - fault isolation is the point
            self._step_aside(hook.__name__, err, args[0] if args else None)
            return None

    guarded.__flightcheck_guarded__ = True  # type: ignore[attr-defined]
    return guarded


class FlightcheckCallback(Callback):
    """Base class of flightcheck callbacks.

    Args:
        on_finding: called with each new :class:`~flightcheck.Finding` on global rank 0,
            e.g. to send an alert from a long run. A hook that raises is logged and ignored.
    """

    #: the ``source`` of this callback's findings
    name: str = "flightcheck"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in list(vars(cls).items()):
            if attr in _HOOK_NAMES and callable(value) and not getattr(value, "__flightcheck_guarded__", False):
                setattr(cls, attr, _guard(value))

    def __init__(self, on_finding: OnFinding | None = None) -> None:
        if on_finding is not None and not callable(on_finding):
            raise TypeError(f"on_finding must be a callable taking a Finding, got {type(on_finding).__name__}")
        self.on_finding = on_finding
        self.findings: list[Finding] = []
        self._dedup = Deduplicator()
        self._failed = False
        self._hub: ReportHub | None = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._hub = attach_hub(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._hub is not None:
            detach_hub(trainer)
            self._hub = None

    def hub(self, trainer: Any) -> ReportHub:
        return self._hub if self._hub is not None else hub_for(trainer)

    # ------------------------------------------------------------------ reporting
    def report(
        self,
        trainer: Any,
        check: str,
        severity: Severity | str,
        message: str,
        *,
        causes: Iterable[str] = (),
        advice: Iterable[str] = (),
        target: str | None = None,
        data: dict[str, Any] | None = None,
        step: int | None = None,
    ) -> Finding | None:
        """Record a finding; returns it when it is news, ``None`` when de-duplicated."""
        finding = Finding(
            check=check,
            severity=Severity.coerce(severity),
            message=message,
            causes=tuple(causes),
            advice=tuple(advice),
            step=int(step if step is not None else getattr(trainer, "global_step", 0)),
            epoch=int(getattr(trainer, "current_epoch", 0)),
            source=self.name,
            data=data or {},
            target=target,
        )
        return self.publish(trainer, finding)

    def report_verdict(self, trainer: Any, verdict: Verdict, step: int | None = None) -> Finding | None:
        """Report what a pure check concluded."""
        return self.report(
            trainer,
            verdict.check,
            verdict.severity,
            verdict.message,
            causes=verdict.causes,
            advice=verdict.advice,
            target=verdict.target,
            data=dict(verdict.data),
            step=step,
        )

    def publish(self, trainer: Any, finding: Finding) -> Finding | None:
        """Send an already built finding through de-duplication and out to every sink."""
        if not self._dedup.offer(finding):
            return None
        self.findings.append(finding)
        hub = self.hub(trainer) if trainer is not None else None
        if hub is not None:
            hub.emit(finding)
        if self.on_finding is not None and (hub is None or hub.is_writer):
            try:
                self.on_finding(finding)
            except Exception as err:  # noqa: BLE001 - user alerting must not kill training
                log.warning("flightcheck: on_finding hook raised %r; continuing", err)
        return finding

    def resolve(self, check: str, target: str | None = None) -> bool:
        """Say a problem cleared, so that it is reported again if it comes back."""
        return self._dedup.clear(check, target)

    def _step_aside(self, hook: str, err: BaseException, trainer: Any) -> None:
        self._failed = True
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
        trainer = trainer if hasattr(trainer, "global_step") else None
        finding = Finding(
            check=INTERNAL_ERROR,
            severity=Severity.WARNING,
            message=f"{type(self).__name__}.{hook} failed with {type(err).__name__}: {err}; "
            f"{type(self).__name__} is switched off for the rest of this run, training continues.",
            causes=("a case this check does not handle (an unusual model, batch or strategy)",),
            advice=("please report it with the traceback in this finding's data",),
            step=int(getattr(trainer, "global_step", 0)) if trainer is not None else 0,
            epoch=int(getattr(trainer, "current_epoch", 0)) if trainer is not None else 0,
            source=self.name,
            data={"hook": hook, "error": repr(err), "traceback": tb},
            target=f"{type(self).__name__}.{hook}",
        )
        try:
            self.publish(trainer, finding)
        except Exception:  # noqa: BLE001 - even reporting failed: say it on the console only
            log.warning("flightcheck: %s", finding.message)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "dedup": self._dedup.state_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "state": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._dedup.load_state_dict(state_dict.get("dedup", {}))
        self.findings = [Finding.from_dict(d) for d in state_dict.get("findings", [])]
        self.load_extra_state(state_dict.get("state", {}))

    def extra_state(self) -> dict[str, Any]:
        """A subclass's baselines and windows, saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""


def logging_due(trainer: Any) -> bool:
    """Whether the optimizer step now being taken is one the trainer logs on.

    Matches Lightning's own rule (``(batches_that_stepped + 1) % log_every_n_steps``), so
    flightcheck moves its numbers to the host on the steps Lightning already does.
    """
    every = int(getattr(trainer, "log_every_n_steps", 50) or 0)
    if every <= 0:
        return False
    return (int(getattr(trainer, "global_step", 0)) + 1) % every == 0
