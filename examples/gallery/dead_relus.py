"""Dead ReLUs from a bad initialisation: hidden biases set to -3.

    python examples/gallery/dead_relus.py

A "sparsity" trick copied from somewhere: start the hidden units with a negative bias so few
fire. With inputs of unit scale, almost every ReLU is off for every input, so almost no
gradient gets through and the loss sits at ln 4. Debugging checklists: "unadapted weights
initialization"; "stick with He normal initialization".
"""

from __future__ import annotations

from torch import nn

import harness

NAME = "dead_relus"
EXPECTED = "gradient_flow"


class Classifier(harness.Classifier):
    def __init__(self):
        super().__init__()
        for layer in self.encoder:
            if isinstance(layer, nn.Linear):
                nn.init.constant_(layer.bias, -3.0)  # BUG: every hidden unit starts far below zero


def build(fast: bool):
    train, val = harness.loaders(*harness.clusters())
    return Classifier(), train, val, 1 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
