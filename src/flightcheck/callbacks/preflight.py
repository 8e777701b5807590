r"""
Preflight
=========

Checks the model and data pipeline on one batch before the first real training step, the way
an experienced practitioner does by hand before a long run: can the model overfit one batch,
is the initial loss what the loss function predicts, does every trainable parameter get a
gradient, are the samples of a batch independent, are inputs and targets sane.

It runs at ``on_fit_start`` (after the strategy has set up the model and the optimizers), on
the real model with the user's own ``training_step`` and optimizer, inside a sandbox that puts
everything back afterwards: training after the pre-flight is bit-identical to training without
it. A failed check stops the run with :class:`~flightcheck.PreflightError` before any real step,
unless ``on_fail="warn"``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from typing import Any

from flightcheck.callbacks.base import FlightcheckCallback, OnFinding
from flightcheck.errors import PreflightError
from flightcheck.findings import INTERNAL_ERROR, PREFLIGHT_CHECKS, Severity
from flightcheck.preflight.battery import run_battery
from flightcheck.preflight.context import PreflightOptions
from flightcheck.preflight.overlap import OVERLAP_BATCHES
from flightcheck.preflight.registry import registered
from flightcheck.preflight.report import PreflightReport, Status
from flightcheck.reporting.sinks import configure_console

log = logging.getLogger("flightcheck")

ON_FAIL = ("raise", "warn")
SNAPSHOT = ("host", "device")
REPORT_TAG = "flightcheck/preflight/report"
REPORT_BASENAME = "preflight_report"


def _check_names(value: Iterable[str] | None, parameter: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    try:
        names = list(value)
    except TypeError:
        raise TypeError(
            f"Preflight({parameter}=...) takes a check name or a list of them (from flightcheck.PREFLIGHT_CHECKS), "
            f"got {type(value).__name__}"
        ) from None
    unknown = [n for n in names if n not in PREFLIGHT_CHECKS]
    if unknown:
        raise ValueError(
            f"Preflight({parameter}=...) got unknown check name(s) {unknown}; accepted: {list(PREFLIGHT_CHECKS)}"
        )
    return names


class Preflight(FlightcheckCallback):
    r"""Run the pre-flight battery on the first training batch at ``on_fit_start``.

    Args:
        checks: names of the checks to run (from ``flightcheck.PREFLIGHT_CHECKS``); ``None``
            runs every check available.
        skip: names of checks to leave out, e.g. ``skip=["class_imbalance"]`` for data that is
            imbalanced on purpose.
        on_fail: ``"raise"`` (default) stops the run with :class:`~flightcheck.PreflightError`
            before any real step when a check fails; ``"warn"`` reports and trains anyway.
            Warnings never stop a run.
        max_steps: the most optimisation steps the overfit-one-batch test takes. It stops as
            soon as the batch is fitted (loss at a tenth of its start, or every sample right),
            which takes a few dozen steps for a healthy small model.
        max_seconds: the most wall-clock seconds the overfit test takes, whatever ``max_steps``
            says, so a large model's pre-flight stays short. Progress is logged every 10 s.
        num_classes: the number of classes, when the model's output does not show it; also
            makes ``label_range`` check the labels against it.
        expected_init_loss: the loss you expect at initialisation; by default it is inferred
            (ln C for C-class cross-entropy, ln 2 for binary cross-entropy).
        target: where the batch holds the targets: an index into a tuple batch or a key of a
            dict batch. By default the last element of a tuple, or a key named ``y``,
            ``target(s)`` or ``label(s)``.
        snapshot: where the copy of the model and optimizer state taken before the checks is
            kept: ``"host"`` memory (default: costs no accelerator memory) or ``"device"``
            (faster to take and restore). There is never more than one copy.
        causal: whether the model is autoregressive, for ``causal_leakage``: ``None`` (default)
            recognises next-token batches (targets equal to the inputs shifted by one position,
            or to the inputs themselves); ``True`` declares it (e.g. a batch of one token tensor
            that ``training_step`` shifts itself); ``False`` switches the check off.
        overlap_batches: how many batches' worth of samples of each split ``split_overlap``
            hashes (at most; it also stops after 10 s per split).
        run_on_resume: also run when ``fit`` resumes from a checkpoint or continues a trainer
            that already trained (skipped by default: the model was already checked, and its
            state is no longer an initialisation).
        on_finding: called with each new finding (see :class:`~flightcheck.FlightcheckCallback`).

    The report (``preflight.last_report``) has one row per check: ``pass``, ``warn``, ``fail``,
    ``skipped`` with the reason, or ``error`` when the check itself failed (reported as an
    ``internal_error`` finding; the other checks still run). It is logged to the console,
    written to TensorBoard as text (``flightcheck/preflight/report``) and to
    ``<log_dir>/flightcheck/preflight_report.md`` and ``.json``; each failing or warning check
    is also a finding.

    Example::

        import lightning as L
        from flightcheck import Preflight

        trainer = L.Trainer(callbacks=[Preflight(skip=["class_imbalance"], max_seconds=60)])
        trainer.fit(model, datamodule=dm)  # raises PreflightError before step 1 if a check fails
    """

    name = "preflight"

    def __init__(
        self,
        checks: Iterable[str] | None = None,
        skip: Iterable[str] = (),
        on_fail: str = "raise",
        max_steps: int = 100,
        max_seconds: float = 30.0,
        num_classes: int | None = None,
        expected_init_loss: float | None = None,
        target: int | str | None = None,
        snapshot: str = "host",
        run_on_resume: bool = False,
        causal: bool | None = None,
        overlap_batches: int = OVERLAP_BATCHES,
        on_finding: OnFinding | None = None,
    ) -> None:
        super().__init__(on_finding=on_finding)
        self.checks = _check_names(checks, "checks")
        self.skip = _check_names(skip, "skip") or []
        if self.checks is not None and not [n for n in self.checks if n not in self.skip]:
            raise ValueError(
                f"Preflight(checks={self.checks}, skip={self.skip}) selects no check; give check names from "
                "flightcheck.PREFLIGHT_CHECKS, or leave the pre-flight out (default_callbacks(preflight=False))"
            )
        if on_fail not in ON_FAIL:
            raise ValueError(f"Preflight(on_fail=...) must be one of {list(ON_FAIL)}, got {on_fail!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"Preflight(max_steps=...) must be an int >= 1, got {max_steps!r}")
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds > 0:
            raise ValueError(f"Preflight(max_seconds=...) must be a number > 0, got {max_seconds!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"Preflight(num_classes=...) must be None or an int >= 2, got {num_classes!r}")
        if expected_init_loss is not None and (
            isinstance(expected_init_loss, bool)
            or not isinstance(expected_init_loss, (int, float))
            or not math.isfinite(expected_init_loss)
        ):
            raise ValueError(
                f"Preflight(expected_init_loss=...) must be None or a finite number, got {expected_init_loss!r}"
            )
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, str))):
            raise TypeError(
                f"Preflight(target=...) must be None, an int index or a str key, got {type(target).__name__}"
            )
        if snapshot not in SNAPSHOT:
            raise ValueError(f"Preflight(snapshot=...) must be one of {list(SNAPSHOT)}, got {snapshot!r}")
        if causal is not None and not isinstance(causal, bool):
            raise TypeError(f"Preflight(causal=...) must be None, True or False, got {causal!r}")
        if isinstance(overlap_batches, bool) or not isinstance(overlap_batches, int) or overlap_batches < 1:
            raise ValueError(f"Preflight(overlap_batches=...) must be an int >= 1, got {overlap_batches!r}")
        if not isinstance(run_on_resume, bool):
            raise TypeError(f"Preflight(run_on_resume=...) must be a bool, got {type(run_on_resume).__name__}")
        self.on_fail = on_fail
        self.run_on_resume = run_on_resume
        self.options = PreflightOptions(
            max_steps=max_steps,
            max_seconds=float(max_seconds),
            num_classes=num_classes,
            expected_init_loss=None if expected_init_loss is None else float(expected_init_loss),
            target=target,
            snapshot_on_device=snapshot == "device",
            causal=causal,
            overlap_batches=overlap_batches,
        )
        #: the report of the last pre-flight (``None`` before one ran)
        self.last_report: PreflightReport | None = None

    def selected_checks(self) -> list[str]:
        """The checks this callback will run, in report order."""
        if self.checks is not None:
            names = self.checks
        else:
            available = registered()
            names = [n for n in PREFLIGHT_CHECKS if n in available]
        return [n for n in names if n not in self.skip]

    # ------------------------------------------------------------------ the hook
    def collective_due(self, hook: str, trainer: Any) -> int:
        # every rank agrees on the verdict once, at the end of a pre-flight that runs
        return int(hook == "on_fit_start" and not (_resumed(trainer) and not self.run_on_resume))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        resumed = _resumed(trainer)
        if resumed and not self.run_on_resume:
            self.last_report = PreflightReport(skipped=f"{resumed} (pass run_on_resume=True to check anyway)")
            if getattr(trainer, "is_global_zero", True):
                log.info("flightcheck %s", self.last_report.summary())
            return
        report = run_battery(trainer, pl_module, self.selected_checks(), self.options)
        self.last_report = report
        self._publish(trainer, report)
        failed = report.failed
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
            failed = self.agree(trainer, failed)[0]  # also hears whether the pre-flight broke on a rank
        if failed and self.on_fail == "raise":
            names = ", ".join(r.check for r in report.failures) or "a check on another rank"
            raise PreflightError(
                f"flightcheck pre-flight failed ({names}); nothing was trained. See the report above, "
                "or pass Preflight(on_fail='warn') to train anyway, or skip=[...] to switch a check off.\n"
                + report.to_text(),
                report=report,
            )

    # ------------------------------------------------------------------ reporting
    def _publish(self, trainer: Any, report: PreflightReport) -> None:
        for row in report.rows:
            if row.status in (Status.FAIL, Status.WARN):
                for verdict in row.verdicts:
                    if Severity.coerce(verdict.severity) is not Severity.INFO:
                        self.report_verdict(trainer, verdict, step=0)
            elif row.status is Status.ERROR:
                self.report(
                    trainer,
                    INTERNAL_ERROR,
                    Severity.WARNING,
                    f"pre-flight check {row.check} failed internally ({row.message}); its row is marked error and "
                    "the other checks ran.",
                    causes=("a model, batch or setup this check does not handle",),
                    advice=(f"skip it with Preflight(skip=[{row.check!r}]) and please report the traceback",),
                    target=f"preflight.{row.check}",
                    data={"traceback": row.traceback},
                    step=0,
                )
        hub = self.hub(trainer)
        if not hub.is_writer:
            return
        configure_console()
        log.log(logging.WARNING if report.failed else logging.INFO, "flightcheck %s", report.to_text())
        writer = hub.tensorboard
        if writer is not None:
            writer.add_text(REPORT_TAG, report.to_markdown(), global_step=0)
        if hub.findings_dir is not None:
            os.makedirs(hub.findings_dir, exist_ok=True)
            base = os.path.join(hub.findings_dir, REPORT_BASENAME)
            with open(base + ".md", "w", encoding="utf-8") as f:
                f.write(report.to_markdown() + "\n")
            with open(base + ".json", "w", encoding="utf-8") as f:
                f.write(report.to_json() + "\n")

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {"report": self.last_report.to_dict() if self.last_report is not None else None}


def _resumed(trainer: Any) -> str | None:
    if getattr(trainer, "ckpt_path", None):
        return "resuming from a checkpoint"
    if int(getattr(trainer, "global_step", 0) or 0) > 0:
        return f"the model already trained for {trainer.global_step} steps"
    return None


__all__ = ["Preflight"]
