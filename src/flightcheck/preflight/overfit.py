"""The shared overfit run: train on the one batch with the user's optimizer for a bounded budget.

Run once per pre-flight and read by several checks: ``overfit_batch`` judges its loss curve,
``gradient_flow`` the gradients every step produced, ``weight_init`` and ``train_mode`` what
trained, ``input_dependence`` (and the leakage checks) the fitted model.

The learning rate is the user's. A warm-up schedule starts near zero, and a model must not look
unable to learn because the pre-flight sits at step 0 of its warm-up; nor should it be thrown at
its peak learning rate cold (the reason warm-ups exist). So each scheduler is probed for the
largest learning rate it reaches in its first :data:`SCHEDULE_PROBE_STEPS` steps, and the
overfit replays the warm-up compressed: linearly from the starting rate to that peak over the
first quarter of the budget, then at the peak. (Under manual optimisation the user's code may
step the scheduler itself, so the scheduler is instead left at its peak.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from flightcheck.preflight.sandbox import DetachedLossError, StepRecord, UserStepError
from flightcheck.preflight.task import candidate_losses, correct_fraction, infer_task

#: Stop early once the loss is this fraction of its start: the batch is fitted.
OVERFIT_TARGET_FRACTION = 0.1
#: ... or once every sample has been right for this many consecutive steps (classification;
#: label smoothing keeps the loss well above zero however well the batch is fitted).
ALL_RIGHT_PATIENCE = 5
#: How far a learning-rate schedule is probed for its peak (steps of the scheduler); cheap: a
#: scheduler step costs microseconds, and transformer warm-ups run to a few thousand steps.
SCHEDULE_PROBE_STEPS = 10_000
SCHEDULE_PROBE_SECONDS = 1.0
#: Manual optimisation whose step reports no single loss (several backward calls) is stepped
#: this many times: enough for the gradient checks, nothing for a loss curve.
NO_LOSS_STEPS = 10
#: A warm-up found in the schedule is replayed over at most 1/WARMUP_SHARE of the step budget.
WARMUP_SHARE = 4
#: Progress is logged this often on long budgets.
PROGRESS_EVERY_SECONDS = 10.0


@dataclasses.dataclass
class GradientFlags:
    """What one trainable parameter's gradient did over the overfit steps."""

    seen: bool  # got a gradient at least once
    nonzero: bool  # ... that was not all zeros
    finite: bool  # ... and every one was finite
    numel: int


@dataclasses.dataclass
class OverfitRun:
    """The loss before each step, then after the last; and what happened along the way."""

    losses: list[float] = dataclasses.field(default_factory=list)
    correct: list[float | None] = dataclasses.field(default_factory=list)
    errors: list[float | None] = dataclasses.field(default_factory=list)  # the task's own error, from the outputs
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""  # "reached", "max_steps", "max_seconds", "nonfinite", "error", "no_loss"
    schedules: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    learning_rates: list[list[float]] = dataclasses.field(default_factory=list)
    gradients: dict[str, GradientFlags] = dataclasses.field(default_factory=dict)
    fitted: StepRecord | None = None
    error: UserStepError | None = None
    detached_loss: bool = False
    skip_reason: str | None = None

    @property
    def initial_loss(self) -> float | None:
        return self.losses[0] if self.losses else None


class GradientTracker:
    """Records, on the device and without a sync per step, whether each trainable parameter's
    gradient was ever present, non-zero and finite (hooks fire in manual optimisation too)."""

    def __init__(self, module: nn.Module) -> None:
        self.entries = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.seen = [False] * len(self.entries)
        self.nonzero: list[Tensor | None] = [None] * len(self.entries)
        self.finite: list[Tensor | None] = [None] * len(self.entries)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, (_, p) in enumerate(self.entries)]

    def _hook(self, i: int) -> Any:
        def hook(p: Tensor) -> None:
            g = p.grad
            if g is None:
                return
            if g.is_sparse:
                g = g.coalesce().values()
            self.seen[i] = True
            nz, fin = g.ne(0).any(), torch.isfinite(g).all()
            self.nonzero[i] = nz if self.nonzero[i] is None else self.nonzero[i] | nz
            self.finite[i] = fin if self.finite[i] is None else self.finite[i] & fin

        return hook

    def close(self) -> dict[str, GradientFlags]:
        for h in self._handles:
            h.remove()
        flags = [
            (bool(nz) if nz is not None else False, bool(fin) if fin is not None else True)
            for nz, fin in zip(self.nonzero, self.finite)
        ]
        return {
            name: GradientFlags(seen, nz, fin, p.numel())
            for (name, p), seen, (nz, fin) in zip(self.entries, self.seen, flags)
        }


def _is_mock(optimizer: Any) -> bool:
    return type(optimizer).__name__ == "_MockOptimizer"


def probe_schedules(trainer: Any, advance: bool) -> list[dict[str, Any]]:
    """Find the largest learning rate each scheduler reaches early on (its warm-up's peak).

    Each scheduler is stepped ahead and put back; with ``advance`` it is then left at its peak
    (for manual optimisation, whose ``training_step`` may step it itself).
    """
    infos = []
    for config in getattr(trainer, "lr_scheduler_configs", []) or []:
        scheduler = config.scheduler
        if getattr(config, "reduce_on_plateau", False) or not hasattr(scheduler, "optimizer"):
            continue
        optimizer = scheduler.optimizer
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = copy.deepcopy(scheduler.state_dict())
        start = [float(g["lr"]) for g in optimizer.param_groups]
        peak, best_k = list(start), 0
        limit = SCHEDULE_PROBE_STEPS
        if config.interval == "epoch":
            limit = min(limit, max(int(getattr(trainer, "max_epochs", None) or 0), 1))
        elif int(getattr(trainer, "max_steps", -1) or -1) > 0:
            limit = min(limit, int(trainer.max_steps))
        began = time.perf_counter()
        for k in range(1, limit + 1):
            try:
                with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                    warnings.simplefilter("ignore")
                    scheduler.step()
            except Exception:  # noqa: BLE001 - e.g. OneCycleLR past its total steps
                break
            lrs = [float(g["lr"]) for g in optimizer.param_groups]
            if sum(lrs) > sum(peak) * (1 + 1e-9):
                peak, best_k = lrs, k
            if time.perf_counter() - began > SCHEDULE_PROBE_SECONDS:
                break
        scheduler.load_state_dict(copy.deepcopy(state))
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(copy.deepcopy(saved))
        if advance:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(best_k):
                    scheduler.step()
        infos.append(
            {
                "scheduler": type(scheduler).__name__,
                "interval": config.interval,
                "optimizer": optimizer,
                "start_lr": start,
                "peak_lr": peak,
                "peak_step": best_k,
            }
        )
    return infos


class WarmupRamp:
    """Raises each learning rate linearly from where its schedule starts to the schedule's peak
    over the first steps of the overfit: a warm-up, compressed to fit the budget."""

    def __init__(self, schedules: list[dict[str, Any]], max_steps: int) -> None:
        self.targets: list[tuple[dict[str, Any], float, float]] = []
        self.length = 0
        for info in schedules:
            if info["peak_step"] == 0:
                continue
            self.length = max(self.length, min(info["peak_step"], max(max_steps // WARMUP_SHARE, 1)))
            for group, lo, hi in zip(info["optimizer"].param_groups, info["start_lr"], info["peak_lr"]):
                self.targets.append((group, lo, hi))

    def fit_time(self, seconds_per_step: float, max_seconds: float) -> None:
        """Shorten the ramp so it ends within the first share of what the time budget allows."""
        if self.length and seconds_per_step > 0:
            affordable = int(max_seconds / seconds_per_step)
            self.length = max(1, min(self.length, affordable // WARMUP_SHARE))

    def apply(self, step: int) -> None:
        if not self.targets:
            return
        frac = min(1.0, (step + 1) / self.length)
        for group, lo, hi in self.targets:
            group["lr"] = lo + (hi - lo) * frac


def run_overfit(ctx: Any) -> OverfitRun:
    """Train on ``ctx.batch`` for at most ``max_steps`` steps and ``max_seconds`` seconds."""
    run = OverfitRun()
    trainer, options = ctx.trainer, ctx.options
    optimizers = [o for o in getattr(trainer, "optimizers", []) or [] if not _is_mock(o)]
    if not optimizers:
        run.skip_reason = "no optimizer is configured (configure_optimizers returned none)"
        return run
    initial = ctx.initial_record
    if initial.error is not None:
        run.skip_reason = f"training_step failed at pre-flight: {initial.error}"
        return run
    if initial.loss is None and ctx.runner.automatic:
        run.skip_reason = "training_step returned no loss for this batch (it returned None or a dict without 'loss')"
        return run
    classification = ctx.task.is_classification
    schedules = probe_schedules(trainer, advance=not ctx.runner.automatic)
    ramp = WarmupRamp(schedules if ctx.runner.automatic else [], options.max_steps)
    run.schedules = [{k: v for k, v in info.items() if k != "optimizer"} for info in schedules]
    tracker = GradientTracker(ctx.module)
    world = int(getattr(trainer, "world_size", 1) or 1)
    began = last_said = time.perf_counter()
    all_right = 0
    try:
        for step in range(options.max_steps):
            ramp.apply(step)
            record = ctx.runner.step(ctx.batch)
            now = time.perf_counter()
            if step == 0:
                ramp.fit_time(now - began, options.max_seconds)
            reason: str | None
            if record.error is not None:
                run.error = record.error
                run.detached_loss = isinstance(record.error.error, DetachedLossError)
                reason = "error"
            else:
                run.steps = step + 1
                if record.loss is not None:
                    run.losses.append(record.loss)
                    _score(ctx, record, run, classification)
                    all_right = all_right + 1 if run.correct[-1] == 1.0 else 0
                    reason = _stop_reason(run, all_right, now - began, options.max_seconds)
                elif ctx.runner.automatic or run.steps >= NO_LOSS_STEPS:
                    # Lightning skips a step without a loss; a manual step with several backward
                    # calls (a GAN's players) has no single loss, but its gradients were seen
                    reason = "no_loss"
                else:
                    reason = "max_seconds" if now - began > options.max_seconds else None
            stop = reason is not None
            if world > 1:  # every rank takes the same steps: stop when any rank must
                stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop:
                run.stopped = reason or "another rank stopped"
                break
            if now - last_said > PROGRESS_EVERY_SECONDS:
                last_said = now
                ctx.say(
                    f"overfitting one batch: step {step + 1}/{options.max_steps}"
                    + (f", loss {record.loss:.4g}" if record.loss is not None else "")
                    + f" ({now - began:.0f} s of at most {options.max_seconds:.0f} s)"
                )
        else:
            run.stopped = "max_steps"
    finally:
        run.gradients = tracker.close()
    run.learning_rates = [[float(g["lr"]) for g in o.param_groups] for o in optimizers]
    if run.stopped != "error":
        run.fitted = ctx.runner.evaluate(ctx.batch)
        if run.fitted.loss is not None and run.fitted.error is None:
            run.losses.append(run.fitted.loss)
            _score(ctx, run.fitted, run, classification)
    run.seconds = time.perf_counter() - began
    return run


def _score(ctx: Any, record: StepRecord, run: OverfitRun, classification: bool) -> None:
    """The share of right answers and the task's own error (cross-entropy, MSE) of this output:
    a loss that falls while its task's error rises is being maximised."""
    if not ctx.task.known:
        run.correct.append(None)
        run.errors.append(None)
        return
    task = infer_task(record.output, ctx.target, ctx.options.num_classes, record.loss)
    run.correct.append(correct_fraction(task) if classification else None)
    candidates = candidate_losses(task)
    run.errors.append(next((candidates[k] for k in NATURAL_ERRORS if k in candidates), None))


#: The error each task is judged by, in order of preference among what applies.
NATURAL_ERRORS = ("cross_entropy", "bce_with_logits", "mse")


def _stop_reason(run: OverfitRun, all_right: int, elapsed: float, max_seconds: float) -> str | None:
    first, last = run.losses[0], run.losses[-1]
    if not math.isfinite(last):
        return "nonfinite"
    if first > 0 and last <= OVERFIT_TARGET_FRACTION * first:
        return "reached"
    if all_right >= ALL_RIGHT_PATIENCE:
        return "reached"
    if elapsed > max_seconds:
        return "max_seconds"
    return None


__all__ = [
    "ALL_RIGHT_PATIENCE",
    "OVERFIT_TARGET_FRACTION",
    "GradientFlags",
    "GradientTracker",
    "OverfitRun",
    "WarmupRamp",
    "probe_schedules",
    "run_overfit",
]
