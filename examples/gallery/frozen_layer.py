"""A layer frozen by mistake: the optimizer was only given the head's parameters.

    python examples/gallery/frozen_layer.py

Common after a fine-tuning experiment: ``configure_optimizers`` builds the optimizer from
``self.head.parameters()``, and when the encoder is meant to train again nobody changes it.
The encoder still gets gradients (so nothing looks wrong) but never moves from its random
initialisation. Debugging checklists: "gradient not flowing through the whole model".
"""

from __future__ import annotations

import torch
import harness

NAME = "frozen_layer"
EXPECTED = "gradient_flow"


class Classifier(harness.Classifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=self.hparams.lr)  # BUG: the encoder is left out


def build(fast: bool):
    train, val = harness.loaders(*harness.clusters())
    return Classifier(), train, val, 1 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
