"""The pre-flight battery's checks, registered by name.

A check is one function of a :class:`~flightcheck.preflight.context.PreflightContext`, in a
module of this package, registered with :func:`register`::

    @register("input_scale", phase="batch", summary="inputs look normalised")
    def input_scale(ctx: PreflightContext) -> Iterable[Verdict]:
        ...

It returns (or yields) :class:`~flightcheck.checks.Verdict` objects: ``error`` makes its row
fail, ``warning`` warn, ``info`` is a note on a passing row; nothing means pass. It raises
:class:`Skip` with a reason when it cannot apply. Any other exception becomes an
``internal_error`` row for that check alone.

Phases order the battery: ``batch`` checks see only the batch; ``initial`` checks also see one
``training_step`` at initialisation (``ctx.initial``); ``fitted`` checks run after the shared
overfit budget (``ctx.overfit``, ``ctx.fitted``) and may run ``training_step`` again on a
modified batch (``ctx.evaluate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from flightcheck.checks import Verdict
from flightcheck.findings import PREFLIGHT_CHECKS

PHASES: tuple[str, ...] = ("batch", "initial", "fitted")

CheckFn = Callable[[Any], "Iterable[Verdict] | Verdict | None"]


class Skip(Exception):  # noqa: N818 - reads as ``raise Skip("why")``
    """A check cannot apply to this model or batch; the message is the reason shown in its row."""


@dataclasses.dataclass(frozen=True)
class RegisteredCheck:
    name: str
    fn: CheckFn
    phase: str
    summary: str


_REGISTRY: dict[str, RegisteredCheck] = {}


def register(name: str, *, phase: str, summary: str = "") -> Callable[[CheckFn], CheckFn]:
    """Add a check to the battery under ``name`` (one of ``flightcheck.PREFLIGHT_CHECKS``)."""
    if name not in PREFLIGHT_CHECKS:
        raise ValueError(
            f"pre-flight check name {name!r} is not in flightcheck.PREFLIGHT_CHECKS {list(PREFLIGHT_CHECKS)}"
        )
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")

    def decorator(fn: CheckFn) -> CheckFn:
        _REGISTRY[name] = RegisteredCheck(name, fn, phase, summary)
        return fn

    return decorator


def registered() -> dict[str, RegisteredCheck]:
    """Every registered check, importing the check modules first."""
    from flightcheck import preflight

    preflight.load_checks()
    return dict(_REGISTRY)


def as_verdicts(result: Iterable[Verdict] | Verdict | None) -> list[Verdict]:
    if result is None:
        return []
    if isinstance(result, Verdict):
        return [result]
    return list(result)


__all__ = ["PHASES", "RegisteredCheck", "Skip", "as_verdicts", "register", "registered"]
