"""Bad configuration raises at construction, naming the parameter and what it accepts.

One table for every public callback constructor and ``default_callbacks(**overrides)``:
wrong types (a string for a number, a bool for a count, a non-callable for a hook),
out-of-range values (zero, negative, NaN, infinite thresholds), unknown names (actions,
tasks, check names, override keys, arguments), and options that contradict each other. Each
row raises ``ValueError`` or ``TypeError`` before any training, and the message holds every
fragment of the row's ``words``: the parameter's name and the accepted values.
"""

from __future__ import annotations

import pytest

import flightcheck
from flightcheck import (
    ActivationMonitor,
    FlightcheckCallback,
    GradientMonitor,
    LossCurveMonitor,
    NonFiniteGuard,
    PredictionStability,
    Preflight,
    default_callbacks,
)

NAN, INF = float("nan"), float("inf")
ERR = (ValueError, TypeError)

TABLE = [
    # ------------------------------------------------------------------ Preflight
    (Preflight, dict(checks=["init_los"]), ("checks", "init_loss", "overfit_batch")),
    (Preflight, dict(skip=["imbalance"]), ("skip", "class_imbalance")),
    (Preflight, dict(checks=5), ("checks", "PREFLIGHT_CHECKS")),
    (Preflight, dict(skip=5), ("skip", "PREFLIGHT_CHECKS")),
    (Preflight, dict(checks=[5]), ("checks", "init_loss")),
    (Preflight, dict(checks=[]), ("checks", "PREFLIGHT_CHECKS", "preflight=False")),
    (Preflight, dict(checks=["init_loss"], skip=["init_loss"]), ("checks", "skip", "selects no check")),
    (Preflight, dict(on_fail="ignore"), ("on_fail", "'raise', 'warn'")),
    (Preflight, dict(on_fail=True), ("on_fail", "'raise', 'warn'")),
    (Preflight, dict(max_steps=0), ("max_steps", ">= 1")),
    (Preflight, dict(max_steps=2.5), ("max_steps", "int")),
    (Preflight, dict(max_steps=True), ("max_steps", "int")),
    (Preflight, dict(max_seconds=-1), ("max_seconds", "> 0")),
    (Preflight, dict(max_seconds=NAN), ("max_seconds", "> 0")),
    (Preflight, dict(max_seconds="30"), ("max_seconds", "number")),
    (Preflight, dict(num_classes=1), ("num_classes", ">= 2")),
    (Preflight, dict(num_classes=True), ("num_classes", "int")),
    (Preflight, dict(expected_init_loss=NAN), ("expected_init_loss", "finite number")),
    (Preflight, dict(expected_init_loss="1.1"), ("expected_init_loss", "finite number")),
    (Preflight, dict(target=1.5), ("target", "int index or a str key")),
    (Preflight, dict(target=True), ("target", "int index or a str key")),
    (Preflight, dict(snapshot="disk"), ("snapshot", "'host', 'device'")),
    (Preflight, dict(run_on_resume="no"), ("run_on_resume", "bool")),
    (Preflight, dict(on_finding="print"), ("on_finding", "callable")),
    # ------------------------------------------------------------------ GradientMonitor
    (GradientMonitor, dict(depth=0), ("depth", "positive int")),
    (GradientMonitor, dict(depth="2"), ("depth", "positive int")),
    (GradientMonitor, dict(depth=True), ("depth", "positive int")),
    (GradientMonitor, dict(max_layer_charts=-1), ("max_layer_charts", "non-negative int")),
    (GradientMonitor, dict(histogram_every_n_steps=0), ("histogram_every_n_steps", "None or a positive int")),
    (GradientMonitor, dict(update_sample_size=0), ("update_sample_size", "positive int")),
    (GradientMonitor, dict(explosion_factor=0.5), ("explosion_factor", "above 1")),
    (GradientMonitor, dict(explosion_factor=INF), ("explosion_factor", "finite number")),
    (GradientMonitor, dict(spike_min_ratio=NAN), ("spike_min_ratio", "finite number above 1")),
    (GradientMonitor, dict(vanishing_ratio=0), ("vanishing_ratio", "above 0")),
    (GradientMonitor, dict(vanishing_ratio=1.5), ("vanishing_ratio", "(0, 1)")),
    (GradientMonitor, dict(max_update_ratio=-1), ("max_update_ratio", "above 0")),
    (GradientMonitor, dict(min_update_ratio=0.5, max_update_ratio=0.1), ("min_update_ratio", "below max_update_ratio")),
    (GradientMonitor, dict(weight_growth_factor=1), ("weight_growth_factor", "above 1")),
    (GradientMonitor, dict(flow_after_steps=0), ("flow_after_steps", "positive int")),
    (GradientMonitor, dict(on_finding=42), ("on_finding", "callable")),
    # ------------------------------------------------------------------ NonFiniteGuard
    (NonFiniteGuard, dict(action="ignore"), ("action", "'warn', 'skip', 'stop', 'raise'")),
    (NonFiniteGuard, dict(action="STOP"), ("action", "'warn', 'skip', 'stop', 'raise'")),
    (NonFiniteGuard, dict(action=None), ("action", "'warn', 'skip', 'stop', 'raise'")),
    (NonFiniteGuard, dict(min_loss_scale=0), ("min_loss_scale", "> 0")),
    (NonFiniteGuard, dict(min_loss_scale=INF), ("min_loss_scale", "finite number > 0")),
    (NonFiniteGuard, dict(min_loss_scale=NAN), ("min_loss_scale", "> 0")),
    (NonFiniteGuard, dict(min_loss_scale="1"), ("min_loss_scale", "number")),
    (NonFiniteGuard, dict(replay="yes"), ("replay", "True or False")),
    (NonFiniteGuard, dict(save_reproducer=1), ("save_reproducer", "True or False")),
    # ------------------------------------------------------------------ LossCurveMonitor
    (LossCurveMonitor, dict(val_loss_key=""), ("val_loss_key", "metric name")),
    (LossCurveMonitor, dict(val_loss_key=5), ("val_loss_key", "metric name")),
    (LossCurveMonitor, dict(train_loss_key=None), ("train_loss_key", "non-empty string")),
    (LossCurveMonitor, dict(metrics="val_acc"), ("metrics", "list of names", "'min'/'max'")),
    (LossCurveMonitor, dict(metrics={"val_acc": "up"}), ("metrics['val_acc']", "'min', 'max'")),
    (LossCurveMonitor, dict(train_val_loss_key=""), ("train_val_loss_key", "non-empty string")),
    (LossCurveMonitor, dict(test_loss_key=[]), ("test_loss_key", "metric name")),
    (LossCurveMonitor, dict(target_error=NAN), ("target_error", "finite number")),
    (LossCurveMonitor, dict(floor=INF), ("floor", "finite number")),
    (LossCurveMonitor, dict(baseline_loss="0.7"), ("baseline_loss", "finite number")),
    (LossCurveMonitor, dict(floor=1.0, baseline_loss=0.5), ("floor", "baseline_loss", "at most")),
    (LossCurveMonitor, dict(floor=0.2, target_error=0.1), ("floor", "target_error", "at most")),
    (LossCurveMonitor, dict(target_error=1.2, baseline_loss=1.0), ("target_error", "baseline_loss", "at most")),
    (LossCurveMonitor, dict(warmup_steps=-1), ("warmup_steps", "int >= 0")),
    (LossCurveMonitor, dict(warmup_steps=True), ("warmup_steps", "int >= 0")),
    (LossCurveMonitor, dict(confirm=0), ("confirm", "int >= 1")),
    (LossCurveMonitor, dict(confirm=3, escalate_after=2), ("escalate_after", ">= confirm")),
    (LossCurveMonitor, dict(log_curves="yes"), ("log_curves", "True or False")),
    (LossCurveMonitor, dict(summary=None), ("summary", "True or False")),
    # ------------------------------------------------------------------ PredictionStability
    (PredictionStability, dict(probe_batch="abc"), ("probe_batch", "tensor")),
    (PredictionStability, dict(every_n_steps=0), ("every_n_steps", "None", "int >= 1")),
    (PredictionStability, dict(every_n_steps=True), ("every_n_steps", "None", "int >= 1")),
    (PredictionStability, dict(every_n_steps=2.5), ("every_n_steps", "int >= 1")),
    (PredictionStability, dict(prediction_fn="logits"), ("prediction_fn", "callable")),
    (PredictionStability, dict(target_fn=3), ("target_fn", "callable")),
    (PredictionStability, dict(task="classification"), ("task", "'auto', 'multiclass'", "'regression'")),
    (PredictionStability, dict(warmup_steps=-1), ("warmup_steps", "int >= 0")),
    (PredictionStability, dict(warmup_steps=True), ("warmup_steps", "int >= 0")),
    (PredictionStability, dict(patience=0), ("patience", "int >= 1")),
    (PredictionStability, dict(patience=True), ("patience", "int >= 1")),
    (PredictionStability, dict(patience=2.0), ("patience", "int >= 1")),
    # ------------------------------------------------------------------ ActivationMonitor
    (ActivationMonitor, dict(probe_batch=3), ("probe_batch", "tensor")),
    (ActivationMonitor, dict(every_n_steps=-5), ("every_n_steps", "int >= 1")),
    (ActivationMonitor, dict(every_n_steps=False), ("every_n_steps", "int >= 1")),
    (ActivationMonitor, dict(prediction_fn=1), ("prediction_fn", "callable")),
    (ActivationMonitor, dict(warmup_steps="10"), ("warmup_steps", "int >= 0")),
    (ActivationMonitor, dict(patience=False), ("patience", "int >= 1")),
    (ActivationMonitor, dict(per_layer="no"), ("per_layer", "True or False")),
    # ------------------------------------------------------------------ the base class
    (FlightcheckCallback, dict(on_finding=object()), ("on_finding", "callable")),
    # ------------------------------------------------------------------ default_callbacks
    (default_callbacks, dict(grad_monitor=False), ("grad_monitor", "gradient_monitor", "preflight")),
    (default_callbacks, dict(preflight="warn"), ("preflight", "True, False or a dict")),
    (default_callbacks, dict(preflight=None), ("preflight", "True, False or a dict")),
    (default_callbacks, dict(activation_monitor=1), ("activation_monitor", "True, False or a dict")),
    (default_callbacks, dict(preflight={"onfail": "warn"}), ("onfail", "Preflight", "on_fail", "max_steps")),
    (default_callbacks, dict(nonfinite_guard={"mode": "stop"}), ("mode", "NonFiniteGuard", "action")),
    (default_callbacks, dict(nonfinite_guard={"action": "explode"}), ("action", "'warn', 'skip', 'stop', 'raise'")),
    (default_callbacks, dict(loss_curve={"warmup_steps": -1}), ("warmup_steps", "int >= 0")),
    (default_callbacks, dict(on_finding="slack"), ("on_finding", "callable")),
]


def _id(row):
    fn, kwargs, _ = row
    return f"{fn.__name__}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}"[:80]


@pytest.mark.parametrize("factory, kwargs, words", TABLE, ids=[_id(r) for r in TABLE])
def test_bad_configuration_raises_at_construction_naming_parameter_and_accepted_values(factory, kwargs, words):
    with pytest.raises(ERR) as raised:
        factory(**kwargs)
    message = str(raised.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{message!r} lacks {missing}"


def test_every_public_callback_has_rows():
    covered = {row[0] for row in TABLE}
    public = {getattr(flightcheck, name) for name in flightcheck.__all__}
    callbacks = {c for c in public if isinstance(c, type) and issubclass(c, FlightcheckCallback)}
    assert callbacks <= covered and default_callbacks in covered


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (Preflight, dict(checks="init_loss")),  # one name for a list
        (Preflight, dict(checks=["init_loss", "overfit_batch"], skip=["overfit_batch"])),  # skip trims checks
        (Preflight, dict(skip=("class_imbalance",), target=-1, expected_init_loss=-0.5)),  # losses may be negative
        (Preflight, dict(max_seconds=INF, max_steps=1)),  # no time limit
        (GradientMonitor, dict(max_layer_charts=0, histogram_every_n_steps=None)),
        (NonFiniteGuard, dict(action="stop", min_loss_scale=2**-10)),
        (LossCurveMonitor, dict(floor=0.0, target_error=0.0, baseline_loss=1.1, metrics={"val_acc": "max"})),
        (LossCurveMonitor, dict(val_loss_key=("val/loss", "val_loss"), warmup_steps=0)),
        (PredictionStability, dict(every_n_steps=1, warmup_steps=0, patience=1, task="regression")),
        (ActivationMonitor, dict(every_n_steps=None, per_layer=True)),
        (default_callbacks, dict(preflight=False, activation_monitor=True, nonfinite_guard={"action": "skip"})),
        (default_callbacks, dict(preflight={"on_finding": print}, on_finding=print)),
    ],
)
def test_edge_values_that_make_sense_are_accepted(factory, kwargs):
    factory(**kwargs)
