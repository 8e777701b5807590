"""Labels shuffled apart from their inputs: every (x, y) pair is a random pairing.

    python examples/gallery/labels_shuffled.py

The data set was shuffled in two calls, one permutation for the features and another for the
labels (the same happens after a join on the wrong key, or sorting one column only). The debugging
notes: "make sure the labels and inputs are aligned ... this mis-alignment can happen if you
shuffle inputs and labels independently". The training loss still falls, slowly, because a
big enough model memorises noise; validation stays at chance.
"""

from __future__ import annotations

import torch

import harness

NAME = "labels_shuffled"
EXPECTED = "overfitting"


def build(fast: bool):
    (x, y), val = harness.clusters(n_train=256)
    g = torch.Generator().manual_seed(1)
    x = x[torch.randperm(len(x), generator=g)]
    y = y[torch.randperm(len(y), generator=g)]  # BUG: a second permutation; should reuse the first
    train, val = harness.loaders((x, y), val)
    return harness.Classifier(hidden=256, lr=3e-3), train, val, 12 if fast else 40


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
