"""Loss checks: ``overfit_batch``, ``init_loss``, ``output_activation``.

The judges are pure functions of numbers (a loss curve, a loss value, an output and a target);
the registered checks read them from the pre-flight context.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from flightcheck.checks import Verdict
from flightcheck.preflight.context import PreflightContext
from flightcheck.preflight.overfit import OVERFIT_TARGET_FRACTION, OverfitRun
from flightcheck.preflight.registry import Skip, register
from flightcheck.preflight.task import (
    Task,
    candidate_losses,
    infer_task,
    matching,
)

# --------------------------------------------------------------------------- overfit_batch
#: Fewer steps than this (a time budget too short for the model) cannot tell a curve's shape.
MIN_JUDGED_STEPS = 5
#: A loss that climbs more than this many times its starting magnitude, or goes non-finite, explodes.
EXPLODE_FACTOR = 10.0
#: The loss ends (median of its last fifth) more than this fraction of its start above it: it rises.
RISE_TOLERANCE = 0.1
#: A fall of this fraction of the starting loss within the budget is learning, even if short of
#: the target: a learning rate tuned for a long run is not a bug.
PROGRESS_FRACTION = 0.3
#: Below that, a loss that still falls steadily counts as learning, slowly (a small learning rate);
#: one that stalls is a plateau. "Steadily": it falls on this share of steps, or its linear trend
#: is this many standard errors below zero (noisy steps: augmentation inside the step) ...
STEADY_SHARE = 0.8
STEADY_TREND_T = 3.0
#: ... and it is not levelling off: its last third falls at least this fraction of its first's.
STEADY_RATE_RATIO = 0.25
#: Oscillation: the path the loss travels is this many times its net change, with swings over
#: :data:`SWING_FRACTION` of the starting loss and a change of direction on :data:`REVERSAL_SHARE` of steps.
OSCILLATION_PATH_RATIO = 3.0
SWING_FRACTION = 0.05
REVERSAL_SHARE = 0.3
#: Accuracy falling by this much, or the task's own error (cross-entropy, MSE of the outputs)
#: rising by this fraction, while the loss falls, means the loss is being maximised.
ACCURACY_DROP = 0.25
ERROR_RISE = 0.5

#: What each failing curve usually means (after the overfit-one-batch advice of practitioners'
#: debugging guides), most likely first.
CURVE_CAUSES: dict[str, tuple[str, ...]] = {
    "maximised": ("a flipped sign in the loss or the gradient (the optimiser maximises the error)",),
    "rises": (
        "a flipped sign in the loss or the gradient (the optimiser maximises the error)",
        "a learning rate far too high",
        "softmax taken over the wrong dimension",
    ),
    "explodes": (
        "a numerical problem: an exp, log or division that overflows or divides by zero",
        "a learning rate far too high",
    ),
    "oscillates": (
        "a learning rate too high for this model",
        "inputs and labels that do not line up (shuffled separately, zeroed or mis-preprocessed)",
    ),
    "plateaus": (
        "no gradient reaching the model (a detach, .data, .item() or torch.no_grad in the path)",
        "a learning rate too low",
        "too much regularisation (weight decay, a penalty term dominating the loss)",
        "the wrong input to the loss: probabilities where it wants logits, or a ReLU on the output",
        "corrupted inputs or labels",
    ),
}
CURVE_ADVICE: dict[str, tuple[str, ...]] = {
    "maximised": ("check the sign of the loss and of any custom gradient",),
    "rises": (
        "check the sign of the loss and any custom gradient",
        "lower the learning rate 10x",
        "check the dimension of every softmax/log_softmax",
    ),
    "explodes": (
        "guard exp/log/division with clamps or their stable forms (log_softmax, logsumexp)",
        "lower the learning rate 10x",
        "try gradient clipping",
    ),
    "oscillates": ("lower the learning rate 10x", "check that each input is paired with its own label"),
    "plateaus": (
        "see the gradient_flow row: every trainable parameter should get a gradient",
        "raise the learning rate 10x for this test",
        "remove regularisation while debugging",
        "feed raw logits to cross-entropy losses",
    ),
}


def classify_curve(
    losses: Sequence[float],
    correct: Sequence[float | None] = (),
    errors: Sequence[float | None] = (),
    target_fraction: float = OVERFIT_TARGET_FRACTION,
) -> tuple[str, dict[str, float]]:
    """Name the shape of an overfit loss curve.

    Args:
        losses: the loss before each step (then after the last).
        correct: the share of right answers at each point (classification), when known.
        errors: the task's own error at each point (cross-entropy, MSE computed from the
            outputs), when known: a loss that falls while it rises is being maximised.

    Returns ``(kind, figures)`` with ``kind`` one of ``reached``, ``falling``, ``slow``,
    ``short`` (passing) or ``explodes``, ``maximised``, ``oscillates``, ``rises``, ``plateaus``
    (failing; ``maximised`` is a rising error behind a falling loss). The categories are
    exclusive and tested in that order. Losses may be negative.
    """
    if not losses:
        return "short", {"steps": 0}
    start = float(losses[0])
    if not math.isfinite(start):
        return "explodes", {"start": start, "nonfinite_at_step": 0.0}
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    finite = list(losses[:bad]) if bad is not None else list(losses)
    n = len(finite)
    scale = max(abs(start), 1e-8)
    peak = max(finite)
    figures = {"start": start, "end": float(finite[-1]), "best": float(min(finite)), "max": float(peak)}
    tail = max(2, n // 5)
    end = statistics.median(finite[-tail:])
    scores = [c for c in correct[:n] if c is not None]
    errs = [e for e in errors[:n] if e is not None and math.isfinite(e)]
    if scores:
        figures["correct_start"], figures["correct_end"] = scores[0], scores[-1]
    if errs:
        figures["error_start"], figures["error_end"] = errs[0], errs[-1]
    if (
        n >= MIN_JUDGED_STEPS
        and end < start
        and (
            (scores and scores[-1] < scores[0] - ACCURACY_DROP)
            or (errs and errs[-1] > errs[0] + max(ERROR_RISE * abs(errs[0]), 0.1))
        )
    ):
        return "maximised", figures  # the loss falls (maybe to -inf) while the task's error rises
    if bad is not None:
        figures["nonfinite_at_step"] = float(bad)
        return "explodes", figures
    if peak - start > EXPLODE_FACTOR * scale:
        return "explodes", figures
    if n < MIN_JUDGED_STEPS:
        return "short", figures
    figures["end"] = float(end)
    figures["fraction_left"] = end / start if start > 0 else float("nan")
    if scores and scores[-1] == 1.0:
        return "reached", figures
    if start > 0 and min(losses) <= target_fraction * start:
        return "reached", figures
    drop = (start - end) / scale
    figures["drop"] = drop
    if drop >= PROGRESS_FRACTION:
        return "falling", figures
    diffs = [b - a for a, b in zip(losses, losses[1:])]
    path = sum(abs(d) for d in diffs)
    reversals = sum(1 for a, b in zip(diffs, diffs[1:]) if a * b < 0)
    if (
        path > OSCILLATION_PATH_RATIO * max(abs(losses[-1] - start), 1e-12)
        and max(abs(d) for d in diffs) > SWING_FRACTION * scale
        and reversals >= REVERSAL_SHARE * max(len(diffs) - 1, 1)
    ):
        return "oscillates", figures
    if end > start + RISE_TOLERANCE * scale:
        return "rises", figures
    if drop > 0 and _still_falling(losses):
        return "slow", figures
    return "plateaus", figures


def _still_falling(losses: Sequence[float]) -> bool:
    """A steady fall that has not levelled off (see :data:`STEADY_SHARE`)."""
    n = len(losses)
    diffs = [b - a for a, b in zip(losses, losses[1:])]
    falling_share = sum(1 for d in diffs if d < 0) / max(len(diffs), 1)
    xs = range(n)
    mean_x, mean_y = (n - 1) / 2, sum(losses) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, losses)) / sxx
    residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in zip(xs, losses))
    stderr = math.sqrt(residual / max(n - 2, 1) / sxx)
    steady = falling_share >= STEADY_SHARE or (slope < 0 and slope <= -STEADY_TREND_T * stderr)
    third = max(1, n // 3)
    first, middle, last = losses[:third], losses[third:-third] or losses[third:], losses[-third:]
    early = statistics.fmean(first) - statistics.fmean(middle)
    late = statistics.fmean(middle) - statistics.fmean(last)
    return steady and early > 0 and late > 0 and late >= STEADY_RATE_RATIO * early


def judge_overfit(run: OverfitRun) -> Verdict:
    kind, figures = classify_curve(run.losses, run.correct, run.errors)
    data = {
        **figures,
        "kind": kind,
        "steps": run.steps,
        "seconds": round(run.seconds, 3),
        "stopped": run.stopped,
        "learning_rates": run.learning_rates,
        "schedules": run.schedules,
        "losses": [round(v, 6) if math.isfinite(v) else v for v in run.losses],
    }
    start, end = figures.get("start", float("nan")), figures.get("end", float("nan"))
    steps = f"{run.steps} step{'s' if run.steps != 1 else ''}"
    if kind == "reached":
        # the lowest loss is what reached the target; the curve's end can have bounced back up
        best = figures.get("best", end)
        how = "every sample right" if figures.get("correct_end") == 1.0 else f"loss {start:.4g} -> {best:.4g}"
        return Verdict("overfit_batch", "info", f"fitted one batch in {steps} ({how}).", data=data)
    if kind == "falling":
        return Verdict("overfit_batch", "info", f"loss fell from {start:.4g} to {end:.4g} in {steps}.", data=data)
    if kind == "slow":
        return Verdict(
            "overfit_batch",
            "info",
            f"loss fell slowly, {start:.4g} -> {end:.4g} in {steps}; fine if the learning rate is "
            "tuned for a long run.",
            data=data,
        )
    if kind == "short":
        return Verdict(
            "overfit_batch",
            "info",
            f"only {steps} fit in the time budget, too few to judge the curve; raise max_seconds.",
            data=data,
        )
    what = {
        "rises": f"the loss rose from {start:.4g} to {end:.4g}",
        "explodes": (
            f"the loss went from {start:.4g} to non-finite values at step {int(figures['nonfinite_at_step'])}"
            if "nonfinite_at_step" in figures
            else f"the loss exploded from {start:.4g} to {figures.get('max', float('nan')):.4g}"
        ),
        "oscillates": f"the loss swung up and down without settling ({start:.4g} -> {end:.4g})",
        "plateaus": f"the loss stayed flat ({start:.4g} -> {end:.4g})",
        "maximised": f"the loss fell ({start:.4g} -> {end:.4g}) but the outputs got worse"
        + (
            f": their error rose from {figures['error_start']:.4g} to {figures['error_end']:.4g}"
            if "error_end" in figures
            else ""
        )
        + (
            f", right answers {figures['correct_start']:.0%} -> {figures['correct_end']:.0%}"
            if "correct_end" in figures
            else ""
        ),
    }[kind]
    return Verdict(
        "overfit_batch",
        "error",
        f"could not overfit one batch: {what} in {steps} with the model's own optimizer.",
        causes=CURVE_CAUSES[kind],
        advice=CURVE_ADVICE[kind],
        data=data,
    )


@register("overfit_batch", phase="fitted", summary="the model can drive the loss on one batch towards zero")
def overfit_batch(ctx: PreflightContext) -> Iterator[Verdict]:
    run = ctx.overfit
    if run.error is not None:
        if run.detached_loss:
            raise Skip("the loss does not require grad (see gradient_flow)")
        raise Skip(f"the overfit stopped: {run.error}")
    if not ctx.runner.automatic and len(ctx.trainer.optimizers) > 1:
        raise Skip(
            "manual optimisation with several optimizers (adversarial or alternating objectives "
            "have no single loss to drive to zero)"
        )
    if not run.losses:
        raise Skip("training_step reports no single loss (it returns none and calls manual_backward several times)")
    yield judge_overfit(run)


# --------------------------------------------------------------------------- init_loss
#: The initial loss may exceed what the loss predicts for an uninformed model by this many nats,
#: or this fraction of the prediction, whichever is larger, before it is called too high. A
#: default-initialised network on normalised inputs starts within ~0.3 nats of ln C; inputs a few
#: times larger spread the logits and add about a nat; an excess of 2 nats (logits spread ~2 for
#: ten classes, wrong answers ~7x more likely than under a uniform guess) is a bad start.
INIT_LOSS_EXCESS = 2.0
INIT_LOSS_EXCESS_FRACTION = 0.5
#: Regression: outputs whose mean square exceeds the targets' this many times start far off scale.
OUTPUT_SCALE_RATIO = 10.0
#: Regression: targets whose mean square is this many times their variance (|mean| ~ 10 std).
TARGET_OFFSET_RATIO = 100.0


def expected_init_loss(task: Task, match: Sequence[str] = ()) -> float | None:
    """What the loss should be for an uninformed model: ln C, ln 2, or ``None`` when unclear."""
    if task.kind == "multiclass" and task.num_classes and task.num_classes >= 2:
        if "bce_with_logits" in match:
            return math.log(2)
        return math.log(task.num_classes)
    if task.kind in ("binary", "multilabel"):
        return math.log(2)
    return None


def _too_high(loss: float, expected: float) -> bool:
    return loss > expected + max(INIT_LOSS_EXCESS, INIT_LOSS_EXCESS_FRACTION * abs(expected))


def judge_init_loss(
    loss: float | None, task: Task, *, expected: float | None = None, output: Tensor | None = None
) -> list[Verdict]:
    """Judge the loss at initialisation against what the task's loss predicts."""
    if loss is None:
        raise Skip("training_step reported no loss")
    if not math.isfinite(loss):
        return [
            Verdict(
                "init_loss",
                "error",
                f"the loss at initialisation is {loss}.",
                causes=("a log of zero or a division by zero in the loss", "non-finite inputs or targets"),
                advice=("see the nonfinite_input row", "use log_softmax / logsumexp instead of log(softmax)"),
                data={"loss": loss},
            )
        ]
    candidates = candidate_losses(task)
    match = matching(loss, candidates)
    data: dict[str, object] = {"loss": loss, "task": task.kind, "num_classes": task.num_classes, "matches": match}
    negated = [m[1:] for m in match if m.startswith("-") and m != "-uniform_cross_entropy"]
    if negated:
        return [
            Verdict(
                "init_loss",
                "error",
                f"the loss at initialisation is {loss:.4g}, exactly minus the {negated[0]} of the output: "
                "the loss has its sign flipped, so training will maximise the error.",
                causes=("a minus sign in the loss",),
                advice=("remove the minus sign",),
                data=data,
            )
        ]
    if task.is_classification and loss < -1e-6:
        return [
            Verdict(
                "init_loss",
                "error",
                f"the loss at initialisation is {loss:.4g}, but a {task.kind} classification loss cannot be negative.",
                causes=("a flipped sign in the loss", "probabilities handed to NLLLoss (see output_activation)"),
                advice=("check the sign of every term of the loss",),
                data=data,
            )
        ]
    summed = [m for m in match if m.endswith("_summed")]
    if summed and expected is None:
        n = task.outputs.shape[0] if task.outputs is not None else 0
        return [
            Verdict(
                "init_loss",
                "warning",
                f"the loss at initialisation is {loss:.4g}, {n} times the mean {summed[0][:-7]}: "
                "the loss is summed over the batch, so its scale (and the step size) grows with the batch size.",
                causes=("reduction='sum' in the loss",),
                advice=("use reduction='mean', or scale the learning rate down",),
                data=data,
            )
        ]
    if expected is not None:
        data["expected"] = expected
        tolerance = max(INIT_LOSS_EXCESS, INIT_LOSS_EXCESS_FRACTION * abs(expected))
        if abs(loss - expected) > tolerance:
            return [
                Verdict(
                    "init_loss",
                    "warning",
                    f"the loss at initialisation is {loss:.4g}; you expected {expected:.4g} (tolerance {tolerance:.2g}).",
                    causes=("an initialisation other than intended", "a loss other than intended"),
                    advice=("check the last layer's initialisation and the loss's arguments",),
                    data=data,
                )
            ]
        return []
    predicted = expected_init_loss(task, match)
    if predicted is not None:
        data["expected"] = predicted
        if _too_high(loss, predicted):
            spread = _logit_spread(task)
            data["logit_std"] = spread
            base = f"ln {task.num_classes}" if task.kind == "multiclass" and predicted != math.log(2) else "ln 2"
            return [
                Verdict(
                    "init_loss",
                    "warning",
                    f"the loss at initialisation is {loss:.4g}, far above {base} = {predicted:.3g} for an uninformed "
                    f"{task.kind} model: the outputs start confidently wrong"
                    + (f" (logit spread {spread:.3g})." if spread is not None else "."),
                    causes=(
                        "inputs not normalised, so the first layers produce large activations",
                        "a last layer initialised with too large weights",
                        "a loss that is not averaged over the batch",
                    ),
                    advice=(
                        "normalise the inputs (see input_scale)",
                        "initialise the last layer with small weights (or zeros) and its bias to the class priors",
                    ),
                    data=data,
                )
            ]
        return []
    if task.kind == "regression":
        return _judge_regression_init(loss, task, match, data)
    raise Skip(
        f"cannot tell what the initial loss should be ({task.reason or task.kind}); "
        "pass num_classes= or expected_init_loss= to Preflight"
    )


def _logit_spread(task: Task) -> float | None:
    z = task.outputs
    if z is None or z.dim() != 2 or z.shape[-1] < 2:
        return None
    return float(z.std(dim=-1).mean())


def _judge_regression_init(loss: float, task: Task, match: list[str], data: dict[str, object]) -> list[Verdict]:
    if "mse" not in match and "l1" not in match and "smooth_l1" not in match and "rmse" not in match:
        return []  # a loss this check does not recognise: nothing it can say
    z, y = task.outputs, task.targets
    assert z is not None and y is not None
    mean_square_y = float((y * y).mean())
    variance_y = float(y.var()) if y.numel() > 1 else 0.0
    mean_square_z = float((z * z).mean())
    data.update(target_mean=float(y.mean()), target_std=variance_y**0.5, output_rms=mean_square_z**0.5)
    if mean_square_z > OUTPUT_SCALE_RATIO * max(mean_square_y, 1e-12):
        return [
            Verdict(
                "init_loss",
                "warning",
                f"the loss at initialisation is {loss:.4g}: the outputs start with RMS {mean_square_z ** 0.5:.3g}, "
                f"far larger than the targets' {mean_square_y ** 0.5:.3g}.",
                causes=("unnormalised inputs", "a last layer initialised with large weights"),
                advice=("normalise the inputs", "initialise the last layer with small weights"),
                data=data,
            )
        ]
    if variance_y > 0 and mean_square_y > TARGET_OFFSET_RATIO * variance_y:
        return [
            Verdict(
                "init_loss",
                "warning",
                f"the loss at initialisation is {loss:.4g}, dominated by the targets' offset: they have mean "
                f"{float(y.mean()):.4g} but spread {variance_y ** 0.5:.3g}, and the model starts near zero.",
                causes=("targets that are not standardised",),
                advice=(
                    "standardise the targets (and undo it at prediction time)",
                    "or initialise the output bias to the targets' mean",
                ),
                data=data,
            )
        ]
    return []


@register("init_loss", phase="initial", summary="the loss at initialisation is what the loss function predicts")
def init_loss(ctx: PreflightContext) -> list[Verdict]:
    record = ctx.initial
    return judge_init_loss(record.loss, ctx.task, expected=ctx.options.expected_init_loss, output=record.output)


# --------------------------------------------------------------------------- output_activation
#: Rows within this of summing to one are probability vectors (softmax output in float32).
SIMPLEX_ATOL = 1e-3
#: Ops whose outputs are probabilities (autograd node names, lower-cased, without "Backward").
SQUASHING_OPS = frozenset({"sigmoid", "softmax", "hardsigmoid"})
#: Ops whose outputs are log-probabilities (all <= 0): a loss on logits reads them as "never positive".
LOG_PROBABILITY_OPS = frozenset({"logsoftmax", "logsigmoid"})
#: Outputs at exactly zero on at least this share of entries look rectified (a ReLU on the output).
RECTIFIED_SHARE = 0.25

_SOFTMAX_TWICE = Verdict(
    "output_activation",
    "error",
    "",
    causes=("a softmax at the end of the model, before a loss that applies softmax itself",),
    advice=(
        "return raw logits from the model and let cross_entropy apply log_softmax",
        "or keep the softmax and use nll_loss(torch.log(p)) (less stable)",
    ),
)



def _log_probabilities(z: Tensor, producer: str | None) -> bool:
    """Whether the outputs are log-probabilities. Logits are negative everywhere only by accident,
    so the op that made them must be a log-softmax / log-sigmoid, or (op unknown) each row must
    be an exact log-probability vector."""
    if not bool((z <= 0).all()):
        return False
    return producer in LOG_PROBABILITY_OPS if producer is not None else _is_log_simplex(z)


def _log_probabilities_into_bce(loss: float, when: str, producer: str | None, data: dict) -> Verdict:
    # Log-probabilities are all <= 0, so a loss on logits reads every one as "class absent"
    # (sigmoid <= 0.5): the positives can never be predicted and the loss floors high.
    return Verdict(
        "output_activation",
        "error",
        f"the outputs are log-probabilities (all <= 0, made by {producer or 'a log-softmax'}) and the loss "
        f"{loss:.4g} is binary_cross_entropy_with_logits on them {when}: every output reads as "
        "probability <= 0.5, so the positive labels can never be predicted.",
        causes=("log_softmax / log_sigmoid at the end of the model before a loss that wants raw logits",),
        advice=(
            "return raw logits to binary_cross_entropy_with_logits",
            "for single-label classes, use cross_entropy on logits (or nll_loss on log_softmax)",
        ),
        data=data,
    )

def judge_output_activation(
    output: Tensor | None,
    target: Tensor | None,
    loss: float | None,
    num_classes: int | None = None,
    when: str = "at initialisation",
    producer: str | None = None,
) -> Verdict | None:
    """Say whether the output is handed to a loss that expects something else.

    Only speaks when a loss formula computed on the captured output reproduces the reported
    loss, so a model whose loss this check does not recognise is left alone.

    Args:
        producer: the op that computed the output (``StepRecord.producer``, e.g. ``"sigmoid"``
            or ``"addmm"``), or ``None`` when unknown; a known non-squashing op clears
            outputs that merely lie in [0, 1] of being probabilities.
    """
    if output is None or target is None or loss is None or not math.isfinite(loss):
        return None
    task = infer_task(output, target, num_classes, loss)
    if not task.is_classification or task.outputs is None:
        return None
    z = task.outputs
    candidates = candidate_losses(task)
    match = set(matching(loss, candidates))
    data = {"loss": loss, "matches": sorted(match), "when": when, "task": task.kind}
    if task.kind == "multiclass":
        raw = output.detach().float()
        if _is_simplex(z, -1):
            if "cross_entropy" in match and "nll_of_log" not in match:
                return _with(
                    _SOFTMAX_TWICE,
                    f"the outputs are already probabilities (non-negative, rows sum to 1) "
                    f"and the loss {loss:.4g} is cross-entropy applied to them as logits {when}: softmax is "
                    "applied twice, which caps the gradient and keeps the loss from falling.",
                    data,
                )
            if "nll_loss" in match:
                return Verdict(
                    "output_activation",
                    "error",
                    f"the outputs are probabilities and the loss {loss:.4g} is nll_loss on them {when}; "
                    "nll_loss expects log-probabilities.",
                    causes=("a softmax output handed to nll_loss without a log",),
                    advice=("end the model with log_softmax, or return logits and use cross_entropy",),
                    data=data,
                )
        elif _log_probabilities(z, producer) and "one_hot_bce_with_logits" in match and "cross_entropy" not in match:
            return _log_probabilities_into_bce(loss, when, producer, data)
        elif raw.dim() == 2 and raw.shape[0] > 1 and raw.shape[0] != raw.shape[1] and _is_simplex(raw, 0):
            return Verdict(
                "output_activation",
                "error",
                f"the outputs sum to 1 down each column, over the {raw.shape[0]} samples of the batch, not "
                "across the classes: softmax is taken over the batch dimension.",
                causes=("softmax(dim=0) or a default dim where the batch comes first",),
                advice=("use softmax/log_softmax with dim=-1 (or drop it and feed logits to cross_entropy)",),
                data=data,
            )
        elif not _is_log_simplex(z) and "nll_loss" in match and "cross_entropy" not in match:
            return Verdict(
                "output_activation",
                "error",
                f"the loss {loss:.4g} is nll_loss on raw outputs {when}, but they are not log-probabilities "
                "(their exponentials do not sum to 1): nll_loss on logits is unbounded below.",
                causes=("logits handed to nll_loss / NLLLoss",),
                advice=("use cross_entropy on the logits, or apply log_softmax first",),
                data=data,
            )
    else:
        # Logits of a healthy one-logit model can all land in [0, 1] by chance (a bias near 0.5,
        # small weights), and then bce_with_logits "matches" on them as surely as on sigmoid outputs.
        # The range is no evidence; the op that made the outputs is. When autograd recorded it, only
        # a squashing op counts; when it did not (producer None), the range and the loss must do.
        inside = bool((z >= 0).all() and (z <= 1).all())
        squashed = producer is None or producer in SQUASHING_OPS
        if (
            inside
            and squashed
            and not bool(((z == 0) | (z == 1)).all())
            and "bce_with_logits" in match
            and "bce" not in match
        ):
            return Verdict(
                "output_activation",
                "error",
                f"the outputs are already probabilities (all in [0, 1]) and the loss {loss:.4g} is "
                f"binary_cross_entropy_with_logits on them {when}: the sigmoid is applied twice.",
                causes=("a sigmoid at the end of the model before a loss that applies it itself",),
                advice=(
                    "return raw logits and keep binary_cross_entropy_with_logits",
                    "or keep the sigmoid and use binary_cross_entropy",
                ),
                data=data,
            )
        if _log_probabilities(z, producer) and "bce_with_logits" in match:
            return _log_probabilities_into_bce(loss, when, producer, data)
    zeros = float((z == 0).float().mean())
    if (
        bool((z >= 0).all())
        and zeros >= RECTIFIED_SHARE
        and not _is_simplex(z, -1)
        and _mixed_rows(z) >= RECTIFIED_SHARE
    ):
        data["zero_share"] = zeros
        return Verdict(
            "output_activation",
            "warning",
            f"{zeros:.0%} of the outputs are exactly zero and none is negative {when}: the output layer "
            "looks rectified (a ReLU after the last layer), so those logits get no gradient.",
            causes=("an activation (ReLU) after the final layer",),
            advice=("remove the activation after the last layer; losses on logits want the raw values",),
            data=data,
        )
    return None


def _mixed_rows(z: Tensor) -> float:
    """Share of rows holding both an exact zero and a positive value: what a ReLU leaves behind
    (a constant initialisation gives rows that are all zero or all equal instead)."""
    if z.dim() < 2:
        return 1.0
    return float(((z == 0).any(-1) & (z > 0).any(-1)).float().mean())


def _is_simplex(p: Tensor, dim: int) -> bool:
    return p.numel() > 0 and bool((p >= -1e-6).all()) and bool(((p.sum(dim) - 1).abs() <= SIMPLEX_ATOL).all())


def _is_log_simplex(z: Tensor) -> bool:
    return bool((z <= 1e-6).all()) and bool((torch.logsumexp(z, dim=-1).abs() <= SIMPLEX_ATOL).all())


def _with(template: Verdict, message: str, data: dict[str, object]) -> Verdict:
    return Verdict(
        template.check, template.severity, message, causes=template.causes, advice=template.advice, data=data
    )


@register(
    "output_activation",
    phase="fitted",
    summary="outputs are the kind of values the loss expects (logits, probabilities, log-probabilities)",
)
def output_activation(ctx: PreflightContext) -> Iterator[Verdict]:
    """Judged on the fitted outputs (far from uniform, so formulas differ clearly), else at init."""
    initial = ctx.initial
    records = [(initial, "at initialisation")]
    try:
        records.insert(0, (ctx.fitted, "after overfitting"))
    except Skip:
        pass
    if ctx.target is None:
        raise Skip("no target was found in the batch (name it with Preflight(target=...))")
    # Outputs that leave [0, 1] once fitted were never probabilities, whatever they were at init.
    fitted = records[0][0] if len(records) == 2 else None
    escapes = (
        fitted is not None
        and fitted.output is not None
        and torch.is_floating_point(fitted.output)
        and bool(((fitted.output < 0) | (fitted.output > 1)).any())
    )
    for record, when in records:
        producer = record.producer
        if producer is None and escapes:
            producer = "unbounded"
        verdict = judge_output_activation(
            record.output, ctx.target, record.loss, ctx.options.num_classes, when, producer=producer
        )
        if verdict is not None:
            yield verdict
            return


__all__ = [
    "CURVE_CAUSES",
    "classify_curve",
    "expected_init_loss",
    "judge_init_loss",
    "judge_output_activation",
    "judge_overfit",
]
