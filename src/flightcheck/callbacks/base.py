"""The shell every flightcheck callback shares: reporting, de-duplication, fault isolation.

Subclasses gather inputs at the right Lightning hook, call pure checks, and hand what they
judged to :meth:`FlightcheckCallback.report`. Every Lightning hook a subclass defines is
wrapped so that an internal failure becomes one ``internal_error`` finding and the callback
steps aside: a monitor must never be the reason a user's run dies. Only
:class:`FlightcheckError` (an explicit ``raise`` action, a failed pre-flight) propagates.

Distributed runs: a callback whose hooks take collectives (an agreement between ranks, a
reduction) must not step aside on one rank only, or the other ranks wait forever in the
next collective. Such a callback takes its collectives after :meth:`FlightcheckCallback.agree`
(one small collective that also carries "my copy failed") and says in
:meth:`FlightcheckCallback.collective_due` which hook calls agree. A rank whose copy failed
keeps answering those agreements (with "failed") until the others have heard it; then every
rank steps aside together, and rank 0 reports the failure.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import traceback
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from flightcheck._compat import Callback
from flightcheck.checks import Verdict
from flightcheck.errors import FlightcheckError
from flightcheck.findings import INTERNAL_ERROR, Finding, Severity
from flightcheck.reporting.dedup import Deduplicator
from flightcheck.reporting.hub import ReportHub, attach_hub, detach_hub, hub_for
from flightcheck.utils.distributed import Agreement, agree, world_size

log = logging.getLogger("flightcheck")

OnFinding = Callable[[Finding], Any]


_HOOK_NAMES = frozenset(
    name for name, _ in inspect.getmembers(Callback, inspect.isfunction) if name.startswith("on_")
) | {"setup", "teardown"}


#: flags one :meth:`FlightcheckCallback.agree` carries (besides "failed")
AGREEMENT_FLAGS = 4


class PeerFailed(Exception):
    """Raised by :meth:`FlightcheckCallback.agree` on the healthy ranks when this callback
    failed on another rank: every rank then steps aside together."""

    def __init__(self, agreement: Agreement) -> None:
        self.who = agreement.who(-1)
        super().__init__(f"failed on {self.who}")


def _guard(hook: Callable[..., Any]) -> Callable[..., Any]:
    name = hook.__name__

    @functools.wraps(hook)
    def guarded(self: FlightcheckCallback, *args: Any, **kwargs: Any) -> Any:
        trainer = args[0] if args else None
        if self._failed and name != "teardown":
            if self._owes_agreement:
                self._settle(name, trainer)
            return None
        ahead, self._agreements_taken = 0, 0
        try:
            ahead = self._collectives_ahead(name, trainer)
            return hook(self, *args, **kwargs)
        except FlightcheckError:
            raise
        except PeerFailed as peers:
            self._step_aside(name, peers, trainer, peers=peers.who)
            return None
        except Exception as err:  # noqa: BLE001 - fault isolation is the point
            self._step_aside(name, err, trainer)
            if ahead > self._agreements_taken:
                self._owes_agreement = True
                self._settle(name, trainer, now=True)  # the other ranks wait in this call's agreement
            elif self._has_collectives and world_size(trainer) > 1:
                self._owes_agreement = True  # answer the next agreement the others take
            return None

    guarded.__flightcheck_guarded__ = True  # type: ignore[attr-defined]
    return guarded


class FlightcheckCallback(Callback):
    """Base class of flightcheck callbacks.

    Args:
        on_finding: called with each new :class:`~flightcheck.Finding` on global rank 0,
            e.g. to send an alert from a long run. A hook that raises is logged (once per run,
            with its traceback) and never re-raised; it is still called for later findings.
    """

    #: the ``source`` of this callback's findings
    name: str = "flightcheck"
    #: whether the class overrides :meth:`collective_due` (its hooks take collectives)
    _has_collectives: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._has_collectives = cls.collective_due is not FlightcheckCallback.collective_due
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
        self._owes_agreement = False
        self._agreements_taken = 0
        self._hub: ReportHub | None = None
        self._trainer: Callable[[], Any] = lambda: None  # a weak reference, for checkpoint-time faults
        self._hook_warned: set[int] = set()

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        try:
            self._trainer = weakref.ref(trainer)
        except TypeError:  # not weak-referenceable (a stand-in trainer in a test)
            self._trainer = lambda: None
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
                self._on_finding_failed(hub, finding, err)
        return finding

    def _on_finding_failed(self, hub: ReportHub | None, finding: Finding, err: Exception) -> None:
        """Say once per run (per hook) that the user's ``on_finding`` raised, with its traceback;
        it is still called for later findings (an alerting service may come back)."""
        warned = hub.hook_failures if hub is not None else self._hook_warned
        if id(self.on_finding) in warned:
            log.debug("flightcheck: on_finding raised %r again (finding %s)", err, finding.check)
            return
        warned.add(id(self.on_finding))
        hook = getattr(self.on_finding, "__qualname__", type(self.on_finding).__name__)
        log.warning(
            "flightcheck: the on_finding hook %s raised %s: %s (on the %s finding). Training continues; findings "
            "still go to the findings file, TensorBoard and the console, and the hook is still called for each "
            "new finding. Said once per run.",
            hook, type(err).__name__, err, finding.check, exc_info=err,
        )

    def resolve(self, check: str, target: str | None = None) -> bool:
        """Say a problem cleared, so that it is reported again if it comes back."""
        return self._dedup.clear(check, target)

    def _step_aside(self, hook: str, err: BaseException, trainer: Any, peers: str | None = None) -> None:
        self._failed = True
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
        trainer = trainer if hasattr(trainer, "global_step") else None
        name = type(self).__name__
        if peers is None:
            message = (f"{name}.{hook} failed with {type(err).__name__}: {err}; "
                       f"{name} is switched off for the rest of this run, training continues.")
            data = {"hook": hook, "error": repr(err), "traceback": tb}
        else:
            message = (f"{name} failed on {peers} (see that rank's log for the traceback); {name} is switched "
                       "off on every rank for the rest of this run, training continues.")
            data = {"hook": hook, "error": f"failed on {peers}"}
        finding = Finding(
            check=INTERNAL_ERROR,
            severity=Severity.WARNING,
            message=message,
            causes=("a case this check does not handle (an unusual model, batch or strategy)",),
            advice=("please report it with the traceback in this finding's data",),
            step=int(getattr(trainer, "global_step", 0)) if trainer is not None else 0,
            epoch=int(getattr(trainer, "current_epoch", 0)) if trainer is not None else 0,
            source=self.name,
            data=data,
            target=f"{name}.{hook}",
        )
        try:
            self.publish(trainer, finding)
        except Exception:  # noqa: BLE001 - even reporting failed: say it on the console only
            log.warning("flightcheck: %s", finding.message)
        if peers is None and trainer is not None and world_size(trainer) > 1:
            # only rank 0 writes findings: the traceback of another rank goes to its console
            log.warning("flightcheck (rank %s): %s\n%s", getattr(trainer, "global_rank", "?"), message, tb)

    # ------------------------------------------------------------------ agreement between ranks
    def collective_due(self, hook: str, trainer: Any) -> int:
        """How many :meth:`agree` calls this call of ``hook`` takes on a healthy rank.

        A subclass whose hooks take collectives overrides it (and then takes every collective
        of such a call after its first :meth:`agree`). It is asked before each call of a hook
        and, once the callback failed on this rank, instead of running the hook; it must
        answer the same on every rank, without a collective.
        """
        return 0

    def agree(self, trainer: Any, *flags: bool) -> Agreement:
        """``flags`` summed over the ranks, in one collective that also carries whether this
        callback failed on some rank; raises :class:`PeerFailed` on the healthy ranks then."""
        if len(flags) > AGREEMENT_FLAGS:
            raise ValueError(f"agree() takes at most {AGREEMENT_FLAGS} flags, got {len(flags)}")
        self._agreements_taken += 1
        # a fixed length: a failed rank answers with no flags of its own, and the vectors must match
        padded = [*flags] + [False] * (AGREEMENT_FLAGS - len(flags))
        agreement = agree(trainer, [*padded, self._failed])
        if agreement[-1] and not self._failed:
            raise PeerFailed(agreement)
        return agreement

    def _collectives_ahead(self, hook: str, trainer: Any) -> int:
        if not self._has_collectives or world_size(trainer) <= 1:
            return 0
        return self.collective_due(hook, trainer)

    def _settle(self, hook: str, trainer: Any, now: bool = False) -> None:
        """On a rank whose copy failed: answer the agreement the other ranks take in this call."""
        if not now and self._collectives_ahead(hook, trainer) <= 0:
            return
        self._owes_agreement = False
        try:
            self.agree(trainer)
        except Exception as err:  # noqa: BLE001 - the collective itself broke: nothing left to save
            log.warning("flightcheck: %s could not tell the other ranks it stepped aside: %r", type(self).__name__, err)

    # ------------------------------------------------------------------ checkpoints
    # Lightning calls these directly (they are not hooks): they are guarded here, so that a
    # state that cannot be saved or restored costs neither the checkpoint nor the resume.
    def state_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if not self._failed:
            try:
                extra = self.extra_state()
            except Exception as err:  # noqa: BLE001 - the checkpoint is saved without this state
                self._contain("state_dict", err)
        return {
            "dedup": self._dedup.state_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "state": extra,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self._dedup.load_state_dict(state_dict.get("dedup", {}))
            self.findings = [Finding.from_dict(d) for d in state_dict.get("findings", [])]
            self.load_extra_state(state_dict.get("state", {}))
        except Exception as err:  # noqa: BLE001 - the run resumes; this callback steps aside
            self._contain("load_state_dict", err)

    def _contain(self, method: str, err: Exception) -> None:
        trainer = self._trainer()
        self._step_aside(method, err, trainer)
        if self._has_collectives and trainer is not None and world_size(trainer) > 1:
            self._owes_agreement = True  # answer the next agreement the other ranks take

    def extra_state(self) -> dict[str, Any]:
        """A subclass's baselines and windows, saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""


# The base class's own hooks are guarded like every subclass's (``__init_subclass__`` does not
# see the class that defines it).
for _name in ("setup", "teardown"):
    setattr(FlightcheckCallback, _name, _guard(vars(FlightcheckCallback)[_name]))
del _name


#: A run of known length is looked at (host transfer, judgement, charts) at least this many
#: times: what a look finds is reported within 1/32 of the run, and a finding that must be seen
#: twice (``confirm``) within 1/16. Long runs look at Lightning's logging cadence; this only
#: quickens short runs, where Lightning's default ``log_every_n_steps=50`` would leave a
#: 300-step run six looks and a finding nothing before a third of it was spent.
LOOKS_PER_RUN = 32
#: ... but never more often than every this many optimizer steps (unless Lightning logs more
#: often): statistics over fewer points than this say little, and a look costs a host transfer.
MIN_LOOK_INTERVAL = 10


def planned_steps(trainer: Any) -> float | None:
    """The optimizer steps the run plans (``trainer.estimated_stepping_batches``), ``None`` when
    it has no planned end (an iterable without length, ``max_steps=-1`` with no epoch limit)."""
    try:
        planned = float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - no estimate, or an unusual trainer
        return None
    return planned if math.isfinite(planned) and planned > 0 else None


_intervals: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()


def look_interval(trainer: Any) -> int:
    """Optimizer steps between flightcheck's looks: Lightning's ``log_every_n_steps``, or
    fewer so that a run of known length is looked at :data:`LOOKS_PER_RUN` times (never more
    often than every :data:`MIN_LOOK_INTERVAL` steps, unless Lightning logs more often)."""
    log_every = int(getattr(trainer, "log_every_n_steps", 50) or 0)
    key = (log_every, getattr(trainer, "max_steps", None), getattr(trainer, "max_epochs", None),
           getattr(trainer, "num_training_batches", None), getattr(trainer, "accumulate_grad_batches", None))
    try:
        cached = _intervals.get(trainer)
    except TypeError:  # not weak-referenceable: no cache
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    planned = planned_steps(trainer)
    every = log_every if log_every > 0 else 50
    if planned is not None:
        every = min(every, max(MIN_LOOK_INTERVAL, int(planned) // LOOKS_PER_RUN))
    every = max(1, every)
    try:
        _intervals[trainer] = (key, every)
    except TypeError:
        pass
    return every


def looking_due(trainer: Any) -> bool:
    """Whether the optimizer step now being taken is one flightcheck looks on: every
    :func:`look_interval` steps, counted the way Lightning counts its logging steps
    (``(global_step + 1) % every``), so that on a long run they are Lightning's logging steps
    and the host transfer falls where Lightning already syncs."""
    return (int(getattr(trainer, "global_step", 0)) + 1) % look_interval(trainer) == 0
