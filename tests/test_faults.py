"""Fault injection: a check that fails inside never costs the user their training.

For every flightcheck callback and every Lightning hook it defines, a copy of the callback
whose hook raises (before its own work, or after it) is trained alongside the other
callbacks: training completes, the failure is reported exactly once as an ``internal_error``
finding naming the callback and the hook (in Python, in the findings file and to the user's
``on_finding``), the failed callback steps aside for the rest of the run, and every other
callback keeps doing its job (charts, probes, summary). The same holds for failures deep
inside a check (a signal function, the pre-flight battery, the curve judge) and for failures
while a checkpoint is saved or loaded. A user's ``on_finding`` hook that raises is logged
once and never re-raised: alerting must not kill the run it reports on.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

import flightcheck
from flightcheck.callbacks import gradient_monitor, nonfinite_guard, preflight, prediction_stability
from flightcheck.callbacks.base import _HOOK_NAMES, FlightcheckCallback
from flightcheck.checks.curves import CurveWatch
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer

STEPS = 6  # two epochs of three batches: every epoch, validation and end-of-run hook is reached


class Recorder(Logger):
    """A logger that keeps the names of the metrics it was given (and has no TensorBoard)."""

    def __init__(self, root):
        super().__init__()
        self._root = root
        self.keys: set[str] = set()

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return self._root

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.keys.update(metrics)


# What each callback visibly does on a healthy run; a callback that stepped aside does none of it.
def _alive(cb, keys):
    name = type(cb).__name__
    if name == "Preflight":
        return cb.last_report is not None and len(cb.last_report.rows) > 0
    if name == "GradientMonitor":
        return "flightcheck/grad_norm/total" in keys
    if name == "NonFiniteGuard":
        return "flightcheck/nonfinite/batches" in keys
    if name == "LossCurveMonitor":
        return cb.diagnosis is not None and len(cb.watch.train) == STEPS  # every loss read, summary written
    if name == "PredictionStability":
        return len(cb.readings) >= 2 and "flightcheck/predictions/churn" in keys
    if name == "ActivationMonitor":
        return len(cb.readings) >= 1 and "flightcheck/activations/dead_fraction" in keys
    raise AssertionError(name)


class Model(TinyClassifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.cross_entropy(self(x), y))


def _callbacks(seen, faulty_key=None, faulty_cls=None):
    callbacks = flightcheck.default_callbacks(
        preflight={"max_steps": 20}, activation_monitor=True, on_finding=seen.append
    )
    if faulty_cls is not None:
        at = next(i for i, cb in enumerate(callbacks) if type(cb).__name__ == faulty_key)
        callbacks[at] = faulty_cls(on_finding=seen.append)
    return callbacks


def _data():
    x, y = cluster_data(n=160)
    return loader(x[:96], y[:96]), loader(x[96:], y[96:], shuffle=False)


def _train(tmp_path, callbacks, **kwargs):
    """Fit (with validation), then test: every hook a flightcheck callback defines is called."""
    recorder = Recorder(str(tmp_path))
    train, val = _data()
    trainer = make_trainer(tmp_path, callbacks, logger=recorder, max_epochs=2, log_every_n_steps=2, **kwargs)
    model = Model()
    trainer.fit(model, train, val)
    assert trainer.global_step == STEPS and trainer.state.status == "finished"
    trainer.test(model, val, verbose=False)
    return trainer, recorder


def _file_rows(tmp_path):
    path = tmp_path / "flightcheck" / "findings.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_contained(tmp_path, trainer, recorder, seen, failed: dict[str, str]):
    """``failed``: callback class name -> the hook (or method) its one internal error names."""
    internal = [f for f in flightcheck.findings(trainer) if f.check == "internal_error"]
    assert sorted(f.target for f in internal) == sorted(f"{c}.{h}" for c, h in failed.items()), \
        [f.message for f in internal]
    for f in internal:
        assert f.severity.value == "warning" and "InjectedFault" in f.message and "traceback" in f.data
    assert [f for f in seen if f.check == "internal_error"] == sorted(internal, key=seen.index)
    rows = [r for r in _file_rows(tmp_path) if r["check"] == "internal_error"]
    assert sorted(r["target"] for r in rows) == sorted(f.target for f in internal)
    # no false alarm on this healthy run, from any callback
    assert [f for f in flightcheck.findings(trainer) if f.check != "internal_error"] == []
    for cb in trainer.callbacks:
        if isinstance(cb, FlightcheckCallback):
            name = type(cb).__name__
            assert cb._failed is (name in failed), name
            if name not in failed:
                assert _alive(cb, recorder.keys), f"{name} stopped working after another callback failed"


class InjectedFault(RuntimeError):
    pass


# ---------------------------------------------------------------------- every hook of every callback
CLASSES = {type(cb).__name__: type(cb) for cb in flightcheck.default_callbacks(activation_monitor=True)}


def _hooks(cls):
    return sorted({n for k in cls.__mro__ if isinstance(k, type) and issubclass(k, FlightcheckCallback)
                   for n in vars(k) if n in _HOOK_NAMES})


CASES = [(name, hook) for name, cls in CLASSES.items() for hook in _hooks(cls)]


def test_every_hook_of_every_callback_is_guarded():
    assert len(CLASSES) == 6 and len(CASES) >= 30
    for name, hook in CASES:
        assert getattr(getattr(CLASSES[name], hook), "__flightcheck_guarded__", False), f"{name}.{hook}"


def _faulty(cls, hook, when):
    original = getattr(cls, hook).__wrapped__  # the hook's own body, without the guard

    def faulty(self, *args, **kwargs):
        if when == "after":
            original(self, *args, **kwargs)
        raise InjectedFault(f"{hook} broke")

    faulty.__name__ = hook
    # a subclass: its hook is guarded the way every flightcheck callback's hooks are
    return type(cls.__name__, (cls,), {hook: faulty})


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("name, hook", CASES, ids=[f"{n}.{h}" for n, h in CASES])
def test_a_hook_that_raises_is_reported_once_and_training_completes(tmp_path, name, hook, when):
    seen = []
    callbacks = _callbacks(seen, name, _faulty(CLASSES[name], hook, when))
    trainer, recorder = _train(tmp_path, callbacks)
    _assert_contained(tmp_path, trainer, recorder, seen, {name: hook})
    failed = next(cb for cb in trainer.callbacks if type(cb).__name__ == name)
    assert failed.findings[-1].data["hook"] == hook


# ---------------------------------------------------------------------- failures deep inside a check
def _raise(*args, **kwargs):
    raise InjectedFault("inside")


def test_the_shared_gradient_read_failing_takes_down_each_of_its_users_once(tmp_path, monkeypatch):
    monkeypatch.setattr(gradient_monitor, "step_grad_norms", _raise)
    monkeypatch.setattr(nonfinite_guard, "step_grad_norms", _raise)
    seen = []
    trainer, recorder = _train(tmp_path, _callbacks(seen))
    _assert_contained(tmp_path, trainer, recorder, seen, {
        "GradientMonitor": "on_before_optimizer_step", "NonFiniteGuard": "on_before_optimizer_step"})


def test_a_preflight_battery_that_crashes_does_not_stop_the_run_even_in_raise_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "run_battery", _raise)
    seen = []
    callbacks = _callbacks(seen)
    assert callbacks[0].on_fail == "raise"
    trainer, recorder = _train(tmp_path, callbacks)
    _assert_contained(tmp_path, trainer, recorder, seen, {"Preflight": "on_fit_start"})


def test_the_curve_judge_failing_leaves_the_other_monitors_running(tmp_path, monkeypatch):
    monkeypatch.setattr(CurveWatch, "evaluate", _raise)
    seen = []
    trainer, recorder = _train(tmp_path, _callbacks(seen))
    failed = [f.target for f in flightcheck.findings(trainer) if f.check == "internal_error"]
    assert len(failed) == 1 and failed[0].startswith("LossCurveMonitor.")
    _assert_contained(tmp_path, trainer, recorder, seen, {"LossCurveMonitor": failed[0].split(".", 1)[1]})


def test_a_probe_measurement_failing_turns_off_prediction_stability_only(tmp_path, monkeypatch):
    # The first probe's failures read as "cannot call this model" (an info note, tested with
    # PredictionStability); a later one is a failure of the check itself.
    measure = prediction_stability.PredictionStability._measure
    calls = []

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise InjectedFault("inside")
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(prediction_stability.PredictionStability, "_measure", second_fails)
    seen = []
    trainer, recorder = _train(tmp_path, _callbacks(seen))
    failed = [f.target for f in flightcheck.findings(trainer) if f.check == "internal_error"]
    assert len(failed) == 1 and failed[0].startswith("PredictionStability.")
    _assert_contained(tmp_path, trainer, recorder, seen, {"PredictionStability": failed[0].split(".", 1)[1]})


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["GradientMonitor", "LossCurveMonitor", "PredictionStability", "NonFiniteGuard"])
def test_a_state_that_cannot_be_saved_costs_neither_the_checkpoint_nor_the_run(tmp_path, name, monkeypatch):
    monkeypatch.setattr(CLASSES[name], "extra_state", _raise)
    seen = []
    callbacks = _callbacks(seen) + [ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)]
    trainer, recorder = _train(tmp_path, callbacks, enable_checkpointing=True)
    _assert_contained(tmp_path, trainer, recorder, seen, {name: "state_dict"})
    saved = torch.load(str(tmp_path / "ckpt" / "last.ckpt"))  # weights_only, as Lightning loads it
    assert saved["global_step"] == STEPS and "state_dict" in saved


@pytest.mark.parametrize("name", ["GradientMonitor", "LossCurveMonitor", "PredictionStability", "NonFiniteGuard"])
def test_a_state_that_cannot_be_loaded_does_not_stop_the_resume(tmp_path, name, monkeypatch):
    train, val = _data()
    first = make_trainer(tmp_path, flightcheck.default_callbacks(), logger=False, max_epochs=1,
                         log_every_n_steps=2)
    first.fit(TinyClassifier(), train, val)
    ckpt = str(tmp_path / "first.ckpt")
    first.save_checkpoint(ckpt)

    monkeypatch.setattr(CLASSES[name], "load_extra_state", _raise)
    seen = []
    recorder = Recorder(str(tmp_path))
    trainer = make_trainer(tmp_path, _callbacks(seen), logger=recorder, max_epochs=2, log_every_n_steps=2)
    trainer.fit(TinyClassifier(), train, val, ckpt_path=ckpt)
    assert trainer.global_step == STEPS
    internal = [f for f in flightcheck.findings(trainer) if f.check == "internal_error"]
    assert [f.target for f in internal] == [f"{name}.load_state_dict"]
    assert [f.target for f in seen if f.check == "internal_error"] == [f"{name}.load_state_dict"]


# ---------------------------------------------------------------------- the user's on_finding hook
class _Reporter(FlightcheckCallback):
    """Reports a new problem on every batch (each one news: a different target)."""

    name = "reporter"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.report(trainer, "loss_spike", "warning", f"spike at step {step}", target=f"step{step}")


def test_an_on_finding_hook_that_raises_is_logged_once_and_never_stops_training(tmp_path, caplog):
    calls = []

    def pager(finding):
        calls.append(finding)
        raise ConnectionError("pager down")

    class _Other(_Reporter):  # Lightning wants one stateful callback per class
        name = "other"

    reporters = [_Reporter(on_finding=pager), _Other(on_finding=pager)]
    trainer = make_trainer(tmp_path, reporters, logger=False, max_steps=5, max_epochs=-1)
    with caplog.at_level(logging.WARNING, logger="flightcheck"):
        trainer.fit(TinyClassifier(), *_data())
    assert trainer.global_step == 5
    assert len(calls) == 10  # still called for every finding: a pager may come back
    assert len(_file_rows(tmp_path)) == 10  # and every finding still reached the file
    failures = [r for r in caplog.records if "on_finding" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]  # said once per run, not per finding
    assert "ConnectionError" in failures[0].getMessage() and "pager down" in failures[0].getMessage()
    assert not [f for f in flightcheck.findings(trainer) if f.check == "internal_error"]
