"""LossCurveMonitor in real Trainer runs: what a user sees in findings, TensorBoard and the summary."""

from __future__ import annotations

import math
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flightcheck
from flightcheck.callbacks.loss_curve import LossCurveMonitor
from flightcheck.testing.syncs import SyncCounter
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer


def _alarms(callback):
    return [(f.check, f.severity.value) for f in callback.findings if f.severity.value != "info"]


def _hard_data(n=256, seed=0):
    return cluster_data(n=n, separation=1.0, seed=seed)


class _ValRecorder(pl.Callback):
    def __init__(self):
        self.val = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


class _BigClassifier(TinyClassifier):
    """A 2x256 MLP: far more capacity than 48 noisy samples need."""

    def __init__(self):
        super().__init__(hidden=256, lr=3e-3, optimizer="adam")
        self.net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))


def _tiny_noisy_split(seed=1):
    x, y = cluster_data(n=560, separation=1.0, seed=seed)
    g = torch.Generator().manual_seed(0)
    xt, yt = x[:48], y[:48].clone()
    flip = torch.rand(48, generator=g) < 0.3
    yt[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=g)
    return (xt, yt), (x[48:], y[48:])


# ----------------------------------------------------------------------------- sick runs
def test_learning_rate_far_too_high_is_divergence(tmp_path):
    monitor = LossCurveMonitor(warmup_steps=20)
    trainer = make_trainer(tmp_path, [monitor], max_steps=120, max_epochs=100)
    trainer.fit(TinyClassifier(lr=10.0), loader(*_hard_data(), batch_size=16))
    divergence = [f for f in monitor.findings if f.check == "loss_divergence"]
    assert divergence and divergence[0].severity.value == "error"
    assert divergence[0].step < 120 and divergence[0].source == "loss_curve"


def test_overfitting_tiny_train_set_with_noisy_labels_reports_the_step_it_began(tmp_path):
    (xt, yt), (xv, yv) = _tiny_noisy_split()
    monitor, recorder = LossCurveMonitor(), _ValRecorder()
    trainer = make_trainer(tmp_path, [monitor, recorder], max_epochs=30)
    trainer.fit(_BigClassifier(), loader(xt, yt, batch_size=8), DataLoader(TensorDataset(xv, yv), batch_size=256))
    found = [f for f in monitor.findings if f.check == "overfitting"]
    assert found and found[0].target == "val_loss"
    best_step = min(recorder.val, key=lambda sv: sv[1])[0]
    assert found[0].data["began_step"] == best_step
    assert f"step {best_step}" in found[0].message
    assert monitor.diagnosis is not None and "overfitting" in monitor.diagnosis.labels


# ----------------------------------------------------------------------------- healthy runs: silent
class _WarmupCosine(TinyClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=200, pct_start=0.2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _FrozenFirstLayer(TinyClassifier):
    def __init__(self):
        super().__init__(optimizer="adam", lr=3e-3)
        self.net[0].requires_grad_(False)


class _DictOutput(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "n": batch[0].shape[0]}


class _Manual(TinyClassifier):
    def __init__(self):
        super().__init__(optimizer="adam", lr=3e-3)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=1.0)
        opt.step()
        return loss


HEALTHY = {
    "sgd": (lambda: TinyClassifier(), {}, 16),
    "adam_noisy_small_batches": (lambda: TinyClassifier(optimizer="adam", lr=1e-3), {}, 4),
    "warmup_then_decay": (lambda: _WarmupCosine(), {}, 16),
    "gradient_clipping": (lambda: TinyClassifier(lr=0.1), {"gradient_clip_val": 0.5}, 16),
    "frozen_layer": (lambda: _FrozenFirstLayer(), {}, 16),
    "dict_output": (lambda: _DictOutput(), {}, 16),
    "gradient_accumulation": (lambda: TinyClassifier(), {"accumulate_grad_batches": 2}, 8),
    "bf16_mixed": (lambda: TinyClassifier(optimizer="adam", lr=3e-3), {"precision": "bf16-mixed"}, 16),
    "manual_optimisation": (lambda: _Manual(), {}, 16),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_run_stays_silent(tmp_path, name):
    build, trainer_kwargs, batch_size = HEALTHY[name]
    monitor = LossCurveMonitor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=200, max_epochs=100, **trainer_kwargs)
    x, y = _hard_data(n=512)
    trainer.fit(build(), loader(x, y, batch_size=batch_size))
    assert _alarms(monitor) == []
    assert len(monitor.watch.train) >= 190  # every step's loss was read
    assert monitor.diagnosis is not None and monitor.diagnosis.labels == ("healthy",)


def test_loss_read_back_unscaled_under_gradient_accumulation(tmp_path):
    monitor = LossCurveMonitor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, accumulate_grad_batches=4)
    x, y = _hard_data()
    trainer.fit(TinyClassifier(), loader(x, y, batch_size=16, shuffle=False))
    _, values = monitor.watch.train.arrays()
    assert values.size == 16 and values[0] == pytest.approx(math.log(3), abs=0.3)  # not divided by 4


# ----------------------------------------------------------------------------- what is read, and when
def test_ordinary_steps_do_not_synchronise_with_the_device():
    monitor = LossCurveMonitor()
    trainer = types.SimpleNamespace(global_step=3, log_every_n_steps=50, accumulate_grad_batches=1)
    module = types.SimpleNamespace(automatic_optimization=True)
    loss = torch.tensor(0.7, requires_grad=True) * 1.0
    with SyncCounter() as syncs:
        for step in range(3, 40):
            trainer.global_step = step
            monitor.on_train_batch_end(trainer, module, {"loss": loss}, None, step)
    assert syncs.total == 0, syncs.calls
    assert len(monitor.watch.train) == 0 and len(monitor._buffer_steps) == 37


class _SometimesNone(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 2 else {"loss": loss, "nll": loss.detach() * 2}


def test_skipped_steps_are_left_out_and_the_loss_key_is_configurable(tmp_path):
    monitor = LossCurveMonitor(train_loss_key="nll")
    trainer = make_trainer(tmp_path, [monitor], max_epochs=1)
    trainer.fit(_SometimesNone(), loader(*_hard_data(), batch_size=32))
    _, values = monitor.watch.train.arrays()
    assert values.size == 4 and values[0] == pytest.approx(2 * math.log(3), abs=0.6)


def test_validate_runs_are_not_curve_points_and_test_loss_completes_the_decomposition(tmp_path):
    class WithTest(TinyClassifier):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    monitor = LossCurveMonitor(target_error=0.05, warmup_steps=10)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=3)
    x, y = _hard_data()
    model = WithTest()
    trainer.fit(model, loader(x, y), loader(x, y, shuffle=False))
    val_points = len(monitor.watch.vals["val_loss"])
    trainer.validate(model, loader(x, y, shuffle=False))
    assert len(monitor.watch.vals["val_loss"]) == val_points == 3
    trainer.test(model, loader(x, y, shuffle=False))
    assert monitor.test_error is not None
    terms = monitor.diagnosis.decomposition
    assert set(terms) == {"irreducible", "avoidable_bias", "variance", "validation_overfitting"}
    summary = (tmp_path / "logs" / "version_0" / "flightcheck" / "summary.md").read_text()
    assert "validation overfitting" in summary


# ----------------------------------------------------------------------------- end of fit
def test_end_of_fit_summary_reaches_console_tensorboard_and_file(tmp_path, caplog):
    monitor = LossCurveMonitor(warmup_steps=20)
    trainer = make_trainer(tmp_path, [monitor], max_steps=120, max_epochs=100)
    with caplog.at_level("INFO", logger="flightcheck"):
        trainer.fit(TinyClassifier(lr=10.0), loader(*_hard_data(), batch_size=16))
    summary = (tmp_path / "logs" / "version_0" / "flightcheck" / "summary.md").read_text()
    assert "**Curve diagnosis:** diverging" in summary
    assert "| step | severity | check | target | source | message |" in summary and "loss_divergence" in summary
    assert any("Curve diagnosis: diverging" in r.getMessage() for r in caplog.records)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "logs" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "flightcheck/summary/text_summary" in acc.Tags()["tensors"]
    assert "flightcheck/curves/train_loss_smoothed" in acc.Tags()["scalars"]


def test_summary_lists_every_flightcheck_callbacks_findings(tmp_path):
    class Other(flightcheck.FlightcheckCallback):
        name = "other"

        def on_train_start(self, trainer, pl_module):
            self.report(trainer, "grad_spike", "warning", "a spike elsewhere", target="net.0")

    monitor = LossCurveMonitor()
    trainer = make_trainer(tmp_path, [Other(), monitor], max_steps=10)
    trainer.fit(TinyClassifier(), loader(*_hard_data()))
    summary = (tmp_path / "logs" / "version_0" / "flightcheck" / "summary.md").read_text()
    assert "grad_spike" in summary and "other" in summary


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_works_without_a_tensorboard_logger(tmp_path, logger):
    monitor = LossCurveMonitor()
    chosen = CSVLogger(str(tmp_path), name="csv") if logger == "csv" else False
    trainer = make_trainer(tmp_path, [monitor], logger=chosen, max_steps=30, max_epochs=100)
    trainer.fit(TinyClassifier(), loader(*_hard_data()))
    assert not [f for f in monitor.findings if f.check == "internal_error"]
    assert len(monitor.watch.train) == 30
    assert monitor.diagnosis is not None


# ----------------------------------------------------------------------------- checkpoints
def test_resumed_run_keeps_its_windows_and_baselines(tmp_path):
    x, y = _hard_data()
    first = LossCurveMonitor()
    trainer = make_trainer(tmp_path, [first], max_steps=60, max_epochs=100)
    trainer.fit(TinyClassifier(), loader(x, y, batch_size=16))
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    before_steps, before_values = first.watch.train.arrays()

    second = LossCurveMonitor()
    trainer = make_trainer(tmp_path, [second], max_steps=100, max_epochs=100)
    trainer.fit(TinyClassifier(), loader(x, y, batch_size=16), ckpt_path=str(path))
    steps, values = second.watch.train.arrays()
    assert steps[: before_steps.size].tolist() == before_steps.tolist()  # the first 60 steps came back
    assert values[: before_values.size].tolist() == pytest.approx(before_values.tolist())
    assert steps[-1] == 100 and second.watch.evaluations > first.watch.evaluations


def test_state_dict_round_trip_restores_the_watch():
    monitor = LossCurveMonitor()
    monitor.watch.add_train(range(1, 101), [1.0 / k for k in range(1, 101)])
    monitor.watch.add_val("val_loss", 50, 0.3)
    other = LossCurveMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.watch.train.arrays()[1].tolist() == monitor.watch.train.arrays()[1].tolist()
    assert other.watch.vals["val_loss"].arrays()[1].tolist() == [0.3]


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"val_loss_key": []}, TypeError, "val_loss_key"),
        ({"train_loss_key": ""}, TypeError, "train_loss_key"),
        ({"metrics": {"val_acc": "up"}}, ValueError, "'min', 'max'"),
        ({"target_error": float("nan")}, ValueError, "target_error"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"confirm": 0}, ValueError, "confirm"),
        ({"confirm": 3, "escalate_after": 2}, ValueError, "escalate_after"),
        ({"summary": "yes"}, TypeError, "summary"),
    ],
)
def test_misconfiguration_is_refused_naming_the_parameter(kwargs, error, words):
    with pytest.raises(error, match=words):
        LossCurveMonitor(**kwargs)


def test_default_callbacks_include_the_monitor():
    assert any(isinstance(cb, LossCurveMonitor) for cb in flightcheck.default_callbacks())
