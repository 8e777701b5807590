"""Judges of loss curves: divergence, spikes, oscillation, plateau, over- and underfitting.

Every judge is a pure function of ``(steps, values)`` series that returns a
:class:`~flightcheck.checks.Verdict` or ``None``; :class:`CurveWatch` adds what a single
look cannot: a warm-up, confirmation over consecutive evaluations and escalation of a
persisting problem. :func:`diagnose` gives the whole-run diagnosis. The
:class:`~flightcheck.LossCurveMonitor` callback and ``flightcheck analyze`` share all of it,
so a run judged live and the same run read back from TensorBoard get the same answer.

The shapes follow the field's "overfit a single batch" table: an error that goes up or
explodes (``loss_divergence``), oscillates (``loss_oscillation``) or plateaus
(``loss_plateau``), each with its usual causes. A curve gets at most one of these at a
time, in that order: a diverging run is not also called a plateau.

Scales: losses can be negative (log-likelihoods), so nothing is divided by a loss value.
Rises and swings are measured against the progress the curve has made (initial level minus
best level) and against its own point-to-point noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from flightcheck.checks import Verdict
from flightcheck.findings import Severity
from flightcheck.signals.curves import (
    MEDIAN_SE_FACTOR,
    ArrayLike,
    SeriesBuffer,
    best_index,
    finite_series,
    level_noise,
    level_shift,
    noise_scale,
    relative_progress,
    repeating_pattern,
    running_median,
    slope_z,
    smoothing_width,
    theil_sen,
)

# ----------------------------------------------------------------------------- thresholds
# Series shape.
#: points averaged (median) for the initial level: a few steps, before much is learned.
INITIAL_POINTS = 5
#: points whose noise stands for the untrained model's batch-to-batch differences.
EARLY_POINTS = 20
#: the fewest judged points (after warm-up) for any verdict about a curve's shape.
MIN_POINTS = 8
#: the judged window is the last half of the points after warm-up, at least MIN_POINTS and at
#: most this many, so it follows the run's own time scale rather than a fixed step count.
MAX_WINDOW = 2048
#: z-score for "the level moved". Loss noise is autocorrelated (the weights drift), which
#: makes naive z-scores optimistic; 3 keeps false trends rare and real ones are far larger.
TREND_Z = 3.0

# loss_divergence: "error goes up / explodes".
#: a rise counts once it undoes this fraction of the progress made (initial level − best level).
DIVERGENCE_RISE_FRACTION = 0.25
#: ... exceeds this many batch-to-batch noise widths (for runs that rose from the start) ...
DIVERGENCE_RISE_NOISE = 3.0
#: ... and this many standard errors of the two levels (measured on the curve's own blocks,
#: so wandering noise counts). The best level is the minimum of a smoothed curve, biased
#: low by noise, hence a margin above TREND_Z.
DIVERGENCE_Z = 4.0

#: for a loss never below zero, a rise must also be this fraction of the way from the initial
#: level to zero: a flat curve's drift by a fraction of a percent is no divergence however
#: quiet its batches are.
DIVERGENCE_SMALL_FRACTION = 0.05
#: A loss that runs off below zero: the fall over the latest quarter of the run at least this
#: fraction of the fall over the quarter before (healthy curves slow down far more) ...
RUNAWAY_PACE = 0.5
#: ... after falling this many times its initial magnitude (or noise width).
RUNAWAY_FALL = 5.0

# loss_spike: one step far above its neighbours.
#: neighbours a step is compared with: a long memory, so that the ordinary tail of small
#: batches (one hard sample in a batch of one) is part of what a spike must dwarf.
SPIKE_CONTEXT = 256
#: ... and at least this many of them.
SPIKE_MIN_CONTEXT = 32
#: a spike stands this many inter-quartile ranges above the neighbours' median (~11 σ for
#: Gaussian noise), ...
SPIKE_SPREADS = 8.0
#: ... twice as far above it as the worst of the neighbours (mini-batch losses are
#: heavy-tailed; a spike must dwarf the tail that is already there), ...
SPIKE_OVER_TAIL = 2.0
#: ... and undoes at least half of the progress made.
SPIKE_PROGRESS = 0.5
#: spikes in one look that make an error: the run is being knocked back again and again.
SPIKE_ERROR_COUNT = 3
#: A lone spike after which the loss is back at once is information (one hard sample in a
#: batch of one does that); it is a warning when the next SPIKE_AFTERMATH points stay raised
#: by SPIKE_KNOCK of the jump: the update it caused knocked the run back.
SPIKE_AFTERMATH = 8
SPIKE_KNOCK = 0.1

# loss_oscillation: "large swings around the trend, not ordinary mini-batch noise".
#: points needed to see a period at all (three periods of up to a third of them) ...
OSCILLATION_MIN_POINTS = 32
#: ... and the most looked at (periods up to ~170 points; keeps each look to milliseconds).
OSCILLATION_MAX_POINTS = 512
#: autocorrelation at the period. Noise from shuffled batches stays below ~0.3 at every lag
#: (measured on small MLPs with batches of 1 to 64, SGD and Adam, with warm-up and decay);
#: a zig-zag, a per-epoch pattern or a corrupted batch every k steps reach 0.7 to 0.9.
OSCILLATION_PERIODIC = 0.5
#: the repeating pattern (peak to trough) must be at least this fraction of the progress
#: made to be worth a warning.
OSCILLATION_PROGRESS_RATIO = 0.1

# loss_plateau: "no real progress after warm-up while far from the floor".
#: judged points after warm-up before a plateau is called: a slow start is not a plateau, and
#: a slow steady fall (0.05% of the loss a step under 5% batch noise) needs ~100 points to
#: show itself.
PLATEAU_MIN_POINTS = 96
#: even weak evidence that the loss is falling (a trend z-score below −2) defers the call.
PLATEAU_FALLING_Z = 2.0
#: with a known floor, the loss is "far" from it while this fraction of the initial gap remains.
PLATEAU_REMAINING = 0.5
#: a learning rate below this fraction of its peak has stopped learning (schedulers that end a
#: run decay to ~0 by design, hence LR_COLLAPSE_REMAINING) ...
LR_COLLAPSE_RATIO = 1e-3
#: ... when at least this fraction of the planned steps is still to come.
LR_COLLAPSE_REMAINING = 0.25
#: without a floor, the loss is stuck when it has come down by less than one batch-to-batch
#: noise width (the quieter of the start's and now's): no progress a user would see. Sound
#: small-batch runs on hard data measured 1.6 widths and up; frozen or label-shuffled runs
#: and learning rates of 1e-6 measured 0.1 to 1.8.
PLATEAU_NOISE_WIDTHS = 1.0
#: ... or, for a loss never below zero, by under a tenth of the way from its start to zero
#: while under three noise widths (a learning rate of 1e-5 on a small MLP: 7%, 2.2 widths),
#: or under a twentieth of it at any noise (a zero-initialised net drifting by 0.2%: quiet
#: batches make any drift many noise widths).
PLATEAU_SMALL_FRACTION = 0.1
PLATEAU_SMALL_NOISE_WIDTHS = 3.0
PLATEAU_TINY_FRACTION = 0.05

# overfitting.
#: validation evaluations after the best one before the rise is believed (early stopping's
#: patience). A rise must hold over all of them, so it is its own confirmation: CurveWatch
#: reports it at once rather than one more validation interval later. A stalled validation
#: with a widening gap is weaker evidence and still waits for CONFIRM evaluations.
OVERFIT_PATIENCE = 2
#: the rise must undo this fraction of what validation gained from the untrained model's loss
#: (or of the training progress since, when validation never improved). Validation
#: cross-entropy creeps up late in many sound runs as the model grows confident; a fifth of
#: the gain is a rise a practitioner would stop the run for.
OVERFIT_RISE_FRACTION = 0.2
#: ... and exceed this many validation-noise widths.
OVERFIT_RISE_NOISE = 3.0
#: a rise that undoes this fraction of what validation gained is an error, not a warning.
OVERFIT_ERROR_FRACTION = 0.5
#: a stalled validation loss is overfitting when training fell by this fraction of its whole
#: progress since validation's best (the generalisation gap widened that much).
OVERFIT_GAP_FRACTION = 0.25

# underfitting.
#: with a target error, avoidable bias above this fraction of the initial-to-target distance.
UNDERFIT_BIAS_FRACTION = 0.1

# CurveWatch.
#: consecutive evaluations that must see a problem before it is reported.
CONFIRM = 2
#: consecutive evaluations after which a persisting warning becomes an error.
ESCALATE_AFTER = 8

# ----------------------------------------------------------------------------- wording
_CAUSES = {
    "loss_divergence": (
        "learning rate too high",
        "a flipped sign somewhere in the loss or the gradient",
        "softmax / log_softmax taken over the wrong dimension",
        "a numerical problem in an exp, log or division (when the loss explodes)",
    ),
    "loss_oscillation": (
        "learning rate too high",
        "data or labels corrupted (zeroed, wrongly shuffled or preprocessed)",
        "batches not shuffled, so each batch holds one kind of sample",
    ),
    "loss_plateau": (
        "learning rate too low",
        "gradients not flowing through the whole model (frozen or detached layers, dead units)",
        "too much regularization",
        "wrong input to the loss (probabilities instead of logits, a ReLU on the output)",
        "data or labels corrupted",
    ),
    "loss_spike": (
        "a corrupted or mislabelled batch",
        "learning rate too high for this part of the loss surface",
        "a numerical problem in an exp, log or division",
    ),
    "overfitting": (
        "too little training data for the model's size",
        "too little regularization",
        "training past the point where validation stopped improving",
    ),
    "underfitting": (
        "model too small for the task",
        "too much regularization",
        "learning rate or optimizer not tuned",
        "training too short",
    ),
}
_ADVICE = {
    "loss_divergence": (
        "lower the learning rate (e.g. 10x) or add a warm-up",
        "clip gradients",
        "check the loss's sign and the dimension of softmax/log_softmax",
    ),
    "loss_oscillation": (
        "lower the learning rate or use larger batches",
        "check that the training loader shuffles",
        "look at a few batches with their labels",
    ),
    "loss_plateau": (
        "raise the learning rate (try a learning-rate range test)",
        "check that every layer gets a gradient (GradientMonitor)",
        "reduce weight decay or dropout",
        "pass raw logits to the loss",
        "check that a single batch can be overfit",
    ),
    "loss_spike": (
        "clip gradients",
        "lower the learning rate or add a warm-up",
        "find the batch at that step and look at it",
    ),
    "overfitting": (
        "get more training data or add data augmentation",
        "add regularization (dropout, weight decay)",
        "stop early at the best validation step",
        "use a smaller model",
    ),
    "underfitting": (
        "make the model bigger",
        "reduce regularization",
        "tune the learning rate",
        "train longer",
    ),
}
_REGULARIZATION_CAUSE = "too much regularization pulling the weights back (the loss settled at the untrained level)"
_LR_COLLAPSE_CAUSE = "the learning rate decayed to almost nothing early (a scheduler stepped per batch instead of per epoch?)"
_RUNAWAY_CAUSES = (
    "a flipped sign: the loss is maximised instead of minimised",
    "raw logits into nll_loss (log_softmax forgotten), or probabilities where log-probabilities belong",
    "labels outside the loss's range (e.g. -1/+1 into BCE, which wants 0/1)",
)
_RUNAWAY_ADVICE = (
    "check the sign of the loss and what goes into it (logits, log-probabilities, probabilities)",
    "check the labels' range against what the loss expects",
)
_VAL_DISAGREES_CAUSE = "validation data not drawn like the training data (validation never improved)"
_VAL_DISAGREES_ADVICE = "check that the validation split comes from the same source and preprocessing"


def _g(x: float) -> str:
    """A number for a message: 4 significant digits."""
    return f"{x:.4g}"


def _step(x: float) -> int:
    return int(round(float(x)))


# ----------------------------------------------------------------------------- one curve
@dataclasses.dataclass
class CurveStats:
    """What the judges read off one curve: levels, noise and the judged window.

    Built by :func:`curve_stats`; every judge of a single curve takes it, so the series is
    read once per evaluation however many checks look at it.
    """

    steps: np.ndarray
    values: np.ndarray
    start_index: int  # first point after warm-up
    initial: float  # the untrained model's loss (initial_level)
    smooth: np.ndarray  # running median of the values (smoothing_width)
    best: float  # lowest level of the smoothed curve
    best_index: int
    now: float  # median of the last points of the window
    now_points: int
    noise: float  # point-to-point noise in the window
    initial_noise: float  # point-to-point noise of the first EARLY_POINTS points (0 if too few)
    window: slice

    @property
    def judged(self) -> int:
        return self.values.size - self.start_index

    @property
    def progress(self) -> float:
        """Initial level minus the current level: what has been learned (negative: lost)."""
        return self.initial - self.now

    @property
    def best_progress(self) -> float:
        return max(self.initial - self.best, 0.0)

    def window_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.steps[self.window], self.values[self.window]


def initial_level(values: np.ndarray) -> float:
    """The untrained model's loss: the first point, or the median of the first
    :data:`INITIAL_POINTS` when lower (a noisy first batch). The first loss is computed before
    any update, so a run that explodes in its first steps keeps its true starting level."""
    return float(min(values[0], np.median(values[: min(INITIAL_POINTS, values.size)])))


def curve_stats(steps: ArrayLike, values: ArrayLike, *, start_step: float = 0.0) -> CurveStats | None:
    """Levels and noise of a curve; ``None`` when fewer than :data:`MIN_POINTS` points follow
    ``start_step`` (the end of warm-up)."""
    s, v = finite_series(steps, values)
    if v.size == 0:
        return None
    start = int(np.searchsorted(s, start_step, side="left"))
    judged = v.size - start
    if judged < MIN_POINTS:
        return None
    width = int(np.clip(judged // 2, MIN_POINTS, MAX_WINDOW))
    window = slice(v.size - width, v.size)
    wv = v[window]
    now_points = int(np.clip(width // 8, 3, 64))
    smooth = running_median(v, smoothing_width(v.size))
    bi = int(np.argmin(smooth))
    return CurveStats(
        steps=s,
        values=v,
        start_index=start,
        initial=initial_level(v),
        smooth=smooth,
        best=float(smooth[bi]),
        best_index=bi,
        now=float(np.median(wv[-now_points:])),
        now_points=now_points,
        noise=noise_scale(wv),
        initial_noise=noise_scale(v[:EARLY_POINTS]) if v.size >= EARLY_POINTS // 2 else 0.0,
        window=window,
    )


def _stats(steps: ArrayLike | CurveStats, values: ArrayLike | None, start_step: float) -> CurveStats | None:
    if isinstance(steps, CurveStats):
        return steps
    assert values is not None
    return curve_stats(steps, values, start_step=start_step)


def loss_divergence(
    steps: ArrayLike | CurveStats,
    values: ArrayLike | None = None,
    *,
    start_step: float = 0.0,
    target: str = "train_loss",
) -> Verdict | None:
    """A sustained rise: the loss climbed well above its best level and is still climbing,
    or has climbed back above where it started.

    The rise must be significant (:data:`DIVERGENCE_Z` standard errors of the two levels),
    undo :data:`DIVERGENCE_RISE_FRACTION` of the progress made, and exceed
    :data:`DIVERGENCE_RISE_NOISE` batch-to-batch noise widths. Warning; error when the loss
    is worse than at the start by as much as it had ever learned (it explodes).
    """
    st = _stats(steps, values, start_step)
    if st is None:
        return None
    runaway = _runaway(st, target)
    if runaway is not None:
        return runaway
    after_best = st.values.size - 1 - st.best_index
    if after_best < MIN_POINTS:
        return None
    rise = st.now - st.best
    noise = max(st.noise, 1e-12)
    ws, wv = st.window_arrays()
    width = smoothing_width(st.values.size)
    se = math.hypot(level_noise(wv, width), level_noise(wv, st.now_points))
    calm = _calm_noise(st)
    needed = max(
        DIVERGENCE_RISE_FRACTION * st.best_progress,
        DIVERGENCE_RISE_NOISE * calm,
        DIVERGENCE_Z * se,
        DIVERGENCE_SMALL_FRACTION * _distance_to_zero(st),
    )
    if rise <= 0 or rise < needed:  # a flat curve (zero noise, zero rise) is not a rise
        return None
    seg_s = st.steps[st.best_index + 1 :][-MAX_WINDOW:]
    seg_v = st.values[st.best_index + 1 :][-MAX_WINDOW:]
    change, z = slope_z(seg_s, seg_v, noise=max(noise_scale(seg_v), 1e-12))
    still_rising = change > 0 and z >= TREND_Z
    above_start = st.now - st.initial >= DIVERGENCE_RISE_NOISE * calm
    if not (still_rising or above_start):
        return None
    exploded = st.now - st.initial >= max(st.best_progress, DIVERGENCE_RISE_NOISE * calm)
    best_step = _step(st.steps[st.best_index])
    causes = _CAUSES["loss_divergence"]
    if exploded:
        message = (
            f"{target} rose from its best {_g(st.best)} (step {best_step}) to {_g(st.now)}, "
            f"above its initial {_g(st.initial)}: the run has lost everything it learned."
        )
        if not still_rising:
            causes = causes + (_REGULARIZATION_CAUSE,)
    elif st.best_progress > 0:
        message = (
            f"{target} has been rising since step {best_step}: from its best {_g(st.best)} to {_g(st.now)}, "
            f"undoing {rise / st.best_progress:.0%} of the progress made."
        )
    else:
        message = f"{target} has been rising since step {best_step}: from {_g(st.best)} to {_g(st.now)}."
    return Verdict(
        "loss_divergence",
        Severity.ERROR if exploded else Severity.WARNING,
        message,
        causes=causes,
        advice=_ADVICE["loss_divergence"],
        target=target,
        data={
            "initial": st.initial,
            "best": st.best,
            "best_step": best_step,
            "now": st.now,
            "rise": rise,
            "noise": st.noise,
            "trend_z": z,
            "began_step": best_step,
        },
    )


def _distance_to_zero(st: CurveStats) -> float:
    """For a loss never below zero, the distance from its initial level to zero: zero bounds
    its floor from below, so this bounds from above how far it can fall. 0 otherwise."""
    return st.initial if st.initial > 0 and float(np.min(st.values)) >= 0.0 else 0.0


def _runaway(st: CurveStats, target: str) -> Verdict | None:
    """A loss falling ever faster, far below zero: it has no floor, so training minimises
    the wrong thing (a flipped sign, logits where log-probabilities belong, labels outside
    the loss's range). Healthy curves slow down as they fall; this one does not."""
    v, s = st.values, st.steps
    if v.size < 2 * MIN_POINTS or st.now >= 0.0:
        return None
    quarter = max(v.size // 4, 2)
    recent_fall = float(np.median(v[-2 * quarter : -quarter]) - np.median(v[-quarter:]))
    earlier_fall = float(np.median(v[:quarter]) - np.median(v[-2 * quarter : -quarter]))
    fall = st.initial - st.now
    yardstick = max(abs(st.initial), _calm_noise(st), 1e-12)
    if not (recent_fall > 0 and recent_fall >= RUNAWAY_PACE * earlier_fall and fall >= RUNAWAY_FALL * yardstick):
        return None
    began = _step(s[int(np.flatnonzero(v < st.initial - yardstick)[0])]) if np.any(v < st.initial - yardstick) else _step(s[0])
    return Verdict(
        "loss_divergence",
        Severity.ERROR,
        f"{target} keeps falling without slowing down, from {_g(st.initial)} to {_g(st.now)}: "
        "a loss with no floor is being minimised, so training optimises the wrong thing.",
        causes=_RUNAWAY_CAUSES,
        advice=_RUNAWAY_ADVICE,
        target=target,
        data={"initial": st.initial, "now": st.now, "recent_fall": recent_fall, "earlier_fall": earlier_fall,
              "shape": "runaway_fall", "began_step": began},
    )


def loss_spike(
    steps: ArrayLike | CurveStats,
    values: ArrayLike | None = None,
    *,
    start_step: float = 0.0,
    since_step: float | None = None,
    target: str = "train_loss",
) -> Verdict | None:
    """Single points far above their neighbours, looked for after ``since_step``.

    A spike stands :data:`SPIKE_SPREADS` inter-quartile ranges above the median of up to
    :data:`SPIKE_CONTEXT` previous points, :data:`SPIKE_OVER_TAIL` times as far as the worst
    of them, and undoes at least :data:`SPIKE_PROGRESS` of the progress made. Three or more
    in one look are an error.
    """
    st = _stats(steps, values, start_step)
    if st is None:
        return None
    v, s = st.values, st.steps
    lo = max(st.start_index, SPIKE_MIN_CONTEXT)
    if since_step is not None:
        lo = max(lo, int(np.searchsorted(s, since_step, side="right")))
    if lo >= v.size:
        return None
    # Only a point above every one of its neighbours can be a spike: find those cheaply first.
    prev_max = np.array([v[max(i - SPIKE_CONTEXT, 0) : i].max() for i in range(lo, v.size)])
    hits: list[tuple[int, float, float, float]] = []  # (index, value, median, jump in IQRs)
    for i in np.flatnonzero(v[lo:] > prev_max) + lo:
        context = v[max(i - SPIKE_CONTEXT, 0) : i]
        q1, med, q3 = np.quantile(context, [0.25, 0.5, 0.75])
        jump = v[i] - med
        spread = max(q3 - q1, 1e-12)
        if (
            jump >= SPIKE_SPREADS * spread
            and jump >= SPIKE_OVER_TAIL * (context.max() - med)
            and jump >= SPIKE_PROGRESS * max(st.initial - med, 0.0)
        ):
            hits.append((int(i), float(v[i]), float(med), jump / spread))
    if not hits:
        return None
    worst = max(hits, key=lambda h: h[1] - h[2])
    count = len(hits)
    spike_step = _step(s[worst[0]])
    # Did the spike knock the run back? The points after it stay raised if so.
    after = v[worst[0] + 1 : worst[0] + 1 + SPIKE_AFTERMATH]
    knocked = after.size > 0 and float(np.median(after)) - worst[2] >= SPIKE_KNOCK * (worst[1] - worst[2])
    if count >= SPIKE_ERROR_COUNT:
        severity = Severity.ERROR
    elif count > 1 or knocked:
        severity = Severity.WARNING
    else:
        severity = Severity.INFO
    times = "" if count == 1 else f" ({count} spikes since step {_step(s[lo])})"
    message = (
        f"{target} spiked to {_g(worst[1])} at step {spike_step}, {worst[3]:.0f} "
        f"inter-quartile ranges above its recent median {_g(worst[2])}{times}."
    )
    return Verdict(
        "loss_spike",
        severity,
        message,
        causes=_CAUSES["loss_spike"],
        advice=_ADVICE["loss_spike"],
        target=target,
        data={
            "value": worst[1],
            "median": worst[2],
            "spike_step": spike_step,
            "count": count,
            "spike_steps": [_step(s[h[0]]) for h in hits[:20]],
            "began_step": _step(s[hits[0][0]]),
        },
    )


def loss_oscillation(
    steps: ArrayLike | CurveStats,
    values: ArrayLike | None = None,
    *,
    start_step: float = 0.0,
    target: str = "train_loss",
) -> Verdict | None:
    """Swings that repeat with a period, large against the progress made.

    Ordinary mini-batch noise from shuffled data does not repeat itself; a learning rate past
    the stability limit zig-zags (period 2), a loader that does not shuffle repeats every
    epoch, a corrupted batch every k steps repeats every k. Needs
    :data:`OSCILLATION_MIN_POINTS` judged points, an autocorrelation of at least
    :data:`OSCILLATION_PERIODIC` at the period, and a repeating pattern (peak to trough of
    its per-phase medians) of at least :data:`OSCILLATION_PROGRESS_RATIO` of the progress made.
    """
    st = _stats(steps, values, start_step)
    if st is None:
        return None
    ws, wv = st.window_arrays()
    ws, wv = ws[-OSCILLATION_MAX_POINTS:], wv[-OSCILLATION_MAX_POINTS:]
    if wv.size < OSCILLATION_MIN_POINTS:
        return None
    period, strength, swing = repeating_pattern(wv, OSCILLATION_PERIODIC)
    if period == 0:
        return None
    progress = max(st.progress, 0.0)
    if swing <= 0.0 or swing < OSCILLATION_PROGRESS_RATIO * progress:
        return None
    began = _step(ws[0])
    if period == 2:
        shape = "zig-zags from one step to the next"
    else:
        spacing = float(np.median(np.diff(ws))) if ws.size > 1 else 1.0
        shape = f"repeats every {period * spacing:.0f} steps"
    message = (
        f"{target} swings by {_g(swing)} and {shape} (autocorrelation {strength:.2f}) since step {began}; "
        f"it has come down {_g(progress)} in all."
    )
    return Verdict(
        "loss_oscillation",
        Severity.WARNING,
        message,
        causes=_CAUSES["loss_oscillation"],
        advice=_ADVICE["loss_oscillation"],
        target=target,
        data={
            "swing": swing,
            "progress": progress,
            "period_points": period,
            "autocorrelation": strength,
            "began_step": began,
        },
    )


def _calm_noise(st: CurveStats) -> float:
    """Batch-to-batch noise when the run was calm: the smaller of the start's and now's.

    A run that goes unstable inflates its recent noise; a classifier's loss differs little
    from batch to batch before it learns and much more once a small-batch run has learned.
    Either way the smaller one is the yardstick of ordinary mini-batch noise."""
    return min(st.noise, st.initial_noise) if st.initial_noise > 0 else st.noise


def _no_progress(st: CurveStats) -> tuple[bool, float]:
    """Whether the curve is practically no lower now than at its start; returns the progress
    in batch-to-batch noise widths.

    Stuck means progress (since the first points, or between the first and last thirds)
    under :data:`PLATEAU_NOISE_WIDTHS` noise widths; or, for a loss that has never been
    negative, under :data:`PLATEAU_TINY_FRACTION` of the way from the initial loss to zero,
    or under :data:`PLATEAU_SMALL_FRACTION` of it and :data:`PLATEAU_SMALL_NOISE_WIDTHS`
    noise widths. (Zero bounds such a loss's floor from below, so these fractions understate
    the progress toward the real floor.)
    """
    calm = max(_calm_noise(st), 1e-12)
    drop, _ = level_shift(st.values, noise=st.noise)
    first_third = float(np.median(st.values[: max(st.values.size // 3, 1)]))
    # The thirds steady a noisy start, unless the early run was worse than its start (it blew
    # up first): then only the start itself says where the run began.
    start = float(np.median(st.values[:INITIAL_POINTS]))
    blew_up_first = first_third > max(start, st.initial) + PLATEAU_NOISE_WIDTHS * calm
    progress = st.progress if blew_up_first else max(st.progress, -drop)
    widths = progress / calm
    if widths <= PLATEAU_NOISE_WIDTHS:
        return True, widths
    to_zero = _distance_to_zero(st)
    small = progress <= PLATEAU_TINY_FRACTION * to_zero or (
        progress <= PLATEAU_SMALL_FRACTION * to_zero and widths <= PLATEAU_SMALL_NOISE_WIDTHS
    )
    return small, widths


def loss_plateau(
    steps: ArrayLike | CurveStats,
    values: ArrayLike | None = None,
    *,
    start_step: float = 0.0,
    floor: float | None = None,
    lr_collapsed_step: float | None = None,
    target: str = "train_loss",
) -> Verdict | None:
    """No real progress after warm-up while the loss is still far from its floor.

    The window must not be falling (Theil–Sen trend z-score below :data:`TREND_Z`). With a
    known ``floor`` (the lowest reachable loss, e.g. ``0`` for cross-entropy without label
    smoothing) the loss is far from it while :data:`PLATEAU_REMAINING` of the initial gap
    remains. Without one, a curve that has flattened may simply have converged, so the
    plateau must be at the starting level: no significant progress since the first steps.
    With ``lr_collapsed_step`` (see :func:`lr_collapsed`), a flat window after it is a
    plateau wherever the loss stands: learning stopped because the steps did.
    """
    st = _stats(steps, values, start_step)
    if st is None or st.judged < PLATEAU_MIN_POINTS:
        return None
    # The window: the last half of the judged points, but never fewer than PLATEAU_MIN_POINTS
    # (a slow steady fall needs that many points to show).
    recent = slice(max(st.values.size - max(st.judged // 2, PLATEAU_MIN_POINTS), st.start_index), st.values.size)
    ws, wv = st.steps[recent], st.values[recent]
    change, z = slope_z(ws, wv, noise=max(st.noise, 1e-12))
    if z <= -PLATEAU_FALLING_Z:
        return None  # still coming down, if slowly: not a plateau
    causes = _CAUSES["loss_plateau"]
    if lr_collapsed_step is not None and ws[0] >= lr_collapsed_step:
        progress = float("nan")
        detail = f"the learning rate fell below {LR_COLLAPSE_RATIO:g} of its peak at step {_step(lr_collapsed_step)}"
        causes = (_LR_COLLAPSE_CAUSE,) + causes
    elif floor is not None:
        progress = relative_progress(st.initial, st.now, floor)
        if not (math.isfinite(progress) and 1.0 - progress >= PLATEAU_REMAINING):
            return None
        detail = f"{1.0 - progress:.0%} of the way from its initial {_g(st.initial)} to its floor {_g(floor)} remains"
    else:
        stuck, _ = _no_progress(st)
        if not stuck:
            return None
        progress = float("nan")
        detail = f"no lower than its initial {_g(st.initial)}"
    began = _plateau_start(st)
    message = f"{target} has made no real progress since step {began}: it stays near {_g(st.now)}, {detail}."
    return Verdict(
        "loss_plateau",
        Severity.WARNING,
        message,
        causes=causes,
        advice=_ADVICE["loss_plateau"],
        target=target,
        data={
            "initial": st.initial,
            "now": st.now,
            "floor": floor,
            "lr_collapsed_step": lr_collapsed_step,
            "progress": progress,
            "window_change": change,
            "trend_z": z,
            "noise": st.noise,
            "began_step": began,
        },
    )


def lr_below_collapse(lr: float, peak_lr: float) -> bool:
    """Whether ``lr`` is at or below :data:`LR_COLLAPSE_RATIO` of ``peak_lr``.

    "At" allows for rounding: a multiplicative schedule reaches the boundary as a product of
    factors (``1e-3 * 0.1 * 0.1 * 0.1`` is ``1.0000000000000002e-06``, not ``1e-06``).
    """
    limit = LR_COLLAPSE_RATIO * peak_lr
    return lr <= limit or math.isclose(lr, limit, rel_tol=1e-9)


def lr_collapsed(lr: float, peak_lr: float, step: float, planned_steps: float | None) -> bool:
    """Whether the learning rate has fallen to almost nothing with much of the run to go:
    below :data:`LR_COLLAPSE_RATIO` of its peak with :data:`LR_COLLAPSE_REMAINING` of the
    planned steps left (a decay to zero at the very end, by design, does not count)."""
    if not (peak_lr > 0 and planned_steps and math.isfinite(planned_steps) and planned_steps > 0):
        return False
    return lr_below_collapse(lr, peak_lr) and 1.0 - step / planned_steps >= LR_COLLAPSE_REMAINING


def _plateau_start(st: CurveStats) -> int:
    """The step after which the smoothed curve stayed within a noise band of its current level."""
    smooth = st.smooth
    band = max(TREND_Z * st.noise, 1e-12)
    outside = np.flatnonzero(np.abs(smooth - st.now) > band)
    idx = 0 if outside.size == 0 else min(int(outside[-1]) + 1, st.values.size - 1)
    return _step(st.steps[idx])


def classify_train_curve(
    steps: ArrayLike | CurveStats,
    values: ArrayLike | None = None,
    *,
    start_step: float = 0.0,
    since_step: float | None = None,
    floor: float | None = None,
    periodic_schedule: bool = False,
    lr_collapsed_step: float | None = None,
    target: str = "train_loss",
) -> list[Verdict]:
    """The shape verdicts of one training curve, mutually exclusive.

    At most one of ``loss_divergence``, ``loss_oscillation``, ``loss_plateau``, in that
    order; ``loss_spike`` (new spikes after ``since_step``) unless the curve diverges.
    ``periodic_schedule=True`` (a cyclic learning rate or warm restarts) leaves out
    ``loss_oscillation``: the schedule itself makes the loss repeat.
    """
    st = _stats(steps, values, start_step)
    if st is None:
        return []
    judges = (loss_divergence,) if periodic_schedule else (loss_divergence, loss_oscillation)
    for judge in judges:
        verdict = judge(st, target=target)
        if verdict is not None:
            if verdict.check == "loss_divergence":
                return [verdict]
            return [verdict, *_spike_list(st, since_step, target)]
    verdicts = _spike_list(st, since_step, target)
    plateau = loss_plateau(st, floor=floor, lr_collapsed_step=lr_collapsed_step, target=target)
    return ([plateau] if plateau is not None else []) + verdicts


def _spike_list(st: CurveStats, since_step: float | None, target: str) -> list[Verdict]:
    spike = loss_spike(st, since_step=since_step, target=target)
    return [] if spike is None else [spike]


# ----------------------------------------------------------------------------- two curves
def best_evaluation(values: ArrayLike) -> int:
    """The index of a validation series' best (lowest) evaluation: where early stopping
    would have kept the weights (the first one on ties)."""
    return int(np.argmin(np.asarray(values, dtype=np.float64)))


def train_levels_at(
    train_steps: ArrayLike, train_values: ArrayLike, at_steps: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """``(levels, counts)``: the training loss level at each of ``at_steps`` (the median of
    the training points since the previous one, at least :data:`INITIAL_POINTS` of the latest
    points) and how many points it is the median of."""
    s, v = finite_series(train_steps, train_values)
    at = np.asarray(at_steps, dtype=np.float64)
    levels = np.full(at.size, np.nan)
    counts = np.zeros(at.size, dtype=np.int64)
    prev = -np.inf
    for i, a in enumerate(at):
        hi = int(np.searchsorted(s, a, side="right"))
        lo = min(int(np.searchsorted(s, prev, side="right")), max(hi - INITIAL_POINTS, 0))
        if hi > lo:
            levels[i] = float(np.median(v[lo:hi]))
            counts[i] = hi - lo
        prev = a
    return levels, counts


def overfitting(
    train_steps: ArrayLike,
    train_values: ArrayLike,
    val_steps: ArrayLike,
    val_values: ArrayLike,
    *,
    target: str = "val_loss",
    mode: str = "min",
) -> Verdict | None:
    """Validation getting worse while training gets better, dated from validation's best.

    Training must have improved significantly since validation's best evaluation, which
    must lie :data:`OVERFIT_PATIENCE` evaluations back. Then two shapes count: validation
    rising (warning; error once the rise undoes :data:`OVERFIT_ERROR_FRACTION` of what
    validation gained from the untrained model's loss), and validation stalled while
    training fell by :data:`OVERFIT_GAP_FRACTION` of its whole progress (a widening gap).
    ``mode="max"`` judges a validation metric that should rise (accuracy).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    vs, vv = finite_series(val_steps, val_values)
    ts, tv = finite_series(train_steps, train_values)
    if vv.size < OVERFIT_PATIENCE + 2 or tv.size < INITIAL_POINTS:
        return None
    sign = 1.0 if mode == "min" else -1.0
    val = sign * vv
    smooth = running_median(val, 3)
    smooth_best = int(np.argmin(smooth))
    bi = best_evaluation(val)
    after = val.size - 1 - bi
    if after < OVERFIT_PATIENCE:
        return None
    best = float(smooth[smooth_best])
    now = float(np.median(val[-min(3, after) :]))
    rise = now - best
    train, counts = train_levels_at(ts, tv, vs)
    if not (np.isfinite(train[bi]) and np.isfinite(train[-1])):
        return None
    train_initial = initial_level(tv)
    train_drop = float(train[bi] - train[-1])
    se_drop = MEDIAN_SE_FACTOR * noise_scale(tv[-MAX_WINDOW:]) * math.sqrt(1.0 / counts[bi] + 1.0 / counts[-1])
    if train_drop <= 0.0 or train_drop < TREND_Z * se_drop:
        return None  # training has not improved since: not overfitting (perhaps not learning at all)
    start = max(float(val[0]), train_initial) if mode == "min" else float(val[0])
    gain = max(start - best, 0.0)
    reference = gain if gain > 0 else train_drop
    val_noise = noise_scale(val, 3) if val.size >= 5 else 0.0
    never_improved = smooth_best == 0 and bi == 0
    rising = (
        rise > 0
        and rise >= OVERFIT_RISE_FRACTION * reference
        and rise >= OVERFIT_RISE_NOISE * val_noise
        and bool(np.all(val[-OVERFIT_PATIENCE:] > best))
    )
    widening = not rising and train_drop >= OVERFIT_GAP_FRACTION * max(train_initial - float(train[-1]), 0.0)
    if not (rising or widening):
        return None
    began = _step(vs[bi])  # where validation was last at its best: the early-stopping point

    def shown(x: float) -> float:  # back to the metric's own direction
        return sign * x

    best_seen = float(val[bi])  # the evaluation the user can find in their logs
    if rising:
        severity = Severity.ERROR if gain > 0 and rise >= OVERFIT_ERROR_FRACTION * gain else Severity.WARNING
        word = "rose" if mode == "min" else "fell"
        message = (
            f"{target} {word} from its best {_g(shown(best_seen))} at step {began} to {_g(shown(now))} while the "
            f"training loss fell from {_g(train[bi])} to {_g(train[-1])}: overfitting began around step {began}."
        )
    else:
        severity = Severity.WARNING
        message = (
            f"{target} has not improved on {_g(shown(best_seen))} since step {began} while the training loss fell "
            f"from {_g(train[bi])} to {_g(train[-1])}: the generalisation gap is widening."
        )
    causes = _CAUSES["overfitting"] + ((_VAL_DISAGREES_CAUSE,) if never_improved else ())
    advice = ((_VAL_DISAGREES_ADVICE,) if never_improved else ()) + _ADVICE["overfitting"]
    return Verdict(
        "overfitting",
        severity,
        message,
        causes=causes,
        advice=advice,
        target=target,
        data={
            "best": shown(best_seen),
            "best_step": began,
            "now": shown(now),
            "train_at_best": float(train[bi]),
            "train_now": float(train[-1]),
            "gap_at_best": float(shown(best) - train[bi]) if mode == "min" else None,
            "gap_now": float(shown(now) - train[-1]) if mode == "min" else None,
            "shape": "rising" if rising else "widening_gap",
            "validation_never_improved": never_improved,
            "began_step": began,
        },
    )


def underfitting(
    steps: ArrayLike | CurveStats,
    values: ArrayLike | None = None,
    *,
    start_step: float = 0.0,
    baseline: float | None = None,
    target_error: float | None = None,
    final: bool = False,
    target: str = "train_loss",
) -> Verdict | None:
    """Training error that stays high against a baseline, once the curve has levelled off
    (or at the end of the run, ``final=True``).

    Baselines, first one given wins: ``baseline`` (a trivial predictor's loss: error when the
    model is no better), ``target_error`` (human-level or irreducible error: warning when the
    avoidable bias exceeds :data:`UNDERFIT_BIAS_FRACTION` of the initial-to-target distance),
    else the initial loss (at the end of a run only: no significant progress at all).
    """
    st = _stats(steps, values, start_step)
    if st is None:
        return None
    ws, wv = st.window_arrays()
    change, z = slope_z(ws, wv, noise=max(st.noise, 1e-12))
    if not final and change < 0 and -z >= TREND_Z:
        return None  # still improving: too early to call
    se = MEDIAN_SE_FACTOR * max(st.noise, 1e-12) / math.sqrt(st.now_points)
    data: dict[str, Any] = {"now": st.now, "initial": st.initial, "baseline": baseline, "target_error": target_error}
    if baseline is not None:
        if st.now < baseline - TREND_Z * se:
            return None
        severity = Severity.ERROR
        message = f"{target} levelled off at {_g(st.now)}, no better than the trivial predictor's {_g(baseline)}."
    elif target_error is not None:
        bias = st.now - target_error
        distance = st.initial - target_error
        if not (distance > 0 and bias >= UNDERFIT_BIAS_FRACTION * distance and bias > TREND_Z * se):
            return None
        severity = Severity.WARNING
        data["avoidable_bias"] = bias
        message = (
            f"{target} levelled off at {_g(st.now)}, {_g(bias)} above the target error {_g(target_error)} "
            f"({bias / distance:.0%} of the way from the start remains): the model underfits."
        )
    else:
        if not final:
            return None
        if st.noise == 0.0 and (st.values[0] > st.now or (st.now == 0.0 and st.steps[0] > 0)):
            # Exactly flat below where it began, or exactly at 0 from a first point logged after
            # step 0 (the fall came before it, as `flightcheck analyze` reads TensorBoard): the
            # loss sits on a numeric bound (a cross-entropy that underflowed to 0 after fitting
            # in a step or two), not stuck.
            return None
        stuck, zp = _no_progress(st)
        if not stuck:
            return None
        severity = Severity.WARNING
        data["progress_z"] = zp
        message = f"{target} ended at {_g(st.now)}, no lower than its initial {_g(st.initial)}: the model did not learn."
    data["began_step"] = _step(st.steps[st.start_index])
    return Verdict(
        "underfitting",
        severity,
        message,
        causes=_CAUSES["underfitting"],
        advice=_ADVICE["underfitting"],
        target=target,
        data=data,
    )


# ----------------------------------------------------------------------------- decomposition
def decompose(
    train_error: float,
    val_error: float | None,
    target_error: float,
    *,
    train_val_error: float | None = None,
    test_error: float | None = None,
) -> dict[str, float]:
    """Split the error into the field's bias/variance terms.

    ``test = irreducible + avoidable bias + variance + distribution shift + validation
    overfitting``, where ``avoidable_bias = train − target``, ``variance = train_val − train``
    (``val − train`` without a second validation set drawn from the training distribution),
    ``distribution_shift = val − train_val`` and ``validation_overfitting = test − val``.
    Terms whose inputs are missing are left out.
    """
    out = {"irreducible": float(target_error), "avoidable_bias": float(train_error) - float(target_error)}
    same_dist = train_val_error if train_val_error is not None else val_error
    if same_dist is not None:
        out["variance"] = float(same_dist) - float(train_error)
    if train_val_error is not None and val_error is not None:
        out["distribution_shift"] = float(val_error) - float(train_val_error)
    if test_error is not None and val_error is not None:
        out["validation_overfitting"] = float(test_error) - float(val_error)
    return out


_TERM_ADVICE = {
    "avoidable_bias": "address underfitting first: a bigger model, less regularization, a tuned learning rate",
    "variance": "address overfitting: more data or augmentation, regularization, early stopping",
    "distribution_shift": "address the distribution shift: more training data like the validation data, "
    "or domain adaptation",
    "validation_overfitting": "the validation set is overfit (small, or heavily tuned on): collect fresh validation data",
}


# ----------------------------------------------------------------------------- watching
@dataclasses.dataclass(frozen=True)
class Problem:
    """A confirmed verdict and when: ``step`` it was confirmed, ``began_step`` it began."""

    verdict: Verdict
    step: int
    began_step: int

    def to_dict(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "check": v.check,
            "severity": Severity.coerce(v.severity).value,
            "target": v.target,
            "message": v.message,
            "causes": list(v.causes),
            "advice": list(v.advice),
            "began_step": self.began_step,
            "step": self.step,
            "data": dict(v.data),
        }


@dataclasses.dataclass
class Update:
    """What one evaluation of a :class:`CurveWatch` found: problems to report, problems cleared."""

    report: list[Problem] = dataclasses.field(default_factory=list)
    cleared: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)


# Checks that judge a one-step event rather than a shape: no confirmation, re-armed on silence.
_EVENT_CHECKS = frozenset({"loss_spike"})


def _confirmed_within(verdict: Verdict) -> bool:
    """A verdict whose own evidence already spans several evaluations (a validation rise held
    for OVERFIT_PATIENCE evaluations): confirming it again would only delay it."""
    return verdict.check == "overfitting" and verdict.data.get("shape") == "rising"


class CurveWatch:
    """The curves of one run, judged again at each evaluation, with warm-up, confirmation and
    escalation. Framework-free: the callback feeds it live, ``flightcheck analyze`` replays a
    finished run through it.

    Args:
        warmup_steps: nothing is judged before this step (the loss of the first steps, and
            during a learning-rate warm-up, says little about the run).
        confirm: consecutive evaluations that must see a problem before it is reported
            (twice as many that must not see it before it is cleared and re-armed).
        escalate_after: consecutive evaluations after which a persisting warning is an error.
        floor: the lowest reachable training loss, when known (enables plateau detection
            short of the starting level).
        baseline: a trivial predictor's loss (for ``underfitting``).
        target_error: human-level or irreducible error, in the loss's units (for
            ``underfitting`` and the bias/variance decomposition).
        capacity: points kept per series (older ones are coarsened).

    Example::

        watch = CurveWatch(warmup_steps=50)
        watch.add_train(steps, losses)
        watch.add_val("val_loss", step, value)
        for problem in watch.evaluate(step).report:
            print(problem.verdict.message)
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 50,
        confirm: int = CONFIRM,
        escalate_after: int = ESCALATE_AFTER,
        floor: float | None = None,
        baseline: float | None = None,
        target_error: float | None = None,
        train_name: str = "train_loss",
        capacity: int = 2048,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.confirm = confirm
        self.escalate_after = escalate_after
        # Clearing asks for more evidence than reporting, so a borderline problem does not
        # flap between reported and cleared.
        self.clear_after = 2 * confirm
        self.floor = floor
        self.baseline = baseline
        self.target_error = target_error
        self.train_name = train_name
        self.train = SeriesBuffer(capacity)
        self.vals: dict[str, SeriesBuffer] = {}
        self.modes: dict[str, str] = {}
        self.start_step = float(warmup_steps)
        self.spike_checked_to: float | None = None
        self._seen: dict[str, int] = {}  # "check|target" -> consecutive sightings
        self._missed: dict[str, int] = {}
        self._reported: dict[str, str] = {}  # -> severity reported
        self.problems: list[Problem] = []
        self.evaluations = 0
        #: set when the learning rate cycles or restarts: repeating swings are then expected
        self.periodic_schedule = False
        #: the step where the learning rate collapsed early (:func:`lr_collapsed`), if it did
        self.lr_collapsed_at: float | None = None
        self._stats_cache: tuple[Any, CurveStats | None] | None = None

    # ------------------------------------------------------------------ feeding
    def add_train(self, steps: ArrayLike, values: ArrayLike) -> None:
        self.train.extend(steps, values)
        self._stats_cache = None

    def _train_stats(self, start_step: float) -> CurveStats | None:
        """The training curve's stats, computed once per new training points and start."""
        key = (len(self.train), self.train.last_step(), float(start_step))
        if self._stats_cache is None or self._stats_cache[0] != key:
            steps, values = self.train.arrays()
            self._stats_cache = (key, curve_stats(steps, values, start_step=start_step))
        return self._stats_cache[1]

    def add_val(self, name: str, step: float, value: float, mode: str = "min") -> None:
        """A validation-time series point (the validation loss, or a metric with ``mode``)."""
        buf = self.vals.get(name)
        if buf is None:
            buf = self.vals[name] = SeriesBuffer(self.train.capacity)
            self.modes[name] = mode
        buf.extend([step], [value])

    def hold(self, step: float) -> None:
        """Extend the warm-up to ``step`` (e.g. while the learning rate is still rising)."""
        self.start_step = max(self.start_step, float(step))

    # ------------------------------------------------------------------ instruments
    def level(self) -> float | None:
        """The training loss's current level (median of the latest points), if any."""
        st = self._train_stats(0.0)
        return None if st is None else st.now

    def figures(self) -> dict[str, float]:
        """The training curve's instruments now: smoothed level, trend and noise."""
        st = self._train_stats(0.0)
        if st is None:
            return {}
        ws, wv = st.window_arrays()
        slope, _ = theil_sen(ws, wv)
        return {
            "train_loss_smoothed": st.now,
            "train_loss_trend_per_1k_steps": 1000.0 * slope,
            "train_loss_noise": st.noise,
        }

    # ------------------------------------------------------------------ judging
    def look(self, *, train: bool = True, val_names: Iterable[str] | None = None) -> list[Verdict]:
        """Every verdict the series support now, without confirmation.

        ``train=False`` leaves out the training curve's verdicts (they are still read, so that
        a diverging or stuck run is not also called overfitting); ``val_names`` limits the
        validation series judged.
        """
        steps, values = self.train.arrays()
        st = self._train_stats(self.start_step)
        verdicts: list[Verdict] = []
        if st is not None:
            since = self.spike_checked_to if train else steps[-1]
            verdicts = classify_train_curve(
                st,
                since_step=since,
                floor=self.floor,
                periodic_schedule=self.periodic_schedule,
                lr_collapsed_step=self.lr_collapsed_at,
                target=self.train_name,
            )
            if train:
                self.spike_checked_to = float(steps[-1])
        else:
            # Still warming up (or few points): only an explosion is judged already.
            early = self._train_stats(0.0)
            explosion = loss_divergence(early, target=self.train_name) if early is not None else None
            if explosion is not None and Severity.coerce(explosion.severity) is Severity.ERROR:
                verdicts = [explosion]
        blocked = any(v.check == "loss_divergence" for v in verdicts)
        if st is not None and not blocked and (self.baseline is not None or self.target_error is not None):
            under = underfitting(st, baseline=self.baseline, target_error=self.target_error, target=self.train_name)
            if under is not None:
                verdicts.append(under)
        if not train:
            verdicts = []
        if not blocked:
            for name in self.vals if val_names is None else val_names:
                vs, vv = self.vals[name].arrays()
                verdict = overfitting(steps, values, vs, vv, target=name, mode=self.modes[name])
                if verdict is not None:
                    verdicts.append(verdict)
        return verdicts

    def evaluate(
        self, step: float, *, train: bool = True, val_names: Iterable[str] | None = None, final: bool = False
    ) -> Update:
        """Judge the curves now; return the problems to report and those that cleared.

        After new training points, ``evaluate(step, val_names=[])``; after a validation
        point, ``evaluate(step, train=False, val_names=[name])``, so that each series is
        confirmed on evaluations that saw new points of it. ``final=True`` at the end of a
        run reports errors seen once: there will be no second look.
        """
        self.evaluations += 1
        update = Update()
        verdicts = self.look(train=train, val_names=val_names)
        judged_vals = set(self.vals if val_names is None else val_names)
        seen_now = set()
        for v in verdicts:
            key = f"{v.check}|{v.target}"
            seen_now.add(key)
            self._missed.pop(key, None)
            count = self._seen.get(key, 0) + 1
            self._seen[key] = count
            needed = (
                1
                if v.check in _EVENT_CHECKS
                or _confirmed_within(v)
                or (final and Severity.coerce(v.severity) is Severity.ERROR)
                else self.confirm
            )
            if count < needed:
                continue
            severity = Severity.coerce(v.severity)
            if count >= self.escalate_after and v.check not in _EVENT_CHECKS:
                severity = Severity.ERROR
            previous = self._reported.get(key)
            if previous is not None and Severity(previous).rank >= severity.rank:
                continue
            if severity is not Severity.coerce(v.severity):
                v = dataclasses.replace(v, severity=severity, message=f"{v.message} It persists.")
            problem = Problem(v, int(round(step)), int(v.data.get("began_step", round(step))))
            self._reported[key] = severity.value
            self.problems.append(problem)
            update.report.append(problem)
        for key in (set(self._seen) | set(self._reported)) - seen_now:
            check, target = key.split("|", 1)
            looked = target in judged_vals if check == "overfitting" else train
            if not looked:
                continue  # that series was not looked at in this evaluation
            self._seen.pop(key, None)  # the run of consecutive sightings is broken
            if key in self._reported:
                self._missed[key] = self._missed.get(key, 0) + 1
                if self._missed[key] >= self.clear_after:
                    del self._reported[key], self._missed[key]
                    update.cleared.append((check, None if target == "None" else target))
        return update

    # ------------------------------------------------------------------ the whole run
    def diagnose(
        self,
        *,
        val_name: str | None = None,
        train_val_name: str | None = None,
        test_error: float | None = None,
    ) -> Diagnosis:
        """The whole-run diagnosis from what the watch holds now."""
        return _diagnosis(self, val_name=val_name, train_val_name=train_val_name, test_error=test_error)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "train": self.train.state_dict(),
            "vals": {k: b.state_dict() for k, b in self.vals.items()},
            "modes": dict(self.modes),
            "start_step": self.start_step,
            "spike_checked_to": self.spike_checked_to,
            "seen": dict(self._seen),
            "missed": dict(self._missed),
            "reported": dict(self._reported),
            "problems": [p.to_dict() for p in self.problems],
            "evaluations": self.evaluations,
            "periodic_schedule": self.periodic_schedule,
            "lr_collapsed_at": self.lr_collapsed_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.train.load_state_dict(state.get("train", {}))
        self.vals = {}
        for name, buf_state in state.get("vals", {}).items():
            buf = SeriesBuffer(self.train.capacity)
            buf.load_state_dict(buf_state)
            self.vals[name] = buf
        self.modes = dict(state.get("modes", {}))
        self.start_step = float(state.get("start_step", self.warmup_steps))
        checked = state.get("spike_checked_to")
        self.spike_checked_to = None if checked is None else float(checked)
        self._seen = {str(k): int(v) for k, v in state.get("seen", {}).items()}
        self._missed = {str(k): int(v) for k, v in state.get("missed", {}).items()}
        self._reported = {str(k): str(v) for k, v in state.get("reported", {}).items()}
        self.problems = [
            Problem(
                Verdict(
                    d["check"], d["severity"], d["message"], tuple(d.get("causes", ())), tuple(d.get("advice", ())),
                    d.get("target"), d.get("data", {}),
                ),
                int(d["step"]),
                int(d["began_step"]),
            )
            for d in state.get("problems", [])
        ]
        self.evaluations = int(state.get("evaluations", 0))
        self.periodic_schedule = bool(state.get("periodic_schedule", False))
        collapsed = state.get("lr_collapsed_at")
        self.lr_collapsed_at = None if collapsed is None else float(collapsed)


# ----------------------------------------------------------------------------- diagnosis
@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The whole-run diagnosis: the problems found, the curves' key numbers, and the
    bias/variance decomposition when a target error was given."""

    labels: tuple[str, ...]
    problems: tuple[Problem, ...]
    train: Mapping[str, Any]
    val: Mapping[str, Any] | None
    decomposition: Mapping[str, float] | None
    notes: tuple[str, ...] = ()

    @property
    def worst(self) -> Severity | None:
        if not self.problems:
            return None
        return max((Severity.coerce(p.verdict.severity) for p in self.problems), key=lambda s: s.rank)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "labels": list(self.labels),
            "worst": None if worst is None else worst.value,
            "problems": [p.to_dict() for p in self.problems],
            "train": dict(self.train),
            "val": None if self.val is None else dict(self.val),
            "decomposition": None if self.decomposition is None else dict(self.decomposition),
            "notes": list(self.notes),
        }

    def format(self, markdown: bool = False) -> str:
        """The diagnosis as text: a headline, a table of problems, the decomposition."""
        from flightcheck.utils.text import table

        lines = [("**Curve diagnosis:** " if markdown else "Curve diagnosis: ") + ", ".join(self.labels)]
        t = self.train
        if t.get("points"):
            lines.append(
                f"training loss: {_g(t['initial'])} at the start, best {_g(t['best'])} at step {t['best_step']}, "
                f"{_g(t['final'])} at the end (step {t['last_step']})"
            )
        if self.val:
            v = self.val
            lines.append(
                f"{v['name']}: {_g(v['first'])} at the first evaluation, best {_g(v['best'])} at step "
                f"{v['best_step']}, {_g(v['final'])} at the last (step {v['last_step']})"
            )
        lines.extend(self.notes)
        if self.problems:
            rows = [
                [
                    Severity.coerce(p.verdict.severity).value,
                    p.verdict.check,
                    p.verdict.target or "",
                    str(p.began_step),
                    str(p.step),
                    p.verdict.message,
                ]
                for p in self.problems
            ]
            lines.append("")
            lines.append(table(["severity", "check", "target", "began", "seen", "message"], rows, markdown=markdown))
        if self.decomposition:
            d = self.decomposition
            order = ["irreducible", "avoidable_bias", "variance", "distribution_shift", "validation_overfitting"]
            rows = [[k.replace("_", " "), _g(d[k])] for k in order if k in d]
            lines.append("")
            lines.append(table(["error term", "value"], rows, markdown=markdown))
            fixable = {k: d[k] for k in order[1:] if k in d}
            if fixable:
                largest = max(fixable, key=lambda k: fixable[k])
                if fixable[largest] > 0:
                    lines.append(f"largest term: {largest.replace('_', ' ')}; {_TERM_ADVICE[largest]}.")
        return "\n".join(lines)


def _curve_summary(steps: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        return {"points": 0}
    bi = best_index(values)
    smooth = running_median(values, smoothing_width(values.size))
    k = max(1, min(values.size // 10, 50))
    initial = initial_level(values)
    best, best_step = float(smooth[bi]), _step(steps[bi])
    if best > initial:  # never below its start: smoothing must not report a "best" above the first loss
        best, best_step = initial, _step(steps[0])
    return {
        "points": int(values.size),
        "initial": initial,
        "best": best,
        "best_step": best_step,
        "final": float(np.median(values[-k:])),
        "last_step": _step(steps[-1]),
        "trend_per_1k_steps": 1000.0 * theil_sen(steps[-max(2 * k, 2) :], values[-max(2 * k, 2) :])[0]
        if values.size >= 3
        else 0.0,
    }


def _diagnosis(
    watch: CurveWatch,
    *,
    val_name: str | None,
    train_val_name: str | None,
    test_error: float | None,
) -> Diagnosis:
    steps, values = watch.train.arrays()
    train = _curve_summary(steps, values)
    notes: list[str] = []
    # One row per (check, target): first seen, earliest start, loudest verdict.
    merged: dict[tuple[str, str | None], Problem] = {}
    for p in watch.problems:
        key = (p.verdict.check, p.verdict.target)
        m = merged.get(key)
        if m is None:
            merged[key] = p
            continue
        loudest = p.verdict if Severity.coerce(p.verdict.severity).rank >= Severity.coerce(m.verdict.severity).rank else m.verdict
        merged[key] = Problem(loudest, min(m.step, p.step), min(m.began_step, p.began_step))
    problems = list(merged.values())
    # What only the whole run shows: a run that ended no better than it started.
    st = curve_stats(steps, values, start_step=watch.start_step)
    checks = {k[0] for k in merged}
    if st is not None and not checks & {"loss_divergence", "loss_plateau", "underfitting"}:
        under = underfitting(
            st, baseline=watch.baseline, target_error=watch.target_error, final=True, target=watch.train_name
        )
        if under is not None:
            last = _step(steps[-1])
            problems.append(Problem(under, last, int(under.data.get("began_step", last))))
    if st is None and values.size:
        notes.append(
            f"too few training points after warm-up (step {int(watch.start_step)}) to judge the curve's shape "
            f"({values.size} points in all, {MIN_POINTS} needed after warm-up)"
        )
    if values.size == 0:
        notes.append("no training loss was recorded")
    val_summary = None
    if val_name is None:
        val_name = next((n for n in watch.vals if watch.modes.get(n) == "min" and n != train_val_name), None)
    val_final = None
    if val_name is not None and val_name in watch.vals:
        vs, vv = watch.vals[val_name].arrays()
        if vv.size:
            bi = best_evaluation(vv)
            val_final = float(vv[-1])
            val_summary = {
                "name": val_name,
                "points": int(vv.size),
                "first": float(vv[0]),
                "best": float(vv[bi]),
                "best_step": _step(vs[bi]),
                "final": val_final,
                "last_step": _step(vs[-1]),
            }
    decomposition = None
    if watch.target_error is not None and train.get("points"):
        tv_final = None
        if train_val_name is not None and train_val_name in watch.vals:
            _, tvv = watch.vals[train_val_name].arrays()
            tv_final = float(tvv[-1]) if tvv.size else None
        decomposition = decompose(
            train["final"], val_final, watch.target_error, train_val_error=tv_final, test_error=test_error
        )
    problems.sort(key=lambda p: (p.began_step, p.step))
    labels = _labels(problems, train, st is not None)
    return Diagnosis(tuple(labels), tuple(problems), train, val_summary, decomposition, tuple(notes))


_LABELS = (
    ("loss_divergence", "diverging"),
    ("loss_oscillation", "unstable"),
    ("loss_spike", "unstable"),
    ("loss_plateau", "not learning"),
    ("underfitting", "underfitting"),
    ("overfitting", "overfitting"),
)


def _labels(problems: Sequence[Problem], train: Mapping[str, Any], judged: bool) -> list[str]:
    checks = {p.verdict.check for p in problems if Severity.coerce(p.verdict.severity) is not Severity.INFO}
    labels: list[str] = []
    for check, label in _LABELS:
        if check in checks and label not in labels:
            labels.append(label)
    if not labels:
        labels.append("healthy" if judged else "not enough data")
    return labels


def diagnose(
    train_steps: ArrayLike,
    train_values: ArrayLike,
    val_steps: ArrayLike | None = None,
    val_values: ArrayLike | None = None,
    *,
    val_name: str = "val_loss",
    train_val: tuple[ArrayLike, ArrayLike] | None = None,
    test_error: float | None = None,
    target_error: float | None = None,
    floor: float | None = None,
    baseline: float | None = None,
    warmup_steps: int = 50,
    confirm: int = CONFIRM,
    escalate_after: int = ESCALATE_AFTER,
    every: int | None = None,
    train_name: str = "train_loss",
) -> Diagnosis:
    """The whole-run diagnosis of finished curves, as the live monitor would have given it.

    Replays the run through a :class:`CurveWatch`: the training curve is judged every
    ``every`` training points (default: ~1/40 of them, at least every point for short series)
    and at each validation point, with the same warm-up, confirmation and escalation.

    Args:
        train_steps, train_values: the training loss.
        val_steps, val_values: the validation loss, if any.
        train_val: ``(steps, values)`` of a second validation set drawn from the training
            distribution (adds the distribution-shift term to the decomposition).
        test_error: the final test error (adds the validation-overfitting term).
        target_error: human-level or irreducible error, in the same units.
        floor, baseline, warmup_steps, confirm, escalate_after: as for :class:`CurveWatch`.

    Example::

        d = diagnose(steps, train_loss, val_steps, val_loss)
        print(d.format())
    """
    watch = CurveWatch(
        warmup_steps=warmup_steps,
        confirm=confirm,
        escalate_after=escalate_after,
        floor=floor,
        baseline=baseline,
        target_error=target_error,
        train_name=train_name,
        capacity=max(4096, 2 * len(np.asarray(train_values).reshape(-1))),
    )
    ts, tv = finite_series(train_steps, train_values)
    vals: list[tuple[str, np.ndarray, np.ndarray]] = []
    if val_steps is not None and val_values is not None:
        vals.append((val_name, *finite_series(val_steps, val_values)))
    train_val_name = None
    if train_val is not None:
        train_val_name = f"{val_name} (training distribution)"
        vals.append((train_val_name, *finite_series(*train_val)))
    # Training is judged every `stride` points and up to each validation step, so that each
    # validation point meets exactly the training points that preceded it.
    n = ts.size
    stride = every if every is not None else max(1, n // 40)
    cuts = set(range(stride, n, stride)) | {n}
    for _, vs, _ in vals:
        cuts |= {int(i) for i in np.searchsorted(ts, vs, side="right") if 0 < i < n}
    val_events = sorted((float(s), name, float(v)) for name, vs, vv in vals for s, v in zip(vs, vv))
    plan: list[tuple[str, Any]] = []  # ("train", (lo, hi)) or ("val", (step, name, value)), in time order
    lo, vi = 0, 0
    for hi in sorted(cuts) if n else []:
        plan.append(("train", (lo, hi)))
        lo = hi
        while vi < len(val_events) and (hi == n or val_events[vi][0] < ts[hi]):
            plan.append(("val", val_events[vi]))
            vi += 1
    plan.extend(("val", e) for e in val_events[vi:])
    for i, (kind, payload) in enumerate(plan):
        final = i == len(plan) - 1
        if kind == "train":
            lo, hi = payload
            watch.add_train(ts[lo:hi], tv[lo:hi])
            watch.evaluate(float(ts[hi - 1]), val_names=[], final=final)
        else:
            step, name, value = payload
            watch.add_val(name, step, value)
            watch.evaluate(step, train=False, val_names=[name], final=final)
    return watch.diagnose(val_name=val_name if vals else None, train_val_name=train_val_name, test_error=test_error)


__all__ = [
    "CurveStats",
    "CurveWatch",
    "best_evaluation",
    "Diagnosis",
    "Problem",
    "Update",
    "classify_train_curve",
    "curve_stats",
    "decompose",
    "diagnose",
    "loss_divergence",
    "loss_oscillation",
    "loss_plateau",
    "loss_spike",
    "lr_below_collapse",
    "lr_collapsed",
    "overfitting",
    "train_levels_at",
    "underfitting",
]
