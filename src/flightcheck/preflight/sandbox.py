"""Run the user's own ``training_step`` before the first real step, and leave no trace.

:class:`Snapshot` copies everything a pre-flight can change — weights, buffers, gradients,
``requires_grad`` flags, optimizer and scheduler state, the AMP loss scaler, and the state a
module keeps outside its parameters (a recurrent state carried between steps, counters,
metric accumulators) — once, to host memory by default, and puts it back bit for bit.
:func:`sandbox` adds what a pre-flight needs around it: fixed RNG seeds (every DDP rank takes
the same steps) with the user's RNG restored afterwards, module modes restored, the other
callbacks hidden (a pre-flight step is not a training step for them), ``self.log`` captured
instead of raising (Lightning forbids it in ``on_fit_start``), and dropout rates at zero.
:class:`StepRunner` calls ``training_step`` under the trainer's precision context, takes an
optimizer step the way Lightning would (its closure, backward, clipping, scaler), or only
evaluates it with the optimizers frozen, and captures the model's output.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flightcheck.utils import modes_preserved, preserved_rng
from flightcheck.utils.modules import MODE_DEPENDENT

#: Seed of every generator inside the sandbox, so that all DDP ranks draw the same numbers.
SANDBOX_SEED = 0


class UserStepError(RuntimeError):
    """The user's ``training_step`` (or its backward / optimizer step) raised inside the sandbox."""

    def __init__(self, where: str, error: BaseException) -> None:
        super().__init__(f"{where} raised {type(error).__name__}: {error}")
        self.where = where
        self.error = error


class Abort(BaseException):  # noqa: N818 - BaseException so a user's ``except Exception`` lets it through
    """Raised from a hook to stop a ``training_step`` once it captured what a check needed."""


# --------------------------------------------------------------------------- snapshot
@dataclasses.dataclass
class _Saved:
    copy: Tensor
    device: torch.device


def _copy_tensor(t: Tensor, on_device: bool) -> _Saved:
    t = t.detach()
    return _Saved(t.clone() if on_device else t.to("cpu", copy=True), t.device)


_PLAIN = (int, float, bool, str, bytes, type(None), complex, np.generic)
_UNSUPPORTED = object()


@dataclasses.dataclass
class _Container:
    """A saved list/tuple/set/dict: its type, the original object (mutable ones are refilled in
    place, since others may hold a reference to them) and its saved items."""

    kind: type
    original: Any
    items: Any  # list of saved values, or dict of key -> saved value


def _copy_tree(value: Any, on_device: bool, depth: int = 0) -> Any:
    """A copy of plain state (tensors, numbers, strings and containers of them), else ``_UNSUPPORTED``."""
    if depth > 6 or isinstance(value, nn.Parameter):
        return _UNSUPPORTED
    if isinstance(value, Tensor):
        return _copy_tensor(value, on_device)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.ndarray):
        return value.copy()
    if type(value) in (list, tuple, set, frozenset):
        items = [_copy_tree(v, on_device, depth + 1) for v in value]
        return _UNSUPPORTED if any(i is _UNSUPPORTED for i in items) else _Container(type(value), value, items)
    if isinstance(value, dict) and (type(value) is dict or type(value).__module__ == "collections"):
        saved = {k: _copy_tree(v, on_device, depth + 1) for k, v in value.items()}
        return _UNSUPPORTED if any(i is _UNSUPPORTED for i in saved.values()) else _Container(dict, value, saved)
    return _UNSUPPORTED


def _restore_tree(saved: Any) -> Any:
    if isinstance(saved, _Saved):
        return saved.copy.to(saved.device, copy=True)
    if isinstance(saved, np.ndarray):
        return saved.copy()
    if not isinstance(saved, _Container):
        return saved
    original = saved.original
    if saved.kind is dict:
        original.clear()
        original.update({k: _restore_tree(v) for k, v in saved.items.items()})
        return original
    items = [_restore_tree(v) for v in saved.items]
    if saved.kind is list:
        original[:] = items
        return original
    if saved.kind is set:
        original.clear()
        original.update(items)
        return original
    return saved.kind(items)


def _tree_bytes(saved: Any) -> int:
    if isinstance(saved, _Saved):
        return saved.copy.element_size() * saved.copy.numel()
    if isinstance(saved, _Container):
        values = saved.items.values() if saved.kind is dict else saved.items
        return sum(_tree_bytes(v) for v in values)
    return 0


_OPTIMIZER_FLAGS = ("_opt_called",)
_BASE_KEYS: frozenset[str] | None = None
# LightningModule attributes that Lightning itself changes while a step runs; put back too.
_LIGHTNING_RESTORED = ("_current_fx_name", "_param_requires_grad_state")


def _base_keys() -> frozenset[str]:
    """Attributes every ``nn.Module``/``LightningModule`` has: bookkeeping, not user state."""
    global _BASE_KEYS
    if _BASE_KEYS is None:
        from flightcheck._compat import LightningModule

        keys = set(vars(nn.Module())) | set(vars(LightningModule()))
        _BASE_KEYS = frozenset(keys - set(_LIGHTNING_RESTORED))
    return _BASE_KEYS


class Snapshot:
    """One copy of everything a pre-flight can change, restored bit for bit by :meth:`restore`.

    Args:
        trainer: the Trainer whose optimizers, schedulers and precision plugin are saved.
        module: the LightningModule (all its submodules are saved).
        on_device: keep the copy on the model's device instead of host memory (faster on a
            GPU when memory allows; either way there is only ever one copy).
    """

    def __init__(self, trainer: Any, module: nn.Module, on_device: bool = False) -> None:
        self.module = module
        self.on_device = on_device
        self.nbytes = 0
        self._tensors: dict[int, tuple[Tensor, _Saved]] = {}
        self._slots: list[tuple[dict[str, Any], str, Tensor]] = []
        self._grads: list[tuple[Tensor, _Saved | None]] = []
        self._requires_grad: list[tuple[Tensor, bool]] = []
        self.names: dict[str, Tensor] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is None:
                        continue
                    self._slots.append((store, name, t))
                    self.names.setdefault(f"{mod_name}.{name}" if mod_name else name, t)
                    if id(t) not in self._tensors:
                        saved = _copy_tensor(t, on_device)
                        self._tensors[id(t)] = (t, saved)
                        self.nbytes += saved.copy.element_size() * saved.copy.numel()
                        if isinstance(t, nn.Parameter):
                            self._requires_grad.append((t, t.requires_grad))
                            grad = None if t.grad is None else _copy_tensor(t.grad, on_device)
                            self._grads.append((t, grad))
        self._extra = self._save_extra_state(module)
        # submodules too: a step that creates or swaps one must not leave it behind
        self._children = [(m, dict(m._modules)) for m in module.modules()]
        self._optimizers = [self._save_optimizer(opt) for opt in getattr(trainer, "optimizers", []) or []]
        self._schedulers = []
        for config in getattr(trainer, "lr_scheduler_configs", []) or []:
            with contextlib.suppress(Exception):
                self._schedulers.append((config.scheduler, copy.deepcopy(config.scheduler.state_dict())))
        plugin = getattr(trainer, "precision_plugin", None)
        scaler = getattr(plugin, "scaler", None)
        self._scaler = (scaler, copy.deepcopy(scaler.state_dict())) if scaler is not None else None

    def initial(self, name: str) -> Tensor | None:
        """The saved value of parameter or buffer ``name`` (on host unless ``on_device``)."""
        t = self.names.get(name)
        return None if t is None else self._tensors[id(t)][1].copy

    # ------------------------------------------------------------------ state outside parameters
    def _save_extra_state(self, module: nn.Module) -> list[tuple[nn.Module, set[str], dict[str, Any]]]:
        base = _base_keys()
        out = []
        for mod in module.modules():
            keys = {k for k in vars(mod) if k not in base}
            saved = {}
            for key in keys:
                value = _copy_tree(vars(mod)[key], self.on_device)
                if value is not _UNSUPPORTED:
                    saved[key] = (vars(mod)[key], value)
                    self.nbytes += _tree_bytes(value)
            out.append((mod, keys, saved))
        return out

    @staticmethod
    def _restore_extra_state(extra: list[tuple[nn.Module, set[str], dict[str, Any]]]) -> None:
        base = _base_keys()
        for mod, keys, saved in extra:
            for key in [k for k in vars(mod) if k not in base and k not in keys]:
                del mod.__dict__[key]  # created during the pre-flight (a lazily made hidden state)
            for key, (original, value) in saved.items():
                if isinstance(original, Tensor) and isinstance(value, _Saved) and original.shape == value.copy.shape:
                    with torch.no_grad():
                        original.copy_(value.copy)
                    mod.__dict__[key] = original
                else:
                    mod.__dict__[key] = _restore_tree(value)

    # ------------------------------------------------------------------ optimizers
    def _save_optimizer(self, opt: Any) -> tuple[Any, list[dict[str, Any]], dict[Any, Any], dict[str, Any]]:
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        state = {}
        for p, s in opt.state.items():
            state[p] = {
                k: (_copy_tensor(v, self.on_device) if isinstance(v, Tensor) else copy.deepcopy(v))
                for k, v in s.items()
            }
            self.nbytes += sum(
                v.copy.element_size() * v.copy.numel() for v in state[p].values() if isinstance(v, _Saved)
            )
        # set by an LR scheduler once the optimizer has stepped; decides one of torch's warnings
        extras = {k: vars(opt)[k] for k in _OPTIMIZER_FLAGS if k in vars(opt)}
        return opt, groups, state, extras

    @staticmethod
    def _restore_optimizer(
        opt: Any, groups: list[dict[str, Any]], state: dict[Any, Any], extras: dict[str, Any]
    ) -> None:
        for group, saved in zip(opt.param_groups, groups):
            params = group["params"]
            group.clear()
            group.update(copy.deepcopy(saved))
            group["params"] = params
        opt.state.clear()
        for p, s in state.items():
            opt.state[p] = {
                k: (v.copy.to(v.device, copy=True) if isinstance(v, _Saved) else copy.deepcopy(v)) for k, v in s.items()
            }
        for k in _OPTIMIZER_FLAGS:
            if k not in extras:
                opt.__dict__.pop(k, None)
        for k, v in extras.items():
            setattr(opt, k, v)

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self._tensors.values():
                if t.shape == saved.copy.shape:
                    t.copy_(saved.copy)
                else:
                    t.data = saved.copy.to(saved.device, copy=True)
        for store, name, t in self._slots:
            store[name] = t  # a module that re-assigned a buffer gets the original object back
        for p, grad in self._grads:
            p.grad = None if grad is None else grad.copy.to(grad.device, copy=True)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        for m, children in self._children:
            m._modules.clear()
            m._modules.update(children)
        self._restore_extra_state(self._extra)
        for opt, groups, state, extras in self._optimizers:
            self._restore_optimizer(opt, groups, state, extras)
        for scheduler, state in self._schedulers:
            scheduler.load_state_dict(copy.deepcopy(state))
        if self._scaler is not None:
            scaler, state = self._scaler
            scaler.load_state_dict(copy.deepcopy(state))


# --------------------------------------------------------------------------- the sandbox
_DROPOUT_ATTRS: tuple[tuple[type, str], ...] = (
    (nn.modules.dropout._DropoutNd, "p"),
    (nn.RNNBase, "dropout"),
    (nn.MultiheadAttention, "dropout"),
)


@contextlib.contextmanager
def dropout_disabled(module: nn.Module) -> Iterator[None]:
    """Set every dropout rate to zero (and back), leaving module modes alone.

    Modes stay as the user set them: batch norm keeps using batch statistics as it will in
    training, and cuDNN recurrent layers, which refuse backward in eval mode, still train.
    Dropout written as ``F.dropout(x, p, self.training)`` inside a forward is not reached.
    """
    saved = []
    for m in module.modules():
        for kind, attr in _DROPOUT_ATTRS:
            if isinstance(m, kind) and isinstance(getattr(m, attr, None), (int, float)):
                saved.append((m, attr, getattr(m, attr)))
                setattr(m, attr, 0.0)
    try:
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


@contextlib.contextmanager
def _instance_patch(obj: Any, name: str, value: Any) -> Iterator[None]:
    missing = object()
    previous = obj.__dict__.get(name, missing)
    obj.__dict__[name] = value
    try:
        yield
    finally:
        if previous is missing:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = previous


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


@dataclasses.dataclass
class SandboxState:
    snapshot: Snapshot
    logged: dict[str, float] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def sandbox(trainer: Any, module: nn.Module, *, on_device: bool = False) -> Iterator[SandboxState]:
    """Everything inside runs on the real model and is undone on exit (see the module docstring)."""
    with preserved_rng(), modes_preserved(module):
        state = SandboxState(Snapshot(trainer, module, on_device=on_device))
        callbacks = trainer.callbacks
        try:
            trainer.callbacks = []
            _seed_all(SANDBOX_SEED)
            with _logging_captured(module, state.logged), dropout_disabled(module), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield state
        finally:
            trainer.callbacks = callbacks
            state.snapshot.restore()


@contextlib.contextmanager
def _logging_captured(module: nn.Module, logged: dict[str, float]) -> Iterator[None]:
    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        logged[name] = value.detach() if isinstance(value, Tensor) else value

    def log_dict(dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            log(name, value)

    with _instance_patch(module, "log", log), _instance_patch(module, "log_dict", log_dict):
        yield


# --------------------------------------------------------------------------- output capture
def primary_tensor(output: Any, batch_size: int | None, flattened: bool = False) -> Tensor | None:
    """The tensor a loss most likely reads from a model output: ``logits`` of a dict-like output,
    else the first floating tensor whose leading dimension is the batch size (with ``flattened``,
    failing that, a multiple of it: logits flattened to ``(batch * time, vocab)``)."""
    candidates: list[Tensor] = []
    if isinstance(output, Tensor):
        candidates = [output]
    elif isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            candidates.append(output["logits"])
        candidates += [v for k, v in output.items() if k not in ("loss", "logits") and isinstance(v, Tensor)]
    elif isinstance(output, (list, tuple)):
        candidates = [v for v in output if isinstance(v, Tensor)]
    for t in candidates:
        if torch.is_floating_point(t) and t.dim() >= 1 and (batch_size is None or t.shape[0] == batch_size):
            return t
    if flattened and batch_size:
        for t in candidates:
            if torch.is_floating_point(t) and t.dim() == 2 and t.shape[0] % batch_size == 0 and t.shape[0] > batch_size:
                return t
    return None


def _is_bookkeeping(module: nn.Module) -> bool:
    """Loss modules and metrics: called in a training step, not the model."""
    if isinstance(module, nn.modules.loss._Loss):
        return True
    return any(c.__name__ == "Metric" and c.__module__.startswith("torchmetrics") for c in type(module).__mro__)


#: Autograd nodes that only move or cast values; :func:`producer_of` looks through them.
_PASS_THROUGH = frozenset(
    "View UnsafeView ReshapeAlias Squeeze Unsqueeze Clone Select Slice ToCopy Expand Permute Transpose "
    "Alias T AsStrided".split()
)


def producer_of(t: Tensor) -> str | None:
    """The op that computed ``t`` (``"sigmoid"``, ``"softmax"``, ``"addmm"``...), looking through
    reshapes and casts; ``None`` when autograd recorded nothing (no-grad, a leaf)."""
    fn = t.grad_fn
    for _ in range(16):
        if fn is None:
            return None
        name = type(fn).__name__
        op = name.split("Backward")[0]
        nexts = [f for f, _ in fn.next_functions if f is not None]
        if op not in _PASS_THROUGH or len(nexts) != 1:
            return op.lower()
        fn = nexts[0]
    return None


@dataclasses.dataclass
class StepRecord:
    """What one run of ``training_step`` showed."""

    loss: float | None = None
    loss_tensor: Tensor | None = None
    output: Tensor | None = None  # the model's primary output (detached)
    source: str | None = None  # "forward" (the LightningModule's) or the child module's name
    producer: str | None = None  # the op that made ``output`` (``"sigmoid"``, ``"addmm"``); None if unknown
    modes: dict[str, bool] = dataclasses.field(default_factory=dict)  # dropout/norm layers' training flag when called
    error: UserStepError | None = None
    aborted: Any = None  # what a hook stopped the step with (see ``StepRunner.evaluate(within=...)``)


class _Capture:
    """Forward hooks recording the LightningModule's output (else its children's) during a step."""

    def __init__(self, module: nn.Module, batch_size: int | None, on_output: Callable[[Tensor], None] | None) -> None:
        self.batch_size = batch_size
        self.on_output = on_output
        self.outputs: list[tuple[str, Tensor]] = []
        self.producers: dict[int, str | None] = {}
        self.modes: dict[str, bool] = {}
        self._handles = [module.register_forward_hook(self._hook("forward"))]
        for name, child in module.named_children():
            if not _is_bookkeeping(child):
                self._handles.append(child.register_forward_hook(self._hook(name)))
        for name, m in module.named_modules():
            if isinstance(m, MODE_DEPENDENT):
                self._handles.append(m.register_forward_pre_hook(self._mode_hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            t = primary_tensor(output, self.batch_size, flattened=True)
            if t is not None:
                self.producers[len(self.outputs)] = producer_of(t)
                self.outputs.append((name, t.detach()))
                if name == "forward" and self.on_output is not None:
                    self.on_output(t.detach())

        return hook

    def _mode_hook(self, name: str) -> Callable[..., None]:
        def hook(m: nn.Module, _args: Any) -> None:
            self.modes.setdefault(name, m.training)

        return hook

    def primary(self) -> tuple[str | None, Tensor | None, str | None]:
        """``(source, output, producer)`` of the LightningModule's output, else the last child's."""
        for i, (name, t) in enumerate(self.outputs):
            if name == "forward":
                return name, t, self.producers.get(i)
        if not self.outputs:
            return None, None, None
        return self.outputs[-1][0], self.outputs[-1][1], self.producers.get(len(self.outputs) - 1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# --------------------------------------------------------------------------- running steps
def loss_of(step_output: Any) -> Tensor | None:
    """The loss in what ``training_step`` returned: a tensor, a dict's ``"loss"``, or nothing."""
    if isinstance(step_output, Tensor):
        return step_output
    if isinstance(step_output, Mapping) and isinstance(step_output.get("loss"), Tensor):
        return step_output["loss"]
    return None


def _frozen(optimizer: Any) -> Any:
    """A ``LightningOptimizer`` over the same optimizer whose ``step``/``zero_grad`` do nothing
    (``step`` still runs a closure, so its loss is seen): for steps that are only evaluated."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    raw = getattr(optimizer, "optimizer", optimizer)
    frozen = LightningOptimizer(raw)
    frozen.__dict__["step"] = lambda closure=None, **kwargs: closure() if closure is not None else None
    frozen.__dict__["zero_grad"] = lambda set_to_none=True: None
    frozen.__dict__["toggle_model"] = lambda sync_grad=True: contextlib.nullcontext()
    return frozen


class StepRunner:
    """Runs the user's ``training_step`` on a batch inside a :func:`sandbox`.

    Args:
        trainer: the Trainer (its strategy, precision plugin and optimizers are used).
        module: the LightningModule.
        batch_size: the batch's leading dimension, to recognise the model's output.
    """

    def __init__(self, trainer: Any, module: Any, batch_size: int | None) -> None:
        from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

        self.trainer = trainer
        self.module = module
        self.batch_size = batch_size
        self.takes_batch_idx = is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)
        self.automatic = bool(module.automatic_optimization)
        self.on_output: Callable[[Tensor], None] | None = None

    # ------------------------------------------------------------------ the one call into user code
    def call_training_step(self, batch: Any) -> Any:
        args = (batch, 0) if self.takes_batch_idx else (batch,)
        try:
            with self.trainer.precision_plugin.train_step_context():
                return self.module.training_step(*args)
        except Abort:
            raise
        except Exception as err:  # noqa: BLE001 - the user's code failed: say so, don't crash
            raise UserStepError("training_step", err) from err

    def _recorded(self, batch: Any, manual_losses: list[Tensor] | None = None) -> tuple[Any, StepRecord]:
        capture = _Capture(self.module, self.batch_size, self.on_output)
        record = StepRecord()
        try:
            out = self.call_training_step(batch)
        finally:
            capture.close()
        loss = loss_of(out)
        if loss is None and manual_losses and len(manual_losses) == 1:
            loss = manual_losses[0]  # several backward calls (a GAN's two players) make no single loss
        record.loss_tensor = loss
        record.source, record.output, record.producer = capture.primary()
        record.modes = capture.modes
        return out, record

    @staticmethod
    def _finish(record: StepRecord) -> StepRecord:
        if record.loss_tensor is not None:
            record.loss_tensor = record.loss_tensor.detach()
            record.loss = float(record.loss_tensor.float().sum())  # one host sync per pre-flight step
        return record

    # ------------------------------------------------------------------ evaluation only
    def evaluate(self, batch: Any, within: contextlib.AbstractContextManager[Any] | None = None) -> StepRecord:
        """Run ``training_step`` without updating anything (manual optimisation's optimizers are
        frozen and its ``manual_backward`` only records the loss).

        ``within`` is entered around the call (hooks a check installs); a hook may stop the step
        early by raising :class:`Abort` with a payload, returned as the record's ``aborted``.
        """
        manual_losses: list[Tensor] = []
        strategy = self.trainer.strategy
        frozen = [_frozen(o) for o in strategy._lightning_optimizers]
        with (
            _instance_patch(self.module, "manual_backward", lambda loss, *a, **k: manual_losses.append(loss)),
            _swapped(strategy, "_lightning_optimizers", frozen),
            within or contextlib.nullcontext(),
        ):
            try:
                _, record = self._recorded(batch, manual_losses)
            except UserStepError as err:
                return StepRecord(error=err)
            except Abort as abort:
                return StepRecord(aborted=abort.args[0] if abort.args else True)
        return self._finish(record)

    # ------------------------------------------------------------------ one optimisation step
    def step(self, batch: Any) -> StepRecord:
        """One optimisation step on ``batch`` the way the Trainer would take it; returns what the
        step saw before its update."""
        try:
            if self.automatic:
                return self._automatic_step(batch)
            return self._manual_step(batch)
        except UserStepError as err:
            return StepRecord(error=err)

    def _manual_step(self, batch: Any) -> StepRecord:
        manual_losses: list[Tensor] = []
        original = self.module.manual_backward

        def manual_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            manual_losses.append(loss.detach())
            original(loss, *args, **kwargs)

        with _instance_patch(self.module, "manual_backward", manual_backward):
            _, record = self._recorded(batch, manual_losses)
        return self._finish(record)

    def _automatic_step(self, batch: Any) -> StepRecord:
        optimizer = self.trainer.optimizers[0]
        strategy = self.trainer.strategy
        records: list[StepRecord] = []

        def closure() -> Tensor | None:
            optimizer.zero_grad(set_to_none=True)
            _, record = self._recorded(batch)
            records.append(record)
            loss = record.loss_tensor
            if loss is None:
                return None
            if not loss.requires_grad:
                raise UserStepError("training_step", DetachedLossError())
            try:
                strategy.backward(loss, optimizer)
            except Exception as err:  # noqa: BLE001
                raise UserStepError("backward", err) from err
            return loss.detach()

        try:
            strategy.optimizer_step(optimizer, closure)
        except (UserStepError, Abort):
            raise
        except Exception as err:  # noqa: BLE001
            raise UserStepError("optimizer step", err) from err
        finally:
            optimizer.zero_grad(set_to_none=True)
        return self._finish(records[0]) if records else StepRecord()


class DetachedLossError(RuntimeError):
    def __init__(self) -> None:
        super().__init__("the loss returned by training_step does not require grad")


@contextlib.contextmanager
def _swapped(obj: Any, attr: str, value: Any) -> Iterator[None]:
    previous = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, previous)


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


__all__ = [
    "SANDBOX_SEED",
    "Abort",
    "DetachedLossError",
    "Snapshot",
    "StepRecord",
    "StepRunner",
    "UserStepError",
    "dropout_disabled",
    "finite",
    "loss_of",
    "primary_tensor",
    "sandbox",
]
