"""Learning rate far too high: SGD with momentum at lr 3.0 where 0.03 works.

    python examples/gallery/lr_too_high.py

A slipped decimal point, or a schedule whose peak is wrong. Within a few steps the loss and the
gradients blow up to inf and NaN. Debugging checklists: "error explodes ... high learning rate";
"lower your learning rate". The pre-flight's overfit-one-batch test uses the model's own
optimizer, so it sees the blow-up before the first real step.
"""

from __future__ import annotations

import torch

import harness

NAME = "lr_too_high"
EXPECTED = "overfit_batch"


class Classifier(harness.Classifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=3.0, momentum=0.9)  # BUG: 100x too high


def build(fast: bool):
    train, val = harness.loaders(*harness.clusters())
    return Classifier(), train, val, 2 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
