"""Small models and data shared by the tests: each test trains for a few steps on a CPU."""

from __future__ import annotations

import logging
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def cluster_data(n: int = 256, dim: int = 8, classes: int = 3, seed: int = 0, separation: float = 3.0):
    """Gaussian clusters a small MLP separates in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * separation
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def loader(x, y, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> DataLoader:
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)
    )


class TinyClassifier(pl.LightningModule):
    """A two-layer MLP classifier written the ordinary Lightning way."""

    def __init__(self, dim: int = 8, hidden: int = 32, classes: int = 3, lr: float = 0.05, optimizer: str = "sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def make_trainer(tmp_path, callbacks=(), logger=True, **kwargs) -> pl.Trainer:
    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="logs")
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def data():
    return cluster_data()


@pytest.fixture(autouse=True)
def _seed():
    pl.seed_everything(0, workers=True, verbose=False)
