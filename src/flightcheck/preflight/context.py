"""What a pre-flight check sees: the batch and its roles, one step at initialisation, the shared
overfit run and the fitted model, and a way to run ``training_step`` on a modified batch.

Everything here lives inside the sandbox: whatever a check does to the model is undone when the
battery ends. Results are computed on first use and shared, so the overfit budget is spent once
however many checks read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flightcheck.preflight.registry import Skip
from flightcheck.preflight.roles import Path, find_target, get_at, input_leaves, path_str, replace_at, shared_batch_size
from flightcheck.preflight.sandbox import Abort, SandboxState, StepRecord, StepRunner, UserStepError
from flightcheck.preflight.task import IGNORE_INDEX, Task, align_classes, infer_task, is_integer
from flightcheck.utils import batch_size_of

log = logging.getLogger("flightcheck")


@dataclasses.dataclass(frozen=True)
class PreflightOptions:
    """The battery's settings (see :class:`~flightcheck.callbacks.preflight.Preflight` for each)."""

    max_steps: int = 100
    max_seconds: float = 30.0
    num_classes: int | None = None
    expected_init_loss: float | None = None
    target: int | str | None = None
    snapshot_on_device: bool = False
    causal: bool | None = None
    overlap_batches: int = 1000


class LabelOutOfRange(RuntimeError):
    """Raised from a forward hook, before the loss reads labels the output cannot index."""


class PreflightContext:
    """The shared state of one pre-flight.

    Args:
        trainer: the Trainer, set up (strategy, optimizers, schedulers).
        module: the LightningModule.
        batch: the first training batch, on the device.
        options: the battery's settings.
        state: the sandbox the battery runs in (snapshot of the initial state, captured logs).
    """

    def __init__(self, trainer: Any, module: Any, batch: Any, options: PreflightOptions, state: SandboxState) -> None:
        self.trainer = trainer
        self.module = module
        self.batch = batch
        self.options = options
        self.snapshot = state.snapshot
        self.logged = state.logged
        self.batch_size = shared_batch_size(batch) or batch_size_of(batch)
        self.target_path: Path | None = find_target(batch, options.target)
        self.runner = StepRunner(trainer, module, self.batch_size)
        #: scratch space shared between checks (e.g. what one check measured for another)
        self.notes: dict[str, Any] = {}
        self._initial: StepRecord | None = None
        self._task: Task | None = None
        self._overfit: Any = None

    # ------------------------------------------------------------------ the batch
    @property
    def target(self) -> Tensor | None:
        """The batch's target tensor (see ``Preflight(target=...)``), or ``None``."""
        return None if self.target_path is None else get_at(self.batch, self.target_path)

    @property
    def user_named_target(self) -> bool:
        """Whether the user said where the target is (``Preflight(target=...)``)."""
        return self.options.target is not None

    @property
    def target_name(self) -> str | None:
        return None if self.target_path is None else path_str(self.target_path)

    @property
    def inputs(self) -> list[tuple[Path, Tensor]]:
        """The batch's tensors other than the target, with their paths."""
        return input_leaves(self.batch, self.target_path)

    def replaced(self, replacements: Mapping[Path, Tensor]) -> Any:
        """A copy of the batch with the tensors at the given paths replaced."""
        return replace_at(self.batch, replacements)

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    # ------------------------------------------------------------------ one step at initialisation
    @property
    def initial_record(self) -> StepRecord:
        """``training_step`` at initialisation (dropout off, nothing updated); may hold an error."""
        if self._initial is None:
            self.runner.on_output = self._label_guard()
            try:
                record = self.runner.evaluate(self.batch)
            finally:
                self.runner.on_output = None
            if isinstance(record.aborted, LabelOutOfRange):
                record = StepRecord(error=UserStepError("training_step", record.aborted))
            self._initial = record
        return self._initial

    @property
    def initial(self) -> StepRecord:
        """Like :attr:`initial_record`, but raises :class:`Skip` when the step failed."""
        record = self.initial_record
        if record.error is not None:
            raise Skip(f"training_step failed at pre-flight: {record.error}")
        return record

    def _label_guard(self) -> Any:
        """On CUDA an out-of-range label is a device-side assert that kills the process; stop the
        step in the forward hook before the loss reads it (on the CPU the loss raises itself)."""
        target = self.target
        if target is None or not is_integer(target) or self.device.type != "cuda":
            return None
        low, high = int(target.min()), int(target.max())

        def guard(output: Tensor) -> None:
            aligned = align_classes(output, target)
            if aligned is None:
                return
            classes = aligned[0].shape[-1]
            if classes >= 2 and (high >= classes or (low < 0 and low != IGNORE_INDEX)):
                raise Abort(LabelOutOfRange(f"labels span {low}..{high} but the output has {classes} classes"))

        return guard

    @property
    def task(self) -> Task:
        """The task inferred from the initial output and the target (``kind == "unknown"`` if unclear)."""
        if self._task is None:
            record = self.initial_record
            self._task = infer_task(record.output, self.target, self.options.num_classes, record.loss)
        return self._task

    # ------------------------------------------------------------------ the shared overfit
    @property
    def overfit(self) -> Any:
        """The shared overfit run (:class:`~flightcheck.preflight.overfit.OverfitRun`), run on first use."""
        if self._overfit is None:
            from flightcheck.preflight.overfit import run_overfit

            self._overfit = run_overfit(self)
        if self._overfit.skip_reason is not None:
            raise Skip(self._overfit.skip_reason)
        return self._overfit

    @property
    def fitted(self) -> StepRecord:
        """``training_step`` evaluated after the overfit budget (nothing updated by it)."""
        record = self.overfit.fitted
        if record is None or record.error is not None:
            raise Skip(f"training_step failed after the overfit: {record.error if record else 'no record'}")
        return record

    # ------------------------------------------------------------------ running the user's step
    def evaluate(self, batch: Any, within: contextlib.AbstractContextManager[Any] | None = None) -> StepRecord:
        """``training_step`` on ``batch`` (e.g. a :meth:`replaced` copy) in the current state,
        nothing updated; raises :class:`Skip` naming the error when the step fails. ``within`` is
        entered around the call (hooks a check installs)."""
        record = self.runner.evaluate(batch, within=within)
        if record.error is not None:
            raise Skip(f"training_step failed on a modified batch: {record.error}")
        return record

    def train_step(self, batch: Any) -> StepRecord:
        """One optimisation step on ``batch``. It changes the fitted state later checks see."""
        return self.runner.step(batch)

    def initial_value(self, name: str) -> Tensor | None:
        """A parameter's or buffer's value at initialisation (from the sandbox's snapshot)."""
        return self.snapshot.initial(name)

    def say(self, message: str) -> None:
        """Progress for long budgets, on global rank 0."""
        if getattr(self.trainer, "is_global_zero", True):
            log.info("flightcheck pre-flight: %s", message)


__all__ = ["LabelOutOfRange", "PreflightContext", "PreflightOptions"]
