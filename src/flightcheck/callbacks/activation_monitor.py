r"""
Activation monitor
^^^^^^^^^^^^^^^^^^

On a schedule, run the model once on a fixed probe batch with recording switched on, and
find ReLU-family units that never fire (dead units) and tanh/sigmoid layers stuck in their
flat tails (saturation), per layer. Ordinary training steps run with nothing installed.

"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from flightcheck.callbacks._probe import (
    PredictionFn,
    ProbeSchedule,
    ProbeSource,
    SummedCounts,
    DefaultPrediction,
    model_unreachable,
    predict_probe,
    probing,
    shares_memory,
)
from flightcheck.callbacks.base import FlightcheckCallback, OnFinding
from flightcheck.checks.activations import (
    DEFAULT_PATIENCE,
    LEAKY_DEAD_SLOPE,
    SIGMOID_TAIL,
    TANH_TAIL,
    ActivationReading,
    dead_fraction,
    dead_units,
    is_dead_layer,
    is_saturated_layer,
    saturation,
)
from flightcheck.signals.activations import tail_count, unit_axis, unit_peaks
from flightcheck.utils import batch_size_of

_RELU = frozenset({F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6})
_HARDTANH = frozenset({F.hardtanh, F.hardtanh_})
_LEAKY = frozenset({F.leaky_relu, F.leaky_relu_})
_TANH = frozenset({torch.tanh, torch.tanh_, Tensor.tanh, Tensor.tanh_, F.tanh})
_SIGMOID = frozenset({torch.sigmoid, torch.sigmoid_, Tensor.sigmoid, Tensor.sigmoid_, F.sigmoid})
#: activation modules: a call inside one is named after the module itself
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Tanh, nn.Sigmoid)
#: layers whose outputs put units on axis 1 even in 3-d activations (B, C, L)
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)

_HISTORY = 16


def _relu_like(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _RELU:
        return True
    if func in _HARDTANH:  # ReLU6 is hardtanh(0, 6)
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        return float(low) == 0.0
    if func in _LEAKY:
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return abs(float(slope)) <= LEAKY_DEAD_SLOPE
    return False


class _Recorder(TorchFunctionMode):
    """Sees every activation function the probe's forward pass calls, module or functional,
    and keeps per layer a device tensor: units that fired, or ``[in tails, total]``."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root_name = type(root).__name__
        self.names = {id(m): name for name, m in root.named_modules()}
        self.scope: list[nn.Module] = []
        self.last_leaf: nn.Module | None = None
        self.dead: dict[str, Tensor] = {}
        self.values: dict[str, int] = {}  # per ReLU layer: values each unit was seen on
        self.tails: dict[str, tuple[Tensor, Any]] = {}
        self.nonfinite: list[Tensor] = []
        self._seen: dict[str, int] = {}
        self._handles: list[Any] = []
        for m in root.modules():
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.scope.append(module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.scope and self.scope[-1] is module:
            self.scope.pop()
        if next(module.children(), None) is None:
            self.last_leaf = module

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer(self, op: str) -> str:
        module = self.scope[-1] if self.scope else None
        where = self.names.get(id(module), "") if module is not None else ""
        if isinstance(module, _ACTIVATION_MODULES) and where:
            name = where
        else:
            name = f"{where or self.root_name}:{op}"
        count = self._seen.get(name, 0) + 1
        self._seen[name] = count
        return name if count == 1 else f"{name}#{count}"

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor) and x.is_floating_point() and x.numel():
            if _relu_like(func, args, kwargs):
                channels_first = isinstance(self.last_leaf, _CHANNELS_FIRST)
                peaks = unit_peaks(x.detach(), unit_axis(x, channels_first))  # before an in-place call
                layer = self._layer("relu")
                self.dead[layer] = (peaks > 0).float()
                self.values[layer] = x.numel() // max(peaks.numel(), 1)  # shapes only: no sync
                self.nonfinite.append((~torch.isfinite(peaks)).sum())
            elif func in _TANH or func in _SIGMOID:
                limit = TANH_TAIL if func in _TANH else SIGMOID_TAIL
                counts = tail_count(x.detach().float(), limit)  # read before an in-place call changes x
                self.nonfinite.append((~torch.isfinite(x.detach())).sum())
                out = func(*args, **kwargs)
                op = "tanh" if func in _TANH else "sigmoid"
                self.tails[self._layer(op)] = (counts, weakref.ref(out) if isinstance(out, Tensor) else None)
                return out
        return func(*args, **kwargs)

    def drop_output_layer(self, output: Tensor) -> None:
        """Leave out a squashing layer that produced the model's prediction itself: its
        saturation is the model's confidence, which PredictionStability watches."""
        for name, (_, ref) in list(self.tails.items()):
            t = ref() if ref is not None else None  # alive, so its memory cannot have been reused
            if t is not None and shares_memory(t, output):
                del self.tails[name]


@contextlib.contextmanager
def _recording(root: nn.Module) -> Iterator[_Recorder]:
    recorder = _Recorder(root)
    try:
        with recorder:
            yield recorder
    finally:
        recorder.remove()


class ActivationMonitor(FlightcheckCallback):
    r"""Find dead ReLU units and saturated tanh/sigmoid layers on a fixed probe batch (opt-in).

    Every ``every_n_steps`` steps the model predicts the probe batch once in eval mode, without
    gradients, with recording switched on; ordinary steps run with nothing installed. The
    probe comes from the same place as :class:`~flightcheck.callbacks.prediction_stability.PredictionStability`'s
    (the batch you give, else the first validation batch of the sanity check, else the first
    training batch), and the pass leaves RNG states, module modes and attributes as they were.

    What is seen: every ReLU, ReLU6, LeakyReLU with a slope of at most 1e-3, tanh and sigmoid
    the forward pass calls from Python, as a module (``nn.ReLU``) or as a function (``F.relu``,
    ``torch.tanh``, ``x.sigmoid()``), recorded with a ``TorchFunctionMode`` while the probe
    runs. A layer is named after the activation module, or ``<module>:<op>`` for a functional
    call inside a module's ``forward`` (``#2``, ``#3`` for repeated calls). Not seen:
    activations inside fused kernels (``nn.LSTM``/``nn.GRU`` gates, the fast path of
    ``nn.TransformerEncoderLayer`` in eval mode, ``torch.compile``\ d regions) and activations
    without a true zero or flat region (GELU, SiLU, ELU, the default LeakyReLU), which do not
    die. A tanh/sigmoid that produces the model's prediction itself is not judged.

    TensorBoard charts: ``flightcheck/activations/dead_fraction`` (the worst layer's share of
    dead units) and ``flightcheck/activations/saturation`` (the worst layer's share of
    pre-activations in the flat tails); with ``per_layer=True`` one chart per layer too.

    Args:
        probe_batch: the batch to run, as your data loader yields it (see above for the default).
        every_n_steps: optimizer steps between probes. Default: flightcheck's look interval
            (:func:`~flightcheck.callbacks.base.look_interval`).
        prediction_fn: ``prediction_fn(pl_module, batch) -> Tensor``, the forward pass to record;
            default as in ``PredictionStability`` (``pl_module(x)`` with the batch's input).
        warmup_steps: no verdict before this global step. Default: two probe intervals.
        patience: consecutive probes a condition must hold on before it is reported.
        per_layer: also log each layer's figures to TensorBoard.
        on_finding: called with each new finding (global rank 0).

    Example::

        import lightning as L
        from flightcheck.callbacks.activation_monitor import ActivationMonitor

        trainer = L.Trainer(callbacks=[ActivationMonitor(every_n_steps=200)])
    """

    name = "activation_monitor"

    def __init__(
        self,
        probe_batch: Any = None,
        every_n_steps: int | None = None,
        prediction_fn: PredictionFn | None = None,
        warmup_steps: int | None = None,
        patience: int = DEFAULT_PATIENCE,
        per_layer: bool = False,
        on_finding: OnFinding | None = None,
    ) -> None:
        super().__init__(on_finding=on_finding)
        if prediction_fn is not None and not callable(prediction_fn):
            raise TypeError(f"prediction_fn must be a callable (pl_module, batch) -> Tensor, got {type(prediction_fn).__name__}")
        if warmup_steps is not None and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be None (two probe intervals) or an int >= 0, got {warmup_steps!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if not isinstance(per_layer, bool):
            raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
        self._source = ProbeSource(probe_batch)
        self._schedule = ProbeSchedule(every_n_steps)
        self.prediction_fn: PredictionFn = prediction_fn or DefaultPrediction()
        self._off = False
        self._reached = False
        self.warmup_steps = warmup_steps
        self.patience = patience
        self.per_layer = per_layer
        self.readings: list[ActivationReading] = []
        self._counts: SummedCounts | None = None
        self._values: dict[str, int] = {}  # of the latest probe: values each ReLU unit was seen on

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._source.reset()
            self._schedule.reset()
            self._off = self._reached = False

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._source.offer_validation(trainer, batch, batch_idx, dataloader_idx)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._schedule.mark(trainer)  # the schedule counts from the first step (or the resumed one)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._source.offer_training(trainer, batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._schedule.due(trainer):
            self._probe(trainer, pl_module)

    # ------------------------------------------------------------------ the probe
    def collective_due(self, hook: str, trainer: Any) -> int:
        # every probe agrees once, after its forward pass and before its counts are summed over ranks
        return int(not self._off and hook == "on_train_batch_end" and self._schedule.peek(trainer))

    def _probe(self, trainer: Any, pl_module: Any) -> None:
        if self._off:
            return
        self._schedule.mark(trainer)
        batch = self._source.get(trainer, pl_module)
        flat, unreachable = None, None
        with probing(pl_module):
            if batch is not None:
                try:
                    with _recording(pl_module) as recorder:
                        output = predict_probe(trainer, pl_module, batch, self.prediction_fn)
                except Exception as err:
                    if self._reached or not isinstance(self.prediction_fn, DefaultPrediction):
                        raise  # an internal error (the other ranks hear it at their agreement below)
                    unreachable = err
                else:
                    self._reached = True
                    recorder.drop_output_layer(output)
                    dead = list(recorder.dead.items())
                    self._values = dict(recorder.values)
                    tails = [(name, counts) for name, (counts, _) in recorder.tails.items()]
                    if dead or tails:
                        # NaN/Inf activations are NonFiniteGuard's: such a probe is counted, then skipped
                        bad = torch.stack(recorder.nonfinite).sum()
                        if output.is_floating_point():
                            bad = bad + (~torch.isfinite(output)).sum()
                        parts = [t for _, t in dead] + [c for _, c in tails] + [bad]
                        flat = torch.cat([p.reshape(-1).float() for p in parts])
            # Every rank agrees here, after the failure-prone part and before the counts are
            # summed over ranks: the ranks probe together, stay off together, or step aside together.
            agreed = self.agree(trainer, flat is None and unreachable is None, unreachable is not None)
            if agreed[1]:
                self._off = True
                model_unreachable(self, trainer, unreachable or RuntimeError(f"the probe failed on {agreed.who(1)}"))
                return
            if agreed[0] or flat is None:
                return
            if self._counts is None or self._counts.counts.numel() != flat.numel():
                self._counts = SummedCounts(flat.numel()).to(flat.device)
            self._counts.update(flat)
            summed = self._counts.compute()  # summed over ranks: a unit is alive if it fired anywhere
            self._counts.reset()
        values = summed.tolist()  # the one host transfer of this probe
        if values[-1] > 0:
            return
        reading = self._reading(trainer, batch, dead, tails, values)
        self.readings = (self.readings + [reading])[-_HISTORY:]
        self._log(trainer, reading)
        self._judge(trainer)

    def _reading(
        self, trainer: Any, batch: Any, dead: list[tuple[str, Tensor]], tails: list[tuple[str, Tensor]], values: list[float]
    ) -> ActivationReading:
        i = 0
        dead_counts: dict[str, tuple[int, int]] = {}
        for name, fired in dead:
            units = fired.numel()
            dead_counts[name] = (sum(1 for v in values[i : i + units] if v <= 0), units)
            i += units
        saturated: dict[str, float] = {}
        for name, _ in tails:
            inside, total = values[i], values[i + 1]
            saturated[name] = inside / total if total else 0.0
            i += 2
        return ActivationReading(
            step=int(trainer.global_step), samples=batch_size_of(batch) or 0, dead=dead_counts, saturated=saturated,
            values={name: self._values.get(name, 0) for name in dead_counts},
        )

    def _log(self, trainer: Any, r: ActivationReading) -> None:
        scalars: dict[str, float] = {}
        if r.dead:
            scalars["flightcheck/activations/dead_fraction"] = max(dead_fraction(c) for c in r.dead.values())
        if r.saturated:
            scalars["flightcheck/activations/saturation"] = max(r.saturated.values())
        if self.per_layer:
            for name, counts in r.dead.items():
                scalars[f"flightcheck/activations/dead_fraction/{name}"] = dead_fraction(counts)
            for name, share in r.saturated.items():
                scalars[f"flightcheck/activations/saturation/{name}"] = share
        self.hub(trainer).log_scalars(scalars, step=r.step)

    def _judge(self, trainer: Any) -> None:
        warmup = self.warmup_steps if self.warmup_steps is not None else 2 * self._schedule.interval(trainer)
        found = dead_units(self.readings, warmup_steps=warmup, patience=self.patience) + saturation(
            self.readings, warmup_steps=warmup, patience=self.patience
        )
        for verdict in found:
            self.report_verdict(trainer, verdict)
        reported = {(v.check, v.target) for v in found}
        recent = self.readings[-self.patience :]
        if len(recent) < self.patience:
            return
        last = recent[-1]
        for check, layers, holds in (
            ("dead_units", last.dead, is_dead_layer),
            ("saturation", last.saturated, is_saturated_layer),
        ):
            for layer in layers:
                if (check, layer) not in reported and not any(holds(r, layer) for r in recent):
                    self.resolve(check, layer)

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {"readings": [_reading_dict(r) for r in self.readings]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.readings = [
            ActivationReading(
                step=int(d["step"]),
                samples=int(d.get("samples", 0)),
                dead={k: (int(v[0]), int(v[1])) for k, v in d.get("dead", {}).items()},
                saturated={k: float(v) for k, v in d.get("saturated", {}).items()},
                values={k: int(v) for k, v in d.get("values", {}).items()},
            )
            for d in state.get("readings", [])
        ]


def _reading_dict(r: ActivationReading) -> dict[str, Any]:
    return {"step": r.step, "samples": r.samples, "dead": dict(r.dead), "saturated": dict(r.saturated),
            "values": dict(r.values)}


__all__ = ["ActivationMonitor"]
