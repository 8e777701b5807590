"""Judges of a model's answers on a fixed probe batch: collapse, instability, stagnation.

Each judge takes the history of :class:`ProbeReading` (host-side numbers, one per probe,
oldest first) and returns a :class:`~flightcheck.checks.Verdict`, or ``None`` while the run
looks healthy. A judge speaks only when its condition held on ``patience`` probes in a row
and the latest of them is past the warm-up: a freshly initialised model often gives one
answer to everything, and one probe is anecdote. The training loss is read as a gate, never
alone: answers that stop changing while the loss is low are a converged model, answers that
keep flipping while the loss still falls are a model still learning.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

from flightcheck.checks import Verdict
from flightcheck.findings import Severity

# ---------------------------------------------------------------------------- thresholds

#: Collapse: at least this share of the probe's answers is one answer. "If a model doesn't
#: learn, it predicts the same thing most of the time"; 95% leaves room for a model that
#: has learned a rare class exists.
COLLAPSE_TOP_SHARE = 0.95
#: ... and the answers outside that one are fewer than this fraction of the labels outside
#: the majority label: a probe whose labels are 90% background may fairly be answered 97%
#: background, not 100%. This is what keeps class-imbalanced probes quiet.
COLLAPSE_MINORITY_RATIO = 0.25
#: Labels must be diverse enough to judge: at least this share outside the majority label
#: (4 of 32 samples). A probe of one class (a validation set sorted by class) says nothing,
#: and on a heavily imbalanced one answering the majority is the prior, not a collapse.
COLLAPSE_MIN_LABEL_MINORITY = 0.1
#: Without labels a probe is collapsed only when every answer is the same one.
COLLAPSE_UNLABELLED_TOP_SHARE = 1.0
#: A probe of fewer answers is not judged for collapse: four samples can agree by chance.
COLLAPSE_MIN_ANSWERS = 8
#: Regression: predictions spread across inputs less than this fraction of the targets'
#: spread (for calibrated predictions, an R^2 below 0.25%: the model answers the mean).
COLLAPSE_SPREAD_RATIO = 0.05
#: Classification: a collapse whose one answer switches class from probe to probe (more
#: than this share of the answers changed since the previous probe; two collapsed probes
#: agree on nearly every answer or on nearly none, so the midpoint splits them) is a model
#: at the label prior with near-uniform outputs, its argmax flipping. A sound model sits
#: there before it breaks symmetry (a GRU measured 90 steps of 250, one answer for 4 probes
#: in a row), so such a collapse must hold for twice the patience; a settled one (dead
#: units, a constant output, the majority class) keeps its answer and is reported at once.
COLLAPSE_MAX_CHURN = 0.5

#: The loss counts as flat when the median of the window's interval losses is less than this
#: fraction below the median of the window before. Collapse and instability are judged only
#: on a flat loss: a model still learning fast passes through a one-answer phase (language
#: models predicting the commonest token) and through a phase of many changing answers.
FLAT_LOSS_IMPROVEMENT = 0.05

#: An answer is one the model is sure of when its probability is at least this far from chance
#: towards certainty (3 classes: p >= 0.67; binary: p >= 0.75).
CONFIDENT_MARGIN = 0.5
#: Instability: at least this share of answers changes between consecutive probes from one
#: answer the model was sure of to another it is sure of, on most probes of the window. A
#: healthy model flips the answers near its decision boundary, unsure ones (a slow learner can
#: flip a third of them); a learning rate too high throws confident answers around wholesale.
INSTABILITY_MIN_CHURN = 0.2
#: ... for regression: the RMS change between probes is this fraction of the targets' spread.
INSTABILITY_MIN_REGRESSION_CHURN = 0.25

#: Stagnation: fewer than this share of answers changes between probes (regression: RMS
#: change under this fraction of the targets' spread) ...
STAGNATION_MAX_CHURN = 0.01
#: ... while the loss is less than this fraction below its initial value (a model that has
#: learned, even to a high floor set by noisy labels, has moved its loss further).
STAGNATION_MAX_LOSS_IMPROVEMENT = 0.1
#: ... and the answers agree with the probe's labels no better than this far from the trivial
#: answer to perfect (skill: (accuracy - majority share) / (1 - majority share); regression:
#: R^2). A fine-tuned model that starts good and stays put, or one converged on noisy labels
#: (40% noise on 3 classes still scores ~0.55), is doing its job; an untrained one scores ~0.
STAGNATION_MAX_SKILL = 0.5
#: Without a loss or labels: the answers differ from the first probe's by less than this.
STAGNATION_MAX_DRIFT = 0.05

#: Consecutive probes a condition must hold on before it is reported (and must be absent on
#: before a reported problem counts as cleared).
DEFAULT_PATIENCE = 3


@dataclasses.dataclass(frozen=True)
class ProbeReading:
    """The figures of one prediction of the probe batch.

    Args:
        step: the trainer's global step.
        task: ``multiclass``, ``multilabel`` or ``regression``.
        answers: how many answers the probe judged (samples, pixels or tokens).
        churn: change since the previous probe (share of changed answers; regression: RMS
            change over the reference spread); ``None`` on the first probe.
        drift: change since the first probe, in the same units.
        diversity: entropy of the answers over ``ln C`` (mean over labels for multi-label);
            regression: ``spread / reference_spread``.
        confidence: mean probability of the model's own answers.
        confident_churn: the share of answers that changed between two answers the model was
            sure of (see :data:`CONFIDENT_MARGIN`); ``None`` without probabilities.
        loss: mean training loss since the previous probe, ``None`` when unknown.
        skill: how well the answers agree with the probe's labels, from 0 (no better than
            always giving the majority label) to 1 (all correct): ``(accuracy - majority share)
            / (1 - majority share)``; regression: R^2. ``None`` without labels.
        top_share: per group (one for multi-class, one per label for multi-label) the share of
            the most common answer.
        label_top_share: the same for the probe's labels, ``None`` without labels.
        top_answer: the most common class (multi-class), for messages.
        spread: regression: how much the predictions differ across inputs.
        reference_spread: regression: the targets' spread, else the widest prediction spread seen.
        reference: what ``reference_spread`` is: ``"targets"`` or ``"peak"`` (the widest seen).
    """

    step: int
    task: str
    answers: int = 0
    churn: float | None = None
    drift: float | None = None
    diversity: float | None = None
    confidence: float | None = None
    confident_churn: float | None = None
    loss: float | None = None
    skill: float | None = None
    top_share: tuple[float, ...] = ()
    label_top_share: tuple[float, ...] | None = None
    top_answer: int | None = None
    spread: float | None = None
    reference_spread: float | None = None
    reference: str = "targets"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def relative_improvement(before: float | None, after: float | None) -> float | None:
    """``(before - after) / max(|before|, |after|)``: positive when the loss fell. Scaled by
    the larger magnitude so losses near or below zero (log-likelihoods) stay comparable."""
    if not (_finite(before) and _finite(after)):
        return None
    scale = max(abs(before), abs(after), 1e-12)  # type: ignore[arg-type]
    return (before - after) / scale  # type: ignore[operator]


# ---------------------------------------------------------------------------- per probe
def collapsed_groups(r: ProbeReading) -> tuple[int, int]:
    """``(collapsed, judged)``: how many answer groups give one answer to every input, of
    those whose labels are diverse enough to judge (regression: one group)."""
    if r.task == "regression":
        if not (_finite(r.spread) and _finite(r.reference_spread)) or not r.reference_spread:
            return 0, 0
        return int(r.spread < COLLAPSE_SPREAD_RATIO * r.reference_spread), 1  # type: ignore[operator]
    if not r.top_share or r.answers < COLLAPSE_MIN_ANSWERS:
        return 0, 0
    if r.label_top_share is None:
        return sum(t >= COLLAPSE_UNLABELLED_TOP_SHARE for t in r.top_share), len(r.top_share)
    collapsed = judged = 0
    for top, label_top in zip(r.top_share, r.label_top_share):
        label_minority = 1.0 - label_top
        if label_minority < COLLAPSE_MIN_LABEL_MINORITY:
            continue
        judged += 1
        if top >= COLLAPSE_TOP_SHARE and (1.0 - top) < COLLAPSE_MINORITY_RATIO * label_minority:
            collapsed += 1
    return collapsed, judged


def is_collapsed(r: ProbeReading) -> bool:
    """Every judged group of answers gives (nearly) the same answer to every input."""
    collapsed, judged = collapsed_groups(r)
    return judged > 0 and collapsed == judged


def instability_churn(r: ProbeReading) -> float | None:
    """The churn instability is judged on: between confident answers when probabilities are
    known, else all answers (regression: the RMS change)."""
    return r.confident_churn if r.confident_churn is not None else r.churn


def is_unstable(r: ProbeReading) -> bool:
    limit = INSTABILITY_MIN_REGRESSION_CHURN if r.task == "regression" else INSTABILITY_MIN_CHURN
    churn = instability_churn(r)
    return _finite(churn) and churn >= limit  # type: ignore[operator]


def is_still(r: ProbeReading) -> bool:
    return _finite(r.churn) and r.churn <= STAGNATION_MAX_CHURN  # type: ignore[operator]


def _trained(readings: Sequence[ProbeReading]) -> list[ProbeReading]:
    """The readings after the first (untrained) one of a probe batch."""
    return [r for r in readings if r.churn is not None]


def _window(readings: Sequence[ProbeReading], patience: int, warmup_steps: int) -> list[ProbeReading] | None:
    """The last ``patience`` trained readings, once the latest is past the warm-up."""
    trained = _trained(readings)
    if len(trained) < patience or trained[-1].step < warmup_steps:
        return None
    return trained[-patience:]


def _losses(readings: Sequence[ProbeReading]) -> list[float]:
    return [float(r.loss) for r in readings if _finite(r.loss)]  # type: ignore[arg-type]


def loss_medians(readings: Sequence[ProbeReading], patience: int = DEFAULT_PATIENCE) -> tuple[float, float] | None:
    """``(before, now)``: the median interval loss of the last ``patience`` trained readings and
    of the ``patience`` before them (the window's first against the rest when there are none
    before). Medians, because one interval of small noisy batches can sit far from its
    neighbours. ``None`` when the loss is unknown."""
    trained = _trained(readings)
    recent = _losses(trained[-patience:])
    earlier = _losses(trained[-2 * patience : -patience])
    if not earlier:
        if len(recent) < 2:
            return None
        earlier, recent = recent[:1], recent[1:]
    if not recent:
        return None
    return statistics.median(earlier), statistics.median(recent)


def loss_improvement(readings: Sequence[ProbeReading], patience: int = DEFAULT_PATIENCE) -> float | None:
    """The relative improvement of :func:`loss_medians` (positive: the loss fell)."""
    medians = loss_medians(readings, patience)
    return None if medians is None else relative_improvement(*medians)


def _steps(window: Sequence[ProbeReading]) -> str:
    return f"steps {window[0].step}-{window[-1].step}"


# ---------------------------------------------------------------------------- judges
def prediction_collapse(
    readings: Sequence[ProbeReading], *, warmup_steps: int = 0, patience: int = DEFAULT_PATIENCE
) -> Verdict | None:
    """The model gives (nearly) the same answer to every input of the probe, on ``patience``
    probes in a row, past the warm-up, with the loss no longer improving. A classifier whose
    one answer switches class between probes needs twice the patience (:data:`COLLAPSE_MAX_CHURN`)."""
    window = _window(readings, patience, warmup_steps)
    if window is None or not all(is_collapsed(r) for r in window):
        return None
    if window[-1].task != "regression" and any(
        _finite(r.churn) and r.churn > COLLAPSE_MAX_CHURN for r in window[1:]  # type: ignore[operator]
    ):
        # The one answer switches class: the prior phase a sound model passes through, unless it lasts.
        window = _window(readings, 2 * patience, warmup_steps)
        if window is None or not all(is_collapsed(r) for r in window):
            return None
    improvement = loss_improvement(readings, patience)
    if improvement is not None and improvement >= FLAT_LOSS_IMPROVEMENT:
        return None  # still learning fast: a one-answer phase, not (yet) a collapse
    last = window[-1]
    still = " and its answers have hardly changed since the first probe" if (
        _finite(last.drift) and last.drift <= STAGNATION_MAX_DRIFT  # type: ignore[operator]
    ) else ""
    data = {
        "steps": [r.step for r in window],
        "top_share": list(last.top_share),
        "label_top_share": None if last.label_top_share is None else list(last.label_top_share),
        "loss_improvement": improvement,
        "drift": last.drift,
    }
    if last.task == "regression":
        ratio = last.spread / last.reference_spread  # type: ignore[operator]
        versus = "the targets do" if last.reference == "targets" else "they did at their most varied"
        message = (
            f"The model's predictions differ across the probe's {last.answers} inputs only {ratio:.1%} as much "
            f"as {versus}, over {len(window)} probes ({_steps(window)}){still}."
        )
        data.update(spread=last.spread, reference_spread=last.reference_spread, spread_ratio=ratio)
        causes = (
            "the model answers the mean target for every input: its input does not reach the output "
            "(a detached or zeroed branch, a bug in the forward pass)",
            "learning rate too high: hidden units died or saturated and the output is now constant",
            "targets on a scale the output cannot reach (unnormalised targets, a bounded output activation)",
        )
        advice = (
            "overfit a single batch: if even that gives one value, the forward pass ignores its input",
            "lower the learning rate and check for dead units (ActivationMonitor)",
            "standardise the targets and check the output layer has no squashing activation",
        )
    else:
        collapsed, judged = collapsed_groups(last)
        if last.task == "multilabel" and judged > 1:
            message = (
                f"The model gives the same yes/no answer to at least {min(last.top_share):.0%} of the probe's "
                f"{last.answers} inputs on every one of its {judged} judged labels over {len(window)} probes "
                f"({_steps(window)}){still}."
            )
        else:
            what = f"class {last.top_answer}" if last.task == "multiclass" and last.top_answer is not None else "one answer"
            labels = (
                ""
                if last.label_top_share is None
                else f", while {1 - last.label_top_share[0]:.0%} of the probe's labels are other answers"
            )
            message = (
                f"The model gives {what} for {last.top_share[0]:.0%} of the probe's {last.answers} answers "
                f"over {len(window)} probes ({_steps(window)}){labels}{still}."
            )
        causes = (
            "the model ignores its input and answers the most frequent or most rewarded class "
            "(strong class imbalance, class weights, a loss that favours one answer)",
            "labels that do not match their inputs (shuffled or loaded separately), so the label "
            "frequencies are all there is to learn",
            "learning rate too high: hidden units died or saturated and the output is now constant",
            "the input does not reach the output (a detached or zeroed branch, a bug in the forward pass)",
        )
        advice = (
            "overfit a single batch: if even that gives one answer, the forward pass ignores its input",
            "look at a few inputs next to their labels, and at the class balance and loss weights",
            "lower the learning rate and check for dead units (ActivationMonitor)",
        )
    return Verdict(
        "prediction_collapse", Severity.WARNING, message, causes=causes, advice=advice, target="probe", data=data
    )


def prediction_instability(
    readings: Sequence[ProbeReading], *, warmup_steps: int = 0, patience: int = DEFAULT_PATIENCE
) -> Verdict | None:
    """Confident answers keep changing between probes (in most of the last ``patience``
    probes) after the loss has stopped improving. Without a loss there is no telling a model
    still learning from an unstable one, and nothing is judged; a collapsed model whose one
    answer flips is reported as a collapse."""
    window = _window(readings, patience, warmup_steps)
    if window is None:
        return None
    if sum(is_unstable(r) for r in window) * 2 <= len(window):
        return None  # a median over the window: one quiet probe between close steps does not clear it
    if all(is_collapsed(r) for r in window):
        return None
    churns = [float(r.churn) for r in window]  # type: ignore[arg-type]
    judged = [float(instability_churn(r)) for r in window]  # type: ignore[arg-type]
    medians = loss_medians(readings, patience)
    improvement = None if medians is None else relative_improvement(*medians)
    if medians is None or improvement is None or improvement >= FLAT_LOSS_IMPROVEMENT:
        return None
    typical = statistics.median(judged)
    if window[-1].task == "regression":
        moved = f"the probe's predictions moved by {typical:.0%} of their expected spread between probes"
    elif window[-1].confident_churn is not None:
        moved = (
            f"{typical:.0%} of the probe's answers flipped from one confident answer to another between probes "
            f"({statistics.median(churns):.0%} changed in all)"
        )
    else:
        moved = f"{typical:.0%} of the probe's answers changed between probes"
    message = (
        f"Typically {moved}, over {patience} probes ({_steps(window)}), while the training loss "
        f"stopped falling (median {medians[0]:.4g} -> {medians[1]:.4g})."
    )
    return Verdict(
        "prediction_instability",
        Severity.WARNING,
        message,
        causes=(
            "learning rate too high: each update jumps past the minimum and rewrites the answers",
            "batches too small or too noisy: each step follows a different few samples",
            "noisy or contradictory labels (the same input labelled differently)",
        ),
        advice=(
            "lower the learning rate, or add warm-up and a decay schedule",
            "increase the batch size or accumulate gradients; clip gradient norms",
            "check the labels for duplicates with different labels",
        ),
        target="probe",
        data={
            "steps": [r.step for r in window],
            "churn": churns,
            "confident_churn": [r.confident_churn for r in window],
            "loss_before": medians[0],
            "loss_now": medians[1],
            "loss_improvement": improvement,
        },
    )


def prediction_stagnation(
    readings: Sequence[ProbeReading],
    *,
    initial_loss: float | None,
    warmup_steps: int = 0,
    patience: int = DEFAULT_PATIENCE,
) -> Verdict | None:
    """The answers have stopped changing while the loss is still near where it started.

    ``initial_loss`` is the loss before training had moved the weights far (the mean of the
    first few steps'); the current loss is the median over the window. Without any loss the
    answers must instead still be close to the untrained model's (``drift``).
    """
    window = _window(readings, patience, warmup_steps)
    if window is None or not all(is_still(r) for r in window):
        return None
    last = window[-1]
    if _finite(last.skill) and last.skill > STAGNATION_MAX_SKILL:  # type: ignore[operator]
        return None  # settled on good answers: converged, or fine-tuned from a good start
    losses = _losses(window)
    current = statistics.median(losses) if losses else None
    improvement = relative_improvement(initial_loss, current)
    if improvement is not None:
        if improvement >= STAGNATION_MAX_LOSS_IMPROVEMENT:
            return None  # converged (or learned down to a noise floor): healthy
        if improvement >= 0.005:
            where = f"only {improvement:.0%} below where it started"
        elif improvement <= -0.005:
            where = f"{-improvement:.0%} above where it started"
        else:
            where = "still where it started"
        loss = f" while the training loss is {where} ({initial_loss:.4g} -> {current:.4g})"
    elif _finite(last.drift) and last.drift <= STAGNATION_MAX_DRIFT:  # type: ignore[operator]
        loss = f" and they differ from the untrained model's by {last.drift:.1%}"
    else:
        return None
    if _finite(last.skill):
        loss += f", its answers scoring {last.skill:.2f} against the labels (0: no better than the majority class, 1: all right)"
    churns = [float(r.churn) for r in window]  # type: ignore[arg-type]
    if last.task == "regression":
        moved = f"the probe's predictions moved by at most {max(churns):.2%} of their expected spread between probes"
    else:
        moved = f"at most {max(churns):.1%} of the probe's answers changed between probes"
    return Verdict(
        "prediction_stagnation",
        Severity.WARNING,
        f"Over {patience} probes ({_steps(window)}) {moved}{loss}.",
        causes=(
            "learning rate too low, or a schedule that has already decayed it to nearly zero",
            "parameters frozen or missing from the optimizer (requires_grad=False, wrong param groups)",
            "gradients cut off before the weights (detach, torch.no_grad, a non-differentiable step)",
            "manual optimisation that never calls optimizer.step()",
        ),
        advice=(
            "log the learning rate (LearningRateMonitor) and check its value and schedule",
            "check which parameters require grad and are in the optimizer's param groups",
            "overfit a single batch: the loss should fall within a few dozen steps",
        ),
        target="probe",
        data={
            "steps": [r.step for r in window],
            "churn": churns,
            "initial_loss": initial_loss,
            "loss": current,
            "loss_improvement": improvement,
            "drift": last.drift,
            "skill": last.skill,
        },
    )


__all__ = [
    "COLLAPSE_MAX_CHURN",
    "COLLAPSE_MINORITY_RATIO",
    "COLLAPSE_MIN_ANSWERS",
    "CONFIDENT_MARGIN",
    "COLLAPSE_MIN_LABEL_MINORITY",
    "COLLAPSE_SPREAD_RATIO",
    "COLLAPSE_TOP_SHARE",
    "COLLAPSE_UNLABELLED_TOP_SHARE",
    "DEFAULT_PATIENCE",
    "FLAT_LOSS_IMPROVEMENT",
    "INSTABILITY_MIN_CHURN",
    "INSTABILITY_MIN_REGRESSION_CHURN",
    "ProbeReading",
    "STAGNATION_MAX_CHURN",
    "STAGNATION_MAX_DRIFT",
    "STAGNATION_MAX_LOSS_IMPROVEMENT",
    "STAGNATION_MAX_SKILL",
    "collapsed_groups",
    "is_collapsed",
    "is_still",
    "instability_churn",
    "is_unstable",
    "loss_improvement",
    "loss_medians",
    "prediction_collapse",
    "prediction_instability",
    "prediction_stagnation",
    "relative_improvement",
]
