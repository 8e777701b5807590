"""Judging NaN/Inf in training: what went non-finite, where it was made, and why.

Pure functions only. The :class:`~flightcheck.callbacks.nonfinite_guard.NonFiniteGuard`
callback gathers the inputs (first non-finite steps kept on the device, per-module records
of a replayed batch) and reports the :class:`~flightcheck.checks.Verdict` built here.

The localisation rule: replay the offending batch with a record of every module call
(in completion order, so a child is seen before its parent). The first call whose output
is non-finite is where the value appeared:

- its inputs were finite: the module made it (``made inside by <module>``);
- its inputs were already non-finite and the batch holds non-finite values: it came in
  with the data;
- its inputs were non-finite but the batch is clean: the innermost enclosing module that
  was given finite inputs made it in its own code (the functional lines between its
  submodules), or training_step did before calling the model;
- no module output is non-finite but the loss is: the loss computation made it;
- the forward pass is finite but gradients are not: the backward pass made it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from flightcheck.checks import Verdict
from flightcheck.findings import Severity
from flightcheck.signals.norms import local_shard
from flightcheck.utils.modules import parent_name

CHECK = "nonfinite"

#: Lowest healthy fp16 loss scale. A dynamic scaler halves the scale on every overflow
#: step; a scale driven below 1 means the loss is scaled *down* yet gradients still
#: overflow, i.e. they are non-finite whatever the scale. DeepSpeed's ``min_loss_scale``
#: and Megatron-LM's ``--min-loss-scale`` both default to 1 for this reason. From the
#: default initial scale of 2**16 it takes 17 skipped steps in a row to get there.
DEFAULT_MIN_LOSS_SCALE = 1.0

#: ``exp(x)`` overflows above ``log(max)`` of the dtype: 88.7 in float32/bfloat16, 11.1 in
#: float16 (max 65504). An input above this to a module whose output went +inf points to
#: an exponential (exp, softmax without max subtraction, softplus, cosh).
EXP_OVERFLOW_INPUT = {torch.float16: math.log(65504.0), torch.bfloat16: 88.7, torch.float32: 88.7}

#: A rise of the global gradient norm by this factor between the start of the look-back
#: window (up to one logging interval) and the last step before the first non-finite one
#: marks a diverging run (learning rate too high, exploding gradients) rather than a sudden
#: NaN/Inf made from particular values. Past the first steps, healthy runs move their
#: gradient norm by well under 10x within a logging interval; GradientMonitor's spike and
#: explosion checks watch the smaller moves.
DIVERGENCE_GROWTH = 100.0

# What each origin is, in the user's words; used in messages and in ``data["origin"]``.
ORIGINS = (
    "data",  # the batch held NaN/Inf
    "module",  # a module made it from finite inputs
    "between_modules",  # a module's own code between its submodules made it
    "loss",  # the loss computation after the model made it
    "backward",  # the forward pass was finite, the backward pass was not
    "weights",  # the weights were already non-finite: no faithful replay possible
    "logged_only",  # only a logged metric, not the loss or gradients
    "other_rank",  # another DDP rank saw it
    "not_reproduced",  # the replay came out finite
    "not_replayed",  # the batch was no longer held (or the replay failed)
)


@dataclasses.dataclass(frozen=True)
class NonFiniteEvent:
    """One quantity seen non-finite: the loss, a logged metric, a gradient, a weight.

    Args:
        kind: ``"loss"``, ``"metric"``, ``"gradient"``, ``"weight"``, or ``"data"`` (a batch
            tensor; evidence for the origin, never reported on its own).
        name: ``"loss"``, the metric's logged name, or the parameter's qualified name.
        step: the global step of the batch where it was first seen.
        batch_idx: that batch's index in its epoch (``-1`` when unknown).
        value: the offending value (``nan``, ``inf``, ``-inf``; for gradients and weights
            the tensor's norm).
    """

    kind: str
    name: str
    step: int
    batch_idx: int = -1
    value: float = float("nan")


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """What one module call saw on a replay: were its inputs and outputs finite."""

    name: str
    type: str
    inputs_finite: bool
    outputs_finite: bool
    input_min: float = 0.0
    input_max: float = 0.0
    input_has_zero: bool = False
    input_nan: bool = False
    input_inf: bool = False
    output_nan: bool = False
    output_posinf: bool = False
    output_neginf: bool = False
    output_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a non-finite value was made (one of :data:`ORIGINS`) and by what."""

    kind: str
    module: str | None = None
    module_type: str | None = None
    call: ModuleCall | None = None
    data_paths: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    op: str | None = None
    fp16: bool = False

    def where(self) -> str:
        """``net.2 (LogLayer)``, or the model itself when the module name is empty."""
        name = self.module or "the model"
        return f"`{name}` ({self.module_type})" if self.module_type else f"`{name}`"


# --------------------------------------------------------------------------- device side
def first_nonfinite_rows(values: Tensor) -> Tensor:
    """Per column of ``values`` (rows = successive steps): ``[has, first_row, value]``.

    ``has`` is 1 where some row is NaN/Inf, ``first_row`` the first such row and ``value``
    its value; one ``(3, columns)`` float tensor, on the device, without a host sync.
    """
    bad = ~torch.isfinite(values)
    first = bad.to(torch.int32).argmax(dim=0)  # argmax returns the first maximal index
    value = values.gather(0, first.unsqueeze(0)).squeeze(0)
    return torch.stack([bad.any(dim=0).to(values.dtype), first.to(values.dtype), value])


def count_nonfinite(t: Tensor) -> int:
    """How many elements of ``t`` are NaN or infinite (0 for integer tensors). Syncs: use on bad paths.

    A sharded tensor (``DTensor``) is counted on this rank's shard: counting the whole would
    be a collective, which one rank alone must not start."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    return int((~torch.isfinite(local_shard(t))).sum())


# --------------------------------------------------------------------------- localisation
def first_nonfinite_call(calls: Sequence[ModuleCall]) -> int | None:
    """Index of the first module call (in completion order) whose output is non-finite."""
    for i, call in enumerate(calls):
        if not call.outputs_finite:
            return i
    return None


def locate_origin(
    calls: Sequence[ModuleCall],
    data_paths: Sequence[str] = (),
    *,
    loss_finite: bool = True,
    module_types: dict[str, str] | None = None,
    grad_bad_parameters: Sequence[str] = (),
    forward_order: Sequence[str] = (),
    backward_op: str | None = None,
    fp16: bool = False,
) -> Origin:
    """Where the non-finite value of a replayed batch was made.

    Args:
        calls: every module call of the replay, in completion order.
        data_paths: the batch's tensors holding non-finite values (``batch[0]``, ...).
        loss_finite: whether the replayed loss was finite.
        module_types: qualified module name -> type name (to name an enclosing module).
        grad_bad_parameters: parameters whose gradients were non-finite (for a backward origin).
        forward_order: module names in the order the replay called them (first call).
        backward_op: the autograd function whose backward turned finite gradients non-finite.
        fp16: whether the step ran under float16 autocast.
    """
    module_types = module_types or {}
    if data_paths:
        return Origin("data", data_paths=tuple(data_paths), fp16=fp16)
    i = first_nonfinite_call(calls)
    if i is not None:
        call = calls[i]
        if call.inputs_finite:
            return Origin("module", module=call.name, module_type=call.type, call=call, fp16=fp16)
        owner = _enclosing_maker(calls, i)
        return Origin(
            "between_modules",
            module=owner,
            module_type=module_types.get(owner) if owner is not None else None,
            call=call,
            fp16=fp16,
            parameters=(call.name,),
        )
    if not loss_finite:
        return Origin("loss", fp16=fp16)
    if grad_bad_parameters:
        owner = _module_nearest_loss(grad_bad_parameters, forward_order)
        return Origin(
            "backward",
            module=owner,
            module_type=module_types.get(owner) if owner is not None else None,
            parameters=tuple(grad_bad_parameters),
            op=backward_op,
            fp16=fp16,
        )
    return Origin("not_reproduced", fp16=fp16)


def _enclosing_maker(calls: Sequence[ModuleCall], i: int) -> str | None:
    # calls[i] received a non-finite input from outside any submodule: the innermost
    # enclosing call that was itself given finite inputs made it in its own code. An
    # enclosing call completes after its children, so it is found later in the list.
    name = calls[i].name
    while name:
        name = parent_name(name)
        enclosing = next((c for c in calls[i + 1:] if c.name == name), None)
        if enclosing is not None and enclosing.inputs_finite:
            return name
    return None  # before the model was called: training_step's own code


def _module_nearest_loss(parameters: Sequence[str], forward_order: Sequence[str]) -> str | None:
    # Backward runs from the loss towards the inputs and spreads a NaN to everything it
    # passes, so of the modules whose gradients went bad the one called last in the
    # forward pass is nearest to where the backward made it.
    owners = {parent_name(p) for p in parameters}
    position = {name: i for i, name in enumerate(forward_order)}
    ranked = sorted(owners, key=lambda m: position.get(m, -1))
    return ranked[-1] if ranked else None


# --------------------------------------------------------------------------- causes and advice
_CAUSE_LOG_ZERO = "log of zero (e.g. log of a probability or a ReLU output that reached 0)"
_CAUSE_LOG_NEG = "log or sqrt of a negative number"
_CAUSE_EXP = "exp overflow: a large input to exp / softmax / softplus without subtracting the max"
_CAUSE_DIV = "division by zero or by a tiny number (a norm, std, count or variance that can be 0)"
_CAUSE_FP16 = "float16 overflow: a value above 65504 under 16-bit autocast"
_CAUSE_LR = "learning rate too high: weights and activations grew until they overflowed"
_CAUSE_DATA = "NaN/Inf in the data (missing values, a division by zero in preprocessing, a corrupt sample)"
_CAUSE_ZERO_BY_ZERO = "0/0 (e.g. standardising by a std or norm that is 0), inf - inf, or 0 * inf"
_CAUSE_OVERFLOW = "activations or weights grew past the float range (learning rate too high, exploding values)"

#: Layers that only multiply and add: from finite inputs they make inf only by overflowing.
AFFINE_LAYERS = frozenset({
    "Linear", "Bilinear", "LazyLinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "Embedding", "EmbeddingBag", "RNN", "LSTM", "GRU", "MultiheadAttention",
})


def gradient_trend(history: Sequence[tuple[int, float]], first_bad_step: int) -> tuple[int, float, int, float] | None:
    """``(start_step, start_norm, last_step, last_norm)``: the global gradient norm at the start of
    the look-back window and at the last step before ``first_bad_step`` (``None`` without two points)."""
    finite = sorted((s, n) for s, n in history if s < first_bad_step and math.isfinite(n))
    if len(finite) < 2:
        return None
    (s0, n0), (s1, n1) = finite[0], finite[-1]
    return s0, n0, s1, n1


def is_diverging(trend: tuple[int, float, int, float] | None) -> bool | None:
    """Whether the gradient norm rose :data:`DIVERGENCE_GROWTH`-fold before the first non-finite step."""
    if trend is None:
        return None
    _, start, _, last = trend
    return last >= DIVERGENCE_GROWTH * max(start, 1e-12)


_SUDDEN = [_CAUSE_LOG_ZERO, _CAUSE_EXP, _CAUSE_DIV, _CAUSE_DATA]


def likely_causes(origin: Origin, diverging: bool | None = None) -> list[str]:
    """The likely causes of a non-finite value made at ``origin``, most likely first.

    ``diverging``: whether the gradient norm was growing before (:func:`is_diverging`), used
    to order the causes when no replay could show where the value was made.
    """
    if origin.kind == "data":
        return [_CAUSE_DATA]
    if origin.kind in ("weights", "not_replayed"):
        if diverging:
            return [_CAUSE_LR, "exploding gradients (no clipping) in a deep or unnormalised network"]
        if diverging is False:
            return _SUDDEN[:3]
        return [*_SUDDEN[:3], _CAUSE_LR]
    if origin.kind == "backward":
        return [
            "a function whose derivative is infinite at the point reached: sqrt, pow with a "
            "fractional exponent, or the norm of an all-zero vector",
            _CAUSE_DIV,
            _CAUSE_LR,
        ]
    if origin.kind == "loss":
        return [_CAUSE_LOG_ZERO + " in the loss", _CAUSE_DIV, _CAUSE_EXP]
    if origin.kind == "logged_only":
        return ["the logged value is computed with a division by a count or sum that can be 0 (e.g. an empty class)"]
    call = origin.call
    causes: list[str] = []
    if origin.kind == "between_modules" and call is not None:
        # what the first module received says what the code before it did
        if call.input_nan:
            causes += [_CAUSE_ZERO_BY_ZERO, _CAUSE_LOG_NEG]
        if call.input_inf:
            causes += [_CAUSE_EXP, _CAUSE_DIV, _CAUSE_LOG_ZERO]
    elif call is not None and call.inputs_finite and call.type in AFFINE_LAYERS:
        causes += [_CAUSE_OVERFLOW] + ([_CAUSE_FP16] if origin.fp16 else [])
    elif call is not None and call.inputs_finite:
        limit = EXP_OVERFLOW_INPUT.get(_dtype(call.output_dtype), 88.7)
        if call.output_neginf and call.input_has_zero:
            causes.append(_CAUSE_LOG_ZERO)
        if call.output_nan and call.input_min < 0:
            causes.append(_CAUSE_LOG_NEG)
        if call.output_posinf and call.input_max > limit:
            causes.append(_CAUSE_EXP)
        if (call.output_posinf or call.output_neginf or call.output_nan) and call.input_has_zero:
            causes.append(_CAUSE_DIV)
        if origin.fp16 and (call.output_posinf or call.output_neginf):
            causes.append(_CAUSE_FP16)
    generic = (_CAUSE_LOG_ZERO, _CAUSE_EXP, _CAUSE_DIV) + ((_CAUSE_FP16,) if origin.fp16 else ()) + (_CAUSE_LR,)
    causes += [c for c in generic if c not in causes]
    return causes[:4]


_ADVICE_STABLE = (
    "use the stable forms: log_softmax / logsumexp / BCEWithLogits instead of log(softmax) / log(sigmoid); "
    "add an eps to divisions, logs and sqrt (`x.clamp_min(eps)`)"
)


def advice_for(origin: Origin, action: str = "warn", diverging: bool | None = None) -> list[str]:
    """What to try next for a non-finite value made at ``origin``."""
    if origin.kind == "data":
        return [
            "find the NaN/Inf samples of that batch (saved with the finding when it could be replayed) "
            "and fix or drop them in the dataset or transforms",
            "add an assertion such as `assert torch.isfinite(x).all()` to the data pipeline",
        ]
    if origin.kind in ("weights", "not_replayed"):
        advice = []
        if action == "warn":
            advice.append("run with `NonFiniteGuard(action='stop')`: it stops before the bad update, keeps the "
                          "last good weights and replays the offending batch to name the module that made it")
        if diverging is not False:
            advice.append("lower the learning rate or add warm-up, and clip gradients (`gradient_clip_val`)")
        if diverging is not True:
            advice.append(_ADVICE_STABLE)
        return advice
    if origin.kind == "logged_only":
        return [
            "check how the logged value is computed: a mean over an empty selection or a ratio with a zero count",
            "log it only when its denominator is positive, or log `torch.nan_to_num(value)`",
        ]
    advice = []
    if origin.kind == "between_modules" and origin.module is None:
        advice.append("look at training_step's code before it calls the model, with the saved batch and weights")
    elif origin.kind in ("module", "between_modules"):
        advice.append(f"look at the forward of {origin.where()} with the saved batch and weights")
    advice += [_ADVICE_STABLE, "lower the learning rate or clip gradients if values grew large before this step"]
    if origin.fp16:
        advice.append("train in bf16-mixed, or keep this module in float32 (autocast(enabled=False))")
    if action == "warn":
        advice.append("set `action='skip'` to drop such updates, or 'stop' to stop with a good checkpoint")
    return advice


# --------------------------------------------------------------------------- verdicts
def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def _names(events: Iterable[NonFiniteEvent], limit: int = 4) -> str:
    names = [e.name for e in events]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""), torch.float32)


def target_of(events: Sequence[NonFiniteEvent]) -> str:
    """The de-duplication target: the logged parts that went bad, else the loss, gradients, weights."""
    for kind, label in (("metric", None), ("loss", "loss"), ("gradient", "gradients"), ("weight", "weights")):
        hits = sorted({e.name for e in events if e.kind == kind})
        if hits:
            return label or "+".join(hits)
    return "training"


def nonfinite_verdict(
    events: Sequence[NonFiniteEvent],
    origin: Origin,
    *,
    finite_metrics: Sequence[str] = (),
    action: str = "warn",
    reproducer: str | None = None,
    checkpoint: str | None = None,
    replayed_step: int | None = None,
    replayed_batch: int | None = None,
    data_counts: dict[str, int] | None = None,
    trend: tuple[int, float, int, float] | None = None,
) -> Verdict:
    """The finding for one non-finite event: what went bad, when, where it was made, why.

    Args:
        events: every quantity seen non-finite since the last look (first step of each).
        origin: where the replay placed it (:func:`locate_origin`), or ``weights`` /
            ``not_replayed`` when no faithful replay was possible.
        finite_metrics: logged training metrics that stayed finite (shows which part of a
            multi-part loss went bad).
        action: what the guard does about it (``warn``, ``skip``, ``stop``, ``raise``).
        reproducer: the folder holding the saved batch and weights.
        checkpoint: the last-good checkpoint written by ``action="stop"``.
        replayed_step, replayed_batch: the step and batch index that were replayed.
        data_counts: per batch tensor path, how many values were non-finite.
        trend: the gradient norm before the first non-finite step (:func:`gradient_trend`),
            told when no replay could show where the value was made.
    """
    events = sorted(events, key=lambda e: (e.step, e.kind != "metric", e.name))
    first = events[0] if events else NonFiniteEvent("loss", "loss", -1)
    metrics = [e for e in events if e.kind == "metric"]
    losses = [e for e in events if e.kind == "loss"]
    grads = [e for e in events if e.kind == "gradient"]
    weights = [e for e in events if e.kind == "weight"]

    def at(e: NonFiniteEvent) -> str:
        return "" if e.step == first.step else f" (from step {e.step})"

    what: list[str] = []
    if metrics:
        parts = ", ".join(f"{e.name}={_fmt(e.value)}{at(e)}" for e in metrics[:4])
        kept = f" while {', '.join(finite_metrics[:4])} stayed finite" if finite_metrics else ""
        what.append(f"logged metric{'s' if len(metrics) > 1 else ''} {parts}{kept}")
    if losses:
        what.append(f"the loss was {_fmt(losses[0].value)}{at(losses[0])}")
    if grads:
        what.append(f"gradients of {len(grads)} parameter{'s' if len(grads) > 1 else ''} ({_names(grads, 3)})"
                    f"{at(grads[0])}")
    if weights:
        what.append(f"now the weights of {len(weights)} parameter{'s' if len(weights) > 1 else ''} "
                    f"({_names(weights, 3)})")
    seen = "; ".join(what) or "a training quantity"
    when = f"step {first.step}" + (f", batch {first.batch_idx}" if first.batch_idx >= 0 else "")
    head = f"Non-finite values at {when}: {seen}."

    step_note = ""
    if replayed_step is not None and replayed_step != first.step:
        step_note = f" (replaying the batch of step {replayed_step}, also non-finite)"
    if origin.kind == "data":
        counts = data_counts or {}
        held = ", ".join(
            f"{p} ({counts[p]} value{'s' if counts[p] != 1 else ''})" if p in counts else p
            for p in origin.data_paths[:3]
        )
        batch = replayed_batch if replayed_batch is not None else first.batch_idx
        where = f" It came in with the data{step_note}: {held} of batch {batch} held NaN/Inf."
    elif origin.kind == "module":
        where = f" It was made inside {origin.where()} from finite inputs{step_note}."
    elif origin.kind == "between_modules":
        child = origin.call.name if origin.call else "?"
        if origin.module is None:
            owner = "training_step, before the model was called"
        elif origin.module == "":
            owner = f"`{origin.module_type or 'the model'}.forward` itself, not a submodule"
        else:
            owner = f"{origin.where()}'s own forward code, not a submodule"
        where = f" It was made by {owner}: `{child}` already received it{step_note}."
    elif origin.kind == "loss":
        where = f" Every module output was finite; the loss computation in training_step made it{step_note}."
    elif origin.kind == "backward":
        op = f"; the backward of {origin.op} made finite gradients non-finite" if origin.op else ""
        near = f", nearest the loss in {origin.where()}" if origin.module is not None else ""
        where = f" The forward pass was finite: the backward pass made it{near}{op}{step_note}."
    elif origin.kind == "weights":
        where = (
            f" The weights were already non-finite ({', '.join(origin.parameters[:3])}) when this was read, "
            "so a replay cannot show where it started."
        )
    elif origin.kind == "logged_only":
        where = " The loss and gradients stayed finite: only the logged value is non-finite, training is not harmed."
    elif origin.kind == "other_rank" and origin.op:
        where = (f" The loss went non-finite on {origin.op}, not on this rank; the ranks' gradients are averaged "
                 "(DDP, FSDP), so every rank's gradients were non-finite.") if grads else \
            f" The loss went non-finite on {origin.op}; this rank's loss and gradients were finite."
    elif origin.kind == "other_rank":
        where = " Another process saw it; this rank's loss and gradients were finite."
    elif origin.kind == "not_reproduced":
        where = " Replaying the batch gave finite values (a non-deterministic op, or state that changed)."
    elif origin.op:
        where = f" The batch could not be replayed ({origin.op})."
    else:
        where = " The offending batch is no longer held, so it was not replayed."
    diverging = is_diverging(trend) if origin.kind in ("weights", "not_replayed") else None
    if diverging is not None and trend is not None:
        s0, n0, s1, n1 = trend
        if diverging:
            where += f" The gradient norm grew from {_fmt(n0)} (step {s0}) to {_fmt(n1)} (step {s1}) first: the run was diverging."
        else:
            where += (f" The gradient norm was steady before ({_fmt(n0)} at step {s0}, {_fmt(n1)} at step {s1}): "
                      "a sudden non-finite value from particular inputs, not a slow divergence.")
    done = {
        "warn": "",
        "skip": " The update was skipped.",
        "stop": " Training stops; the last good state was saved." if checkpoint else
        " Training stops; the weights are already non-finite, so skipping cannot recover.",
        "raise": " Raising NonFiniteError.",
    }.get(action, "")
    severity = Severity.ERROR if (losses or grads or weights) else Severity.WARNING
    return Verdict(
        check=CHECK,
        severity=severity,
        message=head + where + done,
        causes=tuple(likely_causes(origin, diverging)),
        advice=tuple(advice_for(origin, action, diverging)),
        target=target_of(events),
        data={
            "step": first.step,
            "batch_idx": first.batch_idx,
            "origin": origin.kind,
            "module": origin.module,
            "module_type": origin.module_type,
            "data_paths": list(origin.data_paths),
            "op": origin.op,
            "quantities": [dataclasses.asdict(e) for e in events],
            "finite_metrics": list(finite_metrics),
            "action": action,
            "reproducer": reproducer,
            "checkpoint": checkpoint,
            "replayed_step": replayed_step,
            "replayed_batch": replayed_batch,
            "gradient_trend": list(trend) if trend is not None else None,
        },
    )


def loss_scale_verdict(
    min_scale: float, *, floor: float = DEFAULT_MIN_LOSS_SCALE, overflow_steps: int = 0, skipped_in_a_row: int = 0
) -> Verdict | None:
    """Judge an fp16 loss scaler: overflow steps it skips are normal; a collapsed scale is not.

    Args:
        min_scale: the lowest scale seen since the last look.
        floor: below this the scale has collapsed (:data:`DEFAULT_MIN_LOSS_SCALE`).
        overflow_steps: overflow steps the scaler skipped since the last look (for the message).
        skipped_in_a_row: the longest run of skipped steps (for the message).
    """
    if math.isfinite(min_scale) and min_scale >= floor:
        return None
    return Verdict(
        check=CHECK,
        severity=Severity.ERROR,
        message=(
            f"The fp16 loss scale collapsed to {_fmt(min_scale)} (floor {_fmt(floor)}) after "
            f"{overflow_steps} overflow steps, {skipped_in_a_row} in a row: gradients are non-finite "
            "whatever the scale, so the scaler skips every update."
        ),
        causes=(
            "NaN/Inf made in the forward or backward pass, not an fp16 range problem",
            _CAUSE_LR,
            _CAUSE_FP16 + " in a layer that overflows even unscaled",
        ),
        advice=(
            "run a few steps in 32-bit or bf16-mixed precision to see which quantity goes non-finite",
            "keep overflow-prone layers (softmax, norms, losses) in float32",
            "lower the learning rate or clip gradients",
        ),
        target="loss_scale",
        data={"min_scale": min_scale, "floor": floor, "overflow_steps": overflow_steps,
              "skipped_in_a_row": skipped_in_a_row},
    )


__all__ = [
    "AFFINE_LAYERS",
    "CHECK",
    "DIVERGENCE_GROWTH",
    "DEFAULT_MIN_LOSS_SCALE",
    "EXP_OVERFLOW_INPUT",
    "ModuleCall",
    "NonFiniteEvent",
    "Origin",
    "advice_for",
    "count_nonfinite",
    "first_nonfinite_call",
    "gradient_trend",
    "is_diverging",
    "likely_causes",
    "locate_origin",
    "loss_scale_verdict",
    "first_nonfinite_rows",
    "nonfinite_verdict",
    "parent_name",
    "target_of",
]
