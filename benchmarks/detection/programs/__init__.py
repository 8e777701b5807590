"""The detection benchmark's programs: small Lightning training runs, each healthy or carrying one bug.

Every program is a plain function ``build(seed) -> (module, data, trainer_kwargs)`` registered
with :func:`program`. ``data`` is a ``LightningDataModule`` or a ``(train_loader, val_loader)``
pair; ``trainer_kwargs`` holds only what the program itself chooses (run length, precision,
accumulation, clipping); the harness adds the rest. A program declares:

- ``name``: unique, snake_case;
- ``kind``: ``"bug"`` or ``"healthy"``;
- ``expected_checks``: the flightcheck check names that genuinely describe the bug (a bug is
  caught when a warning or error names one of them); empty for healthy programs;
- ``phase``: ``"preflight"`` when the bug is present and observable before the first optimizer
  step (in the model, the loss, the optimizer set-up or the first batches), ``"inflight"`` when it
  only shows during training (a NaN at some step, a schedule, overfitting);
- ``summary``: one line for the README.

Programs are grouped in modules by family (one file each); :func:`all_programs` imports them all.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

KINDS = ("bug", "healthy")
PHASES = ("preflight", "inflight")
#: display order of the families; other modules of this package follow, alphabetically
FAMILIES = ("healthy", "loss_bugs", "optim_bugs", "data_bugs", "numeric_bugs", "model_bugs", "leakage")

Build = Callable[[int], tuple[Any, Any, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    kind: str
    expected_checks: frozenset[str]
    phase: str
    build: Build
    summary: str
    family: str


_REGISTRY: dict[str, Program] = {}


def program(
    name: str,
    *,
    kind: str,
    summary: str,
    expected: Iterable[str] = (),
    phase: str = "preflight",
) -> Callable[[Build], Build]:
    """Register ``build`` as a benchmark program (see the module docstring for the fields)."""
    from flightcheck import CHECKS

    expected = frozenset(expected)
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}, got {kind!r}")
    if phase not in PHASES:
        raise ValueError(f"{name}: phase must be one of {PHASES}, got {phase!r}")
    unknown = sorted(expected - CHECKS)
    if unknown:
        raise ValueError(f"{name}: unknown check name(s) {unknown}")
    if (kind == "bug") != bool(expected):
        raise ValueError(f"{name}: a bug program names its expected checks, a healthy one names none")

    def register(build: Build) -> Build:
        if name in _REGISTRY:
            raise ValueError(f"program {name!r} registered twice")
        family = build.__module__.rsplit(".", 1)[-1]
        _REGISTRY[name] = Program(name, kind, expected, phase, build, summary, family)
        return build

    return register


def _family_order(family: str) -> tuple[int, str]:
    return (FAMILIES.index(family), "") if family in FAMILIES else (len(FAMILIES), family)


def all_programs() -> dict[str, Program]:
    """Every registered program by name, healthy ones first, each family in file order.

    Every module of this package except ``common`` is a family; a new file is picked up as is.
    """
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: _family_order(m.name)):
        if info.name != "common":
            importlib.import_module(f"{__name__}.{info.name}")
    ordered = sorted(_REGISTRY.values(), key=lambda p: (p.kind != "healthy", _family_order(p.family)))
    return {p.name: p for p in ordered}
