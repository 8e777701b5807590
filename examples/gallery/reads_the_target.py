"""Data leakage: the label column was left in the features, so the model reads its own answer.

    python examples/gallery/reads_the_target.py

A tabular pipeline selects feature columns with ``table.drop(columns=["id"])`` where it meant
``drop(columns=["id", "label"])``: the label rides along as the last feature. The loss falls
beautifully, validation (built by the same code) agrees, and the model is useless in
production, where there is no label to read. Debugging checklists: "make sure the labels and inputs
are aligned"; "check your data".
"""

from __future__ import annotations

import torch

import harness

NAME = "reads_the_target"
EXPECTED = "target_leakage"


def with_label_column(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, y[:, None].float()], dim=1)  # BUG: the label is one of the feature columns


def build(fast: bool):
    (x, y), (xv, yv) = harness.clusters()
    train, val = harness.loaders((with_label_column(x, y), y), (with_label_column(xv, yv), yv))
    return harness.Classifier(dim=17), train, val, 1 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
