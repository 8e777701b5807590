"""Run the pre-flight battery: take a batch, open the sandbox, run each check in isolation, report."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from typing import Any

from torch import nn

from flightcheck.errors import FlightcheckError
from flightcheck.preflight.context import PreflightContext, PreflightOptions
from flightcheck.preflight.fetch import NoBatch, first_batch
from flightcheck.preflight.overfit import OverfitRun
from flightcheck.preflight.registry import PHASES, RegisteredCheck, Skip, as_verdicts, registered
from flightcheck.preflight.report import CheckRow, PreflightReport, Status
from flightcheck.preflight.roles import path_str
from flightcheck.preflight.sandbox import sandbox


def unsupported(trainer: Any, module: nn.Module) -> str | None:
    """Why the pre-flight cannot run on this setup, or ``None``."""
    model = getattr(trainer.strategy, "model", None)
    if model is not None and model is not module:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            return f"the {type(trainer.strategy).__name__} strategy (sharded or wrapped models) is not supported yet"
    for p in module.parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            return "the model has lazy modules that are not initialised yet"
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return "the model's parameters are sharded (DTensor), which the pre-flight does not support yet"
    if getattr(trainer, "limit_train_batches", 1) == 0:
        return "limit_train_batches=0: there is no training to check"
    return None


def _run_check(check: RegisteredCheck, ctx: PreflightContext) -> CheckRow:
    began = time.perf_counter()
    try:
        verdicts = as_verdicts(check.fn(ctx))
    except Skip as skip:
        return CheckRow(check.name, Status.SKIPPED, str(skip), time.perf_counter() - began)
    except FlightcheckError:
        raise
    except Exception as err:  # noqa: BLE001 - one check's failure must not take the others down
        return _internal_error(check.name, err, time.perf_counter() - began)
    return CheckRow.from_verdicts(check.name, verdicts, time.perf_counter() - began)


def _internal_error(name: str, err: BaseException, seconds: float) -> CheckRow:
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-4))
    return CheckRow(
        name, Status.ERROR, f"internal error in the check: {type(err).__name__}: {err}", seconds, traceback=trace
    )


def run_battery(
    trainer: Any, module: nn.Module, checks: Sequence[str], options: PreflightOptions, batch: Any = None
) -> PreflightReport:
    """Run the named checks (those not registered get a skipped row) and return the report.

    Args:
        trainer: a Trainer at ``on_fit_start`` (strategy, optimizers and schedulers set up).
        module: its LightningModule.
        checks: names from ``flightcheck.PREFLIGHT_CHECKS``, in any order.
        options: the battery's settings.
        batch: a batch to use instead of the first training batch (already on the device).
    """
    began = time.perf_counter()
    report = PreflightReport()
    available = registered()
    wanted = [available[name] for name in checks if name in available]
    missing = [name for name in checks if name not in available]
    reason = unsupported(trainer, module)
    if reason is not None:
        report.skipped = reason
        return report
    if batch is None:
        try:
            batch = first_batch(trainer, module)
        except NoBatch as err:
            report.skipped = str(err)
            return report
        except FlightcheckError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's data pipeline raised; the run will say so itself
            report.skipped = f"taking the first training batch failed: {type(err).__name__}: {err}"
            return report
    order = {name: i for i, name in enumerate(checks)}
    wanted.sort(key=lambda c: (PHASES.index(c.phase), order[c.name]))
    with sandbox(trainer, module, on_device=options.snapshot_on_device) as state:
        ctx = PreflightContext(trainer, module, batch, options, state)
        report.snapshot_bytes = state.snapshot.nbytes
        overfit_seconds, overfit_error = 0.0, None
        for check in wanted:
            if check.phase == "fitted" and ctx._overfit is None:
                start = time.perf_counter()
                try:
                    ctx.overfit  # noqa: B018 - runs the shared overfit once, timed on its own
                except Skip:
                    pass
                except FlightcheckError:
                    raise
                except Exception as err:  # noqa: BLE001
                    overfit_error = err
                    ctx._overfit = OverfitRun(
                        skip_reason=f"the overfit run failed internally ({type(err).__name__}: {err})"
                    )
                overfit_seconds = time.perf_counter() - start
            if check.name == "overfit_batch" and overfit_error is not None:
                row = _internal_error(check.name, overfit_error, overfit_seconds)
            else:
                row = _run_check(check, ctx)
            if check.name == "overfit_batch":
                row.seconds += overfit_seconds
            report.rows.append(row)
        report.info = _info(ctx)
    for name in missing:
        report.rows.append(CheckRow(name, Status.SKIPPED, "not available in this version of flightcheck"))
    report.seconds = time.perf_counter() - began
    return report


def _info(ctx: PreflightContext) -> dict[str, Any]:
    info: dict[str, Any] = {"batch_size": ctx.batch_size, "target": ctx.target_name}
    if ctx._initial is not None and ctx._initial.error is None:
        info["initial_loss"] = ctx._initial.loss
        info["task"] = ctx.task.kind
        info["num_classes"] = ctx.task.num_classes
        info["output"] = ctx._initial.source
    run = ctx._overfit
    if run is not None and run.skip_reason is None:
        info["overfit"] = {
            "steps": run.steps,
            "seconds": round(run.seconds, 3),
            "stopped": run.stopped,
            "learning_rates": run.learning_rates,
        }
    info["inputs"] = [path_str(p) for p, _ in ctx.inputs]
    return info


__all__ = ["run_battery", "unsupported"]
