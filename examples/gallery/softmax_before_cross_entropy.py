"""Softmax before cross-entropy: the network's probabilities go into a loss that wants logits.

    python examples/gallery/softmax_before_cross_entropy.py

``F.cross_entropy`` applies log-softmax itself. Feed it probabilities and it takes a softmax of
a softmax: the outputs live in [0, 1], the loss cannot fall much below ~0.74 for four classes,
and the gradients are weak. Full Stack Deep Learning lists it among the five most common bugs
("incorrect input to your loss function, e.g. softmaxed outputs to a loss that expects logits").
"""

from __future__ import annotations

from torch import nn

import harness

NAME = "softmax_before_cross_entropy"
EXPECTED = "output_activation"


class Classifier(harness.Classifier):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(self.head, nn.Softmax(dim=-1))  # BUG: F.cross_entropy wants the raw logits


def build(fast: bool):
    train, val = harness.loaders(*harness.clusters())
    return Classifier(), train, val, 1 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
