r"""LossCurveMonitor: read the training and validation curves as a practitioner reads them.

Reads the training loss of every step from what ``training_step`` returns (no extra logging
asked of the user) and, after each validation, the validation loss and any metric the user
names from the logged metrics. It judges the shapes of the curves with robust statistics
(:mod:`flightcheck.checks.curves`) and warns as soon as the evidence is sound:

- ``loss_divergence``: a sustained rise, or an explosion (error);
- ``loss_spike``: single steps far above their neighbours;
- ``loss_oscillation``: swings that repeat with a period (a zig-zag, an epoch pattern);
- ``loss_plateau``: no real progress after warm-up while far from the floor;
- ``overfitting``: validation getting worse while training gets better, dated from
  validation's best step;
- ``underfitting``: training error that levels off high against a trivial predictor, a
  target error, or (at the end of the run) the initial loss.

A curve gets one shape at a time (a diverging run is not also called a plateau). Nothing is
judged before ``warmup_steps`` nor while the learning rate is still rising; a problem must be
seen at ``confirm`` consecutive evaluations, and a persisting warning becomes an error.

At the end of ``fit`` it writes a summary: every finding of the run (all flightcheck
callbacks), the curve diagnosis and, with ``target_error``, the bias/variance decomposition,
to the console, TensorBoard (``flightcheck/summary``) and ``<log_dir>/flightcheck/summary.md``.
``flightcheck analyze LOGDIR`` gives the same diagnosis for any TensorBoard run.

Cost:
    The loss of each step is copied into a device buffer (no synchronisation; ~20 µs of
    Python per step on a CPU). Once per look interval (``trainer.log_every_n_steps``, or less
    on a short run: :func:`~flightcheck.callbacks.base.look_interval`), at
    epoch end and after validation, the buffer is moved to the host as ONE tensor and the
    curves are judged there: ~5 ms of NumPy for a 500-step history, ~12 ms at the 2048-point
    cap (older points are coarsened, so memory and time stay bounded however long the run).

Distributed:
    Each rank judges its own losses (no collective is added); only global rank 0 writes.

Example::

    from flightcheck.callbacks.loss_curve import LossCurveMonitor

    trainer = L.Trainer(callbacks=[LossCurveMonitor(val_loss_key="val/loss", target_error=0.05)])
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from flightcheck.callbacks.base import FlightcheckCallback, OnFinding, looking_due, planned_steps
from flightcheck.checks.curves import CONFIRM, ESCALATE_AFTER, CurveWatch, Diagnosis, Update, lr_collapsed
from flightcheck.findings import Finding
from flightcheck.reporting.sinks import configure_console
from flightcheck.utils.batch import step_loss
from flightcheck.utils.text import table

log = logging.getLogger("flightcheck")

#: Names tried, in order, for the validation loss in ``trainer.callback_metrics``.
DEFAULT_VAL_LOSS_KEYS: tuple[str, ...] = (
    "val_loss",
    "val/loss",
    "valid_loss",
    "validation_loss",
    "val_loss_epoch",
    "loss/val",
    "validation/loss",
)
#: Names tried, in order, for the test loss (the validation-overfitting term).
DEFAULT_TEST_LOSS_KEYS: tuple[str, ...] = ("test_loss", "test/loss", "test_loss_epoch", "loss/test")

SUMMARY_FILENAME = "summary.md"
_MODES = ("min", "max")


class LossCurveMonitor(FlightcheckCallback):
    """Judges the shape of the training and validation curves and summarises the run.

    Args:
        val_loss_key: the validation loss's name in the logged metrics, or several names
            tried in order (default: ``val_loss``, ``val/loss``, ``valid_loss``, ...).
        train_loss_key: the key of the loss when ``training_step`` returns a dict.
        metrics: other validation metrics to follow, e.g. ``["val_acc"]`` or
            ``{"val_acc": "max"}`` (``"min"`` when a list is given): each is judged for
            ``overfitting`` and shown in the summary.
        train_val_loss_key: the loss on a second validation set drawn from the *training*
            distribution, if you log one: adds the distribution-shift term to the summary.
        test_loss_key: the test loss's name(s), read after ``trainer.test``: adds the
            validation-overfitting term.
        target_error: human-level or irreducible error, in the loss's units. Enables
            ``underfitting`` against it and the bias/variance decomposition.
        floor: the lowest loss reachable, when known (``0`` for cross-entropy without label
            smoothing). With it a plateau short of the start is caught too; without it a
            flattened curve may simply have converged, so a plateau must be at the start.
        baseline_loss: a trivial predictor's loss (e.g. the entropy of the class
            frequencies): ``underfitting`` is an error when training ends no better.
        warmup_steps: optimizer steps before any judgment (default 50); the warm-up also
            lasts while the learning rate rises.
        confirm: consecutive evaluations that must see a problem before it is reported
            (default 2; twice as many without it clear it).
        escalate_after: consecutive evaluations after which a persisting warning becomes an
            error (default 8).
        log_curves: log ``flightcheck/curves/*`` scalars (smoothed loss, trend, noise, gap)
            once per look interval.
        summary: write the end-of-fit summary.
        on_finding: called with each new finding (on global rank 0).

    Example::

        trainer = L.Trainer(callbacks=[LossCurveMonitor(metrics={"val_acc": "max"}, floor=0.0)])
    """

    name = "loss_curve"

    def __init__(
        self,
        *,
        val_loss_key: str | Sequence[str] = DEFAULT_VAL_LOSS_KEYS,
        train_loss_key: str = "loss",
        metrics: Sequence[str] | Mapping[str, str] = (),
        train_val_loss_key: str | None = None,
        test_loss_key: str | Sequence[str] = DEFAULT_TEST_LOSS_KEYS,
        target_error: float | None = None,
        floor: float | None = None,
        baseline_loss: float | None = None,
        warmup_steps: int = 50,
        confirm: int = CONFIRM,
        escalate_after: int = ESCALATE_AFTER,
        log_curves: bool = True,
        summary: bool = True,
        on_finding: OnFinding | None = None,
    ) -> None:
        super().__init__(on_finding=on_finding)
        self.val_loss_keys = _names("val_loss_key", val_loss_key)
        if not isinstance(train_loss_key, str) or not train_loss_key:
            raise TypeError(f"train_loss_key must be a non-empty string, got {train_loss_key!r}")
        self.train_loss_key = train_loss_key
        self.metrics = _metric_modes(metrics)
        if train_val_loss_key is not None and (not isinstance(train_val_loss_key, str) or not train_val_loss_key):
            raise TypeError(f"train_val_loss_key must be None or a non-empty string, got {train_val_loss_key!r}")
        self.train_val_loss_key = train_val_loss_key
        self.test_loss_keys = _names("test_loss_key", test_loss_key)
        self.target_error = _optional_number("target_error", target_error)
        self.floor = _optional_number("floor", floor)
        self.baseline_loss = _optional_number("baseline_loss", baseline_loss)
        for low_name, low, high_name, high in (("floor", self.floor, "baseline_loss", self.baseline_loss),
                                               ("floor", self.floor, "target_error", self.target_error),
                                               ("target_error", self.target_error, "baseline_loss", self.baseline_loss)):
            if low is not None and high is not None and not low <= high:
                raise ValueError(
                    f"LossCurveMonitor({low_name}={low:g}, {high_name}={high:g}) contradict each other: "
                    f"{low_name} must be at most {high_name} (floor <= target_error <= baseline_loss)"
                )
        for arg, value, low in (("warmup_steps", warmup_steps, 0), ("confirm", confirm, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
        if not isinstance(escalate_after, int) or isinstance(escalate_after, bool) or escalate_after < confirm:
            raise ValueError(f"escalate_after must be an int >= confirm ({confirm}), got {escalate_after!r}")
        for arg, value in (("log_curves", log_curves), ("summary", summary)):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be True or False, got {value!r}")
        self.warmup_steps = warmup_steps
        self.confirm = confirm
        self.escalate_after = escalate_after
        self.log_curves = log_curves
        self.write_summary = summary
        self.watch = self._new_watch()
        self.val_name: str | None = None  # the validation key found in the logged metrics
        self.test_error: float | None = None
        self.diagnosis: Diagnosis | None = None
        self._last_lr: float | None = None
        self._peak_lr: float | None = None
        self._lr_fell = False
        self._buffer: Tensor | None = None
        self._buffer_steps: list[int] = []
        self._flushed_at: int | None = None

    def _new_watch(self) -> CurveWatch:
        return CurveWatch(
            warmup_steps=self.warmup_steps,
            confirm=self.confirm,
            escalate_after=self.escalate_after,
            floor=self.floor,
            baseline=self.baseline_loss,
            target_error=self.target_error,
        )

    # ------------------------------------------------------------------ gathering
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = self._loss_of(outputs, pl_module, trainer)
        if loss is not None:
            self._record(loss, int(trainer.global_step))
        step = int(trainer.global_step)
        if looking_due(trainer) and step != self._flushed_at:
            self._flushed_at = step
            self._judge_training(trainer, step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._judge_training(trainer, int(trainer.global_step))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False) or not _fitting(trainer):
            return
        step = int(trainer.global_step)
        self._judge_training(trainer, step)  # so validation meets every training point before it
        metrics = getattr(trainer, "callback_metrics", {}) or {}
        if self.val_name is None:
            self.val_name = next((k for k in self.val_loss_keys if _number(metrics.get(k)) is not None), None)
        names: list[str] = []
        series = [(self.val_name, "min")] if self.val_name else []
        series += list(self.metrics.items())
        if self.train_val_loss_key:
            series.append((self.train_val_loss_key, "min"))
        for name, mode in series:
            value = _number(metrics.get(name))
            if value is not None and math.isfinite(value):
                self.watch.add_val(name, step, value, mode)
                names.append(name)
        if not names:
            return
        self._publish(trainer, self.watch.evaluate(step, train=False, val_names=names))
        if self.log_curves and self.val_name in names:
            level = self.watch.level()
            value = _number(metrics.get(self.val_name))
            if level is not None and value is not None:
                self.hub(trainer).log_scalars({"flightcheck/curves/generalization_gap": value - level}, step)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = getattr(trainer, "callback_metrics", {}) or {}
        value = next((v for k in self.test_loss_keys if (v := _number(metrics.get(k))) is not None), None)
        if value is None or not math.isfinite(value):
            return
        self.test_error = value
        if self.diagnosis is not None and self.write_summary and self.target_error is not None:
            self._summarise(trainer)  # the decomposition gains its validation-overfitting term

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._judge_training(trainer, int(trainer.global_step), final=True)
        if self.write_summary:
            self._summarise(trainer)

    # ------------------------------------------------------------------ the device buffer
    def _loss_of(self, outputs: Any, pl_module: Any, trainer: Any) -> Tensor | None:
        loss = step_loss(outputs, self.train_loss_key)
        if loss is None or loss.numel() == 0:
            return None
        loss = loss.detach().float().mean()
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if accumulate > 1 and self.train_loss_key == "loss" and getattr(pl_module, "automatic_optimization", True):
            loss = loss * accumulate  # Lightning hands back the loss divided for accumulation
        return loss

    def _record(self, loss: Tensor, step: int) -> None:
        if self._buffer is None or self._buffer.device != loss.device:
            self._drain()
            self._buffer = torch.empty(_BUFFER_SIZE, dtype=torch.float32, device=loss.device)
        elif len(self._buffer_steps) == self._buffer.numel():
            self._drain()  # full before a look came: one early read
        self._buffer[len(self._buffer_steps)].copy_(loss)  # a device-side copy: no synchronisation
        self._buffer_steps.append(step)

    def _drain(self) -> bool:
        """Move the buffered losses to the host (ONE transfer) and into the watch."""
        n = len(self._buffer_steps)
        if not n or self._buffer is None:
            return False
        values = self._buffer[:n].cpu().tolist()
        self.watch.add_train(self._buffer_steps, values)
        self._buffer_steps = []
        return True

    # ------------------------------------------------------------------ judging
    def _judge_training(self, trainer: Any, step: int, *, final: bool = False) -> None:
        fresh = self._drain()
        if not fresh and not final:
            return
        if not final:
            self._follow_learning_rate(trainer, step)
        self._publish(trainer, self.watch.evaluate(step, val_names=[], final=final))
        if self.log_curves and fresh:
            figures = self.watch.figures()
            if figures:
                self.hub(trainer).log_scalars({f"flightcheck/curves/{k}": v for k, v in figures.items()}, step)

    def _follow_learning_rate(self, trainer: Any, step: int) -> None:
        """Extend the warm-up while the learning rate rises; note a cyclic schedule."""
        rates = [
            float(group["lr"])
            for optimizer in getattr(trainer, "optimizers", []) or []
            for group in getattr(optimizer, "param_groups", [])
            if "lr" in group
        ]
        if not rates:
            return
        lr = max(rates)
        self._peak_lr = max(self._peak_lr or 0.0, lr)
        if lr_collapsed(lr, self._peak_lr, step, planned_steps(trainer)):
            if self.watch.lr_collapsed_at is None:
                self.watch.lr_collapsed_at = float(step)
        else:
            self.watch.lr_collapsed_at = None
        if self._last_lr is not None:
            # A rise to a rate that matters (not a schedule's last wiggle near zero) is warm-up.
            if lr > self._last_lr * (1.0 + 1e-6) and lr >= _LR_RISE_MATTERS * self._peak_lr:
                self.watch.hold(step)
                if self._lr_fell:
                    self.watch.periodic_schedule = True  # a restart or cycle: its swings are expected
            elif lr < self._last_lr * (1.0 - 1e-6):
                self._lr_fell = True
        self._last_lr = lr

    def _publish(self, trainer: Any, update: Update) -> None:
        for check, target in update.cleared:
            self.resolve(check, target)
        for problem in update.report:
            self.report_verdict(trainer, problem.verdict, step=int(trainer.global_step))

    # ------------------------------------------------------------------ end of fit
    def _summarise(self, trainer: Any) -> None:
        self.diagnosis = self.watch.diagnose(
            val_name=self.val_name, train_val_name=self.train_val_loss_key, test_error=self.test_error
        )
        hub = self.hub(trainer)
        if not hub.is_writer:
            return
        findings = _all_findings(trainer, self)
        markdown = summary_text(self.diagnosis, findings, markdown=True)
        configure_console()
        log.info("flightcheck summary\n%s", summary_text(self.diagnosis, findings, markdown=False))
        writer = hub.tensorboard
        if writer is not None:
            writer.add_text("flightcheck/summary", markdown, int(trainer.global_step))
            writer.flush()
        folder = hub.findings_dir
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, SUMMARY_FILENAME), "w", encoding="utf-8") as f:
                f.write(markdown + "\n")

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        self._drain()  # a checkpoint keeps every point recorded so far
        return {
            "watch": self.watch.state_dict(),
            "val_name": self.val_name,
            "last_lr": self._last_lr,
            "peak_lr": self._peak_lr,
            "lr_fell": self._lr_fell,
            "test_error": self.test_error,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.watch = self._new_watch()
        self.watch.load_state_dict(state.get("watch", {}))
        self.val_name = state.get("val_name")
        self._last_lr = state.get("last_lr")
        self._peak_lr = state.get("peak_lr")
        self._lr_fell = bool(state.get("lr_fell", False))
        self.test_error = state.get("test_error")


#: Steps of losses kept on the device between two reads (a read is forced when it fills).
_BUFFER_SIZE = 1024
#: A learning rate that rises to at least this fraction of its peak so far is a warm-up (or a
#: restart); smaller rises (a one-cycle schedule's last step near zero) are not.
_LR_RISE_MATTERS = 0.01


def summary_text(diagnosis: Diagnosis, findings: Sequence[Finding], *, markdown: bool) -> str:
    """The end-of-fit summary: the curve diagnosis, then every finding of the run in a table."""
    parts = ["# flightcheck summary" if markdown else "", diagnosis.format(markdown=markdown), ""]
    if findings:
        rows = [
            [str(f.step), f.severity.value, f.check, f.target or "", f.source, f.message]
            for f in sorted(findings, key=lambda f: (f.step, f.source))
        ]
        parts.append("## Findings" if markdown else "Findings:")
        parts.append(table(["step", "severity", "check", "target", "source", "message"], rows, markdown=markdown))
    else:
        parts.append("No findings." if markdown else "Findings: none.")
    return "\n".join(p for p in parts if p is not None).strip("\n")


def _all_findings(trainer: Any, me: LossCurveMonitor) -> list[Finding]:
    from flightcheck.defaults import findings

    gathered = findings(trainer)
    if me not in (getattr(trainer, "callbacks", None) or []):
        gathered = sorted(gathered + list(me.findings), key=lambda f: f.step)
    return gathered


def _fitting(trainer: Any) -> bool:
    state = getattr(trainer, "state", None)
    fn = getattr(state, "fn", None)
    return fn is None or getattr(fn, "value", fn) == "fit"


def _number(value: Any) -> float | None:
    """A logged metric as a float (one synchronisation for a device tensor), else ``None``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None
        return float(value.detach().float().cpu())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _names(arg: str, value: str | Sequence[str]) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Sequence) else None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{arg} must be a metric name or a non-empty sequence of names, got {value!r}")
    return names


def _metric_modes(metrics: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(metrics, Mapping):
        modes = dict(metrics)
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        modes = {name: "min" for name in metrics}
    else:
        raise TypeError(f"metrics must be a list of names or a dict of name -> 'min'/'max', got {metrics!r}")
    for name, mode in modes.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metrics names must be non-empty strings, got {name!r}")
        if mode not in _MODES:
            raise ValueError(f"metrics[{name!r}] must be one of {list(_MODES)}, got {mode!r}")
    return modes


def _optional_number(arg: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{arg} must be None or a finite number, got {value!r}")
    return float(value)


__all__ = ["DEFAULT_TEST_LOSS_KEYS", "DEFAULT_VAL_LOSS_KEYS", "LossCurveMonitor", "summary_text"]
