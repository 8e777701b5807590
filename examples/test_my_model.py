"""Test your own model on every commit with ``flightcheck.testing``.

    python -m pytest examples/test_my_model.py

The pre-flight's checks, as pytest assertions: each call builds a throw-away CPU Trainer, runs
only the pre-flight on one batch (no training, nothing written) and leaves the model's weights
as they were. A refactor that breaks the model (a softmax added before the loss, a layer left
out of the optimizer, a reshape that mixes samples) fails here, in seconds, instead of
showing up days later as a run that did not learn. The whole file takes a few seconds on a CPU.

Replace ``MyModel`` and ``batch`` with your own LightningModule and one batch of your data
(or your DataLoader or DataModule).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flightcheck.synthetic import GaussianClusters
from flightcheck.testing import (
    assert_batch_independent,
    assert_gradients_flow,
    assert_init_loss,
    assert_overfits,
    run_preflight,
)

NUM_CLASSES = 4


class MyModel(L.LightningModule):
    """The model under test: an MLP classifier with LayerNorm and dropout."""

    def __init__(self, dim: int = 16, hidden: int = 64, num_classes: int = NUM_CLASSES, mix_samples: bool = False):
        super().__init__()
        self.mix_samples = mix_samples  # a switch to show a failing test below; your model has none
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix_samples:
            x = x.reshape(x.shape[1], x.shape[0]).t()  # a reshape where a transpose belonged
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.fixture
def model() -> MyModel:
    torch.manual_seed(0)
    return MyModel()


@pytest.fixture(scope="module")
def data() -> GaussianClusters:
    """Synthetic data shaped like the real thing: the model, not the data, is under test."""
    return GaussianClusters(num_classes=NUM_CLASSES, dim=16, n_train=256, n_val=64, seed=0)


@pytest.fixture(scope="module")
def batch(data):
    """One batch, as ``training_step`` receives it."""
    return next(iter(data.train_dataloader()))


def test_initial_loss_is_that_of_an_uninformed_model(model, batch):
    # cross-entropy of a model that knows nothing yet: ln(4) = 1.39
    assert_init_loss(model, batch, num_classes=NUM_CLASSES)


def test_model_can_overfit_one_batch(model, batch):
    assert_overfits(model, batch)


def test_every_trainable_parameter_gets_a_gradient(model, batch):
    assert_gradients_flow(model, batch)


def test_samples_of_a_batch_do_not_leak_into_each_other(model, batch):
    assert_batch_independent(model, batch)


def test_whole_preflight_passes_on_the_datamodule(model, data):
    report = run_preflight(model, data)
    assert not report.failed, str(report)  # str(report) is the table the Preflight callback prints
    assert report["overfit_batch"].status.value == "pass"


def test_what_a_failure_looks_like(batch):
    """A refactor that mixes the samples of a batch fails with the check's own message."""
    broken = MyModel(mix_samples=True)
    with pytest.raises(AssertionError, match="batch_independence fail: .* depends on the inputs of"):
        assert_batch_independent(broken, batch)
