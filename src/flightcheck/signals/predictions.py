"""What a model answers on a fixed batch, and how those answers move: pure tensor functions.

A model's raw output is read once into an :class:`OutputSpec` (what kind of output it is and
where its class scores live); every other function here takes the output and the spec and
returns device tensors, with no thresholds and no host synchronisation. The
``PredictionStability`` callback aggregates them over ranks and judges them in
:mod:`flightcheck.checks.predictions`.

Answers come in three forms:

- ``multiclass`` (classifiers, segmentation, sequence models): one class id per position,
  a ``(N,)`` int64 tensor, the class axis moved last and every other axis flattened;
- ``multilabel`` (binary and multi-label classifiers): one yes/no per position and label,
  a ``(N, L)`` bool tensor;
- ``regression``: the values themselves, ``(B, ...)`` in float32.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

#: the ``task`` values a user may force instead of ``"auto"``
TASKS: tuple[str, ...] = ("auto", "multiclass", "multilabel", "binary", "regression")

#: how far a row of scores may be from summing to one and still count as probabilities
_PROBABILITY_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """How to read a model's output.

    Args:
        kind: what the output looks like, for messages: ``multiclass`` ``(B, C)``, ``binary``
            ``(B,)``/``(B, 1)``, ``multilabel`` ``(B, L)``, ``segmentation`` ``(B, C, *spatial)``,
            ``sequence`` ``(B, T, C)``, ``class_ids`` (integer answers) or ``regression``.
        task: how answers are read: ``multiclass`` (argmax), ``multilabel`` (one decision
            per label) or ``regression`` (the values).
        class_dim: the axis of the class scores in the raw output; ``None`` for regression
            and class ids.
        num_classes: classes (multiclass) or labels (multilabel, 1 for binary); 0 for regression.
        probabilities: the scores are already probabilities (softmax/sigmoid applied).
    """

    kind: str
    task: str
    class_dim: int | None = None
    num_classes: int = 0
    probabilities: bool = False


# --------------------------------------------------------------------------- inference
def infer_output_kind(
    output: Tensor,
    target: Tensor | None = None,
    task: str = "auto",
    inputs: Tensor | None = None,
    made_by: str | None = None,
) -> OutputSpec:
    """Read what kind of prediction ``output`` is, using the batch's ``target`` when there is one.

    Without a target the common conventions decide: ``(B, C)`` is a multi-class classifier,
    ``(B, T, C)`` a sequence model, ``(B, C, H, W)`` a segmentation model, one value per
    sample a regression, and an output shaped like the model's ``inputs`` a reconstruction
    (regression). A target settles the ambiguous cases: integer labels make a classifier,
    0/1 targets of the output's shape a multi-label one, other real-valued targets a
    regression, and its shape tells ``(B, C, L)`` from ``(B, T, C)``.

    ``made_by`` names the function that produced the output when it was watched being made
    (``"sigmoid"``, ``"softmax"``, or ``"other"``): yes/no scores are probabilities only when
    a sigmoid made them, since untrained logits often all sit in ``[0, 1]``. Unknown
    (``None``): scores all in ``[0, 1]`` are taken for probabilities.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if output.dim() == 0:
        raise ValueError("the prediction is a scalar; give a prediction_fn that returns one prediction per sample")
    if not output.is_floating_point():
        if task in ("auto", "multiclass"):
            return OutputSpec("class_ids", "multiclass", None, int(output.max()) + 1 if output.numel() else 1)
        output = output.float()
    if task == "regression":
        return OutputSpec("regression", "regression")
    if task in ("binary", "multilabel"):
        return _made_by(_forced_multilabel(output, target), made_by)
    spec = _made_by(_infer_scores(output, target, task), made_by)
    if (
        task == "auto"
        and spec.task != "regression"
        and inputs is not None
        and tuple(inputs.shape) == tuple(output.shape)
        and (target is None or target_answers(target, spec, predicted_answers(output, spec)) is None)
    ):
        return OutputSpec("regression", "regression")  # a reconstruction of its input
    return spec


def _made_by(spec: OutputSpec, made_by: str | None) -> OutputSpec:
    if made_by is None:
        return spec
    if spec.task == "multilabel":
        return dataclasses.replace(spec, probabilities=made_by == "sigmoid")
    if spec.task == "multiclass" and made_by == "softmax":
        return dataclasses.replace(spec, probabilities=True)
    return spec


def _infer_scores(output: Tensor, target: Tensor | None, task: str) -> OutputSpec:
    single = output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1)
    if single:
        if task == "multiclass":
            raise ValueError(
                f"task='multiclass' needs class scores of shape (B, C) with C >= 2, got {tuple(output.shape)}"
            )
        if target is not None and _is_binary_valued(target):
            return OutputSpec("binary", "multilabel", None if output.dim() == 1 else 1, 1, _all_in_unit_interval(output))
        return OutputSpec("regression", "regression")
    if output.dim() == 2:
        return _read_vector_scores(output, target, task)
    if output.dim() == 3 and _is_sequence_layout(output, target):
        return _read_class_scores(output, target, task, class_dim=2, kind="sequence")
    return _read_class_scores(output, target, task, class_dim=1, kind="segmentation")


def _forced_multilabel(output: Tensor, target: Tensor | None) -> OutputSpec:
    if output.dim() == 1:
        dim = None
    elif output.dim() == 3 and _is_sequence_layout(output, target):
        dim = 2
    else:
        dim = 1
    labels = 1 if dim is None else int(output.shape[dim])
    if output.dim() >= 3:
        kind = "sequence" if dim == 2 else "segmentation"
    else:
        kind = "binary" if labels == 1 else "multilabel"
    return OutputSpec(kind, "multilabel", dim, labels, _all_in_unit_interval(output))


def _read_vector_scores(output: Tensor, target: Tensor | None, task: str) -> OutputSpec:
    classes = int(output.shape[1])
    if task == "auto" and target is not None and target.is_floating_point() and tuple(target.shape) == tuple(output.shape):
        if _is_distribution(target, dim=1):  # one-hot or soft labels (label smoothing, mixup)
            pass
        elif _is_binary_valued(target):
            return OutputSpec("multilabel", "multilabel", 1, classes, _all_in_unit_interval(output))
        else:
            return OutputSpec("regression", "regression")
    return OutputSpec("multiclass", "multiclass", 1, classes, _is_distribution(output, dim=1))


def _read_class_scores(output: Tensor, target: Tensor | None, task: str, class_dim: int, kind: str) -> OutputSpec:
    classes = int(output.shape[class_dim])
    if task == "auto" and target is not None and target.is_floating_point() and tuple(target.shape) == tuple(output.shape):
        if not _is_distribution(target, dim=class_dim):
            if _is_binary_valued(target):
                return OutputSpec(kind, "multilabel", class_dim, classes, _all_in_unit_interval(output))
            return OutputSpec("regression", "regression")
    if classes == 1:
        if task == "multiclass":
            raise ValueError(f"task='multiclass' needs at least 2 classes on axis {class_dim}, got {tuple(output.shape)}")
        if target is not None and _is_binary_valued(target):
            return OutputSpec(kind, "multilabel", class_dim, 1, _all_in_unit_interval(output))
        return OutputSpec("regression", "regression")
    return OutputSpec(kind, "multiclass", class_dim, classes, _is_distribution(output, dim=class_dim))


def _is_sequence_layout(output: Tensor, target: Tensor | None) -> bool:
    """``(B, T, C)`` (class scores last) rather than ``(B, C, L)``; the target's shape decides."""
    if target is None or target.dim() != 2 or output.dim() != 3:
        return True
    shape = tuple(target.shape)
    if shape == (output.shape[0], output.shape[1]):
        return True
    return shape != (output.shape[0], output.shape[2])


def _is_binary_valued(t: Tensor) -> bool:
    if t.dtype == torch.bool:
        return True
    return bool(((t == 0) | (t == 1)).all()) if t.numel() else False


def _is_distribution(t: Tensor, dim: int) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return False
    t = t.float()
    return bool((t >= 0).all() and (t.sum(dim) - 1).abs().max() <= _PROBABILITY_TOLERANCE)


def _all_in_unit_interval(t: Tensor) -> bool:
    return bool(((t >= 0) & (t <= 1)).all()) if t.numel() else False


# --------------------------------------------------------------------------- answers
def scores_last(output: Tensor, spec: OutputSpec) -> Tensor:
    """Class scores as ``(N, K)``: the class axis moved last, every other axis flattened."""
    if spec.class_dim is None:
        return output.reshape(-1, 1)
    return output.movedim(spec.class_dim, -1).reshape(-1, output.shape[spec.class_dim])


def predicted_answers(output: Tensor, spec: OutputSpec) -> Tensor:
    """The model's answers: class ids ``(N,)``, decisions ``(N, L)`` or values ``(B, ...)``."""
    if spec.task == "regression":
        return output.detach().float()
    if spec.class_dim is None and spec.task == "multiclass":  # integer class ids already
        return output.detach().reshape(-1).long()
    scores = scores_last(output.detach(), spec)
    if spec.task == "multiclass":
        return scores.argmax(dim=-1)
    return scores > (0.5 if spec.probabilities else 0.0)


def target_answers(target: Tensor, spec: OutputSpec, answers: Tensor) -> Tensor | None:
    """The probe's labels in the form of ``answers``, or ``None`` when they do not line up.

    Multi-class labels outside ``[0, C)`` (an ``ignore_index`` such as -100) become -1;
    soft or one-hot labels become their argmax.
    """
    target = target.detach()
    if spec.task == "regression":
        if target.numel() != answers.numel():
            return None
        return target.float().reshape(answers.shape)
    if spec.task == "multiclass":
        if target.is_floating_point() and target.numel() == answers.numel() * spec.num_classes and spec.class_dim is not None:
            labels = scores_last(target.float(), spec).argmax(dim=-1)
        elif target.numel() == answers.numel():
            labels = target.reshape(-1).long()
        else:
            return None
        inside = (labels >= 0) & (labels < spec.num_classes)
        return torch.where(inside, labels, torch.full_like(labels, -1))
    if target.numel() != answers.numel():
        return None
    if spec.class_dim is not None and spec.num_classes > 1:
        labels = scores_last(target.float(), spec)
    else:
        labels = target.float().reshape(-1, 1)
    return labels.reshape(answers.shape) > 0.5


def valid_positions(labels: Tensor | None, spec: OutputSpec, answers: Tensor) -> Tensor:
    """Per answer, 1.0 where it is judged, 0.0 where its label is ignored (padding)."""
    if labels is None or spec.task != "multiclass":
        return torch.ones(answers.shape[0], device=answers.device)
    return (labels >= 0).float()


# --------------------------------------------------------------------------- movement
def answer_changes(previous: Tensor, current: Tensor, spec: OutputSpec) -> Tensor:
    """Per answer how much it moved: 1.0/0.0 changed (classification), squared difference (regression).

    A multi-label answer counts the share of its labels that flipped, so one borderline label
    among many does not make the whole answer change.
    """
    if spec.task == "regression":
        return (current - previous).square().reshape(-1)
    changed = (current != previous).float()
    return changed.mean(dim=-1) if changed.dim() > 1 else changed


def churn(previous: Tensor, current: Tensor, spec: OutputSpec, scale: float | Tensor | None = None) -> Tensor:
    """The fraction of answers that changed; for regression the RMS change divided by ``scale``
    (the spread the answers should have, e.g. the targets' spread)."""
    changes = answer_changes(previous, current, spec)
    if spec.task != "regression":
        return changes.mean()
    rms = changes.mean().sqrt()
    return rms if scale is None else rms / scale


# --------------------------------------------------------------------------- diversity
def class_histogram(answers: Tensor, spec: OutputSpec, weight: Tensor | None = None) -> Tensor:
    """How often each answer was given, as ``(G, K)`` float counts.

    Multi-class: one group of ``C`` classes. Multi-label: one group per label with two
    categories (no, yes). ``weight`` (per answer) leaves ignored positions out.
    """
    if spec.task == "multiclass":
        ids = answers.clamp(0, max(spec.num_classes - 1, 0))
        w = torch.ones_like(ids, dtype=torch.float32) if weight is None else weight.float()
        counts = torch.zeros(max(spec.num_classes, 1), device=answers.device, dtype=torch.float32)
        counts.index_add_(0, ids, w * (answers >= 0).float())
        return counts.unsqueeze(0)
    if spec.task == "multilabel":
        yes = answers.float().sum(dim=0)
        return torch.stack([answers.shape[0] - yes, yes], dim=1)
    raise ValueError("class_histogram needs a classification spec, got a regression")


def normalized_entropy(histogram: Tensor) -> Tensor:
    """Entropy of each row of a ``(G, K)`` histogram divided by ``ln K``: 1 uniform, 0 one answer."""
    k = histogram.shape[-1]
    total = histogram.sum(dim=-1, keepdim=True)
    p = histogram / total.clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return h / math.log(k) if k > 1 else torch.zeros_like(h)


def minority_share(histogram: Tensor) -> Tensor:
    """Per row of a ``(G, K)`` histogram, the share of answers outside the most common one."""
    total = histogram.sum(dim=-1)
    return 1 - histogram.amax(dim=-1) / total.clamp_min(1e-12)


def spread(values: Tensor) -> Tensor:
    """How much answers differ between inputs: per output position the standard deviation
    across the batch (dim 0), averaged over positions. 0 when every input gets the same answer."""
    if values.shape[0] < 2:
        return torch.zeros((), device=values.device)
    return values.float().reshape(values.shape[0], -1).std(dim=0, unbiased=False).mean()


# --------------------------------------------------------------------------- agreement with labels
def answer_agreement(answers: Tensor, labels: Tensor, spec: OutputSpec) -> Tensor:
    """Per answer how it compares with its label: 1.0/0.0 right or wrong (multi-label: the share
    of its labels right); regression: the squared error."""
    if spec.task == "regression":
        return (answers - labels).square().reshape(-1)
    right = (answers == labels).float()
    return right.mean(dim=-1) if right.dim() > 1 else right


def variance(values: Tensor) -> Tensor:
    """Per output position the variance across the batch (dim 0), averaged over positions: the
    squared error of always answering each position's mean."""
    if values.shape[0] < 2:
        return torch.zeros((), device=values.device)
    return values.float().reshape(values.shape[0], -1).var(dim=0, unbiased=False).mean()


def skill_score(accuracy: float, majority_share: float) -> float | None:
    """How far the accuracy is from always giving the majority label (0) towards perfect (1)."""
    if majority_share >= 1.0:
        return None
    return (accuracy - majority_share) / (1.0 - majority_share)


def r_squared(mean_squared_error: float, target_variance: float) -> float | None:
    """The share of the targets' variance the predictions explain (0: as good as the mean)."""
    if target_variance <= 0:
        return None
    return 1.0 - mean_squared_error / target_variance


# --------------------------------------------------------------------------- confidence
def answer_confidence(output: Tensor, spec: OutputSpec) -> Tensor:
    """Per answer the probability the model gives its own answer: the top class probability
    (multiclass), the mean over labels of ``max(p, 1 - p)`` (multilabel). Empty for regression
    and class ids."""
    if spec.task == "regression" or spec.class_dim is None and spec.task == "multiclass":
        return output.new_zeros(0, dtype=torch.float32)
    scores = scores_last(output.detach(), spec).float()
    if spec.task == "multiclass":
        if spec.probabilities:
            return scores.amax(dim=-1)
        return (scores.amax(dim=-1) - scores.logsumexp(dim=-1)).exp()
    p = scores if spec.probabilities else scores.sigmoid()
    return torch.maximum(p, 1 - p).mean(dim=-1)


def confident(confidence: Tensor, spec: OutputSpec, margin: float) -> Tensor:
    """Per answer whether the model is sure of it: its confidence is at least ``margin`` of the
    way from chance (``1 / C``; 0.5 per label) to certainty."""
    chance = 1.0 / spec.num_classes if spec.task == "multiclass" and spec.num_classes > 1 else 0.5
    return confidence >= chance + margin * (1.0 - chance)


__all__ = [
    "TASKS",
    "OutputSpec",
    "answer_agreement",
    "answer_changes",
    "answer_confidence",
    "churn",
    "class_histogram",
    "confident",
    "infer_output_kind",
    "minority_share",
    "normalized_entropy",
    "predicted_answers",
    "r_squared",
    "scores_last",
    "skill_score",
    "spread",
    "target_answers",
    "valid_positions",
    "variance",
]
