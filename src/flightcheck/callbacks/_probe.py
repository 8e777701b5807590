"""The fixed probe batch shared by the monitors that predict it (``PredictionStability``,
``ActivationMonitor``): where it comes from, when it is due, and how the model is run on it
without leaving a trace on training.

Where the probe comes from, first that applies:

1. the batch the user gave (moved to the model's device, in the trainer's precision);
2. the first batch of the first validation loader, as Lightning's sanity check fetched it
   (copied; the loader itself is never iterated by flightcheck, so the validation order,
   workers and samplers of the run are untouched);
3. the first training batch, copied in ``on_train_batch_start`` before ``training_step``
   sees it (when there is no validation, or the sanity check is off).

The probe is not saved in checkpoints, only a fingerprint of it: a resumed run takes its
probe again the same way, and when it is the same batch (the same first validation batch, or
the batch given) the comparisons go on from the checkpoint's answers as if the run had not
been interrupted; otherwise they start afresh.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torchmetrics import Metric

from flightcheck.callbacks.base import look_interval
from flightcheck.utils import modes_preserved, preserved_rng, tensors_in

#: Keys tried, in order, for the model input of a dict batch ...
INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "input_ids", "image", "images", "features", "data")
#: ... for its target ...
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels", "mask", "masks")
#: ... and for the prediction in a dict output (else its first tensor).
OUTPUT_KEYS: tuple[str, ...] = ("logits", "preds", "y_hat")

PredictionFn = Callable[[Any, Any], Tensor]
TargetFn = Callable[[Any], "Tensor | None"]


# --------------------------------------------------------------------------- batch reading
def default_inputs(batch: Any) -> Any:
    """The model input of a batch: the batch itself if it is a tensor, its first element if it
    is a tuple or list, the first of :data:`INPUT_KEYS` (else the first tensor) of a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
    for _, tensor in tensors_in(batch):
        return tensor
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}; give a prediction_fn")


def default_target(batch: Any) -> Tensor | None:
    """The labels of a batch: its second element (tuple/list) or the first of :data:`TARGET_KEYS`
    (dict); ``None`` when there is none."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    return None


def prediction_in(output: Any) -> Tensor:
    """The prediction in a model's output: the tensor itself, the first of :data:`OUTPUT_KEYS`
    of a dict, else the first tensor found (first element of a tuple)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in OUTPUT_KEYS:
            if isinstance(output.get(key), Tensor):
                return output[key]
    for _, tensor in tensors_in(output):
        return tensor
    raise TypeError(f"the model returned {type(output).__name__} with no tensor in it; give a prediction_fn")


class DefaultPrediction:
    """The default ``prediction_fn``: :func:`prediction_in` of ``pl_module(x)`` with ``x`` the
    batch's input (:func:`default_inputs`), else of ``pl_module(batch)`` for a ``forward``
    that takes the whole batch, else of ``pl_module(*batch)`` for a ``forward`` that takes the
    tuple's elements as arguments (``forward(src, tgt)``). A LightningModule with no
    ``forward`` of its own that keeps its network in an attribute (``self.model``,
    ``self.net``, ``self.network``, ``self.module``, or its only sub-module with parameters)
    is called through that network the same ways. The first call that works is kept."""

    FORMS = ("inputs", "batch", "unpacked")
    #: attributes that conventionally hold the whole network of a LightningModule
    NETWORK_ATTRIBUTES = ("model", "net", "network", "module")

    def __init__(self) -> None:
        self.form: str | None = None
        #: the attribute of the LightningModule that is called ("" for the module itself)
        self.via: str | None = None

    @staticmethod
    def _call(module: Any, batch: Any, form: str) -> Tensor:
        if form == "inputs":
            return prediction_in(module(default_inputs(batch)))
        if form == "batch":
            return prediction_in(module(batch))
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("the batch is not a tuple of arguments")
        return prediction_in(module(*batch))

    @classmethod
    def _networks(cls, pl_module: Any) -> list[str]:
        """The module itself, then, when it has no ``forward`` of its own (the network does
        the work), the attributes that may hold its network."""
        names = [""]
        forward = getattr(type(pl_module), "forward", None)
        if getattr(forward, "__module__", "").split(".")[0] not in ("lightning", "pytorch_lightning", "torch"):
            return names  # the user's own forward: calling a part of the model would bypass it
        names += [n for n in cls.NETWORK_ATTRIBUTES if isinstance(getattr(pl_module, n, None), nn.Module)]
        if isinstance(pl_module, nn.Module):
            learning = [n for n, m in pl_module.named_children() if any(True for _ in m.parameters())]
            if len(learning) == 1 and learning[0] not in names:
                names.append(learning[0])
        return names

    def __call__(self, pl_module: Any, batch: Any) -> Tensor:
        if self.form is not None and self.via is not None:
            return self._call(getattr(pl_module, self.via) if self.via else pl_module, batch, self.form)
        first: BaseException | None = None
        for via in self._networks(pl_module):
            module = getattr(pl_module, via) if via else pl_module
            for form in self.FORMS:
                try:
                    output = self._call(module, batch, form)
                except Exception as err:  # noqa: BLE001 - a forward with another signature: try the next form
                    first = first or err
                    continue
                self.form, self.via = form, via
                return output
        assert first is not None
        raise first


def model_unreachable(callback: Any, trainer: Any, err: BaseException) -> None:
    """Say once, as information, that the default prediction cannot call this model, so the
    callback is off for the run: a model flightcheck cannot call is no alarm about training."""
    name = type(callback).__name__
    callback.report(
        trainer,
        "internal_error",
        "info",
        f"{name} cannot get a prediction from this model by itself ({type(err).__name__}: {err}); "
        f"it is off for this run.",
        causes=("a forward that takes other arguments than the batch's input or the batch, or returns no prediction tensor",),
        advice=(f"give {name}(prediction_fn=lambda module, batch: ...) returning the prediction tensor",),
        target=f"{name}.prediction_fn",
        data={"error": repr(err)},
    )


def copy_batch(batch: Any) -> Any:
    """A detached copy of every tensor in ``batch`` (the user's step may change it in place)."""
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


# --------------------------------------------------------------------------- source
#: A probe batch up to this size travels in checkpoints, so a resumed run predicts the same one.
PORTABLE_PROBE_BYTES = 4 << 20


class ProbeSource:
    """Holds the probe batch: the user's, else the first validation batch, else the first training batch."""

    def __init__(self, batch: Any = None) -> None:
        if batch is not None and not any(True for _ in tensors_in(batch)):
            raise TypeError(f"probe_batch must contain at least one tensor, got {type(batch).__name__}")
        self._given = batch
        self._restored: Any = None  # the probe of the run a checkpoint came from (this fit only)
        self._batch: Any = None
        self.origin: str | None = None

    def offer_validation(self, trainer: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Take the first batch of the first validation loader of a fit's sanity check."""
        if self._batch is not None or self._given is not None or self._restored is not None or not _fitting(trainer):
            return
        if getattr(trainer, "sanity_checking", False) and batch_idx == 0 and dataloader_idx == 0 and batch is not None:
            self._batch, self.origin = copy_batch(batch), "validation"

    def offer_training(self, trainer: Any, batch: Any) -> None:
        """Take the first training batch when nothing better came."""
        if self._batch is None and self._given is None and self._restored is None and batch is not None:
            self._batch, self.origin = copy_batch(batch), "training"

    def get(self, trainer: Any, pl_module: Any) -> Any:
        if self._batch is None and (self._given is not None or self._restored is not None):
            given = self._given if self._given is not None else self._restored
            batch = trainer.precision_plugin.convert_input(given)
            origin = "given" if self._given is not None else "checkpoint"
            self._batch, self.origin = move_data_to_device(batch, pl_module.device), origin
        return self._batch

    def get_known(self) -> Any:
        """The probe as last probed, or ``None`` (nothing moved or copied)."""
        return self._batch

    def restore(self, batch: Any) -> None:
        """Probe the batch a checkpoint carried (unless the user gave one), as the interrupted run did."""
        self._restored = batch

    def portable(self, limit_bytes: int | None = None) -> Any:
        """A CPU copy of the probe to keep in a checkpoint, or ``None``: only batches of plain
        tensors, tuples, lists and dicts (what ``torch.load(weights_only=True)`` reads back)
        of at most ``limit_bytes``, and never the batch the user gave (they give it again)."""
        if self._batch is None or self._given is not None or not _plain(self._batch):
            return None
        limit = PORTABLE_PROBE_BYTES if limit_bytes is None else limit_bytes
        if sum(t.numel() * t.element_size() for _, t in tensors_in(self._batch)) > limit:
            return None
        return move_data_to_device(copy_batch(self._batch), "cpu")

    def reset(self) -> None:
        """Forget a captured or restored batch (a new fit takes a new one); a given batch stays."""
        self._batch, self.origin, self._restored = None, None, None


def _plain(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return value is None or type(value) in (int, float, bool, str)


def fingerprint(batch: Any) -> dict[str, Any]:
    """What tells one probe batch from another across a checkpoint: its tensors' shapes and
    their sums and sums of squares (one host transfer)."""
    tensors = [t.detach() for _, t in tensors_in(batch)]
    sums = [torch.stack([t.float().sum(), t.float().square().sum()]).cpu() for t in tensors]
    return {
        "shapes": [list(t.shape) for t in tensors],
        "sums": torch.cat(sums).tolist() if sums else [],
    }


def same_fingerprint(a: Any, b: Any) -> bool:
    if not isinstance(a, Mapping) or not isinstance(b, Mapping) or a.get("shapes") != b.get("shapes"):
        return False
    x, y = a.get("sums") or [], b.get("sums") or []
    return len(x) == len(y) and all(abs(u - v) <= 1e-5 * max(abs(u), abs(v)) + 1e-6 for u, v in zip(x, y))


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn)) == "fit"


# --------------------------------------------------------------------------- schedule
class ProbeSchedule:
    """Every ``every_n_steps`` optimizer steps (default: flightcheck's look interval,
    :func:`~flightcheck.callbacks.base.look_interval`, so the one host transfer of a probe
    falls on a step where the other monitors look, and on a long run where Lightning logs)."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(
                f"every_n_steps must be None (flightcheck's look interval) or an int >= 1, got {every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps
        self.last_step: int | None = None
        self._boundary = -1

    def interval(self, trainer: Any) -> int:
        return self.every_n_steps or look_interval(trainer)

    def due(self, trainer: Any) -> bool:
        """Whether the step just taken crossed a multiple of the interval (steps can advance by
        several at once under manual optimisation with many optimizers). A multiple that falls
        within half an interval of the last probe is skipped, not postponed, so probes stay on
        the looks."""
        if self.last_step is None:
            self.mark(trainer)  # counting starts now
            return False
        boundary = int(trainer.global_step) // self.interval(trainer)
        if boundary <= self._boundary:
            return False
        self._boundary = boundary
        return self.spaced(trainer)

    def peek(self, trainer: Any) -> bool:
        """What :meth:`due` would answer now, without moving the schedule."""
        if self.last_step is None:
            return False
        return int(trainer.global_step) // self.interval(trainer) > self._boundary and self.spaced(trainer)

    def mark(self, trainer: Any) -> None:
        """Record a probe at the current step."""
        self.last_step = int(trainer.global_step)
        self._boundary = max(self._boundary, self.last_step // self.interval(trainer))

    def reset(self) -> None:
        self.last_step, self._boundary = None, -1

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "boundary": self._boundary}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a checkpointed run's schedule (``last_step`` ``None``: start afresh)."""
        last = state.get("last_step")
        self.last_step = None if last is None else int(last)
        self._boundary = int(state.get("boundary", -1))

    def spaced(self, trainer: Any) -> bool:
        """At least half an interval since the last probe: an extra probe (after validation)
        right next to a scheduled one would measure one step's change, not an interval's."""
        if self.last_step is None:
            return True
        return int(trainer.global_step) - self.last_step >= max(1, (self.interval(trainer) + 1) // 2)


def fitting(trainer: Any) -> bool:
    """A ``fit`` outside its sanity check (probes judge training, not ``validate``/``test``)."""
    return _fitting(trainer) and not getattr(trainer, "sanity_checking", False)


# --------------------------------------------------------------------------- leaving no trace
@contextlib.contextmanager
def public_attributes_preserved(module: nn.Module) -> Iterator[None]:
    """Put back each submodule's public plain attributes on exit.

    A forward pass may carry state in attributes (a recurrent state kept between steps for
    truncated backprop, a cache, a counter); the probe's forward must not hand its own to the
    next training step. Private attributes (``_name``) belong to frameworks (FSDP, compile,
    Lightning) and are left to them.
    """
    saved = [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            d = vars(m)
            for key in [k for k in d if not k.startswith("_") and k not in attrs]:
                del d[key]
            for key, value in attrs.items():
                if d.get(key, _MISSING) is not value:
                    d[key] = value


_MISSING = object()


@contextlib.contextmanager
def probing(pl_module: nn.Module) -> Iterator[None]:
    """Run the model on the probe as evaluation does, and leave training exactly as it was:
    eval mode, no gradients, RNG states, module modes and public attributes restored.

    Validation hooks run under ``torch.inference_mode``; it is lifted here so that nothing the
    probe keeps becomes an inference tensor that training could not touch later.
    """
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        preserved_rng(),
        modes_preserved(pl_module),
        public_attributes_preserved(pl_module),
    ):
        pl_module.eval()
        yield


def predict_probe(trainer: Any, pl_module: Any, batch: Any, prediction_fn: PredictionFn) -> Tensor:
    """The prediction on ``batch``, in the trainer's precision (autocast for mixed precision).
    Call inside :func:`probing` (no gradients: the tensor is the model's own output object)."""
    with trainer.precision_plugin.forward_context():
        output = prediction_fn(pl_module, batch)
    if not isinstance(output, Tensor):
        raise TypeError(f"prediction_fn must return a tensor, got {type(output).__name__}")
    return output


def shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two live tensors are views of one storage (``b`` is ``a`` reshaped, squeezed...)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_SQUASHES = {
    **dict.fromkeys((torch.sigmoid, Tensor.sigmoid, F.sigmoid, torch.special.expit), "sigmoid"),
    **dict.fromkeys((torch.softmax, Tensor.softmax, F.softmax), "softmax"),
}


class OutputOrigin(TorchFunctionMode):
    """Watches a forward pass for sigmoids and softmaxes, to tell afterwards whether the
    prediction is one's output: probabilities, not logits (weak references only, so nothing
    is kept alive)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: list[tuple[str, Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = _SQUASHES.get(func)
        if kind is not None and isinstance(out, Tensor):
            self._made.append((kind, weakref.ref(out)))
        return out

    def of(self, output: Tensor) -> str:
        """``"sigmoid"``, ``"softmax"`` or ``"other"``."""
        for kind, ref in reversed(self._made):
            t = ref()
            if t is not None and shares_memory(t, output):  # alive, so its memory was not reused
                return kind
        return "other"


# --------------------------------------------------------------------------- cross-rank sums
class SummedCounts(Metric):
    """A vector of counts summed over ranks on ``compute``.

    torchmetrics' ``SumMetric`` reduces its input to a scalar and ``CatMetric`` grows with
    every update; a histogram needs a fixed-size vector summed element-wise, which this is.
    """

    full_state_update = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(size), dist_reduce_fx="sum")

    def update(self, counts: Tensor) -> None:
        self.counts += counts.reshape(-1).to(self.counts.dtype)

    def compute(self) -> Tensor:
        return self.counts


__all__ = [
    "INPUT_KEYS",
    "OUTPUT_KEYS",
    "TARGET_KEYS",
    "OutputOrigin",
    "ProbeSchedule",
    "ProbeSource",
    "SummedCounts",
    "copy_batch",
    "default_inputs",
    "DefaultPrediction",
    "model_unreachable",
    "default_target",
    "fingerprint",
    "fitting",
    "predict_probe",
    "prediction_in",
    "probing",
    "public_attributes_preserved",
    "same_fingerprint",
    "shares_memory",
]
