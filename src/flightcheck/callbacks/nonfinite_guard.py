r"""NonFiniteGuard: catch NaN/Inf in the loss, logged metrics, gradients and weights.

Watches, on every training batch, the loss, every logged training metric (so a multi-part
loss logged as parts says which part went bad) and, on every optimizer step, the gradients
(the shared fused norm read, :func:`~flightcheck.signals.norms.step_grad_norms`). The
weights are checked whenever the guard looks. When something goes non-finite it replays
the offending batch with forward hooks on every module, in the state before the bad
update, and reports whether the value came in with the data or was made inside (and by
which module); it saves the batch and the weights to reproduce it, then acts.

Cost:
    ``action="warn"`` (the default) never synchronises with the device on ordinary steps.
    Each batch's values (the norms of its float tensors, its loss, its logged values) are
    written into a device buffer with one ``cat``, and each optimizer step's per-parameter
    gradient norms (the read shared with GradientMonitor) with one copy. Once per logging
    interval (:func:`~flightcheck.callbacks.base.look_interval`: ``trainer.log_every_n_steps``,
    or less on a short run) and at epoch and training end the buffers are
    reduced on the device to "first non-finite step and value" per quantity and read back,
    with the weights' norms, as ONE tensor. A problem is therefore reported up to
    one look interval late; by then the bad update has usually reached the
    weights, so the guard does not replay the batch through broken weights: it says what
    went non-finite first, and whether that batch's data already held NaN/Inf. When the
    look's own step is bad and the weights are still finite, it replays and saves a
    reproducer as the other modes do. Measured on CPU (10M-parameter MLP, batch 64): about
    1.9 ms per step in the guard's hooks, 1.4 ms of which is the fused gradient read.

    ``"skip"``, ``"stop"`` and ``"raise"`` must decide before the optimizer applies the
    update, so they read one boolean per optimizer step: one host-device synchronisation
    per step (plus one ``all_reduce`` under DDP). On a GPU this stalls the CPU until the
    step's backward has finished, which costs the overlap of the next step's data loading
    and kernel launches with this step's compute: small for large models, noticeable for
    small fast steps. Under gradient accumulation they also keep references to the
    window's batches (no copies) so the offending micro-batch can be replayed.

Actions:
    - ``warn``: report and carry on.
    - ``skip``: the bad update is not applied. The gradients of the optimizer's parameters
      are set to ``None`` before ``optimizer.step()`` runs; PyTorch optimizers skip
      parameters without a gradient entirely (no momentum, Adam moment, step count or
      weight-decay change), so weights and optimizer state stay as they were. Lightning
      gives a callback no way to cancel ``optimizer.step()`` itself (``on_before_optimizer_step``
      runs inside the closure the optimizer calls). If the weights are already non-finite,
      skipping cannot recover and the guard stops the run instead.
    - ``stop``: skip the bad update as above, ask the trainer to stop
      (``trainer.should_stop``) and save a full, resumable checkpoint of the last good
      state to ``<log_dir>/flightcheck/nonfinite_step<k>/last_good.ckpt``.
    - ``raise``: raise :class:`~flightcheck.errors.NonFiniteError` (never swallowed).

Mixed precision:
    Under ``16-mixed`` with a loss scaler, overflow steps that the scaler skips (inf/NaN
    gradients, then a halved scale) are normal and not reported. The guard reports, and
    acts on, a non-finite loss, and a scale that collapsed below ``min_loss_scale``.

Example::

    from flightcheck.callbacks.nonfinite_guard import NonFiniteGuard

    trainer = L.Trainer(callbacks=[NonFiniteGuard(action="stop")])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flightcheck.callbacks.base import FlightcheckCallback, OnFinding, look_interval, looking_due
from flightcheck.checks import Verdict
from flightcheck.checks.nonfinite import (
    CHECK,
    DEFAULT_MIN_LOSS_SCALE,
    ModuleCall,
    NonFiniteEvent,
    Origin,
    count_nonfinite,
    locate_origin,
    loss_scale_verdict,
    first_nonfinite_rows,
    gradient_trend,
    nonfinite_verdict,
)
from flightcheck.errors import NonFiniteError
from flightcheck.findings import Finding
from flightcheck.signals.norms import foreach_norms, is_dtensor, step_grad_norms
from flightcheck.utils import modes_preserved, preserved_rng, tensors_in
from flightcheck.utils.batch import step_loss
from flightcheck.utils.distributed import world_size

ACTIONS = ("warn", "skip", "stop", "raise")
_SYNCED_ACTIONS = ("skip", "stop", "raise")

# Rows kept on the device between two looks (one per batch); more are folded on the device.
_MAX_ROWS = 256
#: optimizer steps of gradient-norm history behind "was the run diverging before it went
#: non-finite" (Lightning's default logging interval, a few looks on a short run;
#: checks.nonfinite.DIVERGENCE_GROWTH is judged over it).
_TREND_LOOKBACK = 50
# Folded blocks waiting for a look; reached only when no look comes, then look anyway.
_MAX_FOLDED = 32

# Each reproducer holds a full copy of the weights: keep the first few episodes only.
_MAX_REPRODUCERS = 5

class NonFiniteGuard(FlightcheckCallback):
    r"""Catch NaN/Inf during training, find where it was made, keep what reproduces it, and act.

    Args:
        action: what to do when the loss, the gradients or the weights go non-finite:
            ``"warn"`` (default: report only; it is the one mode that never synchronises
            with the GPU on ordinary steps, so it costs nothing on a healthy run),
            ``"skip"`` (drop the bad update), ``"stop"`` (drop it, stop gracefully and save
            a last good checkpoint) or ``"raise"`` (raise
            :class:`~flightcheck.errors.NonFiniteError`). The last three cost one
            host-device synchronisation per optimizer step. A metric that is only logged
            (not the loss) going non-finite is reported but never acted on.
        min_loss_scale: under ``16-mixed`` with a loss scaler, the scale below which it
            counts as collapsed. Default 1.0, the default floor of DeepSpeed and
            Megatron-LM: below it gradients are non-finite whatever the scale.
        replay: replay the offending batch with forward hooks to find the module that made
            the value. The replay restores RNG states, module modes, buffers and module
            attributes, and leaves no gradient behind.
        save_reproducer: save the offending batch (on CPU), the step and the weights before
            the bad update to ``<log_dir>/flightcheck/nonfinite_step<k>/`` (global rank 0).
        on_finding: called with each new finding (see :class:`FlightcheckCallback`).

    Example::

        trainer = L.Trainer(callbacks=[NonFiniteGuard(action="skip")])
        trainer.fit(model, datamodule=dm)
        for finding in flightcheck.findings(trainer):
            print(finding.format())
    """

    name = "nonfinite_guard"

    def __init__(
        self,
        action: str = "warn",
        *,
        min_loss_scale: float = DEFAULT_MIN_LOSS_SCALE,
        replay: bool = True,
        save_reproducer: bool = True,
        on_finding: OnFinding | None = None,
    ) -> None:
        super().__init__(on_finding=on_finding)
        if action not in ACTIONS:
            raise ValueError(f"NonFiniteGuard(action={action!r}) is not supported; accepted values: {list(ACTIONS)}")
        if (isinstance(min_loss_scale, bool) or not isinstance(min_loss_scale, (int, float))
                or not 0 < min_loss_scale < math.inf):
            raise ValueError(f"NonFiniteGuard(min_loss_scale={min_loss_scale!r}) must be a finite number > 0, e.g. 1.0")
        for flag, value in (("replay", replay), ("save_reproducer", save_reproducer)):
            if not isinstance(value, bool):
                raise TypeError(f"NonFiniteGuard({flag}=...) must be True or False, got {value!r}")
        self.action = action
        self.min_loss_scale = float(min_loss_scale)
        self.replay = replay
        self.save_reproducer = save_reproducer
        self._synced = action in _SYNCED_ACTIONS
        self._scale = _LossScaleWatch()
        self._reset_run_state()
        self.skipped_steps = 0
        self.reproducers: list[str] = []
        self._active_targets: set[str] = set()

    def _reset_run_state(self) -> None:
        self._records = _Records()
        self._param_names: dict[int, str] = {}
        self._window: list[tuple[Any, int]] = []
        self._window_open = False
        self._batch_step = 0
        self._batch_idx = -1
        self._data: tuple[tuple[str, ...], list[Tensor]] | None = None
        self._losses: list[Tensor] = []
        self._flushed = False
        self._last_logged: dict[str, Tensor] = {}
        self._pending_loss_bad: Tensor | None = None
        self._checkpoint_due: str | None = None
        self._batches_since_look = 0
        self._last_bad_step = -1
        self._grad_streams: set[int] = set()
        self._norm_overflows: set[int] = set()
        self._grad_history: list[tuple[int, float]] = []
        self._remote_loss: str | None = None  # "rank 1": the rank whose loss went non-finite, not this one
        self._forward_talks: str | None = None  # why a replay would take collectives (sharded model, SyncBatchNorm)

    # ------------------------------------------------------------------ hooks
    def collective_due(self, hook: str, trainer: Any) -> int:
        # The acting modes agree once per optimizer step and once at each epoch end.
        return int(self._synced and hook in ("on_before_optimizer_step", "on_train_epoch_end"))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()
        self._scale = _LossScaleWatch()
        self._param_names = {id(p): n for n, p in pl_module.named_parameters()}
        self._forward_talks = _forward_communicates(pl_module)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        self._records.capacity = min(_MAX_ROWS, look_interval(trainer) * accumulate + 2)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._window_open or not self._synced or not pl_module.automatic_optimization:
            self._window = []
        # references, not copies; only the synced modes keep a whole accumulation window
        keep = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) - 1
        self._window = (self._window[-keep:] if keep > 0 else []) + [(batch, batch_idx)]
        self._window_open = True
        self._batch_step = int(trainer.global_step)
        self._batch_idx = int(batch_idx)
        self._batches_since_look += 1
        self._losses, self._flushed = [], False
        # The batch's float tensors, read (one norm each) when the batch's row is written: a
        # late look can still tell that the non-finite value came in with the data, after the
        # batch itself is gone.
        floats = [(path, t) for path, t in tensors_in(batch) if t.is_floating_point() and t.numel() > 0]
        self._data = (tuple(path for path, _ in floats), [t for _, t in floats]) if floats else None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if not isinstance(loss, Tensor) or loss.numel() == 0:
            return
        value = _as_scalar(loss)
        self._losses.append(value)
        if self._synced:
            bad = ~torch.isfinite(value)
            self._pending_loss_bad = bad if self._pending_loss_bad is None else self._pending_loss_bad | bad

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        params, norms = step_grad_norms(trainer, optimizer)
        if params:
            names = self._param_names
            self._grad_streams.add(id(optimizer))
            self._records.write(
                ("gradient", id(optimizer)),
                tuple(map(id, params)),
                lambda: [("gradient", names.get(id(p), "?")) for p in params],
                [norms],
                (self._batch_step, self._batch_idx),
            )
        scaler = _loss_scaler(trainer)
        if scaler is not None and norms.numel():
            self._scale.record_step(~torch.isfinite(norms).all())
        self._window_open = False
        if self._synced:
            self._decide(trainer, pl_module, optimizer, params, norms, scaler)
        elif looking_due(trainer) or self._records.look_due:
            self._look(trainer, pl_module, pre_step=True, acting=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._losses and not self._flushed:
            loss = step_loss(outputs)
            if loss is not None and loss.numel():
                self._losses.append(_as_scalar(loss))
        self._flush_batch(trainer)
        if not self._synced or not self._window_open:
            self._window = []  # the batch is not needed after its update: let it be freed
        scaler = _loss_scaler(trainer)
        if scaler is not None:
            self._scale.record_scale(scaler)
        if self._checkpoint_due is not None:
            path, self._checkpoint_due = self._checkpoint_due, None
            _save_checkpoint(trainer, path)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        look = self._look(trainer, pl_module, pre_step=False, acting=self._synced)
        if self._synced:
            agreed = self.agree(trainer, look.actionable)  # every rank acts, or none
            if agreed[0]:
                self._act_on(trainer, pl_module, None, look if look.actionable else None, pre_step=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._look(trainer, pl_module, pre_step=False, acting=False)
        self._window = []

    # ------------------------------------------------------------------ gathering
    def _flush_batch(self, trainer: Any) -> None:
        """Write this batch's data norms, losses and logged values as one row (one ``stack``)."""
        logged = _logged_training_values(trainer)
        # Lightning keeps a metric's last value until it is logged again; each ``self.log``
        # stores a new tensor, so identity tells a fresh value from a repeated one.
        stale = tuple(self._last_logged.get(name) is value for name, value in logged.items())
        if self._flushed and all(stale) and not self._losses:
            return
        self._last_logged.update(logged)
        data = self._data if not self._flushed else None
        with torch.no_grad():
            norms = [torch.linalg.vector_norm(t) for t in data[1]] if data else []
        pieces = norms + self._losses + [_as_scalar(v) for v in logged.values()]
        if pieces:
            layout = (data[0] if data else (), len(self._losses), tuple(logged))

            def columns() -> list[tuple[str, str]]:
                return ([("data", p) for p in layout[0]] + [("loss", "loss")] * layout[1]
                        + [("metric", n) for n in layout[2]])

            self._records.write("batch", layout, columns, pieces, (self._batch_step, self._batch_idx), stale,
                                evidence=len(layout[0]))
        self._losses, self._flushed = [], True
        self._data = None  # read: the batch's tensors are not held past its row

    # ------------------------------------------------------------------ deciding (skip / stop / raise)
    def _decide(self, trainer: Any, pl_module: Any, optimizer: Any, params: Sequence[Tensor], norms: Tensor,
                scaler: Any) -> None:
        """The synced modes: one host read per optimizer step, then every rank takes the same decision."""
        loss_bad = self._pending_loss_bad
        self._pending_loss_bad = None
        # Under a loss scaler, inf/NaN gradients are overflow steps the scaler skips itself.
        grads_bad = (~torch.isfinite(norms)).any() if scaler is None and norms.numel() else None
        flags = [f.reshape(()) for f in (loss_bad, grads_bad) if f is not None]
        read = _to_host(flags)  # the one synchronisation per step of these modes
        bad_loss = bool(read[0]) if loss_bad is not None else False
        bad_grads = bool(read[-1]) if grads_bad is not None else False
        if bad_grads and not bad_loss:
            bad_grads = _gradients_really_nonfinite(params, norms)
            if not bad_grads:
                self._norm_overflows.add(self._batch_step)  # an explosion, for GradientMonitor
        look = None
        if not (bad_loss or bad_grads) and looking_due(trainer):
            look = self._look(trainer, pl_module, pre_step=True, acting=True)
        # One agreement per optimizer step: every rank skips, stops or raises together.
        agreed = self.agree(trainer, bad_loss or bad_grads, look is not None and look.actionable, bad_loss)
        if agreed[0]:
            self._remote_loss = None if bad_loss or not agreed[2] else agreed.who(2)
            try:
                self._act_on(trainer, pl_module, optimizer, None, pre_step=True)
            finally:
                self._remote_loss = None
        elif agreed[1]:
            self._act_on(trainer, pl_module, optimizer, look if look is not None and look.actionable else None,
                         pre_step=True)

    def _act_on(self, trainer: Any, pl_module: Any, optimizer: Any, look: _Look | None, *, pre_step: bool) -> None:
        """Act on a decision every rank shares. Without a ``look`` of its own (the problem was
        seen on another rank, or the step is bad) this rank looks now; if that look fails,
        the rank still acts (a rank that did not would hang the others), then reports the failure."""
        if look is None:
            try:
                look = self._look(trainer, pl_module, pre_step=pre_step, acting=True, forced=True)
            except Exception:
                self._act(trainer, optimizer, self._blind_look(trainer))
                raise
        self._act(trainer, optimizer, look)

    def _blind_look(self, trainer: Any) -> _Look:
        look = _Look(action=self.action, actionable=True)
        if self.action == "stop":
            with contextlib.suppress(Exception):
                look.checkpoint = self._plan(trainer, "stop", weights_good=True).checkpoint
        return look

    def _act(self, trainer: Any, optimizer: Any, look: _Look) -> None:
        """Carry out ``look.action``; ``optimizer`` is ``None`` outside an optimizer step."""
        if look.action == "raise":
            message = look.verdict.message if look.verdict is not None else "non-finite values in training"
            raise NonFiniteError(message, finding=look.finding)
        if look.action in ("skip", "stop") and optimizer is not None:
            # Optimizers skip parameters whose gradient is None: no update, no state change.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_steps += 1
        if look.action == "stop":
            trainer.should_stop = True
            if optimizer is None and look.checkpoint is not None:
                _save_checkpoint(trainer, look.checkpoint)
            else:
                self._checkpoint_due = look.checkpoint

    # ------------------------------------------------------------------ looking (one transfer)
    def _look(self, trainer: Any, pl_module: Any, *, pre_step: bool, acting: bool, forced: bool = False) -> _Look:
        """Read every device-side record at once, report what went non-finite, decide the action.

        ``pre_step``: called before the optimizer step, with the current batch still held;
        ``acting``: the caller carries out the action (else the finding says ``warn``);
        ``forced``: the shared decision was "bad", perhaps on another rank only.
        """
        covered, self._batches_since_look = self._batches_since_look, 0
        named = dict(pl_module.named_parameters())
        weight_norms = foreach_norms([p.detach() for p in named.values()]) if named else None
        if pre_step:
            self._flush_batch(trainer)  # this batch's loss and logged values, before its update
        folded = self._records.collect()
        parts = [f.stats for f in folded] + self._scale.tensors()
        parts += [weight_norms] if weight_norms is not None else []
        host = _to_host(parts)
        events, history, counts = [], [], {"batches": 0, "grad_steps": 0}
        for f in folded:
            found, norms, bad_rows, host = f.events(host)
            events += found
            history += norms
            counts["grad_steps" if f.totals else "batches"] += bad_rows
        if any(f.totals for f in folded) and len(self._grad_streams) == 1:
            # The trend is read over the last _TREND_LOOKBACK steps, however often the guard looks.
            history = self._grad_history + history
            finite = [h for h in history if math.isfinite(h[1])]
            self._grad_history = [h for h in finite if h[0] > finite[-1][0] - _TREND_LOOKBACK] if finite else []
        else:
            history = []
        data_events = [e for e in events if e.kind == "data"]  # evidence only, never news on its own
        events = [e for e in events if e.kind != "data"]
        scale_figures, host = self._scale.figures(host)
        self._scale.reset()
        self._chart(trainer, counts, scale_figures)
        bad_weights = _nonfinite_parameters(named, host) if weight_norms is not None else []

        if _loss_scaler(trainer) is not None:
            events = [e for e in events if e.kind != "gradient"]  # overflow steps the scaler skips
        else:
            if pre_step:
                events = _drop_norm_overflows(events, named, self._batch_step)
            events = [e for e in events if not (e.kind == "gradient" and e.step in self._norm_overflows)]
        self._norm_overflows.clear()
        events += [NonFiniteEvent("weight", n, self._batch_step, self._batch_idx) for n in bad_weights]
        if any(e.kind in ("loss", "gradient") for e in events):
            self._last_bad_step = max(e.step for e in events if e.kind in ("loss", "gradient"))
        else:
            # values logged after the optimizer step of a bad batch arrive one look late
            events = [e for e in events if not (e.kind == "metric" and e.step <= self._last_bad_step)]
        remote = self._remote_loss if forced else None
        if remote is not None:
            # This rank's loss was finite, another's was not: DDP averaged its NaN/Inf into the gradients here.
            events = [e for e in events if e.kind != "loss"]
            events.append(NonFiniteEvent("loss", f"loss (on {remote})", self._batch_step, self._batch_idx))
        elif forced and not events:
            # Another rank saw it (the decision is shared): say so, and act with everyone.
            events = [NonFiniteEvent("loss", "loss (on another rank)", self._batch_step, self._batch_idx)]

        look = _Look()
        scale_verdict = None
        if scale_figures is not None:
            low, overflows, in_a_row = scale_figures
            scale_verdict = loss_scale_verdict(low, floor=self.min_loss_scale, overflow_steps=int(overflows),
                                               skipped_in_a_row=int(in_a_row))
            if scale_verdict is None:
                self.resolve(CHECK, "loss_scale")
            else:
                act = self.action if acting and self.action != "skip" else "warn"
                look = self._plan(trainer, act, weights_good=True)
                look.verdict = scale_verdict
                look.actionable = look.action != "warn"
                look.finding = self.report_verdict(trainer, scale_verdict)

        if not events:
            if covered:  # a look right after another has seen no batch: nothing has cleared
                for target in sorted(self._active_targets):
                    self.resolve(CHECK, target)
                self._active_targets.clear()
            return look

        if self._active_targets and all(e.kind == "weight" for e in events):
            return look  # the weights still carry a problem already reported

        harmful = any(e.kind in ("loss", "gradient", "weight") for e in events)
        action = self.action if harmful and acting else "warn"
        if bad_weights and action == "skip":
            action = "stop"  # every later step would be skipped as well: nothing left to save
        origin, replayed = self._origin(trainer, pl_module, events, data_events, bad_weights, pre_step, forced)
        look = self._plan(trainer, action, weights_good=not bad_weights)
        look.actionable = harmful
        verdict = nonfinite_verdict(
            events,
            origin,
            finite_metrics=_finite_metrics(trainer, events),
            action=action,
            checkpoint=look.checkpoint,
            replayed_step=replayed.step if replayed else None,
            replayed_batch=replayed.batch_idx if replayed else None,
            data_counts=replayed.data_counts if replayed else None,
            trend=gradient_trend(history, min(e.step for e in events)),
        )
        news = not self._dedup.is_active(CHECK, verdict.target)
        if (replayed is not None and self.save_reproducer and news and self.hub(trainer).is_writer
                and len(self.reproducers) < _MAX_REPRODUCERS):
            try:
                folder = self._save_reproducer(trainer, pl_module, replayed, origin)
            except Exception as err:  # noqa: BLE001 - a full disk must not cost the finding or the action
                verdict = dataclasses.replace(verdict, data={**verdict.data, "reproducer_error": repr(err)})
            else:
                self.reproducers.append(folder)
                verdict = dataclasses.replace(
                    verdict,
                    data={**verdict.data, "reproducer": folder},
                    advice=(*verdict.advice, f"reload the batch and the weights before the update from {folder}"),
                )
        look.verdict = verdict
        look.finding = self.report_verdict(trainer, verdict, step=min(e.step for e in events))
        if verdict.target:
            self._active_targets.add(verdict.target)
        return look

    def _chart(self, trainer: Any, counts: dict[str, int], scale_figures: tuple[float, float, float] | None) -> None:
        """TensorBoard (and every logger): what this look saw, on rank 0, from numbers already on the host."""
        scalars = {
            "flightcheck/nonfinite/batches": counts["batches"],
            "flightcheck/nonfinite/grad_steps": counts["grad_steps"],
            "flightcheck/nonfinite/skipped_updates": self.skipped_steps,
        }
        if scale_figures is not None:
            scalars["flightcheck/nonfinite/loss_scale_min"] = scale_figures[0]
        self.hub(trainer).log_scalars(scalars, step=int(trainer.global_step))

    def _plan(self, trainer: Any, action: str, *, weights_good: bool) -> _Look:
        look = _Look(action=action)
        if action == "stop" and weights_good:
            look.checkpoint = os.path.join(self._findings_folder(trainer, self._batch_step), "last_good.ckpt")
        return look

    # ------------------------------------------------------------------ localising
    def _origin(self, trainer: Any, pl_module: Any, events: list[NonFiniteEvent], data_events: list[NonFiniteEvent],
                bad_weights: list[str], pre_step: bool, forced: bool) -> tuple[Origin, _Replayed | None]:
        fp16 = _loss_scaler(trainer) is not None
        harmful = [e for e in events if e.kind in ("loss", "gradient")]
        if not harmful and not bad_weights:
            return Origin("logged_only", fp16=fp16), None
        now = [e for e in harmful if e.step == self._batch_step]
        if forced and self._remote_loss is not None:
            return Origin("other_rank", op=self._remote_loss, fp16=fp16), None
        if forced and not any(e.name != "loss (on another rank)" for e in now):
            return Origin("other_rank", fp16=fp16), None
        if pre_step and self.replay and now and self._window and not bad_weights:
            if self._forward_talks and world_size(trainer) > 1:
                # a forward that takes collectives, replayed on the ranks that saw the value only, would wait forever
                return Origin("not_replayed", op=self._forward_talks, fp16=fp16), None
            return self._replay_window(trainer, pl_module, [e.name for e in now if e.kind == "gradient"], fp16)
        # No faithful replay: the batch-level record still tells whether the data held NaN/Inf then.
        first = min((e.step for e in harmful), default=None)
        paths = tuple(e.name for e in data_events if e.step == first)
        if paths:
            return Origin("data", data_paths=paths, fp16=fp16), None
        if bad_weights:
            return Origin("weights", parameters=tuple(bad_weights), fp16=fp16), None
        return Origin("not_replayed", fp16=fp16), None

    def _replay_window(self, trainer: Any, pl_module: Any, grad_bad: list[str],
                       fp16: bool) -> tuple[Origin, _Replayed | None]:
        error: BaseException | None = None
        found: tuple[Origin, _Replayed] | None = None
        for batch, batch_idx in self._window:
            try:
                origin, replayed = self._replay(trainer, pl_module, batch, batch_idx, grad_bad, fp16)
            except Exception as err:  # noqa: BLE001 - a replay that fails must not cost the action
                error = err
                continue
            found = found or (origin, replayed)
            if origin.kind != "not_reproduced":
                return origin, replayed
        if found is not None:
            return found
        return Origin("not_replayed", op=f"replay failed: {error!r}" if error else None, fp16=fp16), None

    def _replay(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, grad_bad: list[str],
                fp16: bool) -> tuple[Origin, _Replayed]:
        data_counts = {path: n for path, t in tensors_in(batch) if (n := count_nonfinite(t))}
        recorder = _ForwardRecorder(pl_module)
        with _replaying(trainer, pl_module), recorder, torch.no_grad():
            output = _call_training_step(pl_module, batch, batch_idx)
        loss = step_loss(output)
        loss_finite = loss is None or count_nonfinite(loss.detach()) == 0
        calls = recorder.calls()
        backward_op = None
        if grad_bad and loss_finite and not data_counts and all(c.outputs_finite for c in calls):
            with contextlib.suppress(Exception):  # naming the op is a bonus; the layer is known without it
                backward_op = _backward_culprit(trainer, pl_module, batch, batch_idx)
        origin = locate_origin(
            calls,
            tuple(data_counts),
            loss_finite=loss_finite,
            module_types={n: type(m).__name__ for n, m in pl_module.named_modules()},
            grad_bad_parameters=grad_bad,
            forward_order=recorder.order,
            backward_op=backward_op,
            fp16=fp16,
        )
        return origin, _Replayed(batch, batch_idx, self._batch_step, data_counts)

    # ------------------------------------------------------------------ files
    def _findings_folder(self, trainer: Any, step: int) -> str:
        root = self.hub(trainer).findings_dir or os.path.join(str(trainer.default_root_dir), "flightcheck")
        return os.path.join(root, f"nonfinite_step{step}")

    def _save_reproducer(self, trainer: Any, pl_module: Any, replayed: _Replayed, origin: Origin) -> str:
        from lightning.fabric.utilities.apply_func import move_data_to_device

        folder = self._findings_folder(trainer, replayed.step)
        os.makedirs(folder, exist_ok=True)
        torch.save(move_data_to_device(replayed.batch, "cpu"), os.path.join(folder, "batch.pt"))
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(folder, "weights_before_update.pt"))
        info = {
            "step": replayed.step,
            "epoch": int(trainer.current_epoch),
            "batch_idx": replayed.batch_idx,
            "origin": origin.kind,
            "module": origin.module,
            "module_type": origin.module_type,
            "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "how_to_replay": (
                "model.load_state_dict(torch.load('weights_before_update.pt')); "
                "batch = torch.load('batch.pt', weights_only=False); "
                f"model.training_step(batch, {replayed.batch_idx})"
            ),
        }
        with open(os.path.join(folder, "info.json"), "w") as f:
            json.dump(info, f, indent=2)
        return folder

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "active_targets": sorted(self._active_targets),
                "reproducers": list(self.reproducers)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._active_targets = set(state.get("active_targets", []))
        self.reproducers = list(state.get("reproducers", []))


# ---------------------------------------------------------------------- device-side records
class _Folded:
    """One ring's rows reduced on the device to, per column, whether and where it first went
    non-finite and the value it had; with the host-side labels to read it back."""

    def __init__(self, columns: Callable[[], list[tuple[str, str]]], stats: Tensor, width: int,
                 rows: list[tuple[int, int]], stale: list[tuple[bool, ...] | None], totals: bool) -> None:
        self._columns = columns
        self.stats = stats
        self._width = width
        self._rows = rows
        self._stale = stale
        self.totals = totals

    def events(self, host: list[float]) -> tuple[list[NonFiniteEvent], list[tuple[int, float]], int, list[float]]:
        """The first non-finite value of each column, the per-row norm history, how many rows
        held a non-finite value (data columns aside), and the rest of ``host``."""
        width = self._width
        has, first, value, host = host[:width], host[width:2 * width], host[2 * width:3 * width], host[3 * width:]
        bad_rows, host = int(host[0]), host[1:]
        history: list[tuple[int, float]] = []
        if self.totals:
            history = [(row[0], total) for row, total in zip(self._rows, host[: len(self._rows)])]
            host = host[len(self._rows):]
        columns = self._columns()
        metric_at = {i: j for j, i in enumerate(i for i, (kind, _) in enumerate(columns) if kind == "metric")}
        events = []
        for i, (kind, name) in enumerate(columns):
            if has[i] < 0.5:
                continue
            row = int(first[i])
            stale = self._stale[row]
            if kind == "metric" and stale is not None and stale[metric_at[i]]:
                continue  # a value repeated from an earlier, already counted batch
            step, batch = self._rows[row]
            events.append(NonFiniteEvent(kind, name, step, batch, value[i]))
        return events, history, bad_rows, host


class _Ring:
    """Rows of per-batch (or per-step) values of one layout, on the device until folded."""

    def __init__(self, layout: Hashable, columns: Callable[[], list[tuple[str, str]]], width: int, device: Any,
                 capacity: int, totals: bool, evidence: int = 0) -> None:
        self.layout = layout
        self.evidence = evidence  # leading columns (the batch's data) not counted as bad rows
        self.totals = totals  # keep each row's L2 norm too (the global gradient norm of a step)
        self.columns = _cached(columns)
        self.values = torch.empty((capacity, width), dtype=torch.float32, device=device)
        self._row_views = list(self.values.unbind(0))  # indexing costs a dispatch per write: once here
        self.rows: list[tuple[int, int]] = []
        self.stale: list[tuple[bool, ...] | None] = []

    def write(self, pieces: Sequence[Tensor], row: tuple[int, int], stale: tuple[bool, ...] | None) -> None:
        out = self._row_views[len(self.rows)]
        with torch.no_grad():
            if len(pieces) == 1 and pieces[0].shape == out.shape:
                out.copy_(pieces[0])
            elif all(p.dim() == 0 for p in pieces):
                torch.stack(list(pieces), out=out)  # the batch's scalars: one op
            else:
                torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in pieces], out=out)
        self.rows.append(row)
        self.stale.append(stale)

    def fold(self) -> _Folded | None:
        if not self.rows:
            return None
        values = self.values[: len(self.rows)]
        bad_rows = (~torch.isfinite(values[:, self.evidence:])).any(dim=1).sum().reshape(1).to(values.dtype)
        stats = torch.cat([first_nonfinite_rows(values).reshape(-1), bad_rows])
        if self.totals:
            stats = torch.cat([stats, values.square().sum(dim=1).sqrt()])
        folded = _Folded(self.columns, stats, values.shape[1], self.rows, self.stale, self.totals)
        self.rows, self.stale = [], []
        return folded


class _Records:
    """Per stream (the batch's values, each optimizer's gradients) a ring of rows written
    with one device copy per batch; folded on the device when full, when the layout
    changes, and at each look, where everything is read back in one transfer."""

    def __init__(self) -> None:
        self.capacity = 64
        self._rings: dict[Hashable, _Ring] = {}
        self._folded: list[_Folded] = []

    @property
    def look_due(self) -> bool:
        # folds pile up only when nothing looks (no looks come): look once in a while
        return len(self._folded) >= _MAX_FOLDED

    def write(self, stream: Hashable, layout: Hashable, columns: Callable[[], list[tuple[str, str]]],
              pieces: Sequence[Tensor], row: tuple[int, int], stale: tuple[bool, ...] | None = None,
              evidence: int = 0) -> None:
        ring = self._rings.get(stream)
        width = sum(p.numel() for p in pieces)
        if ring is None or ring.layout != (layout, width) or len(ring.rows) >= ring.values.shape[0]:
            if ring is not None:
                self._fold(ring)
            if ring is None or ring.layout != (layout, width):
                gradients = isinstance(stream, tuple) and stream[0] == "gradient"
                ring = _Ring((layout, width), columns, width, pieces[0].device, self.capacity, totals=gradients,
                             evidence=0 if gradients else evidence)
                self._rings[stream] = ring
        device = ring.values.device
        ring.write([p if p.device == device else p.to(device) for p in pieces], row, stale)

    def _fold(self, ring: _Ring) -> None:
        folded = ring.fold()
        if folded is not None:
            self._folded.append(folded)

    def collect(self) -> list[_Folded]:
        for ring in self._rings.values():
            self._fold(ring)
        folded, self._folded = self._folded, []
        return folded


def _cached(fn: Callable[[], list[tuple[str, str]]]) -> Callable[[], list[tuple[str, str]]]:
    memo: list[list[tuple[str, str]]] = []

    def cached() -> list[tuple[str, str]]:
        if not memo:
            memo.append(fn())
        return memo[0]

    return cached


class _LossScaleWatch:
    """The fp16 loss scaler's lowest scale and its overflow (skipped) steps, on the device."""

    def __init__(self) -> None:
        self.low: Tensor | None = None
        self.overflows: Tensor | None = None
        self.run: Tensor | None = None
        self.longest: Tensor | None = None
        self._read = False

    def record_step(self, overflow: Tensor) -> None:
        o = overflow.to(torch.int64).reshape(())
        if self.overflows is None:
            self.overflows, self.run, self.longest = o.clone(), o.clone(), o.clone()
            return
        self.overflows = self.overflows + o
        self.run = (self.run + o) * o  # back to 0 on a step the scaler applied
        self.longest = torch.maximum(self.longest, self.run)

    def record_scale(self, scaler: Any) -> None:
        scale = getattr(scaler, "_scale", None)  # the device tensor; get_scale() would sync
        if not isinstance(scale, Tensor):
            return
        scale = scale.detach().reshape(()).to(torch.float32)
        self.low = scale.clone() if self.low is None else torch.minimum(self.low, scale)

    def tensors(self) -> list[Tensor]:
        self._read = self.low is not None
        if not self._read:
            return []
        zero = torch.zeros((), dtype=torch.float32, device=self.low.device)
        counts = [zero if t is None else t.to(device=self.low.device, dtype=torch.float32)
                  for t in (self.overflows, self.longest)]
        return [torch.stack([self.low, *counts])]

    def figures(self, host: list[float]) -> tuple[tuple[float, float, float] | None, list[float]]:
        if not self._read:
            return None, host
        return (host[0], host[1], host[2]), host[3:]

    def reset(self) -> None:
        self.low = None
        if self.overflows is not None:
            self.overflows = torch.zeros_like(self.overflows)
            self.longest = self.run.clone()


@dataclasses.dataclass
class _Look:
    action: str = "warn"
    verdict: Verdict | None = None
    finding: Finding | None = None
    checkpoint: str | None = None
    actionable: bool = False


@dataclasses.dataclass
class _Replayed:
    batch: Any
    batch_idx: int
    step: int
    data_counts: dict[str, int]


# ---------------------------------------------------------------------- reading the trainer
def _forward_communicates(pl_module: Any) -> str | None:
    """Why the model's forward pass takes collectives (so replaying a batch on one rank alone
    would wait for the others forever), or ``None``."""
    if any(is_dtensor(p) for p in pl_module.parameters()):
        return "the model is sharded (its forward gathers parameters from every rank)"
    for m in pl_module.modules():
        if isinstance(m, nn.SyncBatchNorm):
            return "the model has SyncBatchNorm (its forward exchanges batch statistics between ranks)"
        if type(m).__name__ == "FullyShardedDataParallel":
            return "the model is sharded (its forward gathers parameters from every rank)"
    return None


def _save_checkpoint(trainer: Any, path: str) -> None:
    """``trainer.save_checkpoint`` on every rank. Lightning writes on rank 0, then all ranks
    meet at a barrier: a rank whose part failed (a full disk on rank 0) still meets the
    others there before the error goes on, so they do not wait for it forever."""
    try:
        trainer.save_checkpoint(path)
    except Exception:
        if world_size(trainer) > 1:
            with contextlib.suppress(Exception):
                trainer.strategy.barrier("Trainer.save_checkpoint")
        raise


def _loss_scaler(trainer: Any) -> Any:
    """The enabled fp16 ``GradScaler`` of ``trainer.precision_plugin``, else ``None``."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None:
        return None
    is_enabled = getattr(scaler, "is_enabled", None)
    return scaler if is_enabled is None or is_enabled() else None


def _logged_training_values(trainer: Any) -> dict[str, Tensor]:
    """The values logged so far in this training batch, by name, as device tensors.

    Read from the trainer's result collection directly: ``trainer.callback_metrics`` would
    turn progress-bar values into Python numbers (a sync per metric).
    """
    if not getattr(trainer, "training", False):
        return {}
    try:
        results = trainer._results
        items = list(results.valid_items()) if results is not None else []
    except Exception:  # noqa: BLE001 - a Lightning internal that moved: watch the loss only
        return {}
    logged: dict[str, Tensor] = {}
    for _, result in items:
        meta = getattr(result, "meta", None)
        if meta is None:
            continue
        value = result._forward_cache if meta.on_step else getattr(result, "value", None)
        if isinstance(value, Tensor) and value.numel() > 0:
            logged[meta.name] = value
    return logged


def _as_scalar(t: Tensor) -> Tensor:
    """A 0-d view of a logged value or loss (its sum when it has more), detached."""
    t = t.detach()
    if t.dim() == 0:
        return t
    return t.reshape(()) if t.numel() == 1 else t.float().sum()


def _finite_metrics(trainer: Any, events: Sequence[NonFiniteEvent]) -> list[str]:
    bad = {e.name for e in events if e.kind == "metric"}
    if not bad:
        return []
    return [name for name in _logged_training_values(trainer) if name not in bad]


def _to_host(parts: Sequence[Tensor]) -> list[float]:
    """Every tensor in ``parts`` moved to the host as ONE float64 tensor (one synchronisation)."""
    if not parts:
        return []
    device = parts[0].device
    flat = torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float64) for p in parts])
    return flat.tolist()


def _gradients_really_nonfinite(params: Sequence[Tensor], norms: Tensor) -> bool:
    # A norm overflows float32 for huge but finite gradients; only NaN/Inf elements count.
    return any(count_nonfinite(p.grad) for p, n in zip(params, norms.tolist()) if not math.isfinite(n))


def _drop_norm_overflows(events: list[NonFiniteEvent], named: dict[str, Tensor], step: int) -> list[NonFiniteEvent]:
    kept = []
    for e in events:
        p = named.get(e.name)
        overflow_only = (
            e.kind == "gradient" and e.step == step and math.isinf(e.value)
            and p is not None and p.grad is not None and count_nonfinite(p.grad) == 0
        )
        if not overflow_only:
            kept.append(e)
    return kept


def _nonfinite_parameters(named: dict[str, Tensor], norms: list[float]) -> list[str]:
    """Names of the parameters holding NaN/Inf (an infinite norm is confirmed element-wise)."""
    bad = []
    for (name, p), n in zip(named.items(), norms):
        if math.isnan(n) or (math.isinf(n) and count_nonfinite(p.detach()) > 0):
            bad.append(name)
    return bad


# ---------------------------------------------------------------------- replaying a batch
# Attributes every nn.Module has; the replay restores everything else a module holds.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# Tensor attributes up to this many elements are cloned so in-place changes are undone too.
_CLONE_LIMIT = 1 << 20


class _Restorer:
    """Snapshot of module attributes and buffers, put back on exit (the replay leaves no trace)."""

    def __init__(self, root: nn.Module) -> None:
        self._saved = []
        for module in root.modules():
            attrs = {k: (v, _copy_of(v)) for k, v in vars(module).items() if k not in _MODULE_INTERNALS}
            buffers = {k: (b, None if b is None else b.detach().clone()) for k, b in module._buffers.items()}
            self._saved.append((module, attrs, buffers))

    def restore(self) -> None:
        with torch.no_grad():
            for module, attrs, buffers in self._saved:
                for k in [k for k in vars(module) if k not in _MODULE_INTERNALS and k not in attrs]:
                    del module.__dict__[k]
                for k, (original, copied) in attrs.items():
                    _put_back(original, copied)
                    module.__dict__[k] = original
                for k, (original, copied) in buffers.items():
                    if original is not None:
                        original.copy_(copied)
                    module._buffers[k] = original


def _copy_of(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone() if value.numel() <= _CLONE_LIMIT else None
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return None


def _put_back(original: Any, copied: Any) -> None:
    if copied is None:
        return
    if isinstance(original, Tensor):
        if original.shape == copied.shape:
            original.detach().copy_(copied)
    elif isinstance(original, list):
        original[:] = copied
    elif isinstance(original, dict):
        original.clear()
        original.update(copied)


class _InertOptimizer:
    """Stands in for an optimizer during a replay: ``step`` runs the closure, changes nothing."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


class _InertScheduler:
    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def step(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)


def _inert(value: Any, wrap: Callable[[Any], Any]) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return wrap(value)


@contextlib.contextmanager
def _replaying(trainer: Any, pl_module: Any) -> Iterator[None]:
    """Run ``training_step`` again with no trace left: RNG, modes, buffers, attributes,
    logged values, optimizer and scheduler state all as they were; under the run's autocast."""
    try:
        optimizers = pl_module.optimizers()
    except Exception:  # noqa: BLE001 - no trainer-attached optimizers
        optimizers = None
    try:
        schedulers = pl_module.lr_schedulers()
    except Exception:  # noqa: BLE001
        schedulers = None
    restorer = _Restorer(pl_module)

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    patches = {
        "log": nothing,
        "log_dict": nothing,
        "manual_backward": nothing,
        "clip_gradients": nothing,
        "toggle_optimizer": nothing,
        "untoggle_optimizer": nothing,
        "optimizers": lambda *a, **k: _inert(optimizers, _InertOptimizer),
        "lr_schedulers": lambda *a, **k: _inert(schedulers, _InertScheduler),
    }
    context = trainer.precision_plugin.train_step_context()
    try:
        with preserved_rng(), modes_preserved(pl_module), context:
            pl_module.__dict__.update(patches)
            yield
    finally:
        restorer.restore()


def _call_training_step(pl_module: Any, batch: Any, batch_idx: int) -> Any:
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    step = pl_module.training_step
    if is_param_in_hook_signature(step, "dataloader_iter", explicit=True):
        raise RuntimeError("a training_step that takes dataloader_iter cannot be replayed")
    if is_param_in_hook_signature(step, "batch_idx", min_args=2):
        return step(batch, batch_idx)
    return step(batch)


def _float_tensors(value: Any) -> list[Tensor]:
    return [t.detach() for _, t in tensors_in(value) if t.is_floating_point() and t.numel() > 0]


def _input_stats(tensors: list[Tensor]) -> Tensor | None:
    if not tensors:
        return None
    device = tensors[0].device
    inf = float("inf")
    rows = [
        torch.stack([torch.isfinite(t).all().float(), t.min().float(), t.max().float(), (t == 0).any().float(),
                     torch.isnan(t).any().float(), (t.abs() == inf).any().float()])
        for t in tensors
    ]
    stats = torch.stack([r.to(device) for r in rows])
    return torch.cat([stats[:, :1].min(0).values, stats[:, 1:2].min(0).values, stats[:, 2:].max(0).values])


def _output_stats(tensors: list[Tensor]) -> Tensor | None:
    if not tensors:
        return None
    device = tensors[0].device
    inf = float("inf")
    rows = [
        torch.stack([torch.isfinite(t).all(), torch.isnan(t).any(), (t == inf).any(), (t == -inf).any()]).float()
        for t in tensors
    ]
    stats = torch.stack([r.to(device) for r in rows])
    return torch.stack([stats[:, 0].min(), stats[:, 1].max(), stats[:, 2].max(), stats[:, 3].max()])


class _ForwardRecorder:
    """Forward hooks on every module: for each call, were its inputs and outputs finite."""

    def __init__(self, root: nn.Module) -> None:
        self._root = root
        self._names = {id(m): n for n, m in root.named_modules()}
        self._handles: list[Any] = []
        self._stack: list[Tensor | None] = []
        self._records: list[tuple[str, str, Tensor | None, Tensor | None, str]] = []
        self.order: list[str] = []

    def __enter__(self) -> _ForwardRecorder:
        for module in self._root.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        name = self._names.get(id(module), "?")
        if name not in self.order:
            self.order.append(name)
        # computed now, before the module can change its inputs in place
        self._stack.append(_input_stats(_float_tensors((args, kwargs))))

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        inputs = self._stack.pop() if self._stack else None
        outputs = _float_tensors(output)
        dtype = str(outputs[0].dtype).replace("torch.", "") if outputs else "float32"
        self._records.append((self._names.get(id(module), "?"), type(module).__name__, inputs,
                              _output_stats(outputs), dtype))

    def calls(self) -> list[ModuleCall]:
        """The records as :class:`ModuleCall` (one transfer to the host)."""
        parts = [s for r in self._records for s in (r[2], r[3]) if s is not None]
        host = _to_host(parts)
        calls = []
        for name, type_name, inputs, outputs, dtype in self._records:
            i = host[:6] if inputs is not None else [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
            host = host[6:] if inputs is not None else host
            o = host[:4] if outputs is not None else [1.0, 0.0, 0.0, 0.0]
            host = host[4:] if outputs is not None else host
            calls.append(ModuleCall(
                name=name, type=type_name, inputs_finite=i[0] > 0.5, outputs_finite=o[0] > 0.5,
                input_min=i[1], input_max=i[2], input_has_zero=i[3] > 0.5, input_nan=i[4] > 0.5, input_inf=i[5] > 0.5,
                output_nan=o[1] > 0.5, output_posinf=o[2] > 0.5, output_neginf=o[3] > 0.5, output_dtype=dtype,
            ))
        return calls


def _backward_culprit(trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> str | None:
    """The autograd function whose backward turned finite gradients into NaN/Inf.

    Replays the batch with grad enabled and a hook on every node of its autograd graph;
    ``torch.autograd.grad`` returns the gradients instead of adding them to ``.grad``, so
    the parameters' gradients stay as they were. (Anomaly mode would see NaN only, not inf.)
    """
    params = [p for p in pl_module.parameters() if p.requires_grad]
    if not params:
        return None
    with _replaying(trainer, pl_module), torch.enable_grad():
        loss = step_loss(_call_training_step(pl_module, batch, batch_idx))
        if loss is None or loss.grad_fn is None:
            return None
        records: list[tuple[str, Tensor]] = []

        def record(node: Any, made: Sequence[Tensor | None], came: Sequence[Tensor | None]) -> None:
            made_ok = [torch.isfinite(g).all() for g in made if isinstance(g, Tensor)]
            came_ok = [torch.isfinite(g).all() for g in came if isinstance(g, Tensor)]
            if made_ok:
                flags = torch.stack([torch.stack(made_ok).all(), torch.stack(came_ok).all() if came_ok
                                     else torch.ones((), dtype=torch.bool, device=made_ok[0].device)])
                records.append((node.name(), flags))

        handles, seen, todo = [], set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            handles.append(node.register_hook(lambda made, came, node=node: record(node, made, came)))
            todo.extend(child for child, _ in node.next_functions)
        try:
            torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
    host = _to_host([flags for _, flags in records])
    for i, (name, _) in enumerate(records):
        made_finite, came_finite = host[2 * i] > 0.5, host[2 * i + 1] > 0.5
        if came_finite and not made_finite:
            return name
    return None
