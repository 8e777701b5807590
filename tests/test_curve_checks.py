"""The curve judges on synthetic series: healthy shapes stay silent, each sick shape gets its check."""

from __future__ import annotations

import numpy as np
import pytest

from flightcheck.checks.curves import (
    CurveWatch,
    classify_train_curve,
    decompose,
    diagnose,
    loss_divergence,
    loss_oscillation,
    loss_plateau,
    loss_spike,
    lr_collapsed,
    overfitting,
    underfitting,
)
from flightcheck.signals.curves import (
    SeriesBuffer,
    level_noise,
    noise_scale,
    repeating_pattern,
    running_median,
    theil_sen,
)

STEPS = np.arange(1, 601, dtype=float)


def _decay(steps=STEPS, start=1.1, floor=0.05, rate=60.0):
    return floor + (start - floor) * np.exp(-steps / rate)


def _noisy(curve, scale, seed=0, heavy=False):
    rng = np.random.default_rng(seed)
    noise = rng.standard_t(3, curve.size) if heavy else rng.standard_normal(curve.size)
    return curve + scale * noise


def _checks(steps, values, **kwargs):
    return [(p.verdict.check, p.verdict.severity.value) for p in diagnose(steps, values, **kwargs).problems]


# ----------------------------------------------------------------------------- healthy: silent
def _warmup(steps=STEPS):
    lr = np.minimum(1.0, steps / 100)
    return 0.05 + 1.05 * np.exp(-np.cumsum(lr) / 50)


def _cosine(steps=STEPS):
    lr = 0.5 * (1 + np.cos(np.pi * steps / steps[-1]))
    return 0.1 + 1.0 * np.exp(-np.cumsum(lr) / 60)


def _step_decay(steps=STEPS):
    curve = _decay(steps, floor=0.3)
    return curve - 0.1 * (steps > 200) - 0.05 * (steps > 400)  # each LR drop knocks the loss down a notch


HEALTHY = {
    "noisy_but_falling": lambda s: _noisy(_decay(), 0.05, s),
    "lr_warmup": lambda s: _noisy(_warmup(), 0.04, s),
    "cosine_decay": lambda s: _noisy(_cosine(), 0.04, s),
    "step_lr_decay": lambda s: _noisy(_step_decay(), 0.03, s),
    "label_smoothing_floor": lambda s: _noisy(_decay(floor=0.45), 0.03, s),
    "negative_log_likelihood": lambda s: _noisy(_decay(start=1.5, floor=-2.0), 0.08, s),
    "large_noise_small_batches": lambda s: np.abs(_noisy(_decay(floor=0.3), 0.3, s, heavy=True)),
    "slow_but_steady": lambda s: _noisy(1.1 - 0.0006 * STEPS, 0.05, s),
    "converged_regression_near_noise_floor": lambda s: _noisy(_decay(start=1.3, floor=1.0, rate=30), 0.1, s),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_training_curves_get_no_verdict(name, seed):
    values = HEALTHY[name](seed)
    assert _checks(STEPS, values) == []
    assert classify_train_curve(STEPS, values, start_step=50) == []


def test_healthy_train_and_validation_pair_is_called_healthy():
    train = _noisy(_decay(), 0.05, 0)
    val_steps = np.arange(60, 601, 60, dtype=float)
    val = _decay(val_steps, floor=0.12) + 0.005 * np.random.default_rng(1).standard_normal(val_steps.size)
    d = diagnose(STEPS, train, val_steps, val)
    assert d.labels == ("healthy",) and d.problems == ()


# ----------------------------------------------------------------------------- divergence
def test_sustained_rise_is_divergence_dated_from_the_best_step():
    curve = np.where(STEPS < 250, _decay(), _decay(np.array([250.0]))[0] + 0.004 * (STEPS - 250))
    values = _noisy(curve, 0.02, 0)
    verdicts = classify_train_curve(STEPS, values, start_step=50)
    assert [v.check for v in verdicts] == ["loss_divergence"]  # a diverging run is not also a plateau
    assert abs(verdicts[0].data["began_step"] - 250) <= 40


def test_moderate_rise_is_a_warning_not_an_error():
    curve = np.where(STEPS < 300, _decay(), _decay(np.array([300.0]))[0] + 0.0012 * (STEPS - 300))
    verdict = loss_divergence(STEPS, _noisy(curve, 0.01, 0), start_step=50)
    assert verdict is not None and verdict.severity.value == "warning"
    assert 0.25 < verdict.data["rise"] / (verdict.data["initial"] - verdict.data["best"]) < 1.0


def test_explosion_during_warmup_is_an_error_at_once():
    steps = np.arange(1, 31, dtype=float)
    values = 1.1 * 1.5 ** steps  # the loss multiplies every step, long before warm-up ends
    assert _checks(steps, values, warmup_steps=50) == [("loss_divergence", "error")]


def test_loss_running_off_below_zero_is_divergence():
    values = _noisy(-1.4 - 0.00002 * STEPS**2.5, 0.05, 0)  # a negated cross-entropy being "minimised"
    verdict = loss_divergence(STEPS, values, start_step=50)
    assert verdict is not None and verdict.data["shape"] == "runaway_fall" and verdict.severity.value == "error"


def test_drift_of_a_flat_quiet_curve_is_no_divergence():
    values = 1.386 + 0.001 * np.random.default_rng(0).standard_normal(STEPS.size) + 0.004 * (STEPS > 400)
    assert loss_divergence(STEPS, values, start_step=50) is None


# ----------------------------------------------------------------------------- spikes
def test_lone_spike_the_run_shrugs_off_is_info():
    values = _noisy(_decay(), 0.02, 0)
    values[400] = 1.5
    verdict = loss_spike(STEPS, values, start_step=50)
    assert verdict is not None and verdict.severity.value == "info"
    assert verdict.data["spike_step"] == 401


def test_spike_that_knocks_the_run_back_is_a_warning():
    values = _noisy(_decay(), 0.02, 0)
    values[400] = 2.0
    values[401:440] += 0.3 * np.exp(-np.arange(39) / 15)  # the bad update set it back
    verdict = loss_spike(STEPS, values, start_step=50)
    assert verdict is not None and verdict.severity.value == "warning"


def test_heavy_tailed_small_batch_noise_has_no_spikes():
    values = np.abs(_noisy(_decay(floor=0.3), 0.3, 4, heavy=True))
    assert loss_spike(STEPS, values, start_step=50) is None


# ----------------------------------------------------------------------------- oscillation
def test_zig_zag_around_a_level_is_oscillation():
    values = 0.9 + 0.05 * (-1.0) ** STEPS + 0.005 * np.random.default_rng(0).standard_normal(STEPS.size)
    values[:40] = np.linspace(1.16, 0.9, 40)
    verdicts = classify_train_curve(STEPS, values, start_step=50)
    assert [v.check for v in verdicts] == ["loss_oscillation"]
    assert verdicts[0].data["period_points"] == 2


def test_every_third_batch_corrupted_is_oscillation():
    values = _noisy(_decay(floor=0.3), 0.03, 0)
    values[::3] += 0.6
    verdict = loss_oscillation(STEPS, values, start_step=50)
    assert verdict is not None and verdict.data["period_points"] == 3


def test_cyclic_schedule_swings_are_not_oscillation():
    values = _noisy(_decay(floor=0.3), 0.02, 0) + 0.1 * np.sin(2 * np.pi * STEPS / 50)
    assert loss_oscillation(STEPS, values, start_step=50) is not None  # the shape alone repeats ...
    verdicts = classify_train_curve(STEPS, values, start_step=50, periodic_schedule=True)
    assert "loss_oscillation" not in [v.check for v in verdicts]  # ... but the schedule explains it


# ----------------------------------------------------------------------------- plateau
def test_flat_curve_at_its_initial_level_is_a_plateau():
    values = _noisy(np.full(STEPS.size, 1.386), 0.03, 0)
    verdicts = classify_train_curve(STEPS, values, start_step=50)
    assert [v.check for v in verdicts] == ["loss_plateau"]
    assert "no lower than its initial" in verdicts[0].message


def test_flat_negative_log_likelihood_is_a_plateau():
    values = _noisy(np.full(STEPS.size, -0.25), 0.01, 0)
    assert loss_plateau(STEPS, values, start_step=50) is not None


def test_plateau_short_of_a_known_floor_is_caught_only_with_the_floor():
    values = _noisy(_decay(floor=0.8), 0.02, 0)  # fell from 1.1 and stuck at 0.8
    assert loss_plateau(STEPS, values, start_step=50) is None  # may have converged
    verdict = loss_plateau(STEPS, values, start_step=50, floor=0.0)
    assert verdict is not None and verdict.data["progress"] < 0.5


def test_flat_curve_after_the_learning_rate_collapsed_is_a_plateau():
    values = _noisy(np.where(STEPS < 60, _decay(), _decay(np.array([60.0]))[0]), 0.02, 0)
    assert loss_plateau(STEPS, values, start_step=50) is None
    verdict = loss_plateau(STEPS, values, start_step=50, lr_collapsed_step=60)
    assert verdict is not None and "learning rate decayed" in verdict.causes[0]


def test_learning_rate_collapse_needs_much_of_the_run_left():
    assert lr_collapsed(1e-9, 0.1, step=60, planned_steps=300)
    assert not lr_collapsed(1e-9, 0.1, step=290, planned_steps=300)  # a decay to zero at the end
    assert not lr_collapsed(1e-3, 0.1, step=60, planned_steps=300)


def test_slow_start_is_not_called_a_plateau_before_enough_points():
    values = _noisy(np.full(100, 1.386), 0.03, 0)
    assert loss_plateau(np.arange(1, 101.0), values, start_step=50) is None


# ----------------------------------------------------------------------------- overfitting
VAL_STEPS = np.arange(30, 601, 30, dtype=float)


def _u_shaped_val(best_step=210.0):
    return 0.45 + 0.6 * np.exp(-VAL_STEPS / 60) + 0.0012 * np.maximum(VAL_STEPS - best_step, 0)


def test_validation_rising_while_training_falls_is_overfitting_from_its_best_step():
    val = _u_shaped_val()
    verdict = overfitting(STEPS, _noisy(_decay(floor=0.01), 0.02, 0), VAL_STEPS, val)
    assert verdict is not None and verdict.check == "overfitting"
    assert verdict.data["began_step"] == VAL_STEPS[np.argmin(val)]
    assert verdict.data["shape"] == "rising"


def test_validation_that_never_improved_is_overfitting_naming_the_split():
    val = 1.1 + 0.002 * VAL_STEPS
    verdict = overfitting(STEPS, _noisy(_decay(), 0.02, 0), VAL_STEPS, val)
    assert verdict is not None and verdict.data["validation_never_improved"]
    assert any("validation data not drawn like the training data" in c for c in verdict.causes)


def test_stalled_validation_while_training_keeps_falling_is_a_widening_gap():
    train = _noisy(np.maximum(1.1 - 0.002 * STEPS, 0.02), 0.01, 0)
    val = np.maximum(1.1 - 0.004 * VAL_STEPS, 0.62) + 0.002 * np.random.default_rng(0).standard_normal(VAL_STEPS.size)
    verdict = overfitting(STEPS, train, VAL_STEPS, val)
    assert verdict is not None and verdict.data["shape"] == "widening_gap"


def test_validation_accuracy_falling_is_overfitting_in_max_mode():
    acc = 0.9 - 0.5 * np.exp(-VAL_STEPS / 60) - 0.0006 * np.maximum(VAL_STEPS - 210, 0)
    verdict = overfitting(STEPS, _noisy(_decay(floor=0.01), 0.02, 0), VAL_STEPS, acc, target="val_acc", mode="max")
    assert verdict is not None and verdict.data["best_step"] == VAL_STEPS[np.argmax(acc)]


def test_overfitting_is_replayed_with_its_start_step_in_the_diagnosis():
    d = diagnose(STEPS, _noisy(_decay(floor=0.01), 0.02, 0), VAL_STEPS, _u_shaped_val())
    assert d.labels == ("overfitting",)
    assert [p.began_step for p in d.problems] == [210]
    assert d.val is not None and d.val["best_step"] == 210


# ----------------------------------------------------------------------------- underfitting
def test_levelled_off_above_the_target_error_is_underfitting():
    values = _noisy(_decay(floor=0.6), 0.02, 0)
    verdict = underfitting(STEPS, values, start_step=50, target_error=0.1)
    assert verdict is not None and verdict.severity.value == "warning"
    assert verdict.data["avoidable_bias"] == pytest.approx(0.5, abs=0.05)
    assert underfitting(STEPS, values, start_step=50, target_error=0.58) is None


def test_no_better_than_a_trivial_predictor_is_an_underfitting_error():
    values = _noisy(_decay(start=1.2, floor=1.1), 0.02, 0)  # settles at the prior's entropy, ln 3
    verdict = underfitting(STEPS, values, start_step=50, baseline=1.0986)
    assert verdict is not None and verdict.severity.value == "error"


def test_run_that_learned_nothing_ends_underfitting_or_plateau_not_both_shapes():
    checks = {c for c, _ in _checks(STEPS, _noisy(np.full(STEPS.size, 1.386), 0.03, 0))}
    assert "loss_plateau" in checks and "loss_divergence" not in checks


def test_bias_variance_decomposition_terms():
    terms = decompose(0.30, 0.45, 0.05, train_val_error=0.35, test_error=0.50)
    assert terms == pytest.approx({
        "irreducible": 0.05, "avoidable_bias": 0.25, "variance": 0.05,
        "distribution_shift": 0.10, "validation_overfitting": 0.05,
    })
    assert "distribution_shift" not in decompose(0.3, 0.45, 0.05)


def test_diagnosis_with_target_error_names_the_largest_term():
    d = diagnose(STEPS, _noisy(_decay(floor=0.1), 0.01, 0), VAL_STEPS, np.full(VAL_STEPS.size, 0.5), target_error=0.05)
    assert d.decomposition["variance"] == pytest.approx(0.4, abs=0.03)
    assert "largest term: variance" in d.format()


# ----------------------------------------------------------------------------- watching
def test_a_problem_seen_once_is_not_reported():
    watch = CurveWatch(warmup_steps=50, confirm=2)
    flat = _noisy(np.full(STEPS.size, 1.386), 0.03, 0)
    watch.add_train(STEPS[:200], flat[:200])
    assert watch.evaluate(200).report == []
    watch.add_train(STEPS[200:250], flat[200:250])
    assert [p.verdict.check for p in watch.evaluate(250).report] == ["loss_plateau"]


def test_persisting_warning_escalates_and_cleared_problem_is_rearmed():
    watch = CurveWatch(warmup_steps=50, confirm=2, escalate_after=4)
    flat = _noisy(np.full(STEPS.size, 1.386), 0.03, 0)
    severities = []
    for end in range(150, 401, 25):
        watch.add_train(STEPS[end - 25 : end] if end > 150 else STEPS[:end], flat[end - 25 : end] if end > 150 else flat[:end])
        severities += [p.verdict.severity.value for p in watch.evaluate(end).report]
    assert severities == ["warning", "error"]
    falling = flat[400] - 0.004 * np.arange(1, 201)  # now it learns fast
    cleared = []
    for k in range(0, 200, 25):
        watch.add_train(STEPS[400 + k : 425 + k], falling[k : k + 25])
        cleared += watch.evaluate(425 + k).cleared
    assert ("loss_plateau", "train_loss") in cleared


def _first_overfitting_report(train, val):
    """Feed a watch as LossCurveMonitor does (training, then each validation); the step of
    the first overfitting report and the evaluations at which overfitting() already held."""
    watch = CurveWatch(warmup_steps=50, confirm=2)
    held, done = [], 0
    for vstep, value in zip(VAL_STEPS, val):
        end = int(vstep)
        watch.add_train(STEPS[done:end], train[done:end])
        done = end
        watch.evaluate(vstep, val_names=[])
        watch.add_val("val_loss", vstep, float(value))
        if overfitting(STEPS[:end], train[:end], VAL_STEPS[VAL_STEPS <= vstep], val[: VAL_STEPS[VAL_STEPS <= vstep].size]):
            held.append(vstep)
        report = watch.evaluate(vstep, train=False, val_names=["val_loss"]).report
        if any(p.verdict.check == "overfitting" for p in report):
            return vstep, held
    return None, held


def test_rising_validation_is_reported_once_early_stopping_patience_is_met():
    # The rise must already hold over OVERFIT_PATIENCE evaluations past the best one: that is
    # its confirmation; waiting for one more evaluation would add a whole validation interval.
    step, held = _first_overfitting_report(_noisy(_decay(floor=0.01), 0.02, 0), _u_shaped_val())
    assert held and step == held[0]


def test_a_widening_gap_needs_a_second_evaluation():
    train = _noisy(np.maximum(1.1 - 0.002 * STEPS, 0.02), 0.01, 0)
    val = np.maximum(1.1 - 0.004 * VAL_STEPS, 0.62) + 0.002 * np.random.default_rng(0).standard_normal(VAL_STEPS.size)
    step, held = _first_overfitting_report(train, val)
    assert len(held) >= 2 and step == held[1]


def test_watch_state_round_trips():
    watch = CurveWatch(warmup_steps=20)
    watch.add_train(STEPS[:100], _decay()[:100])
    watch.add_val("val_loss", 50, 0.8)
    watch.evaluate(100)
    other = CurveWatch(warmup_steps=20)
    other.load_state_dict(watch.state_dict())
    assert np.array_equal(other.train.arrays()[1], watch.train.arrays()[1])
    assert other.vals["val_loss"].arrays()[1].tolist() == [0.8]
    assert other.evaluations == watch.evaluations


# ----------------------------------------------------------------------------- signals
def test_theil_sen_ignores_a_few_wild_points():
    y = 2.0 - 0.01 * STEPS
    y[::20] += 50.0
    slope, _ = theil_sen(STEPS, y)
    assert slope == pytest.approx(-0.01, rel=0.05)


def test_running_median_edges_do_not_stand_on_one_point():
    v = np.array([9.0, 1, 1, 1, 1, 1, 1, 1, 1, 9])
    assert running_median(v, 5).tolist() == [1.0] * 10


def test_repeating_pattern_finds_the_period():
    v = np.tile([0.0, 0.0, 0.0, 0.0, 1.0], 40) + 0.01 * np.random.default_rng(0).standard_normal(200)
    period, strength, swing = repeating_pattern(v, 0.5)
    assert period == 5 and strength > 0.8 and swing == pytest.approx(1.0, abs=0.1)
    assert repeating_pattern(np.random.default_rng(1).standard_normal(300), 0.5)[0] == 0


def test_level_noise_counts_wandering_that_point_noise_misses():
    rng = np.random.default_rng(0)
    white = rng.standard_normal(400)
    wander = np.convolve(rng.standard_normal(420), np.ones(20) / 20 ** 0.5, mode="valid")[:400]
    as_if_independent = 1.2533 * noise_scale(wander) / np.sqrt(10)
    assert level_noise(wander, 10) > 2 * as_if_independent
    assert level_noise(white, 10) == pytest.approx(1.2533 * noise_scale(white) / np.sqrt(10), rel=0.3)


def test_series_buffer_keeps_recent_points_exact_and_old_ones_coarse():
    buf = SeriesBuffer(capacity=64)
    buf.extend(np.arange(200), np.arange(200, dtype=float))
    steps, values = buf.arrays()
    assert len(buf) <= 64 and steps[-1] == 199 and np.array_equal(values[-16:], np.arange(184, 200))
    assert steps[0] < 10  # the start of the run is still there


def test_loss_that_fits_to_exactly_zero_is_neither_divergence_nor_underfitting():
    # A large learning rate on separable data: logits grow so large that the cross-entropy
    # underflows to exactly 0.0 on every batch after the first. Nothing rose.
    steps = np.arange(130, dtype=float)
    values = np.r_[1.3, np.zeros(129)]
    assert _checks(steps, values) == []


def test_loss_first_logged_after_it_fitted_to_exactly_zero_is_not_underfitting():
    # The same run read back from TensorBoard by `flightcheck analyze`: logged every 10 steps,
    # its first point is already 0.0, so the fall is not in the series.
    steps = np.arange(9, 130, 10, dtype=float)
    assert _checks(steps, np.zeros(len(steps))) == []


def test_loss_exactly_zero_from_step_0_is_underfitting():
    # zero before any update: the loss never carried a signal (everything masked out, times 0)
    steps = np.arange(130, dtype=float)
    assert ("underfitting", "warning") in _checks(steps, np.zeros(130))


def test_summary_best_is_never_above_the_start_of_a_curve_that_only_rose():
    """A 6-point curve that explodes from 0.9: the smoothed minimum sits above the first loss,
    and the summary must not call it the best."""
    from flightcheck.checks.curves import _curve_summary

    summary = _curve_summary(np.arange(0, 60, 10.0), np.array([0.9, 8.6, 12.0, 40.0, 9.0, 5.3]))
    assert summary["best"] == pytest.approx(0.9) and summary["best_step"] == 0


def test_a_step_schedule_landing_exactly_on_the_collapse_ratio_counts_despite_rounding():
    lr = 1e-3
    for _ in range(3):  # StepLR(gamma=0.1) three times: 1.0000000000000002e-06, not 1e-06
        lr *= 0.1
    assert lr > 1e-3 * 1e-3  # the rounding this guards against
    assert lr_collapsed(lr, 1e-3, step=40, planned_steps=300)
    assert not lr_collapsed(lr * 1.01, 1e-3, step=40, planned_steps=300)
