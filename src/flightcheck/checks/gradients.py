"""Judges of gradient and weight norms: explosion, vanishing, spikes, weight growth, update
ratios and gradient flow.

Each judge takes host-side numbers (series of norms, per-layer figures, parameter names)
and returns :class:`~flightcheck.checks.Verdict` objects, or nothing when the run looks
healthy. The thresholds are the module-level defaults below; each says why it is where it
is. They are set so that a healthy run stays quiet through warm-up, learning-rate decay,
gradient clipping, frozen layers and small noisy batches, and a broken one is named within
a few dozen steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from flightcheck.checks import Verdict
from flightcheck.checks.curves import LR_COLLAPSE_RATIO, lr_below_collapse
from flightcheck.findings import Severity
from flightcheck.signals.layers import common_scope
from flightcheck.signals.robust import MAD_TO_STD, finite, growth_by_part, median_mad

# ---------------------------------------------------------------------------- thresholds

#: Explosion: the median of the last few gradient norms is this many times the median of the
#: run's first steps. Healthy runs move their gradient norm by a few times over training
#: (warm-up, sharpening, LR decay) and mostly downwards; 50x above the start is a divergence
#: in progress, whether it took five steps or five hundred.
EXPLOSION_FACTOR = 50.0
#: ... over this many recent optimizer steps (a median of 5 ignores one or two outliers:
#: a single bad batch is a spike, not an explosion).
EXPLOSION_WINDOW = 5
#: A further factor over ``EXPLOSION_FACTOR`` at which an explosion becomes an error.
EXPLOSION_ERROR_FACTOR = 100.0
#: The run's early gradient level is the median of its first this many steps (before a
#: small model on easy data has converged, which can take as few as ten). It is the yardstick
#: of explosions, and a floor for spikes: a converged run has gradients many orders below it,
#: and an ordinary hard batch would otherwise look like a 1000x spike of a near-zero median.
EARLY_STEPS = 5

#: Spike: one step's gradient norm at least this many times the rolling median ...
SPIKE_MIN_RATIO = 10.0
#: ... and this many robust standard deviations (1.4826 x MAD, on the log scale where the
#: noise of norms is multiplicative) above it. Small noisy batches have a wide log spread,
#: which raises the bar with them; the 10x floor keeps a very steady run from calling a
#: doubling a spike. Healthy runs of 1500 steps at batch sizes 2-32, with and without label
#: noise, peaked at 4.7 among steps that were also 10x their median.
SPIKE_ZSCORE = 5.0
#: Steps of history the rolling median and MAD of a spike are taken over.
SPIKE_WINDOW = 100
#: Steps of history needed before any spike is judged (a median of fewer is itself noisy).
SPIKE_MIN_HISTORY = 20

#: Vanishing: a layer's gradient RMS (norm / sqrt(elements), so big and small layers compare)
#: below this fraction of the largest layer's. A 10-layer sigmoid stack sits near 1e-7, a
#: healthy ReLU/normalised network within ~1e-2; 1e-4 leaves two orders of room either way.
VANISHING_RATIO = 1e-4
#: ... as a median over up to this many steps ...
VANISHING_WINDOW = 20
#: ... judged once this many were seen (a layer does not stop vanishing in a few steps).
VANISHING_MIN_STEPS = 10

#: Update ratio ||Δw|| / ||w|| per step. Karpathy's rule of thumb puts healthy training near
#: 1e-3; small models at high learning rates run near 1e-1 in their first steps. Half the
#: weight norm per step, sustained over the window, rewrites the weights every few steps.
MAX_UPDATE_RATIO = 0.5
#: One step that changes the weights by more than their own norm replaced them: an Adam step
#: is about the learning rate per weight, so this is a learning rate above the weights' own
#: scale (Adam at 1e-2 on a 784-input layer, whose weights are ~0.02, sits near 0.45).
MAX_STEP_UPDATE_RATIO = 1.0
#: Below this, sustained while the gradients are alive, the weights have effectively stopped
#: moving: Adam at 1e-6 on weights of RMS ~0.1 sits near 6e-6; fine-tuning a pretrained model
#: with Adam at 1e-5 (weights of RMS 0.02-0.04) sits at 3e-5 and above.
MIN_UPDATE_RATIO = 1e-5
#: Steps the update ratio is judged over (a median).
UPDATE_RATIO_WINDOW = 20
#: "Too small" is judged only while the gradients are at least this fraction of their early
#: level: a converged model has tiny gradients and, rightly, tiny updates.
LIVE_GRADIENT_FRACTION = 0.1
#: A learning rate that rose by more than this factor across the window is warming up.
WARMUP_LR_RISE = 1.1
#: A learning rate below this fraction of the run's peak has been decayed.
DECAYED_LR_FRACTION = 0.5
# A learning rate below ``LR_COLLAPSE_RATIO`` of its peak (the loss-curve checks' own
# definition of a collapse) before half the planned run has collapsed: the updates have
# stopped, whatever the update ratio's window says yet. A schedule that decays on purpose gets
# there at the end of the run (cosine, OneCycle: the last few percent); a scheduler stepped
# every batch instead of every epoch gets there in a few dozen steps.

#: Weight growth: the total weight norm grew by this factor within ``WEIGHT_GROWTH_WINDOW``
#: steps, by at least its square root in each half of the window (a sustained trend: a single
#: jump grows only one half). Healthy growth from initialisation is a few tens of percent.
WEIGHT_GROWTH_FACTOR = 3.0
WEIGHT_GROWTH_WINDOW = 20
#: ... judged on at least this many measurements of the window when the weights were measured
#: only every few steps (each half of the window then still has two or more).
WEIGHT_GROWTH_MIN_POINTS = 5
#: ... and not slowing down: the second half's log-growth is at least this fraction of the
#: first's. Divergence grows exponentially (equal halves) or faster; weights growing from a
#: zero or tiny initialisation grow like a power of the step, whose log-growth falls off
#: (0.58 for the halves of steps 10-30, 0.71 for steps 20-40).
WEIGHT_GROWTH_PERSISTENCE = 0.75

#: Gradient flow and never-updated parameters are judged after this many optimizer steps
#: with gradients: enough that a parameter used only every few batches shows up, early enough
#: to save the run.
FLOW_AFTER_STEPS = 10
#: A parameter counts as never updated after this many steps in which it received a
#: non-zero gradient without changing (a warm-up that starts at learning rate 0 skips one).
NEVER_UPDATED_MIN_STEPS = 10

#: Gradients never cleared: judged once this many steps were seen applying a gradient that
#: still held the previous step's. The evidence is exact (``.grad`` unchanged, bit for bit,
#: from one step to the next backward), so two steps rule out a one-off ...
STALE_MIN_STEPS = 2
#: ... making up at least this fraction of the steps judged recently (a code path that zeroes
#: on some steps and not on others is still the bug, and still worth the warning).
STALE_FRACTION = 0.5

_LIST_LIMIT = 6


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def _listing(names: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _where(target: str) -> str:
    return "the total gradient norm" if target == "total" else f"the gradient norm of {target}"


# ---------------------------------------------------------------------------- judges


def grad_explosion(
    recent: Sequence[float],
    early: Sequence[float],
    *,
    target: str = "total",
    factor: float = EXPLOSION_FACTOR,
    top_layer: str | None = None,
) -> Verdict | None:
    """A sustained rise of the gradient norm far above the level the run started at.

    Judged against the first steps rather than a rolling baseline, so a climb over hundreds
    of steps (a loss running off to minus infinity) is caught as surely as a sudden one, and
    a converged run's near-zero gradients are not the yardstick.

    Args:
        recent: the last few finite gradient norms (``EXPLOSION_WINDOW`` of them).
        early: the norms of the run's first ``EARLY_STEPS`` steps.
        target: ``"total"`` or the optimizer the series belongs to.
        factor: how many times the early median the recent median must reach.
        top_layer: the layer holding most of the gradient, named in the message when given.
    """
    recent_arr, early_arr = finite(recent), finite(early)
    if recent_arr.size < 3 or early_arr.size < 3:
        return None
    now, before = float(np.median(recent_arr)), float(np.median(early_arr))
    if before <= 0 or now < factor * before:
        return None
    ratio = now / before
    severity = Severity.ERROR if ratio >= factor * EXPLOSION_ERROR_FACTOR else Severity.WARNING
    where = f", most of it in {top_layer}" if top_layer else ""
    return Verdict(
        check="grad_explosion",
        severity=severity,
        message=f"{_where(target).capitalize()} rose to {_fmt(now)} (median of the last {recent_arr.size} steps), "
        f"{_fmt(ratio)}x the {_fmt(before)} the run started at{where}.",
        causes=(
            "the learning rate is too high for this model (or warm-up too short)",
            "a loss that is unbounded below (a wrong sign, NLL on raw logits) or summed instead of averaged",
            "a numerically unstable operation (exp, log, division) or an unnormalised input",
        ),
        advice=(
            "lower the learning rate by 10x, or add or lengthen the warm-up",
            "check the loss' sign, input and reduction",
            "clip gradients (Trainer(gradient_clip_val=1.0))",
        ),
        target=target,
        data={"recent_median": now, "early_median": before, "ratio": ratio, "factor": factor, "top_layer": top_layer},
    )


def stale_gradients(stale: int, judged: int, *, target: str = "total", optimizer: str | None = None) -> Verdict | None:
    """Gradients added onto the ones the previous step already applied (never zeroed).

    Reported as ``grad_explosion``: the applied gradient is the running sum of every step's,
    so it grows with the run, and this is its cause seen before the growth is.

    Args:
        stale: recent optimizer steps whose backward passes only added to the gradient the
            step before had applied (:class:`~flightcheck.signals.stale.StaleGradientWatch`).
        judged: the recent steps judged.
        target: ``"total"`` or the optimizer's series name.
        optimizer: the optimizer's class name, for the message.
    """
    if stale < STALE_MIN_STEPS or stale < STALE_FRACTION * judged:
        return None
    who = f"{optimizer} ({target})" if optimizer and target != "total" else (optimizer or "the optimizer")
    return Verdict(
        check="grad_explosion",
        severity=Severity.ERROR,
        message=f"The gradients were never cleared between optimizer steps: at {stale} of the {judged} steps "
        f"checked, {who} stepped on a .grad that still held the gradient its previous step had applied: "
        "nothing zeroed it (zero_grad) before the next backward, so each backward adds onto every earlier "
        "one and the applied gradient grows with the run.",
        causes=(
            "optimizer.zero_grad() missing under manual optimisation (automatic_optimization=False leaves "
            "zeroing to you)",
            "optimizer_zero_grad overridden to do nothing, or zero_grad called on a different optimizer",
        ),
        advice=(
            "call opt.zero_grad() once per step: before self.manual_backward(loss), or right after opt.step()",
            "to accumulate gradients on purpose, step and zero only every N batches",
        ),
        target=target,
        data={"cause": "gradients_not_cleared", "stale_steps": stale, "judged_steps": judged, "optimizer": optimizer},
    )


def grad_spike(
    value: float,
    history: Sequence[float],
    *,
    step: int | None = None,
    early_level: float = 0.0,
    target: str = "total",
    min_ratio: float = SPIKE_MIN_RATIO,
    zscore: float = SPIKE_ZSCORE,
    min_history: int = SPIKE_MIN_HISTORY,
    top_layer: str | None = None,
) -> Verdict | None:
    """One step's gradient norm far above the rolling median of the steps before it.

    Robust to noise: the scale is the median absolute deviation of the log norms, which the
    spike itself (or a few earlier ones) cannot inflate the way it inflates a standard
    deviation. ``early_level`` (the median of the run's first steps) is a floor: after
    convergence the median is tiny, and a hard batch that does not even reach the gradients
    the run started with is not a spike.
    """
    ref = finite(history)
    ref = ref[ref > 0]
    if ref.size < min_history or not (value > 0 and math.isfinite(value)):
        return None
    med = float(np.median(ref))
    _, mad = median_mad(np.log(ref))
    ratio = value / med
    z = math.log(ratio) / max(MAD_TO_STD * mad, 1e-12)
    if value < max(min_ratio * med, early_level) or z < zscore:
        return None
    at = f" at step {step}" if step is not None else ""
    where = f", mostly in {top_layer}" if top_layer else ""
    return Verdict(
        check="grad_spike",
        severity=Severity.WARNING,
        message=f"{_where(target).capitalize()} spiked to {_fmt(value)}{at}, {_fmt(ratio)}x the median "
        f"{_fmt(med)} of the previous {ref.size} steps ({z:.1f} robust standard deviations){where}.",
        causes=(
            "a bad or unusual batch (corrupt sample, extreme values, a wrong label)",
            "a learning rate at the edge of stability (loss spikes of large models)",
            "a numerically unstable operation hit by one input",
        ),
        advice=(
            "find the batch of that step and look at its inputs and labels",
            "clip gradients (Trainer(gradient_clip_val=1.0)) so one batch cannot move the weights far",
            "lower the learning rate if spikes repeat",
        ),
        target=target,
        data={"value": value, "median": med, "ratio": ratio, "robust_z": z, "step": step, "top_layer": top_layer},
    )


def grad_vanishing(
    layer_rms: Mapping[str, float],
    *,
    ratio: float = VANISHING_RATIO,
) -> Verdict | None:
    """Layers whose gradients are a vanishing fraction of the liveliest layer's.

    Args:
        layer_rms: per layer, the typical (median) gradient RMS over recent steps. Layers
            with no or exactly zero gradient are left out by the caller: that is
            ``gradient_flow``'s finding.
        ratio: the fraction of the largest layer RMS below which a layer counts as vanishing.
    """
    rms = {k: float(v) for k, v in layer_rms.items() if math.isfinite(v) and v > 0}
    if len(rms) < 2:
        return None
    top_name = max(rms, key=rms.__getitem__)
    top = rms[top_name]
    faint = [name for name, v in rms.items() if v < ratio * top]
    if not faint:
        return None
    worst = min(faint, key=rms.__getitem__)
    return Verdict(
        check="grad_vanishing",
        severity=Severity.WARNING,
        message=f"Gradients vanish in {len(faint)} of {len(rms)} layers ({_listing(faint)}): the smallest, "
        f"{worst}, gets {_fmt(rms[worst] / top)}x the gradient RMS of {top_name}.",
        causes=(
            "saturating activations (sigmoid, tanh) stacked deep without normalisation or residuals",
            "weights initialised far too small",
            "a very deep plain network",
        ),
        advice=(
            "use ReLU/GELU activations, normalisation layers (BatchNorm, LayerNorm) or residual connections",
            "initialise with a scaled scheme (Kaiming for ReLU, Xavier/Glorot for tanh)",
            "check any custom init or weight scaling",
        ),
        target=common_scope(faint),
        data={"layers": {k: rms[k] / top for k in faint}, "reference_layer": top_name, "ratio": ratio},
    )


def weight_growth(
    norms: Sequence[float],
    *,
    target: str = "total",
    factor: float = WEIGHT_GROWTH_FACTOR,
    window: int = WEIGHT_GROWTH_WINDOW,
    top_layer: str | None = None,
    steps: Sequence[int] | None = None,
) -> Verdict | None:
    """A sustained, not-slowing growth of the weight norm over the last ``window`` steps.

    Args:
        norms: the weight norm at consecutive optimizer steps, oldest first; the last
            ``window + 1`` values are judged.
        factor: the growth across the window; each half must grow by ``sqrt(factor)``.
        top_layer: the layer that grew fastest, named in the message when given.
        steps: the optimizer step of each norm, when they were measured only every few
            steps: then the norms of the last ``window`` steps are judged, at least
            ``WEIGHT_GROWTH_MIN_POINTS`` of them covering at least 3/4 of the window.
    """
    if steps is None:
        series = finite(norms)[-(window + 1) :]
        if series.size < window + 1 or series[0] <= 0:
            return None
        span = window
    else:
        pairs = [(int(s), float(v)) for s, v in zip(steps, norms) if math.isfinite(v)]
        if not pairs:
            return None
        last = pairs[-1][0]
        recent = [(s, v) for s, v in pairs if s >= last - window]
        if len(recent) < WEIGHT_GROWTH_MIN_POINTS or last - recent[0][0] < 0.75 * window:
            return None
        series = np.array([v for _, v in recent])
        span = last - recent[0][0]
        if series[0] <= 0:
            return None
    halves = growth_by_part(series, parts=2)
    if not halves or min(halves) < math.sqrt(factor):
        return None
    if math.log(halves[1]) < WEIGHT_GROWTH_PERSISTENCE * math.log(halves[0]):
        return None  # slowing down: growing into a solution from a small start, not running away
    grown = float(series[-1] / series[0])
    where = f", fastest in {top_layer}" if top_layer else ""
    return Verdict(
        check="weight_growth",
        severity=Severity.WARNING,
        message=f"The weight norm grew {_fmt(grown)}x in the last {span} steps "
        f"(from {_fmt(series[0])} to {_fmt(series[-1])}) and is not slowing down{where}.",
        causes=(
            "the learning rate is too high: the run is diverging",
            "no weight decay on a loss that rewards ever larger weights (e.g. separable data)",
            "a positive-feedback bug (a weight updated with the wrong sign)",
        ),
        advice=(
            "lower the learning rate",
            "add weight decay (AdamW) or a norm constraint",
            "check custom update rules and the loss' sign",
        ),
        target=target,
        data={"growth": grown, "halves": halves, "start": float(series[0]), "end": float(series[-1]),
              "window": window, "top_layer": top_layer},
    )


def update_ratio(
    ratios: Sequence[float],
    *,
    learning_rates: Sequence[float] = (),
    steps: Sequence[int] = (),
    gradient_level: float | None = None,
    peak_learning_rate: float | None = None,
    progress: float | None = None,
    from_zero: bool = False,
    target: str = "total",
    max_ratio: float = MAX_UPDATE_RATIO,
    max_step_ratio: float = MAX_STEP_UPDATE_RATIO,
    min_ratio: float = MIN_UPDATE_RATIO,
    window: int = UPDATE_RATIO_WINDOW,
) -> Verdict | None:
    """Steps that move the weights far too much or hardly at all (``||Δw|| / ||w||``).

    Args:
        ratios: the update ratio per optimizer step, oldest first; steps the optimizer
            skipped (an fp16 overflow) are left out by the caller.
        learning_rates: the learning rate at the same steps; "too small" is not judged while
            it ramps up (a warm-up moves the ratio on purpose).
        steps: the optimizer step of each ratio, to say when a single step went too far.
        gradient_level: the recent gradient norm as a fraction of its early level; "too small"
            is judged only while the gradients are alive (a converged model rightly stops).
        peak_learning_rate: the highest learning rate of the run so far, and
        progress: the fraction of the planned steps done (``None`` when unknown): a learning
            rate decayed below half its peak in the second half of the run is a schedule doing
            its job; decayed in the first half (a scheduler stepped per batch instead of per
            epoch), it is judged.
        from_zero: the weights started at zero (a zero-initialised linear model), where the
            first steps are rightly as large as the weights.
    """
    ratios = list(ratios)[-window:]
    if not from_zero and ratios:
        worst = int(np.nanargmax(ratios)) if np.isfinite(ratios).any() else 0
        if ratios[worst] > max_step_ratio:
            at = f" at step {list(steps)[-len(ratios):][worst]}" if len(steps) >= len(ratios) else ""
            return Verdict(
                check="update_ratio",
                severity=Severity.WARNING,
                message=f"One optimizer step{at} changed the weights by {_fmt(ratios[worst])}x their norm: "
                f"the update is larger than the weights themselves.",
                causes=("the learning rate is far too high (Adam moves each weight by about the learning rate)",
                        "weights initialised near zero for the learning rate used"),
                advice=("lower the learning rate until steps change the weights by ~1e-3 of their norm",
                        "add a warm-up"),
                target=target,
                data={"ratio": ratios[worst], "max_step_ratio": max_step_ratio},
            )
    lrs_now = finite(learning_rates)
    if (lrs_now.size and peak_learning_rate and progress is not None and progress < 0.5
            and 0 < lrs_now[-1] and lr_below_collapse(float(lrs_now[-1]), peak_learning_rate)):
        lr, at = float(lrs_now[-1]), (f" by step {list(steps)[-1]}" if len(steps) else "")
        return Verdict(
            check="update_ratio",
            severity=Severity.WARNING,
            message=f"The learning rate fell to {_fmt(lr)}{at}, {_fmt(lr / peak_learning_rate)} of its peak "
            f"{_fmt(peak_learning_rate)}, before half the run: the weights have practically stopped moving.",
            causes=("a scheduler stepped every batch where it was meant to step every epoch (check its "
                    "interval: 'step' vs 'epoch', or where scheduler.step() is called)",
                    "a decay factor or step size meant for a run of another length"),
            advice=("step the scheduler once per epoch (lr_scheduler_config interval='epoch'), or size its "
                    "step_size / T_max in optimizer steps",),
            target=target,
            data={"learning_rate": lr, "peak_learning_rate": peak_learning_rate, "progress": progress,
                  "collapse_ratio": LR_COLLAPSE_RATIO},
        )
    series = finite(ratios)
    if series.size < window:
        return None
    med = float(np.median(series))
    if med > max_ratio:
        return Verdict(
            check="update_ratio",
            severity=Severity.WARNING,
            message=f"Each optimizer step changes the weights by {_fmt(med)} of their norm "
            f"(median of {window} steps), above {_fmt(max_ratio)}.",
            causes=("the learning rate is far too high", "weights initialised near zero for the learning rate used"),
            advice=("lower the learning rate (a ratio near 1e-3 is typical of healthy training)",
                    "add a warm-up"),
            target=target,
            data={"median": med, "max_ratio": max_ratio, "window": window},
        )
    lrs = finite(learning_rates)[-window:]
    warming_up = lrs.size > 1 and lrs[-1] > WARMUP_LR_RISE * lrs[0]
    decayed = (lrs.size > 0 and peak_learning_rate is not None and lrs[-1] < DECAYED_LR_FRACTION * peak_learning_rate)
    scheduled_decay = decayed and (progress is None or progress >= 0.5)
    alive = gradient_level is None or gradient_level >= LIVE_GRADIENT_FRACTION
    if 0 < med < min_ratio and alive and not warming_up and not scheduled_decay:
        lr = f" at a learning rate of {_fmt(float(lrs[-1]))}" if lrs.size else ""
        why = (f"; the learning rate fell to {_fmt(float(lrs[-1]) / peak_learning_rate)} of its peak before half the run"
               if decayed and peak_learning_rate else "")
        return Verdict(
            check="update_ratio",
            severity=Severity.WARNING,
            message=f"Each optimizer step changes the weights by only {_fmt(med)} of their norm "
            f"(median of {window} steps{lr}), below {_fmt(min_ratio)}: the weights have practically stopped moving{why}.",
            causes=("the learning rate is far too low, or a scheduler decays it far too fast "
                    "(stepped every batch where it was meant per epoch: check its interval)",
                    "gradients too small for the optimizer (SGD on tiny gradients)",
                    "updates lost to rounding in low-precision weights"),
            advice=("raise the learning rate (a ratio near 1e-3 is typical of healthy training)",
                    "use an adaptive optimizer (Adam) or keep fp32 master weights"),
            target=target,
            data={"median": med, "min_ratio": min_ratio, "window": window,
                  "learning_rate": float(lrs[-1]) if lrs.size else None, "peak_learning_rate": peak_learning_rate},
        )
    return None


def never_updated(
    layers: Mapping[str, Sequence[str]],
    *,
    steps: int,
    orphans: Sequence[str] = (),
) -> Verdict | None:
    """Parameters that received gradients on ``steps`` steps yet never changed.

    Args:
        layers: per layer, the names of such parameters.
        steps: how many steps with a gradient each of them went unchanged (at least).
        orphans: those of them that are in no optimizer at all.
    """
    if not layers:
        return None
    names = [p for ps in layers.values() for p in ps]
    orphan_set = set(orphans)
    missing = [p for p in names if p in orphan_set]
    detail = (f"; {len(missing)} of them are in no optimizer's param_groups" if missing else
              "; they are in an optimizer, which never changes them")
    return Verdict(
        check="update_ratio",
        severity=Severity.WARNING,
        message=f"{len(names)} parameters in {len(layers)} layers ({_listing(list(layers))}) received gradients "
        f"for {steps} steps but were never updated (update ratio exactly 0){detail}.",
        causes=(
            "the parameters were left out of the optimizer (configure_optimizers built it from a sub-module, "
            "or before the layer was added)",
            "a param group with learning rate 0, or an optimizer that is never stepped",
            "updates lost to rounding in low-precision weights",
        ),
        advice=(
            "build the optimizer from self.parameters(), or add the missing parameters to a param group",
            "if they are meant to stay fixed, set requires_grad=False (it also saves their backward pass)",
        ),
        target=common_scope(list(layers)),
        data={"layers": {k: list(v) for k, v in layers.items()}, "steps": steps, "not_in_optimizer": missing},
    )


def gradient_flow(
    no_gradient: Mapping[str, Sequence[str]],
    zero_gradient: Mapping[str, Sequence[str]],
    *,
    steps: int,
) -> Verdict | None:
    """Trainable parameters that never received a gradient (or only exactly zero ones).

    Args:
        no_gradient: per layer, parameters whose ``.grad`` stayed ``None`` on every step.
        zero_gradient: per layer, parameters whose gradient was exactly zero on every step.
        steps: optimizer steps observed.
    """
    layers = list(dict.fromkeys([*no_gradient, *zero_gradient]))
    if not layers:
        return None
    n_none = sum(len(v) for v in no_gradient.values())
    n_zero = sum(len(v) for v in zero_gradient.values())
    parts = []
    if n_none:
        parts.append(f"{n_none} got no gradient at all")
    if n_zero:
        parts.append(f"{n_zero} only exactly zero gradients")
    return Verdict(
        check="gradient_flow",
        severity=Severity.WARNING,
        message=f"Trainable parameters in {len(layers)} layers ({_listing(layers)}) never received a gradient in "
        f"{steps} optimizer steps: {' and '.join(parts)}.",
        causes=(
            "the layer's output is detached (.detach(), .item(), .numpy(), torch.no_grad()) before the loss",
            "the layer is never used in forward, or its output does not reach the loss",
            "its output is multiplied by zero or passes a dead path (a ReLU that is always off)",
        ),
        advice=(
            "follow the layer's output to the loss and remove the detach / no_grad",
            "if the layer is meant to be frozen, set requires_grad=False; if unused, delete it",
        ),
        target=common_scope(layers),
        data={"no_gradient": {k: list(v) for k, v in no_gradient.items()},
              "zero_gradient": {k: list(v) for k, v in zero_gradient.items()}, "steps": steps},
    )


__all__ = [
    "EXPLOSION_FACTOR",
    "FLOW_AFTER_STEPS",
    "MAX_STEP_UPDATE_RATIO",
    "MAX_UPDATE_RATIO",
    "MIN_UPDATE_RATIO",
    "NEVER_UPDATED_MIN_STEPS",
    "SPIKE_MIN_RATIO",
    "SPIKE_ZSCORE",
    "VANISHING_RATIO",
    "WEIGHT_GROWTH_FACTOR",
    "grad_explosion",
    "grad_spike",
    "grad_vanishing",
    "gradient_flow",
    "never_updated",
    "update_ratio",
    "weight_growth",
]
