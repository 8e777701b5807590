"""What the model is asked to do, read from its output and the batch's target.

Pure functions on tensors. :func:`infer_task` lines up the model's output with the target
(class axis last or second, ignored labels dropped), :func:`candidate_losses` computes the
losses the user is likely to use on that pair, and :func:`matching` says which of them
reproduces the loss ``training_step`` reported. A match is evidence about what the loss reads
(logits, probabilities, log-probabilities), used by ``init_loss``, ``output_activation`` and
``target_shape`` so they only speak when the numbers prove their point.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from torch.nn import functional as F

#: Lightning/PyTorch's default ``ignore_index``; labels equal to it are left out.
IGNORE_INDEX = -100

#: Relative tolerance for "this formula reproduces the reported loss". Recomputing a loss from
#: the captured output in float32 agrees with the user's own to ~1e-6; bf16/fp16 autocast to ~1e-3.
MATCH_RTOL = 2e-3

CLASSIFICATION = ("multiclass", "binary", "multilabel")


@dataclasses.dataclass(frozen=True)
class Task:
    """The task, with the output and target aligned element for element.

    ``outputs`` is ``(N, C)`` for multiclass and ``(N,)`` otherwise, in float32; ``targets`` is
    ``(N,)`` class ids, ``(N, C)`` class probabilities (``soft``), or ``(N,)`` values.
    """

    kind: str  # "multiclass" | "binary" | "multilabel" | "regression" | "unknown"
    num_classes: int | None = None
    outputs: Tensor | None = None
    targets: Tensor | None = None
    soft: bool = False
    reason: str = ""

    @property
    def is_classification(self) -> bool:
        return self.kind in CLASSIFICATION

    @property
    def known(self) -> bool:
        return self.kind != "unknown"


def _unknown(reason: str) -> Task:
    return Task("unknown", reason=reason)


def is_integer(t: Tensor) -> bool:
    return not torch.is_floating_point(t) and not torch.is_complex(t) and t.dtype != torch.bool


def align_classes(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """``(logits (N, C), labels (N,), class_dim)`` when ``output`` has one more axis than ``target``,
    or is ``(N, C)`` logits flattened from a ``(batch, time)`` target of ``N`` entries."""
    if output.dim() == 2 and target.dim() >= 2 and output.shape[0] == target.numel() and output.shape[0] > target.shape[0]:
        return output, target.reshape(-1), 1
    if output.dim() != target.dim() + 1 or output.shape[0] != (target.shape[0] if target.dim() else 1):
        return None
    if output.shape[:-1] == target.shape:
        return output.reshape(-1, output.shape[-1]), target.reshape(-1), output.dim() - 1
    if output.dim() >= 3 and output.shape[2:] == target.shape[1:]:
        return output.movedim(1, -1).reshape(-1, output.shape[1]), target.reshape(-1), 1
    return None


def _binary_values(t: Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def infer_task(
    output: Tensor | None, target: Tensor | None, num_classes: int | None = None, loss: float | None = None
) -> Task:
    """Infer the task from the model's output and the target.

    Args:
        output: the model's output (logits, probabilities or values).
        target: the batch's target.
        num_classes: what the user said; overrides the output's class count.
        loss: the reported loss, to tell one-hot targets used with cross-entropy from
            multi-label targets used with binary cross-entropy.
    """
    if output is None or target is None:
        return _unknown("no model output or no target was found")
    o = output.detach().float()
    t = target.detach()
    if t.dtype == torch.bool:
        t = t.float()
    if o.numel() == 0 or t.numel() == 0:
        return _unknown("empty output or target")
    if is_integer(t):
        aligned = align_classes(o, t)
        if aligned is not None and aligned[0].shape[-1] >= 2:
            logits, labels, _ = aligned
            keep = labels != IGNORE_INDEX
            return Task("multiclass", num_classes or logits.shape[-1], logits[keep], labels[keep])
        if o.numel() == t.numel() and _binary_values(t):
            kind = "multilabel" if t.dim() >= 2 and t.shape[-1] > 1 else "binary"
            return Task(kind, None, o.reshape(-1), t.reshape(-1).float())
        return _unknown(f"integer targets of shape {tuple(t.shape)} do not line up with the output {tuple(o.shape)}")
    if not torch.is_floating_point(t):
        return _unknown(f"targets of dtype {t.dtype}")
    t = t.float()
    if o.numel() != t.numel():
        return _unknown(f"output {tuple(o.shape)} and target {tuple(t.shape)} have different sizes")
    rows_sum_to_one = (
        o.shape == t.shape
        and o.dim() >= 2
        and o.shape[-1] >= 2
        and bool(t.min() >= 0)
        and bool(((t.sum(-1) - 1).abs() < 1e-4).all())
    )
    if rows_sum_to_one:
        soft = Task(
            "multiclass", num_classes or o.shape[-1], o.reshape(-1, o.shape[-1]), t.reshape(-1, t.shape[-1]), soft=True
        )
        if not _binary_values(t):
            return soft
        if loss is not None and "bce_with_logits" in matching(loss, candidate_losses(soft)):
            return Task("multilabel", None, o.reshape(-1), t.reshape(-1))
        return soft
    if _binary_values(t):
        kind = "multilabel" if t.dim() >= 2 and t.shape[-1] > 1 else "binary"
        return Task(kind, None, o.reshape(-1), t.reshape(-1))
    return Task("regression", None, o.reshape(-1), t.reshape(-1))


def candidate_losses(task: Task) -> dict[str, float]:
    """The losses a user is likely to compute on this output and target, by name."""
    z, y = task.outputs, task.targets
    if z is None or y is None or z.numel() == 0:
        return {}
    out: dict[str, float] = {}
    with torch.no_grad():
        if task.kind == "multiclass" and not task.soft:
            if int(y.min()) < 0 or int(y.max()) >= z.shape[-1]:
                return {}
            logp = F.log_softmax(z, dim=-1)
            out["cross_entropy"] = float(-logp.gather(1, y[:, None]).mean())
            out["uniform_cross_entropy"] = float(-logp.mean())  # the label-smoothing term
            out["nll_loss"] = float(-z.gather(1, y[:, None]).mean())
            # multi-label style scoring of class ids (one-hot targets made inside the loss)
            out["one_hot_bce_with_logits"] = float(
                F.binary_cross_entropy_with_logits(z, F.one_hot(y, z.shape[-1]).to(z.dtype))
            )
            if bool((z > 0).all()):
                out["nll_of_log"] = float(-z.log().gather(1, y[:, None]).mean())
        elif task.kind == "multiclass":
            logp = F.log_softmax(z, dim=-1)
            out["cross_entropy"] = float(-(y * logp).sum(-1).mean())
            out["bce_with_logits"] = float(F.binary_cross_entropy_with_logits(z, y))
            if bool((z > 0).all()):
                out["nll_of_log"] = float(-(y * z.log()).sum(-1).mean())
        elif task.kind in ("binary", "multilabel"):
            out["bce_with_logits"] = float(F.binary_cross_entropy_with_logits(z, y))
            if bool((z >= 0).all() and (z <= 1).all()):
                out["bce"] = float(F.binary_cross_entropy(z, y))
            out["mse"] = float(F.mse_loss(z, y))
        elif task.kind == "regression":
            mse = float(F.mse_loss(z, y))
            out["mse"] = mse
            out["rmse"] = math.sqrt(mse)
            out["l1"] = float(F.l1_loss(z, y))
            out["smooth_l1"] = float(F.smooth_l1_loss(z, y))
    n = z.shape[0]
    for name in ("cross_entropy", "bce_with_logits", "mse", "l1"):
        if name in out and n > 1:
            out[f"{name}_summed"] = out[name] * n
    return out


def close(a: float, b: float, rtol: float = MATCH_RTOL) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-6


def matching(loss: float | None, candidates: dict[str, float], rtol: float = MATCH_RTOL) -> list[str]:
    """Names of the candidates equal to ``loss``; ``"-name"`` when the loss is its negative."""
    if loss is None or not math.isfinite(loss):
        return []
    found = [name for name, value in candidates.items() if close(loss, value, rtol)]
    found += [f"-{name}" for name, value in candidates.items() if value > 1e-6 and close(loss, -value, rtol)]
    return found


def label_smoothing(loss: float, candidates: dict[str, float]) -> float | None:
    """The label smoothing that reproduces ``loss`` from cross-entropy, when one in (0, 0.5] does.

    With smoothing e, the loss is ``(1 - e) * CE + e * uniform_CE``; one equation, one unknown,
    so it is only trusted when the two terms differ clearly (outputs far from uniform).
    """
    ce, uniform = candidates.get("cross_entropy"), candidates.get("uniform_cross_entropy")
    if ce is None or uniform is None or abs(uniform - ce) < 0.05:
        return None
    eps = (loss - ce) / (uniform - ce)
    return eps if 0.0 < eps <= 0.5 else None


def correct_fraction(task: Task) -> float | None:
    """The fraction of samples (elements, for multi-label) the output gets right, or ``None``."""
    z, y = task.outputs, task.targets
    if z is None or y is None or z.numel() == 0 or not task.is_classification:
        return None
    with torch.no_grad():
        if task.kind == "multiclass":
            labels = y.argmax(-1) if task.soft else y
            return float((z.argmax(-1) == labels).float().mean())
        threshold = 0.5 if bool((z >= 0).all() and (z <= 1).all()) else 0.0
        return float(((z > threshold).float() == y).float().mean())


__all__ = [
    "IGNORE_INDEX",
    "MATCH_RTOL",
    "Task",
    "align_classes",
    "candidate_losses",
    "close",
    "correct_fraction",
    "infer_task",
    "is_integer",
    "label_smoothing",
    "matching",
]
