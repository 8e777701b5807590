"""Quickstart: a small classifier trained with flightcheck's default callbacks.

    python examples/quickstart.py            # a healthy run: pre-flight passes, TensorBoard fills up
    python examples/quickstart.py --bug lr   # the same model with a learning rate 1000x too high

Then look at the charts and findings::

    tensorboard --logdir flightcheck_logs
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flightcheck


def make_data(n: int = 2048, dim: int = 20, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    split = int(0.8 * n)
    train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=256)
    return train, val


class Classifier(L.LightningModule):
    def __init__(self, dim: int = 20, classes: int = 4, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(dim, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, classes)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bug", choices=["none", "lr"], default="none", help="seed a bug to see a warning")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--logdir", default="flightcheck_logs")
    args = parser.parse_args()

    L.seed_everything(0)
    train, val = make_data()
    model = Classifier(lr=1.0 if args.bug == "lr" else 1e-3)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        logger=TensorBoardLogger(args.logdir, name="quickstart"),
        callbacks=flightcheck.default_callbacks(preflight={"on_fail": "warn"}),
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    trainer.fit(model, train, val)

    found = flightcheck.findings(trainer)
    print(f"\nflightcheck: {len(found)} finding(s); TensorBoard logs in {trainer.log_dir}")
    for f in found:
        print(f"  [{f.severity.value}] step {f.step} {f.check}: {f.message}")
    print(f"\nOpen the dashboard with:  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
