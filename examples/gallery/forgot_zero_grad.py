"""Forgot ``zero_grad``: with manual optimisation, gradients pile up from step to step.

    python examples/gallery/forgot_zero_grad.py

Lightning zeroes gradients for you, until you take over the loop with
``automatic_optimization = False`` (for GANs, several optimizers, custom clipping). Then
``opt.zero_grad()`` is yours to call. Forget it and each step's gradient is the sum of every
gradient so far: the steps grow, the loss runs away, and the model ends answering one class.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

import harness

NAME = "forgot_zero_grad"
EXPECTED = "grad_explosion"


class Classifier(harness.Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)  # BUG: no opt.zero_grad() before (or after) this
        opt.step()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def build(fast: bool):
    train, val = harness.loaders(*harness.clusters())
    return Classifier(), train, val, 2 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
