"""The pre-flight battery: checks run on one batch before the first real training step.

Layout:

- :mod:`~flightcheck.preflight.registry` — checks are registered by name and phase;
- :mod:`~flightcheck.preflight.context` — what a check sees (batch, initial step, shared overfit,
  fitted model, ``evaluate`` on a modified batch);
- :mod:`~flightcheck.preflight.sandbox` — snapshot/restore and running the user's ``training_step``;
- :mod:`~flightcheck.preflight.fetch` — one batch without consuming the training loader;
- :mod:`~flightcheck.preflight.overfit` — the shared overfit run;
- one module per family of checks (``data``, ``loss``, ``gradients``, ``batch``, ``modes``);
- :mod:`~flightcheck.preflight.report` and :mod:`~flightcheck.preflight.battery`.

A new family of checks is a module here that registers its checks, listed in :data:`CHECK_MODULES`::

    from flightcheck.preflight.registry import Skip, register

    @register("target_leakage", phase="fitted", summary="the model does not read its targets")
    def target_leakage(ctx):
        if ctx.target_path is None:
            raise Skip("no target in the batch")
        shuffled = ctx.target[torch.randperm(len(ctx.target), device=ctx.target.device)]
        permuted = ctx.evaluate(ctx.replaced({ctx.target_path: shuffled}))  # the user's own step
        ...  # compare with ctx.fitted.loss and ctx.overfit.initial_loss; yield Verdicts

What a check can use: ``ctx.batch`` / ``ctx.target`` / ``ctx.inputs`` / ``ctx.replaced(...)``,
``ctx.initial`` (the step at initialisation), ``ctx.task``, ``ctx.overfit`` (the shared run:
losses, gradients, learning rates) and ``ctx.fitted`` (the step after it), ``ctx.evaluate(batch)``
(the step on a modified batch, nothing updated), ``ctx.initial_value(name)`` (a weight before the
overfit), :func:`~flightcheck.preflight.batch.probed_inputs` (gradients of the output with respect
to the inputs, token ids included), and :mod:`~flightcheck.preflight.fetch` (loaders' batches
without consuming them). Everything is undone when the battery ends.
"""

from __future__ import annotations

import importlib

#: Modules whose import registers checks, in report order within a phase.
CHECK_MODULES: tuple[str, ...] = ("data", "loss", "gradients", "batch", "modes", "leakage", "overlap")

_loaded = False


def load_checks() -> None:
    """Import every check module once (registration happens at import)."""
    global _loaded
    if not _loaded:
        for name in CHECK_MODULES:
            importlib.import_module(f"{__name__}.{name}")
        _loaded = True


from flightcheck.preflight.context import PreflightContext, PreflightOptions  # noqa: E402
from flightcheck.preflight.registry import Skip, register, registered  # noqa: E402
from flightcheck.preflight.report import CheckRow, PreflightReport, Status  # noqa: E402

__all__ = [
    "CHECK_MODULES",
    "CheckRow",
    "PreflightContext",
    "PreflightOptions",
    "PreflightReport",
    "Skip",
    "Status",
    "load_checks",
    "register",
    "registered",
]
