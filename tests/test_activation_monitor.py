"""ActivationMonitor: dead ReLU units and saturated tanh/sigmoid layers on the probe batch,
named per layer, with nothing installed on ordinary steps and no trace left on training."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flightcheck.callbacks.activation_monitor import ActivationMonitor
from flightcheck.checks.activations import ActivationReading, dead_units, saturation
from flightcheck.signals.activations import tail_count, unit_axis, units_fired
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer
from tests.test_prediction_stability import TransferCounter


class Classifier(TinyClassifier):
    """TinyClassifier with a given ``net``."""

    def __init__(self, net, lr=0.05, optimizer="sgd"):
        super().__init__(lr=lr, optimizer=optimizer)
        self.net = net


def fit(tmp_path, model, callback=None, data=None, **trainer_kwargs):
    callback = callback if callback is not None else ActivationMonitor()
    x, y = data if data is not None else cluster_data()
    trainer_kwargs.setdefault("max_epochs", 4)
    trainer = make_trainer(tmp_path, [callback], **trainer_kwargs)
    trainer.fit(model, loader(x, y), loader(x, y, shuffle=False))
    return callback


def relu_mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


# ------------------------------------------------------------------ sick layers are named
def test_a_relu_layer_behind_a_large_negative_bias_is_dead(tmp_path):
    net = relu_mlp()
    with torch.no_grad():
        net[2].bias.fill_(-100.0)
    cb = fit(tmp_path, Classifier(net))
    dead = [f for f in cb.findings if f.check == "dead_units"]
    assert [f.target for f in dead] == ["net.3"]
    assert dead[0].severity.value == "error"  # every unit: nothing passes forward or back
    assert dead[0].data["dead_units"] == dead[0].data["units"] == 32


def test_a_functional_relu_is_seen_and_named_after_its_module(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.b(F.relu(self.a(x) - 50.0))

    cb = fit(tmp_path, Classifier(Block()))
    assert [(f.check, f.target) for f in cb.findings] == [("dead_units", "net:relu")]


def test_a_sigmoid_layer_with_a_huge_initialisation_saturates(tmp_path):
    net = nn.Sequential(nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 3))
    with torch.no_grad():
        net[0].weight.mul_(30.0)
    cb = fit(tmp_path, Classifier(net))
    saturated = [f for f in cb.findings if f.check == "saturation"]
    assert [f.target for f in saturated] == ["net.1"]
    assert min(saturated[0].data["saturated_fraction"]) > 0.8


# ------------------------------------------------------------------ healthy networks stay quiet
def test_healthy_relu_and_conv_networks_stay_quiet(tmp_path):
    assert fit(tmp_path, Classifier(relu_mlp())).findings == []
    x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    cb = fit(tmp_path, Classifier(conv, lr=0.01, optimizer="adam"), data=(x, y))
    assert cb.findings == []
    assert cb.readings[-1].dead["net.1"][1] == 8  # units are channels


def test_healthy_tanh_network_stays_quiet(tmp_path):
    x, y = cluster_data()
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    cb = fit(tmp_path, Classifier(net), data=(x / 3, y))
    assert cb.findings == [] and "net.1" in cb.readings[-1].saturated


def test_a_confident_sigmoid_output_is_not_judged(tmp_path):
    class BinaryWithSigmoid(TinyClassifier):
        def __init__(self):
            super().__init__(lr=0.5)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.binary_cross_entropy(self(x).squeeze(1), (y == 0).float())

        def validation_step(self, batch, batch_idx):
            pass

    cb = fit(tmp_path, BinaryWithSigmoid(), max_epochs=6)
    assert cb.findings == [] and cb.readings[-1].saturated == {}


# ------------------------------------------------------------------ off the hot path, no trace
def test_no_hook_is_installed_on_ordinary_steps(tmp_path):
    class Watched(Classifier):
        hooks_seen = []

        def training_step(self, batch, batch_idx):
            self.hooks_seen.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules()))
            return super().training_step(batch, batch_idx)

    cb = fit(tmp_path, Watched(relu_mlp()), callback=ActivationMonitor(every_n_steps=2))
    assert len(cb.readings) > 5 and Watched.hooks_seen and set(Watched.hooks_seen) == {0}


def test_no_host_sync_on_ordinary_steps_and_one_per_probe(tmp_path):
    class Counted(ActivationMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            before = len(self.readings)
            with TransferCounter() as syncs:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            (self.probe_syncs if len(self.readings) > before else self.quiet_syncs).append(dict(syncs.calls))

    cb = Counted()
    cb.probe_syncs, cb.quiet_syncs = [], []
    fit(tmp_path, Classifier(relu_mlp()), callback=cb, max_epochs=2)
    assert len(cb.quiet_syncs) > 10 and all(not calls for calls in cb.quiet_syncs), cb.quiet_syncs
    assert cb.probe_syncs and all(calls == {"tolist": 1} for calls in cb.probe_syncs), cb.probe_syncs


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
        model = Classifier(net)
        x, y = cluster_data()
        trainer = make_trainer(tmp_path, callbacks, max_epochs=2, logger=False)
        trainer.fit(model, loader(x, y, batch_size=16), loader(x, y, shuffle=False))
        return model.state_dict(), torch.get_rng_state()

    cb = ActivationMonitor(every_n_steps=3)
    (with_state, with_rng), (without_state, without_rng) = run([cb]), run([])
    assert len(cb.readings) > 5
    assert all(torch.equal(with_state[k], without_state[k]) for k in with_state)
    assert torch.equal(with_rng, without_rng)


# ------------------------------------------------------------------ pure pieces
def test_units_are_features_or_channels():
    assert unit_axis(torch.zeros(4, 16), channels_first=False) == 1
    assert unit_axis(torch.zeros(4, 8, 5, 5), channels_first=False) == 1
    assert unit_axis(torch.zeros(4, 10, 16), channels_first=False) == 2  # (B, T, F)
    assert unit_axis(torch.zeros(4, 16, 10), channels_first=True) == 1  # (B, C, L) after a Conv1d
    x = torch.tensor([[1.0, -1.0, 0.0], [-2.0, -1.0, 0.0]])
    assert units_fired(x, 1).tolist() == [1.0, 0.0, 0.0]
    assert tail_count(torch.tensor([-4.0, 0.5, 3.5, 1.0]), 3.0).tolist() == [2.0, 4.0]


def test_judges_need_the_condition_on_every_probe_of_the_window():
    def r(step, dead, sat):
        return ActivationReading(step=step, samples=32, dead={"l": (dead, 10)}, saturated={"s": sat})

    sick = [r(10, 9, 0.9), r(20, 6, 0.7), r(30, 5, 0.6)]
    assert [v.target for v in dead_units(sick, patience=3)] == ["l"]
    assert [v.target for v in saturation(sick, patience=3)] == ["s"]
    assert dead_units(sick, patience=3, warmup_steps=40) == []
    recovering = sick[:2] + [r(30, 4, 0.4)]
    assert dead_units(recovering, patience=3) == [] and saturation(recovering, patience=3) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be"),
        ({"patience": 0}, ValueError, "patience must be"),
        ({"per_layer": "yes"}, TypeError, "per_layer must be"),
        ({"prediction_fn": 3}, TypeError, "prediction_fn must be a callable"),
    ],
)
def test_misconfiguration_is_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ActivationMonitor(**kwargs)
