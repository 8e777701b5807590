r"""GradientMonitor: gradient and weight norms, update ratios and gradient flow, on the device.

On every optimizer step (in ``on_before_optimizer_step``: gradients complete after
accumulation, and unscaled under ``16-mixed``, where Lightning unscales them before this
hook and clips them after it) the monitor takes:

- the L2 norm of each layer's gradient, from one fused read of the gradients that it shares
  with :class:`~flightcheck.NonFiniteGuard` (``signals.norms.step_grad_norms``);
- the update-to-weight ratio ``||Δw|| / ||w||`` of each layer, from a small fixed block of
  every tensor copied before the step and compared after it
  (:class:`~flightcheck.signals.updates.UpdateSample`): never a copy of the weights;
- which parameters received a gradient, and which ever changed.

Every figure stays on the device, one row per step in a small ring buffer, so no step
between two looks is missed. Every look interval (Lightning's ``log_every_n_steps``, or
less on a short run: :func:`~flightcheck.callbacks.base.look_interval`) and at the end of
each epoch the rows go to the host as one tensor, together with the exact per-layer weight
norms; every step of the interval is judged by
:mod:`flightcheck.checks.gradients`, and the look's step is charted:

- ``flightcheck/grad_norm/total``, ``flightcheck/weight_norm/total``,
  ``flightcheck/update_ratio/total``, and ``flightcheck/grad_norm/interval_max`` (the
  largest gradient norm since the previous log, so a spike between two logs shows);
- ``flightcheck/grad_norm/optimizer_<i>`` when there are several optimizers;
- ``flightcheck/{grad_norm,weight_norm,update_ratio}/layers/<layer>`` for the
  ``max_layer_charts`` largest layers; the rest summed up as ``layers/other``;
- ``flightcheck/grad_norm/clipped_fraction`` when ``Trainer(gradient_clip_val=...)`` clips
  by norm: the share of steps since the last log whose gradient norm was above it;
- opt-in histograms under ``flightcheck/histograms/``.

Under DDP every rank sees the same all-reduced gradients and weights and so reaches the same
verdicts without communicating; only rank 0 writes. Under sharded training (FSDP2, i.e.
``ModelParallelStrategy`` with ``fully_shard``, or tensor parallelism: ``DTensor``
parameters) each rank measures its own shards, on the device; at each flush the interval's
squared norms are summed over the ranks (one ``all_reduce``, after one agreement between the
ranks), so every rank judges the whole model's norms, under the parameters' unsharded
names. FSDP1 (Lightning's ``FSDPStrategy``, flat parameters) is not supported.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flightcheck.callbacks.base import FlightcheckCallback, OnFinding, look_interval, looking_due, planned_steps
from flightcheck.checks import Verdict
from flightcheck.checks import gradients as judge
from flightcheck.checks import modes as judge_modes
from flightcheck.signals.layers import group_by_layer
from flightcheck.signals.norms import (
    float32_on,
    foreach_norms,
    is_dtensor,
    local_shard,
    shard_weights,
    step_grad_norms,
    sum_over_ranks,
)
from flightcheck.signals.robust import trailing_medians
from flightcheck.signals.stale import StaleGradientWatch
from flightcheck.signals.updates import DEFAULT_BLOCK_SIZE, UpdateSample
from flightcheck.utils.distributed import world_size

#: Rows of the device ring buffer are capped so that it stays under ~4 MiB of float32.
_RING_ELEMENTS = 2**20
#: The update ratio needs each tensor's sampled block copied before the step and compared
#: after it: four small fused ops, on a CPU about as much as the rest of the monitor. It is
#: measured on every step for the first ``_DENSE_UPDATE_STEPS`` steps (where a learning rate
#: far off and parameters that never update show), on every look, and in between on
#: every ``_UPDATE_EVERY``-th step of each optimizer: the ratio's median and the weights'
#: growth are trends over tens of steps, and a step that blows the weights up also shows in
#: the gradients.
_DENSE_UPDATE_STEPS = 100
_UPDATE_EVERY = 4
#: Gradients never cleared are sampled on the dense steps (the bug shows from the first step)
#: and then on looks only (a few tiny kernels per look interval), and judged over the counts of
#: this many recent intervals.
_STALE_INTERVALS = 4
#: A finding is re-armed (reported again if it comes back) after its judge found the run
#: clear on this many look intervals in a row.
_CLEAR_AFTER = 3


def _device_index(values: Sequence[int], device: torch.device) -> Tensor:
    """A long index tensor on ``device`` without a synchronising copy (pinned + non-blocking on CUDA)."""
    host = torch.tensor(list(values), dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host if device.type == "cpu" else host.to(device)


def _grouping(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, groups)`` to sum columns by ``index`` with one ``np.add.reduceat``."""
    order = np.argsort(index, kind="stable")
    if not index.size:
        return order, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, np.diff(index[order]) != 0])
    return order, starts, index[order][starts]


def _group_sums(values: np.ndarray, grouping: tuple[np.ndarray, np.ndarray, np.ndarray], groups: int) -> np.ndarray:
    """Per row of ``values`` (rows x columns), the sums of the columns of each group; a NaN stays
    in its own group (a product with a one-hot matrix would spread it: NaN x 0 is NaN)."""
    order, starts, ids = grouping
    out = np.zeros((values.shape[0], groups))
    if starts.size:
        out[:, ids] = np.add.reduceat(values[:, order], starts, axis=1)
    return out


def _learning_rate(optimizer: Any) -> float:
    groups = getattr(optimizer, "param_groups", None) or [{}]
    lr = groups[0].get("lr")
    return float(lr) if isinstance(lr, (int, float)) else float("nan")  # a tensor lr would need a sync


class _Layout:
    """What the monitor follows, fixed for a stretch of training: parameters, layers, optimizers."""

    def __init__(self, pl_module: Any, optimizers: Sequence[Any], depth: int, block_size: int, world: int = 1) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.pos = {id(p): i for i, p in enumerate(self.params)}
        # sharded training: each rank measures its shards, weighted so that sums over ranks are whole
        self.shard_weight = shard_weights(self.params, world)
        local = [local_shard(p) for p in self.params]
        self.device = local[0].device if local else torch.device("cpu")
        self.layers, layer_of = group_by_layer(self.names, depth)
        self.L = len(self.layers)
        self.layer_of = layer_of
        self.layer_numel = np.zeros(self.L)
        for i, p in enumerate(self.params):
            self.layer_numel[layer_of[i]] += p.numel()
        self.optimizers = list(optimizers)
        self.K = len(self.optimizers)
        self.opt_slot = {id(o): k for k, o in enumerate(self.optimizers)}
        opt_of: dict[int, int] = {}
        self.group_of: dict[int, tuple[int, int]] = {}
        for k, opt in enumerate(self.optimizers):
            for g, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    opt_of.setdefault(id(p), k)
                    self.group_of.setdefault(id(p), (k, g))
        self.opt_of = [opt_of.get(id(p), self.K) for p in self.params]  # K: in no optimizer
        self.orphans = [i for i, k in enumerate(self.opt_of) if k == self.K]
        self.P = len(self.params)
        self.layer_of_np = np.asarray(layer_of, dtype=np.int64)
        self.opt_of_np = np.asarray(self.opt_of, dtype=np.int64)
        self.by_layer, self.by_opt = _grouping(self.layer_of_np), _grouping(self.opt_of_np)
        # which optimizer slots hold parameters of each layer: a layer is measured on a step
        # when one of them stepped (host-side, so the device row needs no "not measured" mark)
        self._measured: dict[tuple[int, ...], np.ndarray] = {}
        self.layer_slots = np.zeros((self.L, self.K + 1), dtype=bool)
        for i, k in enumerate(self.opt_of):
            self.layer_slots[layer_of[i], k] = True
        self.sample = UpdateSample(local, self.names, block_size)
        self.signature = self.signature_of(pl_module, optimizers)
        self.scale = np.asarray(self.sample.scale_host, dtype=np.float64)  # block -> whole-tensor estimate
        self.cache: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        # The device ring holds one row of per-tensor *norms* per step, each written by one op:
        # [gradient | Δw over the block | w over the block, before the step | gradient over the
        # block (evidence for never_updated, only while some tensor has not been seen changing)].
        P = self.P
        self.ring_len = 4 * P
        self.RG, self.RD, self.RB = slice(0, P), slice(P, 3 * P), slice(3 * P, 4 * P)
        # On the host, at each flush, the rows are squared and summed into per-layer and
        # per-optimizer figures: [grad² per layer | per optimizer] [Δw² ...] [w² ...].
        L, K1 = self.L, self.K + 1
        self.G, self.GO = slice(0, L), slice(L, L + K1)
        self.D, self.DO = slice(L + K1, 2 * L + K1), slice(2 * L + K1, 2 * L + 2 * K1)
        self.W, self.WO = slice(2 * L + 2 * K1, 3 * L + 2 * K1), slice(3 * L + 2 * K1, 3 * L + 3 * K1)
        self.row_len = 3 * L + 3 * K1

    def measured(self, stepped: Sequence[int]) -> np.ndarray:
        """The layers measured on a step in which the optimizer slots ``stepped`` stepped."""
        key = tuple(stepped)
        hit = self._measured.get(key)
        if hit is None:
            hit = self.layer_slots[:, list(stepped)].any(axis=1) if stepped else np.zeros(self.L, dtype=bool)
            hit.setflags(write=False)
            self._measured[key] = hit
        return hit

    @staticmethod
    def signature_of(pl_module: Any, optimizers: Sequence[Any]) -> tuple:
        trainable = tuple(id(p) for p in pl_module.parameters() if p.requires_grad)
        groups = tuple(id(p) for o in optimizers for g in o.param_groups for p in g["params"])
        return trainable, groups

    def indices(self, params: Sequence[Tensor]) -> tuple[Tensor, bool, Tensor | None, list[int]]:
        """``(positions, whole, keep, pos_list)`` of the followed ones among ``params``, cached
        per parameter set: their positions (a device index; ``whole`` when they are every
        followed parameter in order: one plain copy into the ring row), and ``keep`` to select
        their entries from a per-``params`` tensor (``None`` when all are followed)."""
        cache_key = tuple(map(id, params))
        hit = self.cache.get(cache_key)
        if hit is not None:
            return hit
        keep = [j for j, p in enumerate(params) if id(p) in self.pos]
        pos_list = [self.pos[id(params[j])] for j in keep]
        entry = (
            _device_index(pos_list, self.device),
            pos_list == list(range(self.P)),
            None if len(keep) == len(params) else _device_index(keep, self.device),
            pos_list,
        )
        self.remember(cache_key, entry)
        return entry

    def host_rows(self, sq: np.ndarray) -> np.ndarray:
        """Per-layer and per-optimizer rows (the host layout) from ring rows of squared norms."""
        n, P = sq.shape[0], self.P
        grad, delta, weight = sq[:, :P], sq[:, P:2 * P] * self.scale, sq[:, 2 * P:3 * P] * self.scale
        rows = np.zeros((n, self.row_len))
        for values, (by_layer, by_opt) in ((grad, (self.G, self.GO)), (delta, (self.D, self.DO)),
                                           (weight, (self.W, self.WO))):
            rows[:, by_layer] = _group_sums(values, self.by_layer, self.L)
            rows[:, by_opt] = _group_sums(values, self.by_opt, self.K + 1)
        return rows

    def remember(self, key: Any, value: Any) -> None:
        self.cache[key] = value
        if len(self.cache) > 64:  # models whose set of parameters with gradients changes (mixture of experts)
            self.cache.popitem(last=False)


class GradientMonitor(FlightcheckCallback):
    r"""Watch gradient and weight norms and update ratios; warn about explosion, vanishing
    gradients, spikes, runaway weights, parameters that never update or never get a gradient.

    Costs one fused read of the gradients per step (shared with ``NonFiniteGuard``) plus a few
    small device ops, and no host-device synchronisation outside its looks.

    Args:
        depth: how many levels of module names make a layer: ``encoder.layers.3.attn.q.weight``
            belongs to ``encoder.layers.3`` at depth 2 (an index counts with the name before it)
            and to ``encoder`` at depth 1. Default 2: blocks of a stack are told apart without a
            chart per linear layer.
        max_layer_charts: per-layer charts for at most this many layers (the largest); the
            rest are summed up in ``layers/other``. Findings still look at every layer.
        histogram_every_n_steps: log per-layer histograms of gradients and weights every this
            many optimizer steps; ``None`` (default) for none. Histograms read every value to
            the host, so keep this in the hundreds or thousands.
        update_sample_size: elements each tensor lends to the update-ratio estimate (exact
            for tensors up to this size). Memory: this many elements per parameter tensor.
        explosion_factor: how many times its earlier median the recent gradient norm must
            reach to count as an explosion.
        spike_min_ratio: how many times the rolling median one step's gradient norm must
            reach to count as a spike (it must also stand out of the run's own noise).
        vanishing_ratio: a layer whose gradient RMS is below this fraction of the liveliest
            layer's has vanishing gradients.
        max_update_ratio: a sustained ``||Δw|| / ||w||`` per step above this is too large.
        min_update_ratio: a sustained ratio below this, at a steady learning rate, is too small.
        weight_growth_factor: the total weight norm growing this much within 20 steps, without
            slowing down, is runaway growth.
        flow_after_steps: after this many optimizer steps, report trainable parameters that
            never got a gradient, and parameters that got gradients but never changed.
        on_finding: called with each new finding (see :class:`~flightcheck.FlightcheckCallback`).

    Example::

        import lightning as L
        from flightcheck import GradientMonitor

        trainer = L.Trainer(callbacks=[GradientMonitor(depth=1)], log_every_n_steps=50)
    """

    name = "gradient_monitor"

    def __init__(
        self,
        depth: int = 2,
        max_layer_charts: int = 32,
        histogram_every_n_steps: int | None = None,
        update_sample_size: int = DEFAULT_BLOCK_SIZE,
        explosion_factor: float = judge.EXPLOSION_FACTOR,
        spike_min_ratio: float = judge.SPIKE_MIN_RATIO,
        vanishing_ratio: float = judge.VANISHING_RATIO,
        max_update_ratio: float = judge.MAX_UPDATE_RATIO,
        min_update_ratio: float = judge.MIN_UPDATE_RATIO,
        weight_growth_factor: float = judge.WEIGHT_GROWTH_FACTOR,
        flow_after_steps: int = judge.FLOW_AFTER_STEPS,
        on_finding: OnFinding | None = None,
    ) -> None:
        super().__init__(on_finding=on_finding)
        _positive_int("depth", depth)
        _positive_int("max_layer_charts", max_layer_charts, allow_zero=True)
        if histogram_every_n_steps is not None:
            _positive_int("histogram_every_n_steps", histogram_every_n_steps, accepted="None or a positive int")
        _positive_int("update_sample_size", update_sample_size)
        _positive_int("flow_after_steps", flow_after_steps)
        for name, value, low in (("explosion_factor", explosion_factor, 1.0), ("spike_min_ratio", spike_min_ratio, 1.0),
                                 ("weight_growth_factor", weight_growth_factor, 1.0)):
            _number_above(name, value, low)
        for name, value in (("vanishing_ratio", vanishing_ratio), ("max_update_ratio", max_update_ratio),
                            ("min_update_ratio", min_update_ratio)):
            _number_above(name, value, 0.0)
        if vanishing_ratio >= 1:
            raise ValueError(f"vanishing_ratio must be a fraction in (0, 1), got {vanishing_ratio}")
        if min_update_ratio >= max_update_ratio:
            raise ValueError(
                f"min_update_ratio ({min_update_ratio}) must be below max_update_ratio ({max_update_ratio})"
            )
        self.depth = depth
        self.max_layer_charts = max_layer_charts
        self.histogram_every_n_steps = histogram_every_n_steps
        self.update_sample_size = update_sample_size
        self.explosion_factor = float(explosion_factor)
        self.spike_min_ratio = float(spike_min_ratio)
        self.vanishing_ratio = float(vanishing_ratio)
        self.max_update_ratio = float(max_update_ratio)
        self.min_update_ratio = float(min_update_ratio)
        self.weight_growth_factor = float(weight_growth_factor)
        self.flow_after_steps = flow_after_steps
        self._layout: _Layout | None = None
        self._plan = _FlushPlan()
        self._pending_state: dict[str, Any] = {}
        self._batch_open = False
        self._meta: list[tuple[int, list[float], list[int], bool]] = []
        self._reset_history()

    # ------------------------------------------------------------------ state
    def _reset_history(self) -> None:
        self._steps_with_grads = 0
        # per optimizer series, keyed by a stable name ("total", "optimizer_1"): gradient norms, the
        # first ones, (step, update ratio, learning rate), the weights' norm at the start, peak LR
        self._history: dict[str, collections.deque] = {}
        self._early: dict[str, list[float]] = {}
        self._ratios: dict[str, collections.deque] = {}
        self._start_weight: dict[str, float] = {}
        self._peak_lr: dict[str, float] = {}
        self._weights: collections.deque = collections.deque(maxlen=judge.WEIGHT_GROWTH_WINDOW + 1)
        self._layer_weights: collections.deque = collections.deque(maxlen=judge.WEIGHT_GROWTH_WINDOW + 1)
        self._layer_rms: collections.deque = collections.deque(maxlen=judge.VANISHING_WINDOW)
        self._raised: dict[tuple[str, str], str] = {}  # (check, series) -> target of the active finding
        self._clear_count: dict[tuple[str, str], int] = {}
        self._spikes: dict[str, tuple[Verdict, int]] = {}
        self._vanishing_layers: set[str] = set()

    def _reset_device_state(self, lay: _Layout, capacity: int) -> None:
        P, dev = len(lay.params), lay.device
        self._ring = torch.zeros(capacity, lay.ring_len, device=dev)
        # per ring row, the views each step writes into (slicing costs a dispatch: done once)
        self._grad_dest = [self._ring[i, lay.RG] for i in range(capacity)]
        self._update_dest = [self._ring[i, lay.RD] for i in range(capacity)]
        # per parameter, on the host, from the rows at each flush
        self._grad_steps = np.zeros(P)  # steps with a non-zero finite gradient
        self._hits = np.zeros(P)  # steps whose sampled block got a non-zero finite gradient
        self._delta_max = np.zeros(P)  # the largest Δw² seen
        self._no_grad_yet = {id(p) for i, p in enumerate(lay.params) if lay.opt_of[i] < lay.K}
        self._unsettled = set(range(P))  # never seen changing: still collecting evidence
        self._generation = 0
        # (step, learning rates, stepped slots, whether the update was measured)
        self._meta: list[tuple[int, list[float], list[int], bool]] = []
        self._rows_taken = 0
        self._unmeasured = [0] * (lay.K + 1)  # per optimizer slot: its steps since its update was measured
        self._row_measured = False
        self._row_sentinel = False
        self._batch_open = False
        self._row_due = False
        self._row_step = 0
        self._row_lrs: list[float] = []
        self._stale = StaleGradientWatch(lay.K + 1, dev)
        # per optimizer slot, the last few intervals' (stale steps, steps judged)
        self._stale_recent = [collections.deque(maxlen=_STALE_INTERVALS) for _ in range(lay.K + 1)]

    def extra_state(self) -> dict[str, Any]:
        lay = self._layout
        per_param: dict[str, list[float]] = dict(self._pending_state.get("per_param", {}))
        if lay is not None and lay.params:
            stats = np.stack([self._grad_steps, self._hits, self._delta_max], 1).tolist()
            for i, name in enumerate(lay.names):
                had = 0.0 if id(lay.params[i]) in self._no_grad_yet else 1.0
                per_param[name] = [*stats[i], had]
        pending = None
        if lay is not None and lay.params and self._meta:
            # rows of steps not judged yet (a checkpoint between two looks): a resumed
            # run judges them as the uninterrupted run would have (checkpoint time only)
            pending = {
                "names": list(lay.names),
                "format": 2,  # rows of per-tensor norms
                "row_len": lay.ring_len,
                "rows": self._ring[: len(self._meta)].tolist(),
                "meta": [[step, list(lrs), list(stepped), bool(took)] for step, lrs, stepped, took in self._meta],
            }
        return {
            "steps_with_grads": self._steps_with_grads,
            "history": {k: list(v) for k, v in self._history.items()},
            "early": {k: list(v) for k, v in self._early.items()},
            "ratios": {k: [list(t) for t in v] for k, v in self._ratios.items()},
            "start_weight": dict(self._start_weight),
            "peak_lr": dict(self._peak_lr),
            "weights": [[s, v] for s, v in self._weights],
            "raised": [[c, s, t] for (c, s), t in self._raised.items()],
            "per_param": per_param,
            "clear_count": [[c, s, n] for (c, s), n in self._clear_count.items()],
            # per-layer windows, valid for the same layers only
            **({
                "layers": list(lay.layers),
                "layer_rms": [[float(v) for v in a] for a in self._layer_rms],
                "layer_weights": [[s, [float(v) for v in a]] for s, a in self._layer_weights],
                "pending": pending,
            } if lay is not None else {  # restored but not taken up yet: keep it as it came
                k: self._pending_state.get(k) for k in ("layers", "layer_rms", "layer_weights", "pending")
            }),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._reset_history()
        self._steps_with_grads = int(state.get("steps_with_grads", 0))
        for attr, maxlen in (("history", judge.SPIKE_WINDOW), ("ratios", judge.UPDATE_RATIO_WINDOW)):
            store = getattr(self, f"_{attr}")
            for key, values in state.get(attr, {}).items():
                store[key] = collections.deque([tuple(v) if isinstance(v, list) else v for v in values], maxlen=maxlen)
        self._start_weight = dict(state.get("start_weight", {}))
        self._peak_lr = dict(state.get("peak_lr", {}))
        self._early = {k: list(v) for k, v in state.get("early", {}).items()}
        # (step, norm) pairs; a bare norm is from a flightcheck that measured every step: no step to give it
        self._weights.extend((int(w[0]), float(w[1])) for w in state.get("weights", []) if isinstance(w, list))
        self._raised = {(c, s): t for c, s, t in state.get("raised", [])}
        self._clear_count = {(c, s): int(n) for c, s, n in state.get("clear_count", [])}
        self._pending_state = {
            "per_param": dict(state.get("per_param", {})),
            "layers": state.get("layers"),
            "layer_rms": state.get("layer_rms", []),
            "layer_weights": state.get("layer_weights", []),
            "pending": state.get("pending"),
        }
        self._layout = None

    # ------------------------------------------------------------------ layout
    def _ensure_layout(self, trainer: Any, pl_module: Any) -> _Layout:
        if self._layout is None:
            lay = _Layout(pl_module, list(getattr(trainer, "optimizers", []) or []), self.depth,
                          self.update_sample_size, world_size(trainer))
            capacity = max(1, min(look_interval(trainer), max(8, _RING_ELEMENTS // max(lay.ring_len, 1))))
            self._layout = lay
            self._reset_device_state(lay, capacity)
            self._restore_per_param(lay)
            self._restore_windows(lay)
        return self._layout

    def _restore_windows(self, lay: _Layout) -> None:
        """Per-layer windows and unjudged rows saved in a checkpoint, when the layout is the same."""
        state, self._pending_state = self._pending_state, {}
        if state.get("layers") == list(lay.layers):
            self._layer_rms.extend(np.array(a, dtype=np.float64) for a in state.get("layer_rms") or [])
            self._layer_weights.extend((int(w[0]), np.array(w[1], dtype=np.float64))
                                       for w in state.get("layer_weights") or [] if len(w) == 2 and isinstance(w[1], list))
        pending = state.get("pending")
        if (pending and pending.get("names") == lay.names and pending.get("format") == 2
                and pending.get("row_len") == lay.ring_len and 0 < len(pending["rows"]) <= self._ring.shape[0]):
            rows = pending["rows"]
            self._ring[: len(rows)].copy_(torch.tensor(rows, dtype=self._ring.dtype))
            self._meta = [(int(m[0]), [float(v) for v in m[1]], [int(k) for k in m[2]], bool(m[3]))
                          for m in pending["meta"]]

    def _restore_per_param(self, lay: _Layout) -> None:
        saved = self._pending_state.pop("per_param", {})
        rows = [(i, saved[n]) for i, n in enumerate(lay.names) if n in saved]
        if not rows:
            return
        for i, r in rows:
            self._grad_steps[i], self._hits[i], self._delta_max[i] = r[:3]
            if r[3] > 0:
                self._no_grad_yet.discard(id(lay.params[i]))
            if r[2] > 0:
                self._unsettled.discard(i)

    def collective_due(self, hook: str, trainer: Any) -> int:
        """Under sharded training each flush agrees once, then sums over the ranks. Which calls
        flush is followed here from the trainer alone, the way the hooks decide it, so that a
        rank whose copy failed (and runs no hook) still answers the next flush's agreement."""
        plan = self._plan
        if hook == "on_train_epoch_start":
            plan.sharded = None  # layers may be unfrozen: look again
            return 0
        if hook == "on_before_optimizer_step":
            if plan.sharded is None:
                params = [p for p in trainer.lightning_module.parameters() if p.requires_grad]
                plan.sharded = any(map(is_dtensor, params)) and shard_weights(params, world_size(trainer)) is not None
            plan.due = (plan.due and plan.open) or looking_due(trainer)
            plan.open = True
            return 0
        if not plan.sharded:
            return 0
        if hook == "on_train_batch_end":
            if not plan.open:
                return 0
            plan.open, plan.rows = False, plan.rows + 1
            ring = getattr(self, "_ring", None)
            capacity = ring.shape[0] if ring is not None else look_interval(trainer)
            if plan.due or plan.rows >= capacity:
                plan.rows = 0
                return 1
            return 0
        if hook in ("on_train_epoch_end", "on_train_end"):
            due, plan.rows = plan.rows > 0, 0
            return int(due)
        return 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # Fine-tuning callbacks unfreeze layers and add param groups between epochs: follow them.
        lay = self._layout
        if lay is not None and lay.signature != _Layout.signature_of(pl_module, trainer.optimizers):
            self._flush(trainer)
            self._pending_state = {"per_param": self.extra_state()["per_param"]}
            self._layout = None
            self._layer_rms.clear()  # per-layer windows: the layers are about to change
            self._layer_weights.clear()

    # ------------------------------------------------------------------ per step, on the device
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        lay = self._ensure_layout(trainer, pl_module)
        if not lay.params:
            return
        k = lay.opt_slot.get(id(optimizer), lay.K)
        if not self._batch_open:
            self._open_row(trainer, lay, k)
        self._row_due = self._row_due or looking_due(trainer)
        self._row_lrs[k] = _learning_rate(optimizer)
        params, norms = step_grad_norms(trainer, optimizer)
        with torch.no_grad():
            self._stale.stepped(k, params, snapshot=self._row_sentinel)
        if params:
            self._row_stepped.append(k)
            with torch.no_grad():
                self._take_gradients(lay, params, norms)
        every = self.histogram_every_n_steps
        if every and int(trainer.global_step) % every == 0:
            self._log_histograms(trainer, lay, params)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._layout is not None and self._layout.params:
            with torch.no_grad():
                self._stale.before_backward()

    def _open_row(self, trainer: Any, lay: _Layout, k: int) -> None:
        self._batch_open = True
        self._row_due = False
        self._row_step = int(trainer.global_step)
        self._row_lrs = [math.nan] * (lay.K + 1)
        self._row_stepped: list[int] = []  # optimizer slots that had gradients on this step
        # Every optimizer's update is measured at least every _UPDATE_EVERY of its own steps (a
        # stride over the rows would alias with optimizers that take turns, as in a GAN).
        dense_or_look = self._rows_taken < _DENSE_UPDATE_STEPS or looking_due(trainer)
        self._row_sentinel = dense_or_look  # the stale-gradient watch samples these steps only
        self._row_measured = dense_or_look or self._unmeasured[k] >= _UPDATE_EVERY - 1
        if not self._row_measured:
            return
        lay.sample.snapshot()
        # Parameters in no optimizer keep their .grad (nobody zeroes it): evidence that they get one.
        if self._unsettled and lay.orphans:
            present = [lay.params[i] for i in lay.orphans if lay.params[i].grad is not None]
            if present:
                self._gather_evidence(lay, present, lay.indices(present)[3])

    def _take_gradients(self, lay: _Layout, params: list[Tensor], norms: Tensor) -> None:
        """The step's per-tensor gradient norms go into the ring row as they are: one copy."""
        positions, whole, keep, pos_list = lay.indices(params)
        if keep is not None:
            if not pos_list:
                return
            norms = norms.index_select(0, keep)
            params = [p for p in params if id(p) in lay.pos]
        row = len(self._meta)
        if whole:
            self._grad_dest[row].copy_(norms)
        else:
            self._ring[row, lay.RG].index_copy_(0, positions, float32_on(norms, lay.device))
        self._steps_with_grads += 1
        if self._no_grad_yet:
            self._no_grad_yet.difference_update(map(id, params))
        if self._unsettled and self._row_measured:
            self._gather_evidence(lay, params, pos_list)

    def _gather_evidence(self, lay: _Layout, params: list[Tensor], pos_list: list[int]) -> None:
        """Evidence for "never updated": the gradient over the sampled block of each parameter
        not yet seen changing. Stops once every parameter has changed."""
        cache_key = ("evidence", tuple(map(id, params)), self._generation)
        hit = lay.cache.get(cache_key)
        if hit is None:  # recomputed only when the settled set changes (at a flush)
            cand = [i for i in pos_list if i in self._unsettled]
            hit = (_device_index(cand, lay.device), cand)
            lay.remember(cache_key, hit)
        cpos, cand = hit
        grads = [lay.params[i].grad for i in cand]
        if not cand or any(g is None for g in grads):
            return  # none, or the update was dropped (NonFiniteGuard's skip ran first): no evidence
        norms = lay.sample.grad_block_norms(cand, grads)
        self._ring[len(self._meta), lay.RB].index_copy_(0, cpos, float32_on(norms, lay.device))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._batch_open:
            return
        lay = self._layout
        assert lay is not None
        self._batch_open = False
        n = len(self._meta)
        if self._row_measured:
            lay.sample.measure_into(self._update_dest[n])  # Δw and w norms per tensor, over the blocks
        self._meta.append((self._row_step, self._row_lrs, self._row_stepped, self._row_measured))
        self._rows_taken += 1
        for k in self._row_stepped:
            self._unmeasured[k] = 0 if self._row_measured else self._unmeasured[k] + 1
        if self._row_due:
            self._check_train_mode(trainer, pl_module)
        if self._row_due or len(self._meta) >= self._ring.shape[0]:
            self._flush(trainer)

    def _check_train_mode(self, trainer: Any, pl_module: Any) -> None:
        """Dropout / batch norm left in eval mode by the step (a ``model.eval()`` in
        ``training_step`` or an epoch hook); read on looks only, from module flags."""
        verdict = judge_modes.judge_train_mode(*judge_modes.current_modes(pl_module))
        if verdict is None:
            self.resolve("train_mode")
        else:
            self.report_verdict(trainer, verdict)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush(trainer)

    # ------------------------------------------------------------------ once per look interval, on the host
    def _flush(self, trainer: Any) -> None:
        lay = self._layout
        if lay is None or not lay.params or not self._meta:
            return
        n = len(self._meta)
        with torch.no_grad():
            squares = self._ring[:n].square()
            weights = foreach_norms(lay.params).square()
            if lay.shard_weight is not None:
                # Sharded: every figure so far is of this rank's shards. The ranks agree (a rank
                # whose copy failed says so here), then add up the interval's squares: whole norms.
                squares = squares * lay.shard_weight.repeat(4)
                weights = weights * lay.shard_weight
                flat = torch.cat([squares.reshape(-1), weights])
                self.agree(trainer)
                sum_over_ranks(flat)
            else:
                flat = torch.cat([squares.reshape(-1), weights])
            stale, judged = self._stale.take()  # this rank's own: every rank sees the same code path
            # the one device-to-host transfer of the interval
            host = torch.cat([flat, stale]).cpu().numpy().astype(np.float64)
            self._ring[:n].zero_()  # a row's columns are written only by the steps that have them
        host, stale_host = host[: -stale.numel()], host[-stale.numel() :]
        for k, seen in enumerate(judged):
            if seen:
                self._stale_recent[k].append((int(stale_host[k]), seen))
        meta, self._meta = self._meta, []
        lay.sample.refresh()
        raw = host[: n * lay.ring_len].reshape(n, lay.ring_len)
        layer_w = _group_sums(host[None, n * lay.ring_len :], lay.by_layer, lay.L)[0]
        rows = lay.host_rows(raw)
        self._count_evidence(lay, raw, rows)
        grad_steps, hits, delta_max = self._grad_steps, self._hits, self._delta_max
        # Once every parameter has changed, the evidence behind never_updated stops being
        # gathered (that finding is about parameters that never do): the step is an op lighter.
        changed = {i for i in self._unsettled if delta_max[i] != 0}
        if changed:
            self._unsettled -= changed
            self._generation += 1

        step = meta[-1][0]
        metrics = self._absorb_rows(lay, rows, meta, _norm_clip(trainer))
        metrics.update(self._layer_metrics(trainer, lay, rows, meta, layer_w))
        self.hub(trainer).log_scalars(metrics, step=step)
        verdicts = self._judge_series(lay, rows, step, _progress(trainer, step))
        verdicts += self._judge_parameters(lay, grad_steps, hits, delta_max, step)
        for slot, verdict, at in verdicts:
            self._raise(trainer, slot, verdict, at)

    def _count_evidence(self, lay: _Layout, raw: np.ndarray, rows: np.ndarray) -> None:
        """Per parameter, from the interval's rows: steps with a finite non-zero gradient, steps
        whose sampled block got one (while its optimizer's step was finite), the largest Δw²."""
        P = lay.P
        grad, block = raw[:, :P], raw[:, 3 * P :]
        with np.errstate(invalid="ignore"):
            self._grad_steps += ((grad != 0) & np.isfinite(grad)).sum(axis=0)
            step_finite = np.isfinite(rows[:, lay.GO])[:, lay.opt_of_np]  # a NaN step is no evidence
            self._hits += ((block != 0) & np.isfinite(block) & step_finite).sum(axis=0)
            # NaN propagates (np.maximum): a parameter that went NaN changed
            self._delta_max = np.maximum(self._delta_max, (raw[:, P : 2 * P] * lay.scale).max(axis=0))

    def _series_name(self, lay: _Layout, k: int) -> str:
        if k == lay.K:
            return "unregistered_optimizer"
        return "total" if lay.K == 1 else f"optimizer_{k}"

    def _absorb_rows(self, lay: _Layout, rows: np.ndarray, meta: list, clip: float) -> dict[str, float]:
        """Extend the host-side histories with the interval's rows and judge its spikes.

        Returns the totals to chart at this look: the latest step's, and the largest
        gradient norm of the interval (a spike between two looks stays visible).
        """
        numel = np.maximum(lay.layer_numel, 1)
        metrics: dict[str, float] = {}
        fresh: dict[str, list[tuple[float, int, str | None]]] = {}  # per series: (norm, step, top layer)
        totals = []
        # the per-layer arithmetic for every row at once; only the per-optimizer series loop
        measured = np.stack([lay.measured(stepped) for _, _, stepped, _ in meta])
        g_layers, w_layers = rows[:, lay.G], rows[:, lay.W]
        with np.errstate(all="ignore"):
            rms = np.where(measured & (g_layers > 0), np.sqrt(g_layers / numel), np.nan)
            tops = np.argmax(np.where(measured, g_layers, -1.0), axis=1)
            d_all, w_all = np.nansum(rows[:, lay.DO][:, : lay.K], axis=1), np.nansum(rows[:, lay.WO][:, : lay.K], axis=1)
            ratio_all = np.sqrt(d_all / w_all)
            w_total = np.sqrt(w_layers.sum(axis=1))
            w_each = np.sqrt(w_layers)
        w_finite = np.isfinite(w_layers).all(axis=1)
        for i, (row, (step, lrs, stepped, took)) in enumerate(zip(rows, meta)):
            g_opt, d_opt, w_opt = row[lay.GO], row[lay.DO], row[lay.WO]
            top = None
            if stepped:  # charted as it is, inf or NaN included
                totals.append(math.sqrt(sum(float(g_opt[k]) for k in stepped)))
                metrics["flightcheck/grad_norm/total"] = totals[-1]
            if measured[i].any():
                top = lay.layers[int(tops[i])]
                self._layer_rms.append(rms[i])
            for k in stepped:
                name = self._series_name(lay, k)
                value = math.sqrt(float(g_opt[k]))
                if lay.K > 1:
                    metrics[f"flightcheck/grad_norm/{name}"] = value
                if not value > 0 or not math.isfinite(value):
                    continue  # none at all (gradient_flow's business) or non-finite (NonFiniteGuard's)
                early = self._early.setdefault(name, [])
                if len(early) < judge.EARLY_STEPS:
                    early.append(value)
                fresh.setdefault(name, []).append((value, step, top))
                if not took:
                    continue  # the update was not measured on this step
                self._start_weight.setdefault(name, float(w_opt[k]))
                ratio = math.sqrt(d_opt[k] / w_opt[k]) if w_opt[k] > 0 and math.isfinite(d_opt[k]) else 0.0
                if ratio > 0:  # 0: the optimizer skipped this step (fp16 overflow, learning rate 0)
                    history = self._ratios.setdefault(name, collections.deque(maxlen=judge.UPDATE_RATIO_WINDOW))
                    history.append((step, ratio, lrs[k]))
                    if math.isfinite(lrs[k]):
                        self._peak_lr[name] = max(self._peak_lr.get(name, 0.0), lrs[k])
            if not took:
                continue
            if w_all[i] > 0 and math.isfinite(d_all[i]):
                metrics["flightcheck/update_ratio/total"] = float(ratio_all[i])
            if w_finite[i]:
                self._weights.append((step, float(w_total[i])))
                self._layer_weights.append((step, w_each[i]))
        if totals:
            metrics["flightcheck/grad_norm/interval_max"] = float(np.nanmax(totals)) if not np.isnan(totals).all() \
                else math.nan
        self._spikes = {}
        for name, entries in fresh.items():
            spike = self._first_spike(name, entries, clip)
            if spike is not None:
                self._spikes[name] = spike
            history = self._history.setdefault(name, collections.deque(maxlen=judge.SPIKE_WINDOW))
            history.extend(value for value, _, _ in entries)
        return metrics

    def _first_spike(self, name: str, entries: list[tuple[float, int, str | None]], clip: float):
        """The interval's first spike of one series, each step judged against the steps before it.

        Judged on the norm that reaches the optimizer: under ``gradient_clip_val`` a spike is
        capped, which is what the user asked clipping to do. Only steps above ``spike_min_ratio``
        times their rolling median (one vectorised median for the interval) go to the judge.
        """
        history = list(self._history.get(name, ()))
        series = np.array(history + [min(value, clip) for value, _, _ in entries])
        medians = trailing_medians(series, len(history), judge.SPIKE_WINDOW)
        early_level = float(np.median(self._early[name]))
        for j in np.flatnonzero(series[len(history) :] >= self.spike_min_ratio * medians):
            i = len(history) + int(j)
            _, step, top = entries[int(j)]
            verdict = judge.grad_spike(float(series[i]), series[max(0, i - judge.SPIKE_WINDOW) : i], step=step,
                                       early_level=early_level, target=name, min_ratio=self.spike_min_ratio,
                                       top_layer=top)
            if verdict is not None:
                return verdict, step
        return None

    def _judge_series(self, lay: _Layout, rows: np.ndarray, step: int, progress: float | None) -> list:
        verdicts: list[tuple[tuple[str, str], Verdict | None, int]] = []
        top = self._top_layer(lay, rows)
        # gradients never zeroed: the cause of an explosion, seen before the explosion is
        stale = {}
        for k, recent_counts in enumerate(self._stale_recent):
            if recent_counts:
                seen, judged = map(sum, zip(*recent_counts))
                optimizer = type(lay.optimizers[k]).__name__ if k < lay.K else None
                stale[self._series_name(lay, k)] = judge.stale_gradients(
                    seen, judged, target=self._series_name(lay, k), optimizer=optimizer)
        for name in [*self._history, *(n for n, v in stale.items() if v is not None and n not in self._history)]:
            recent = list(self._history.get(name, ()))[-judge.EXPLOSION_WINDOW :]
            explosion = stale.get(name) or judge.grad_explosion(recent, self._early.get(name, ()), target=name,
                                                                factor=self.explosion_factor, top_layer=top)
            verdicts.append((("grad_explosion", name), explosion, step))
            if explosion is None:  # the climb of an explosion is not also a spike
                spike, at = self._spikes.get(name, (None, step))
                verdicts.append((("grad_spike", name), spike, at))
        for name, history in self._ratios.items():
            early, recent = self._early.get(name), self._history.get(name)
            level = float(np.median(list(recent)[-judge.UPDATE_RATIO_WINDOW :]) / np.median(early)) if early and recent else None
            at, ratios, lrs = zip(*history)
            peak = self._peak_lr.get(name)
            verdict = judge.update_ratio(ratios, learning_rates=lrs, steps=at, gradient_level=level,
                                         peak_learning_rate=peak if peak and math.isfinite(peak) else None,
                                         progress=progress, from_zero=self._start_weight.get(name, 1.0) == 0, target=name,
                                         max_ratio=self.max_update_ratio, min_ratio=self.min_update_ratio)
            verdicts.append((("update_ratio", name), verdict, step))
        self._vanishing_layers: set[str] = set()
        if len(self._layer_rms) >= judge.VANISHING_MIN_STEPS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: layers never measured
                typical = np.nanmedian(np.stack(self._layer_rms), axis=0)
            verdict = judge.grad_vanishing(dict(zip(lay.layers, typical.tolist())), ratio=self.vanishing_ratio)
            if verdict is not None:
                self._vanishing_layers = set(verdict.data["layers"])
            verdicts.append((("grad_vanishing", ""), verdict, step))
        fastest = None
        if self._layer_weights:
            end = self._layer_weights[-1][0]
            window = [w for s, w in self._layer_weights if s >= end - judge.WEIGHT_GROWTH_WINDOW]
            first, last = window[0], window[-1]
            with np.errstate(all="ignore"):
                fastest = lay.layers[int(np.argmax(np.where(first > 0, last / first, 0.0)))]
        at, norms = zip(*self._weights) if self._weights else ((), ())
        verdict = judge.weight_growth(norms, steps=at, factor=self.weight_growth_factor, top_layer=fastest)
        verdicts.append((("weight_growth", ""), verdict, step))
        return verdicts

    @staticmethod
    def _top_layer(lay: _Layout, rows: np.ndarray) -> str | None:
        """The layer holding the largest gradient in the latest step that measured one."""
        for row in rows[::-1]:
            g = row[lay.G]
            if np.isfinite(g).any() and np.nanmax(g) > 0:
                return lay.layers[int(np.nanargmax(g))]
        return None

    def _judge_parameters(self, lay: _Layout, grad_steps: np.ndarray, hits: np.ndarray, delta_max: np.ndarray,
                          step: int) -> list:
        if self._steps_with_grads < self.flow_after_steps:
            return []
        no_grad: dict[str, list[str]] = {}
        zero_grad: dict[str, list[str]] = {}
        stale: dict[str, list[str]] = {}
        stale_hits: list[float] = []
        orphans: list[str] = []
        for i, (name, p) in enumerate(zip(lay.names, lay.params)):
            layer = lay.layers[lay.layer_of[i]]
            in_optimizer = lay.opt_of[i] < lay.K
            if in_optimizer and id(p) in self._no_grad_yet:
                no_grad.setdefault(layer, []).append(name)
            elif in_optimizer and grad_steps[i] == 0:
                zero_grad.setdefault(layer, []).append(name)
            # A vanishing gradient can be too small to change a float32 weight at all: that is
            # grad_vanishing's finding, not a second one here.
            explained = in_optimizer and layer in self._vanishing_layers
            if (hits[i] >= judge.NEVER_UPDATED_MIN_STEPS and delta_max[i] == 0 and not explained
                    and not self._frozen_by_lr(lay, p)):
                stale.setdefault(layer, []).append(name)
                stale_hits.append(hits[i])
                if not in_optimizer:
                    orphans.append(name)
        flow = judge.gradient_flow(no_grad, zero_grad, steps=self._steps_with_grads)
        updated = judge.never_updated(stale, steps=int(min(stale_hits, default=0)), orphans=orphans)
        return [(("gradient_flow", ""), flow, step), (("update_ratio", "never_updated"), updated, step)]

    @staticmethod
    def _frozen_by_lr(lay: _Layout, p: Tensor) -> bool:
        """A parameter whose param group has learning rate 0 is frozen on purpose."""
        where = lay.group_of.get(id(p))
        if where is None:
            return False
        lr = lay.optimizers[where[0]].param_groups[where[1]].get("lr")
        return isinstance(lr, (int, float)) and lr == 0

    def _raise(self, trainer: Any, slot: tuple[str, str], verdict: Verdict | None, step: int) -> None:
        """Report a verdict, or re-arm the slot's last finding once its judge has seen the run
        clear ``_CLEAR_AFTER`` times in a row (a borderline case must not flap)."""
        previous = self._raised.get(slot)
        if verdict is None:
            if previous is not None:
                self._clear_count[slot] = self._clear_count.get(slot, 0) + 1
                if self._clear_count[slot] >= _CLEAR_AFTER:
                    self.resolve(slot[0], previous)
                    del self._raised[slot]
            return
        self._clear_count.pop(slot, None)
        if previous is not None and previous != verdict.target:
            self.resolve(slot[0], previous)
        self._raised[slot] = verdict.target or ""
        self.report_verdict(trainer, verdict, step=step)

    # ------------------------------------------------------------------ charts
    def _layer_metrics(self, trainer: Any, lay: _Layout, rows: np.ndarray, meta: list,
                       layer_w: np.ndarray) -> dict[str, float]:
        """Per-layer scalars at a look: the charted layers, and the rest summed as ``other``."""
        metrics = {"flightcheck/weight_norm/total": float(np.sqrt(layer_w.sum()))}
        grad = np.full(lay.L, np.nan)
        delta, weight = np.zeros(lay.L), np.zeros(lay.L)
        for row, (_, _, stepped, took) in zip(rows, meta):  # the latest measurement of every layer
            fresh = lay.measured(stepped)
            grad[fresh] = row[lay.G][fresh]
            if took:  # and the latest update of it that was measured (its optimizer stepped)
                delta[fresh], weight[fresh] = row[lay.D][fresh], row[lay.W][fresh]
        charted = self._charted(lay)
        rest = np.ones(lay.L, dtype=bool)
        rest[charted] = False
        groups = [(f"layers/{lay.layers[j]}", [j]) for j in charted]
        if rest.any():
            groups.append(("layers/other", np.flatnonzero(rest).tolist()))
        with np.errstate(all="ignore"):
            for label, idx in groups:
                values = {
                    "grad_norm": np.sqrt(np.nansum(grad[idx])) if np.isfinite(grad[idx]).any() else math.nan,
                    "weight_norm": np.sqrt(np.sum(layer_w[idx])),
                    "update_ratio": np.sqrt(np.sum(delta[idx]) / np.sum(weight[idx])),
                }
                for kind, value in values.items():
                    if math.isfinite(value):
                        metrics[f"flightcheck/{kind}/{label}"] = float(value)
        clip = _norm_clip(trainer)
        if math.isfinite(clip):
            with np.errstate(all="ignore"):
                totals = np.sqrt(np.nansum(rows[:, lay.G], axis=1))
            metrics["flightcheck/grad_norm/clipped_fraction"] = float(np.mean(totals > clip))
        return metrics

    def _charted(self, lay: _Layout) -> list[int]:
        if lay.L <= self.max_layer_charts:
            return list(range(lay.L))
        biggest = np.argsort(-lay.layer_numel, kind="stable")[: self.max_layer_charts]
        return sorted(int(j) for j in biggest)

    def _log_histograms(self, trainer: Any, lay: _Layout, params: list[Tensor]) -> None:
        writer = self.hub(trainer).tensorboard
        if writer is None:
            return
        charted = set(self._charted(lay))
        by_layer: dict[int, list[Tensor]] = {}
        for p in params:
            i = lay.pos.get(id(p))
            if i is not None and lay.layer_of[i] in charted and p.grad is not None and not p.grad.is_sparse:
                by_layer.setdefault(lay.layer_of[i], []).append(p)
        step = int(trainer.global_step)
        for j, ps in by_layer.items():  # one layer at a time: never a copy of every gradient at once
            name = lay.layers[j]
            writer.add_histogram(f"flightcheck/histograms/grad/{name}",
                                 torch.cat([local_shard(p.grad).detach().reshape(-1).float() for p in ps]), step)
            writer.add_histogram(f"flightcheck/histograms/weight/{name}",
                                 torch.cat([local_shard(p).detach().reshape(-1).float() for p in ps]), step)


class _FlushPlan:
    """Where GradientMonitor's flushes fall, followed from the trainer (see ``collective_due``)."""

    def __init__(self) -> None:
        self.sharded: bool | None = None
        self.open = False  # an optimizer step was taken in this batch
        self.due = False  # ... on a look
        self.rows = 0  # steps since the last flush


def _progress(trainer: Any, step: int) -> float | None:
    """The fraction of the planned optimizer steps done, ``None`` when the run has no planned end."""
    planned = planned_steps(trainer)
    return None if planned is None else step / planned


def _norm_clip(trainer: Any) -> float:
    """The gradient norm Lightning clips to after this hook (``inf`` when it does not clip by norm)."""
    clip = getattr(trainer, "gradient_clip_val", None)
    algorithm = getattr(trainer, "gradient_clip_algorithm", None)
    if clip and (algorithm is None or algorithm == "norm"):
        return float(clip)
    return math.inf


def _positive_int(name: str, value: Any, allow_zero: bool = False, accepted: str | None = None) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = accepted or ("a non-negative int" if allow_zero else "a positive int")
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _number_above(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number above {low:g}, got {value!r}")


__all__ = ["GradientMonitor"]
