"""flightcheck.testing's pre-flight helpers: the same checks as plain functions and pytest assertions."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F

from flightcheck.preflight import overfit
from flightcheck.testing.preflight import (
    assert_batch_independent,
    assert_gradients_flow,
    assert_init_loss,
    assert_overfits,
    run_preflight,
)

from .conftest import TinyClassifier, cluster_data, loader


class FlippedSign(TinyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return -F.cross_entropy(self(x), y)


class DetachedTrunk(TinyClassifier):
    def forward(self, x):
        return self.net[2](self.net[:2](x).detach())


class MixesSamples(TinyClassifier):
    def forward(self, x):
        return self.net(x - x.mean(0, keepdim=True))


def _data():
    return loader(*cluster_data(n=64), batch_size=32)


def test_assertions_pass_on_a_healthy_model_and_leave_it_untouched():
    model = TinyClassifier(optimizer="adam", lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_overfits(model, _data())
    assert_init_loss(model, _data(), num_classes=3)
    assert_gradients_flow(model, _data())
    assert_batch_independent(model, _data())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("assertion", "model", "words"),
    [
        (assert_overfits, FlippedSign(), "overfit_batch fail"),
        (assert_init_loss, FlippedSign(), "sign flipped"),
        (assert_gradients_flow, DetachedTrunk(), "net.0 (weight, bias)"),
        (assert_batch_independent, MixesSamples(), "depends on the inputs of"),
    ],
)
def test_assertions_fail_with_the_finding_in_the_message(assertion, model, words):
    with pytest.raises(AssertionError, match=words.replace("(", r"\(").replace(")", r"\)")):
        assertion(model, _data())


def test_a_single_batch_or_a_datamodule_can_stand_in_for_a_loader():
    x, y = cluster_data(n=32)
    assert not run_preflight(TinyClassifier(), (x, y)).failed

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return _data()

    report = run_preflight(TinyClassifier(), Data(), checks=["init_loss"])
    assert [r.check for r in report.rows] == ["init_loss"]


def test_an_unanswerable_assertion_fails_with_the_reason():
    class NoTarget(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

    with pytest.raises(AssertionError, match="could not be checked: cannot tell what the initial loss should be"):
        assert_init_loss(NoTarget(), loader(cluster_data(n=32)[0], cluster_data(n=32)[0][:, 0], batch_size=16))


def test_a_tight_time_budget_is_respected_and_is_not_a_failure():
    report = run_preflight(TinyClassifier(lr=1e-4), _data(), checks=["overfit_batch"], max_seconds=1e-6)
    row = report["overfit_batch"]
    assert row.status.value == "pass" and "too few to judge" in row.message
    assert row.verdicts[0].data["stopped"] == "max_seconds"


def test_long_budgets_show_progress(monkeypatch, caplog):
    monkeypatch.setattr(overfit, "PROGRESS_EVERY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="flightcheck"):
        run_preflight(TinyClassifier(lr=1e-4), _data(), checks=["overfit_batch"], max_steps=3)
    assert "overfitting one batch: step 1/3" in caplog.text
