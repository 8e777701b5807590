"""Data checks: ``nonfinite_input``, ``input_scale``, ``target_shape``, ``label_range``, ``class_imbalance``.

Pure judges of tensors, and the registered checks that hand them the batch (and, for the
checks that need the model's output, the step at initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flightcheck.checks import Verdict
from flightcheck.preflight.context import LabelOutOfRange, PreflightContext
from flightcheck.preflight.fetch import leading_batches
from flightcheck.preflight.registry import Skip, register
from flightcheck.preflight.roles import get_at, leaves, path_str
from flightcheck.preflight.task import IGNORE_INDEX, align_classes, close, is_integer

# --------------------------------------------------------------------------- nonfinite_input


def judge_nonfinite(name: str, t: Tensor) -> Verdict | None:
    """NaN or Inf anywhere in a floating tensor of the batch."""
    if not torch.is_floating_point(t) or t.numel() == 0:
        return None
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if nan == 0 and inf == 0:
        return None
    rows = torch.nonzero(~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)).flatten().tolist() if t.dim() else []
    return Verdict(
        "nonfinite_input",
        "error",
        f"{name} holds {nan} NaN and {inf} infinite values "
        f"(in {len(rows)} of its {t.shape[0] if t.dim() else 1} samples).",
        causes=(
            "missing values in the raw data read as NaN",
            "a division by zero or a log of zero in preprocessing",
            "normalising a constant feature (std 0)",
        ),
        advice=("fill or drop missing values before training", "guard the preprocessing's divisions (add an epsilon)"),
        target=name,
        data={"nan": nan, "inf": inf, "samples": rows[:10]},
    )


@register("nonfinite_input", phase="batch", summary="no NaN or Inf in inputs and targets")
def nonfinite_input(ctx: PreflightContext) -> Iterator[Verdict]:
    for path, t in leaves(ctx.batch):
        verdict = judge_nonfinite(path_str(path), t)
        if verdict is not None:
            yield verdict


# --------------------------------------------------------------------------- input_scale
#: Integer-valued images reaching above this look like raw 0-255 pixels, not scaled ones.
RAW_PIXEL_MAX = 20.0
#: A feature whose root-mean-square exceeds this is not normalised (normalised features are ~1).
FEATURE_SCALE_MAX = 100.0
#: ... below this (for the largest feature) inputs are squashed towards zero.
FEATURE_SCALE_MIN = 1e-3
#: Features whose scales differ by this factor or more are "orders of magnitude apart": the large
#: ones dominate the first layer's gradient.
FEATURE_SPREAD_MAX = 1000.0


def feature_scales(t: Tensor) -> Tensor:
    """Root-mean-square of each feature: columns of ``(B, F)``, the last axis of ``(B, T, F)``,
    the channels of images ``(B, C, H, W)``; a ``(B,)`` tensor is one feature."""
    x = t.detach().float()
    if x.dim() <= 1:
        x = x.reshape(-1, 1)
    elif x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
    elif x.dim() >= 4:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.square().mean(dim=0).sqrt()


def judge_input_scale(name: str, t: Tensor) -> Verdict | None:
    """Raw pixels, unnormalised features, or features on scales orders of magnitude apart."""
    if not torch.is_floating_point(t) or t.numel() < 2 or not bool(torch.isfinite(t).all()):
        return None
    x = t.detach().float()
    low, high = float(x.min()), float(x.max())
    advice = ("standardise each feature with the training set's mean and std (or scale to [0, 1])",)
    if x.dim() >= 3 and low >= 0 and RAW_PIXEL_MAX < high <= 255 and bool((x == x.round()).all()):
        return Verdict(
            "input_scale",
            "warning",
            f"{name} holds whole numbers from {low:g} to {high:g}: raw 0-255 pixel values, not scaled ones.",
            causes=("a missing ToTensor()/division by 255 or normalisation in the transforms",),
            advice=("divide by 255 and normalise with the dataset's channel mean and std",),
            target=name,
            data={"min": low, "max": high},
        )
    scales = feature_scales(x)
    present = scales[scales > 0]
    if present.numel() == 0:
        return None
    largest, smallest = float(present.max()), float(present.min())
    which = int(torch.argmax(scales))
    data = {
        "largest_scale": largest,
        "smallest_scale": smallest,
        "largest_feature": which,
        "features": int(scales.numel()),
    }
    if largest > FEATURE_SCALE_MAX:
        return Verdict(
            "input_scale",
            "warning",
            f"{name} is not normalised: feature {which} has RMS {largest:.3g} (normalised features are ~1).",
            causes=("features left in raw units (prices, counts, timestamps)",),
            advice=advice,
            target=name,
            data=data,
        )
    if present.numel() >= 2 and largest / smallest >= FEATURE_SPREAD_MAX:
        return Verdict(
            "input_scale",
            "warning",
            f"{name} has feature scales {largest / smallest:.3g}x apart (RMS {smallest:.3g} to {largest:.3g}): "
            "the large features dominate the gradient.",
            causes=("features in different units, not standardised",),
            advice=advice,
            target=name,
            data=data,
        )
    if largest < FEATURE_SCALE_MIN:
        return Verdict(
            "input_scale",
            "warning",
            f"{name} is squashed towards zero: its largest feature RMS is {largest:.3g}.",
            causes=("a normalisation applied twice, or a unit conversion off by orders of magnitude",),
            advice=advice,
            target=name,
            data=data,
        )
    return None


@register("input_scale", phase="batch", summary="inputs are normalised, on comparable scales, not raw pixels")
def input_scale(ctx: PreflightContext) -> Iterator[Verdict]:
    for path, t in ctx.inputs:
        verdict = judge_input_scale(path_str(path), t)
        if verdict is not None:
            yield verdict


# --------------------------------------------------------------------------- target_shape
_BROADCAST_LOSSES = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "smooth_l1": F.smooth_l1_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}


def judge_target_shape(output: Tensor | None, target: Tensor | None, loss: float | None) -> Verdict | None:
    """Output and target of different shapes that broadcast into a larger one, proven by the loss.

    Only speaks when an elementwise loss on the broadcast pair reproduces the reported loss and
    the same loss on the aligned pair does not (the user may squeeze in the step themselves).
    """
    if output is None or target is None or loss is None or not math.isfinite(loss):
        return None
    if not torch.is_floating_point(target) or output.shape == target.shape:
        return None
    try:
        shape = torch.broadcast_shapes(output.shape, target.shape)
    except RuntimeError:
        return None
    if math.prod(shape) <= max(output.numel(), target.numel()):
        return None
    o, t = output.detach().float(), target.detach().float()
    ob, tb = torch.broadcast_tensors(o, t)
    broadcast, aligned = {}, {}
    with torch.no_grad():
        for name, fn in _BROADCAST_LOSSES.items():
            if name == "bce_with_logits" and not bool(((t == 0) | (t == 1)).all()):
                continue
            broadcast[name] = float(fn(ob, tb))
            if o.numel() == t.numel():
                aligned[name] = float(fn(o.reshape(-1), t.reshape(-1)))
    hit = [n for n, v in broadcast.items() if close(loss, v)]
    if not hit or any(close(loss, v) for v in aligned.values()):
        return None
    return Verdict(
        "target_shape",
        "error",
        f"the output {tuple(output.shape)} and the target {tuple(target.shape)} broadcast to {tuple(shape)} in the loss "
        f"({hit[0]} = {loss:.4g}): every output is compared with every target.",
        causes=("a trailing dimension of size 1 on the output (or the target) that the loss broadcasts",),
        advice=("squeeze the output (output.squeeze(-1)) or unsqueeze the target so both have the same shape",),
        data={
            "output_shape": list(output.shape),
            "target_shape": list(target.shape),
            "broadcast_shape": list(shape),
            "loss": loss,
        },
    )


@register("target_shape", phase="initial", summary="output and target shapes line up (no silent broadcasting)")
def target_shape(ctx: PreflightContext) -> Iterator[Verdict]:
    if ctx.target is None:
        raise Skip("no target was found in the batch (name it with Preflight(target=...))")
    failed = ctx.initial_record.error
    if failed is not None and "target size" in str(failed.error).lower():
        yield Verdict(
            "target_shape",
            "error",
            f"the loss refused the output and target shapes: {failed.error}",
            causes=("a trailing dimension of size 1 on the output (or the target)",),
            advice=("squeeze the output (output.squeeze(-1)) or unsqueeze the target so both have the same shape",),
            data={"error": str(failed.error)},
        )
        return
    record = ctx.initial
    if record.output is None:
        raise Skip("the model's output could not be captured (training_step calls neither self(...) nor a submodule)")
    verdict = judge_target_shape(record.output, ctx.target, record.loss)
    if verdict is not None:
        yield verdict


# --------------------------------------------------------------------------- label_range
_OUT_OF_RANGE_WORDS = ("out of bounds", "out of range", "labelsoutofrange", "labeloutofrange")


def judge_label_range(
    target: Tensor, classes: int | None, step_error: BaseException | None, stated: bool = False
) -> Verdict | None:
    """Class ids outside ``[0, classes)`` (``-100`` is ignored, as by PyTorch's losses)."""
    valid = target[target != IGNORE_INDEX]
    if valid.numel() == 0:
        return None
    low, high = int(valid.min()), int(valid.max())
    text = f"{type(step_error).__name__}: {step_error}".lower() if step_error is not None else ""
    crashed = step_error is not None and (
        isinstance(step_error, LabelOutOfRange) or any(w in text for w in _OUT_OF_RANGE_WORDS)
    )
    outside = classes is not None and (low < 0 or high >= classes)
    if not crashed and not (stated and outside):
        return None
    where = f"the output has {classes} classes" if classes is not None else "the loss cannot index them"
    causes = [
        (
            "labels that do not start at 0"
            if low >= 1 and classes is not None and high == classes
            else "more classes in the data than the model's output size"
        )
    ]
    causes.append("a label encoding that differs between the data and the model")
    data = {"min_label": low, "max_label": high, "num_classes": classes}
    if step_error is not None:
        data["error"] = str(step_error)
    return Verdict(
        "label_range",
        "error",
        f"labels run from {low} to {high} but {where}" + (" (training_step failed on them)." if crashed else "."),
        causes=tuple(causes),
        advice=("map labels to 0..C-1", "make the last layer's size equal the number of classes"),
        data=data,
    )


def judge_bce_targets(output: Tensor | None, target: Tensor, loss: float | None) -> Verdict | None:
    """Targets outside [0, 1] read by binary cross-entropy (e.g. labels in {-1, +1}).

    Speaks only when binary_cross_entropy(_with_logits) on the captured output and the target
    reproduces the reported loss, so a regression loss on the same values is left alone.
    """
    if output is None or loss is None or not math.isfinite(loss) or target.numel() == 0:
        return None
    if output.numel() != target.numel() or not torch.is_floating_point(output):
        return None
    z, y = output.detach().float().reshape(-1), target.detach().float().reshape(-1)
    if not bool(torch.isfinite(y).all()):
        return None
    low, high = float(y.min()), float(y.max())
    if low >= 0 and high <= 1:
        return None
    with torch.no_grad():
        formulas = {"binary_cross_entropy_with_logits": float(F.binary_cross_entropy_with_logits(z, y))}
        if bool((z >= 0).all() and (z <= 1).all()):
            p = z.clamp(1e-12, 1 - 1e-12)
            formulas["binary_cross_entropy"] = float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
    hit = [name for name, value in formulas.items() if close(loss, value) or close(loss, value * len(y))]
    if not hit:
        return None
    values = torch.unique(y)
    shown = ", ".join(f"{v:g}" for v in values.tolist()) if values.numel() <= 4 else f"{low:g} .. {high:g}"
    return Verdict(
        "label_range",
        "error",
        f"the loss is {hit[0]} (= {loss:.4g}) but its targets take values {{{shown}}} outside [0, 1]: "
        "binary cross-entropy wants 0/1 labels (or probabilities), and is unbounded below on these.",
        causes=("labels in {-1, +1} (an SVM / hinge-loss convention)", "unscaled soft labels or class ids > 1"),
        advice=("map the labels to {0, 1}: (y + 1) / 2 for {-1, +1}", "for more than two classes use cross_entropy"),
        data={"min_label": low, "max_label": high, "loss": loss, "formula": hit[0]},
    )


@register("label_range", phase="initial", summary="class ids fit the output size; BCE targets lie in [0, 1]")
def label_range(ctx: PreflightContext) -> Iterator[Verdict]:
    target = ctx.target
    if target is None:
        raise Skip("no target was found in the batch (name it with Preflight(target=...))")
    record = ctx.initial_record
    if record.error is None:
        verdict = judge_bce_targets(record.output, target, record.loss)
        if verdict is not None:
            yield verdict
            return
    if not is_integer(target):
        raise Skip("the target holds values, not class ids")
    stated = ctx.options.num_classes is not None
    classes = ctx.options.num_classes
    if classes is None and record.output is not None:
        aligned = align_classes(record.output, target)
        classes = aligned[0].shape[-1] if aligned is not None else None
    error = record.error.error if record.error is not None else None
    verdict = judge_label_range(target, classes, error, stated=stated)
    if verdict is not None:
        yield verdict


# --------------------------------------------------------------------------- class_imbalance
#: A batch this small says too little about the class balance.
MIN_IMBALANCE_BATCH = 16
#: One class making up this share of a batch is worth a note. Alone it is no bug: real data is
#: often this skewed (a dataset at 80% majority gives batches of 32 at >= 90% about one time in
#: ten), so it is reported as ``info`` only.
MAJORITY_SHARE = 0.9
#: One class making up this share of a batch, with an unweighted loss, is a ``warning``: a batch of
#: 32 from data at 80% majority reaches it less than one time in a hundred (>= 31 of 32: 0.7%;
#: >= 61 of 64: 0.01%), so the data itself is ~95% one class or the loader is sorted by label, and
#: the model can score 95% by answering that class alone.
SEVERE_SHARE = 0.95
#: The class balance is also judged on the labels of this many leading batches pooled (taken
#: within IMBALANCE_SECONDS): one batch says little. A batch of 32 from data at 97% majority
#: holds two or more minority samples one time in four (93.8%: only a note); 256 samples
#: reach 95% about 97 times in 100, and data at 80% majority never comes near.
IMBALANCE_BATCHES = 8
IMBALANCE_SECONDS = 2.0
#: ... read only when the first batch is at least this share one class: a batch of 32 from data
#: at 95% majority falls below 80% about one time in a thousand, and a balanced first batch
#: (the common case) costs no extra reads.
IMBALANCE_POOL_FROM = 0.8


def class_counts(target: Tensor) -> Tensor | None:
    """Counts per class of a one-label-per-sample target ((B,) ids or (B,)/(B, 1) 0/1 values)."""
    t = target.detach()
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        return None
    if is_integer(t) or t.dtype == torch.bool:
        t = t.long()
        t = t[t >= 0]
        return torch.bincount(t) if t.numel() else None
    if torch.is_floating_point(t) and bool(((t == 0) | (t == 1)).all()):
        return torch.bincount(t.long(), minlength=2)
    return None


#: Names of a LightningModule's buffers/attributes that hold class weights for a functional loss.
_WEIGHT_NAMES = ("class_weight", "class_weights", "pos_weight", "loss_weight", "loss_weights")


def loss_weighting(module: nn.Module | None) -> str | None:
    """Where the loss is class-weighted, if anywhere: an ``nn.*Loss`` with ``weight``/``pos_weight``
    set, or a tensor attribute or buffer named like class weights (for ``F.cross_entropy(weight=...)``)."""
    if module is None:
        return None
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.loss._Loss):
            for attr in ("weight", "pos_weight"):
                if isinstance(getattr(m, attr, None), Tensor):
                    return f"{name or type(m).__name__}.{attr}"
    for name, buf in module.named_buffers():
        if name.rsplit(".", 1)[-1].lower() in _WEIGHT_NAMES:
            return name
    for name in _WEIGHT_NAMES:
        if isinstance(getattr(module, name, None), Tensor):
            return name
    return None


def judge_class_imbalance(target: Tensor, weighted: str | None = None, where: str = "the batch's") -> Verdict | None:
    """One class dominating the batch: ``info`` from :data:`MAJORITY_SHARE`, ``warning`` from
    :data:`SEVERE_SHARE` unless the loss is class-weighted (``weighted`` names where).
    ``where`` names the samples in the message."""
    counts = class_counts(target)
    if counts is None or int(counts.sum()) < MIN_IMBALANCE_BATCH:
        return None
    if weighted is not None:
        return None  # the user has already handled the imbalance in the loss
    total = int(counts.sum())
    top = int(torch.argmax(counts))
    share = int(counts[top]) / total
    if share < MAJORITY_SHARE:
        return None
    return Verdict(
        "class_imbalance",
        "warning" if share >= SEVERE_SHARE else "info",
        f"{int(counts[top])} of {where} {total} samples ({share:.0%}) are class {top}, and the loss is not "
        "class-weighted.",
        causes=("a dataset dominated by one class", "a training loader that is not shuffled over data sorted by label"),
        advice=(
            "shuffle the training loader",
            "rebalance: weight the loss or sample classes evenly (WeightedRandomSampler)",
            "judge the model by per-class metrics, not accuracy",
        ),
        data={"counts": counts.tolist(), "majority_class": top, "share": share},
    )


@register("class_imbalance", phase="batch", summary="no single class dominates the batch")
def class_imbalance(ctx: PreflightContext) -> Iterator[Verdict]:
    target = ctx.target
    if target is None:
        raise Skip("no target was found in the batch (name it with Preflight(target=...))")
    counts = class_counts(target)
    if counts is None:
        raise Skip("the target is not one class label per sample")
    weighted = loss_weighting(ctx.module)
    verdict = judge_class_imbalance(target, weighted=weighted)
    first_share = float(counts.max()) / max(int(counts.sum()), 1)
    if (weighted is None and first_share >= IMBALANCE_POOL_FROM and ctx.target_path is not None
            and (verdict is None or verdict.severity != "warning")):
        pooled = _pooled_targets(ctx)
        if pooled is not None:
            wider = judge_class_imbalance(pooled[1], where=f"the first {pooled[0]} batches'")
            if wider is not None and (verdict is None or wider.severity == "warning"):
                verdict = wider
    if verdict is not None:
        yield verdict


def _pooled_targets(ctx: PreflightContext) -> tuple[int, Tensor] | None:
    """``(batches, labels)``: the labels of the leading training batches, one tensor; ``None``
    when fewer than two batches could be read or their labels are not class ids."""
    try:
        batches = leading_batches(ctx.trainer, ctx.module, IMBALANCE_BATCHES, IMBALANCE_SECONDS)
        targets = [get_at(b, ctx.target_path) for b in batches]
    except Exception:  # noqa: BLE001 - no trainer, or a batch of another shape: the first batch's verdict stands
        return None
    labels = []
    for t in targets:
        if not isinstance(t, Tensor) or class_counts(t) is None:
            return None
        labels.append(t.detach().reshape(-1).cpu())
    if len(labels) < 2:
        return None
    return len(labels), torch.cat(labels)


__all__ = [
    "class_counts",
    "feature_scales",
    "judge_class_imbalance",
    "judge_input_scale",
    "judge_bce_targets",
    "judge_label_range",
    "judge_nonfinite",
    "loss_weighting",
    "judge_target_shape",
]
