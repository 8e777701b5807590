"""What the gallery's scripts share: the data, the Trainer with flightcheck attached, the printout.

Each gallery script holds one small model with one bug and a ``build()`` that returns
``(model, train_loader, val_loader, epochs)``. :func:`main` trains it exactly as a user would,
``L.Trainer(callbacks=flightcheck.default_callbacks())``, and prints what flightcheck found.

Fast settings for tests and CI: ``--fast`` or ``FLIGHTCHECK_EXAMPLES_FAST=1`` (fewer epochs).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flightcheck
from flightcheck.synthetic import GaussianClusters

FAST_ENV = "FLIGHTCHECK_EXAMPLES_FAST"

#: what a script's ``build(fast)`` returns: (model, train loader, validation loader, epochs)
Build = Callable[[bool], tuple[L.LightningModule, DataLoader, DataLoader, int]]


def fast_default() -> bool:
    return os.environ.get(FAST_ENV, "").strip().lower() not in ("", "0", "false", "no")


def clusters(num_classes: int = 4, dim: int = 16, n_train: int = 1024, n_val: int = 256, seed: int = 0):
    """Gaussian clusters with a known answer (``flightcheck.synthetic``): ``(x, y), (x_val, y_val)``.

    A working two-layer MLP reaches about 95% validation accuracy on them in one epoch.
    """
    dm = GaussianClusters(num_classes=num_classes, dim=dim, n_train=n_train, n_val=n_val, seed=seed)
    return dm.train_set.tensors, dm.val_set.tensors


def loaders(train: Sequence[torch.Tensor], val: Sequence[torch.Tensor], batch_size: int = 32, seed: int = 0):
    """A shuffled training loader (with its own seeded generator) and an ordered validation loader."""
    return (
        DataLoader(
            TensorDataset(*train), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
        ),
        DataLoader(TensorDataset(*val), batch_size=256),
    )


class Classifier(L.LightningModule):
    """The ordinary model each bug is a change of: an MLP classifier, cross-entropy, Adam.

    A gallery script subclasses it and rewrites the one method its bug lives in.
    """

    def __init__(self, dim: int = 16, num_classes: int = 4, hidden: int = 64, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = self.make_encoder(dim, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def make_encoder(self, dim: int, hidden: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

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


def parse_args(description: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", default=fast_default(), help=f"fewer epochs (or {FAST_ENV}=1)")
    parser.add_argument("--logdir", default="flightcheck_logs/gallery", help="where TensorBoard logs and findings go")
    return parser.parse_args(argv)


def quiet_lightning() -> None:
    """Keep the output to flightcheck's report: Lightning's banners and the PossibleUserWarnings go."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def train(name: str, build: Build, *, fast: bool, logdir: str) -> tuple[list[flightcheck.Finding], str, float]:
    """Train the broken model with flightcheck's default callbacks; returns (findings, log dir, seconds)."""
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the machine to others
    L.seed_everything(0, verbose=False)
    model, train_loader, val_loader, epochs = build(fast)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=flightcheck.default_callbacks(),  # the one line a user adds
        logger=TensorBoardLogger(logdir, name=name),  # a new version_N per run
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    try:
        trainer.fit(model, train_loader, val_loader)
    except flightcheck.PreflightError:
        # the default: a failed pre-flight stops the run before the first real step
        print("\n-> the pre-flight stopped the run before the first training step (PreflightError).")
    return flightcheck.findings(trainer), trainer.log_dir, time.perf_counter() - start


def show(name: str, expected: str, found: Sequence[flightcheck.Finding], log_dir: str) -> bool:
    """Print what flightcheck raised, the expected check first; returns whether it was caught."""
    alarms = [f for f in found if f.severity is not flightcheck.Severity.INFO]
    hits = [f for f in alarms if f.check == expected]
    print(f"\n=== {name}: flightcheck raised {len(alarms)} warning(s)/error(s)")
    for f in hits[:1] + [f for f in alarms if f.check != expected]:
        print(f"  [{f.severity.value}] step {f.step} {f.check}: {f.message}")
    verdict = "caught" if hits else "NOT caught"
    print(f"  -> {verdict} by `{expected}`; findings in {os.path.join(log_dir, 'flightcheck', 'findings.jsonl')}")
    return bool(hits)


def main(name: str, build: Build, expected: str, doc: str | None, argv: Sequence[str] | None = None) -> bool:
    """Run one gallery script from the command line."""
    args = parse_args(doc, argv)
    quiet_lightning()
    found, log_dir, _ = train(name, build, fast=args.fast, logdir=args.logdir)
    return show(name, expected, found, log_dir)


__all__ = ["FAST_ENV", "Classifier", "clusters", "loaders", "main", "parse_args", "quiet_lightning", "show", "train"]
