"""NaN from ``log(0)``: a hand-written binary cross-entropy without clamping.

    python examples/gallery/nan_from_log.py

``-(y * log(sigmoid(z)) + (1 - y) * log(1 - sigmoid(z)))`` is fine until the model gets
confident: on separable data ``z`` grows until ``sigmoid(z)`` rounds to exactly 1.0 in float32,
``log(1 - 1.0) = log(0) = -inf``, and the next backward fills the weights with NaN. The debugging
notes: "numerical instability (inf/NaN) often stems from using an exp, log, or div operation".
``F.binary_cross_entropy_with_logits`` computes the same loss stably.
"""

from __future__ import annotations

import torch

import harness

NAME = "nan_from_log"
EXPECTED = "nonfinite"


class BinaryClassifier(harness.Classifier):
    def __init__(self):
        super().__init__(num_classes=1, lr=1e-2)

    def loss(self, x, y):
        p = torch.sigmoid(self(x).squeeze(-1))
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()  # BUG: log(0) once p rounds to 0 or 1

    def training_step(self, batch, batch_idx):
        loss = self.loss(*batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(*batch))


def build(fast: bool):
    (x, y), (xv, yv) = harness.clusters(num_classes=2)
    train, val = harness.loaders((x, y.float()), (xv, yv.float()))
    return BinaryClassifier(), train, val, 3 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
