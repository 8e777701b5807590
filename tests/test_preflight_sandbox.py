"""The pre-flight leaves no trace: training after it is bit-identical to training without it."""

from __future__ import annotations

import math
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flightcheck.callbacks.preflight import Preflight
from flightcheck.preflight import fetch
from flightcheck.preflight.fetch import first_batch
from flightcheck.preflight.sandbox import Snapshot

from .conftest import cluster_data, make_trainer


class StatefulNet(pl.LightningModule):
    """Dropout, batch norm, Adam with a warm-up schedule, and state outside its parameters:
    a step counter and a running tensor carried from step to step (as truncated backprop does)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 3)
        )
        self.seen_steps = 0
        self.carry = torch.zeros(3)
        self.mean_loss = torchmetrics.MeanMetric()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.seen_steps += 1
        self.carry = 0.9 * self.carry + 0.1 * logits.detach().mean(0)
        loss = F.cross_entropy(logits, y) + 1e-3 * self.carry.sum()
        self.mean_loss.update(loss.detach())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class ManualStatefulNet(StatefulNet):
    """The same, optimised by hand: the step calls the optimizer and the scheduler itself."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        sched.step()


def _train(tmp_path, callbacks, steps: int = 12, model_class=StatefulNet):
    pl.seed_everything(7)
    x, y = cluster_data(n=128)
    # one loader object, shuffled by its own generator: a pre-flight that iterated it would shift it
    data = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    model = model_class()
    trainer = make_trainer(tmp_path, callbacks, max_steps=steps, logger=False)
    trainer.fit(model, data)
    draws = (torch.rand(1).item(), random.random(), float(np.random.rand()))
    return model, trainer, draws


@pytest.mark.parametrize("model_class", [StatefulNet, ManualStatefulNet])
def test_training_after_preflight_is_bit_identical(tmp_path, model_class):
    plain, plain_trainer, plain_draws = _train(tmp_path / "a", [], model_class=model_class)
    checked, checked_trainer, checked_draws = _train(tmp_path / "b", [Preflight()], model_class=model_class)
    report = checked_trainer.callbacks[0].last_report
    assert report is not None and not report.failed and report["overfit_batch"].verdicts  # it really trained
    a, b = plain.state_dict(), checked.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = plain_trainer.optimizers[0].state_dict(), checked_trainer.optimizers[0].state_dict()
    for p in opt_a["state"]:
        for k in opt_a["state"][p]:
            assert torch.equal(opt_a["state"][p][k], opt_b["state"][p][k]), (p, k)
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert (
        plain_trainer.lr_scheduler_configs[0].scheduler.state_dict()
        == checked_trainer.lr_scheduler_configs[0].scheduler.state_dict()
    )
    assert plain.seen_steps == checked.seen_steps
    assert torch.equal(plain.carry, checked.carry)
    assert torch.equal(plain.mean_loss.compute(), checked.mean_loss.compute())  # metric state untouched
    assert plain_draws == checked_draws


class _Probe(pl.Callback):
    """Records, at the first real step, what the pre-flight must have left untouched."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.first_batch = batch[0].clone()
            self.grads = [p.grad for p in pl_module.parameters()]
            self.modes = {n: m.training for n, m in pl_module.named_modules()}
            self.dropout = [m.p for m in pl_module.modules() if isinstance(m, nn.Dropout)]
            self.steps = pl_module.seen_steps
            self.global_step = trainer.global_step
            self.logged = dict(trainer.callback_metrics)


def test_first_real_step_sees_the_untouched_model_and_loader(tmp_path):
    probes = []
    for root, callbacks in (("a", []), ("b", [Preflight()])):
        probe = _Probe()
        _train(tmp_path / root, [*callbacks, probe], steps=1)
        probes.append(probe)
    plain, checked = probes
    assert torch.equal(plain.first_batch, checked.first_batch)  # the loader was not consumed or shifted
    assert all(g is None for g in checked.grads)
    assert checked.modes == plain.modes and checked.dropout == plain.dropout == [0.3]
    assert checked.steps == 0 and checked.global_step == 0
    assert "train_loss" not in checked.logged  # self.log during the pre-flight went nowhere


class _FirstBatchSeen(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = batch[0].clone()


def test_the_preflight_checks_the_batch_training_receives_first(tmp_path, monkeypatch):
    # A shuffled loader with its own generator: starting an iterator draws a seed from that
    # generator before the sampler shuffles with it, so a copy without it shuffles otherwise.
    from flightcheck.preflight import battery

    checked = []

    def recording(trainer, module):
        batch = fetch.first_batch(trainer, module)
        checked.append(batch[0].clone())
        return batch

    monkeypatch.setattr(battery, "first_batch", recording)
    seen = _FirstBatchSeen()
    _train(tmp_path, [Preflight(checks=["nonfinite_input"]), seen], steps=1)
    assert len(checked) == 1 and torch.equal(checked[0], seen.batch)


def test_snapshot_restores_weights_optimizer_and_module_state():
    model = StatefulNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    class FakeTrainer:
        optimizers = [opt]
        lr_scheduler_configs = []
        precision_plugin = None

    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = Snapshot(FakeTrainer(), model)
    assert snap.nbytes >= sum(v.numel() * v.element_size() for v in before.values())
    model(torch.randn(16, 8)).sum().backward()
    opt.step()
    model.seen_steps, model.carry, model.lazily_made = 5, torch.ones(3), torch.ones(2)
    snap.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())
    assert model.seen_steps == 0 and torch.equal(model.carry, torch.zeros(3)) and not hasattr(model, "lazily_made")


def test_device_snapshot_keeps_its_copy_beside_the_weights():
    model = StatefulNet()

    class FakeTrainer:
        optimizers = []
        lr_scheduler_configs = []

    snap = Snapshot(FakeTrainer(), model, on_device=True)
    with torch.no_grad():
        model.net[0].weight.add_(1.0)
    snap.restore()
    assert torch.equal(model.net[0].weight, snap.initial("net.0.weight"))


def test_taking_the_batch_leaves_every_generator_as_it_was(tmp_path):
    x, y = cluster_data(n=64)
    gen = torch.Generator().manual_seed(5)
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=gen, num_workers=0)
    seen = {}

    class Grab(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            state, cpu = gen.get_state(), torch.get_rng_state()
            seen["batch"] = first_batch(trainer, pl_module)
            seen["same"] = torch.equal(state, gen.get_state()) and torch.equal(cpu, torch.get_rng_state())

    from .conftest import TinyClassifier

    make_trainer(tmp_path, [Grab()], max_steps=1, logger=False).fit(TinyClassifier(), data)
    assert seen["same"] and seen["batch"][0].shape == (8, 8)


def test_sandbox_hides_other_callbacks_and_captures_logging(tmp_path):
    from .conftest import TinyClassifier

    calls = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(trainer.global_step)

    model = TinyClassifier()
    trainer = make_trainer(tmp_path, [Preflight(), Spy()], max_steps=2, logger=False)
    trainer.fit(model, DataLoader(TensorDataset(*cluster_data(n=64)), batch_size=16))
    assert calls == [0, 1]  # only the two real steps: the pre-flight's steps were not shown to it
    assert math.isfinite(trainer.callbacks[0].last_report.info["initial_loss"])


@pytest.mark.parametrize("snapshot", ["host", "device"])
def test_report_gives_the_snapshot_size(tmp_path, snapshot):
    from .conftest import TinyClassifier

    cb = Preflight(snapshot=snapshot)
    model = TinyClassifier()
    make_trainer(tmp_path, [cb], max_steps=1, logger=False).fit(
        model, DataLoader(TensorDataset(*cluster_data(n=64)), batch_size=16)
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights <= cb.last_report.snapshot_bytes < 3 * weights
