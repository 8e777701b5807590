"""Data leakage: the model reads its own answer.

    python examples/gallery/reads_the_target.py

Left over from a label-conditioned experiment, ``training_step`` appends the one-hot label to
the features before the forward pass. The loss falls beautifully, validation (built the same
way) agrees, and the model is useless on real inputs, where there is no label to read.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

import harness

NAME = "reads_the_target"
EXPECTED = "target_leakage"


class Classifier(harness.Classifier):
    def __init__(self):
        super().__init__(dim=16 + 4)

    def logits(self, x, y):
        return self(torch.cat([x, F.one_hot(y, 4).float()], dim=-1))  # BUG: y is an input of the model

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.logits(x, y), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.logits(x, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())


def build(fast: bool):
    train, val = harness.loaders(*harness.clusters())
    return Classifier(), train, val, 1 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
