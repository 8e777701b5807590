"""Synthetic data first: can the model learn at all? Then the real data, the pre-flight on both.

    python examples/synthetic_first.py
    python examples/synthetic_first.py --broken   # the same workflow with a classic model bug

1. Train the model on ``flightcheck.synthetic.GaussianClusters`` shaped like the real data
   (same input width, same number of classes). The module states the accuracy a working
   classifier reaches on it (the Bayes accuracy). If the model gets near it, the model and
   the training loop are sound; if not, the bug is in them, not in the data.
2. Train the same model, unchanged, on the real data. Whatever gap remains now points at
   the data: noise in the labels, features in odd units, too little signal.

Both runs go through flightcheck's pre-flight and in-flight monitors, so each step also
says what it saw. Runs in well under a minute on a CPU. Then::

    tensorboard --logdir flightcheck_logs
"""

from __future__ import annotations

import argparse
import logging

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flightcheck
from flightcheck.synthetic import GaussianClusters

# how close to the known answer counts as "learns"; a working MLP gets within a point or two
TOLERANCE = 0.05


class RealReadings(L.LightningDataModule):
    """A stand-in for the user's real data set: sensor readings labelled by people.

    Like much real data it is messier than the synthetic clusters: a few columns are in
    other units (hundreds instead of ones), the classes overlap more, and 15% of the labels
    are wrong. Its best reachable accuracy is not known, which is the point of step 1.
    """

    def __init__(self, dim: int = 16, num_classes: int = 3, n: int = 1536, batch_size: int = 32, seed: int = 7):
        super().__init__()
        self.dim, self.num_classes, self.batch_size, self.seed = dim, num_classes, batch_size, seed
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(num_classes, dim, generator=g) * 0.8
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, dim, generator=g)
        x[:, :4] *= 100.0  # four columns recorded in other units
        wrong = torch.rand(n, generator=g) < 0.15
        y = torch.where(wrong, torch.randint(0, num_classes, (n,), generator=g), y)
        split = n * 2 // 3
        self.train_set = TensorDataset(x[:split], y[:split])
        self.val_set = TensorDataset(x[split:], y[split:])

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256, generator=torch.Generator().manual_seed(self.seed))


class Classifier(L.LightningModule):
    """The user's model: an MLP classifier.

    ``broken=True`` plants a classic bug: a ``reshape`` where a transpose belonged (think of a
    channels-first/channels-last conversion), which mixes the samples of a batch together.
    """

    def __init__(self, dim: int, num_classes: int, lr: float = 3e-3, broken: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x):
        if self.hparams.broken:
            x = x.reshape(x.shape[1], x.shape[0]).t()  # the right shape, the wrong numbers
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def fit(name: str, datamodule: L.LightningDataModule, args: argparse.Namespace) -> tuple[float, list]:
    """Train a fresh model on ``datamodule`` with flightcheck; returns (validation accuracy, findings)."""
    L.seed_everything(0, verbose=False)
    model = Classifier(datamodule.dim, datamodule.num_classes, broken=args.broken)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(args.logdir, name="synthetic_first", version=name),
        # the pre-flight runs on both data sets; "warn" lets this demo go on after a failed
        # check, where the default would stop the run with a PreflightError
        callbacks=flightcheck.default_callbacks(preflight={"on_fail": "warn"}),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    (metrics,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    return float(metrics["val_acc"]), flightcheck.findings(trainer)


def show(findings: list) -> None:
    if not findings:
        print("  flightcheck: nothing to report")
    for f in findings:
        print(f"  flightcheck [{f.severity.value}] step {f.step} {f.check}: {f.message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broken", action="store_true", help="plant a bug that mixes the samples of a batch")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--logdir", default="flightcheck_logs")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the output to the point

    real = RealReadings()
    synthetic = GaussianClusters(num_classes=real.num_classes, dim=real.dim, n_train=1024, n_val=512, seed=0)

    print("Step 1 - the model on synthetic data with a known answer")
    print(f"  {synthetic.describe()}")
    accuracy, findings = fit("synthetic", synthetic, args)
    show(findings)
    expected = synthetic.expected_accuracy
    learns = accuracy >= expected - TOLERANCE
    print(
        f"  validation accuracy {accuracy:.3f}; a working classifier reaches {expected:.3f}, chance is "
        f"{synthetic.chance_accuracy:.3f}"
    )
    if not learns:
        print(
            "  -> the model cannot learn even this: the bug is in the model or the training loop.\n"
            "     Fix it before looking at the real data."
        )
        return
    print("  -> the model and the training loop can learn.")

    print("\nStep 2 - the same model on the real data")
    accuracy_real, findings_real = fit("real", real, args)
    show(findings_real)
    print(f"  validation accuracy {accuracy_real:.3f} (synthetic: {accuracy:.3f})")
    print(
        "  -> the model is known to work, so a gap here is about the data: look at what the\n"
        "     pre-flight and the monitors said about it (input scale, labels, imbalance)."
    )
    print(f"\nTensorBoard:  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
