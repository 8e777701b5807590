"""Inputs not normalised: features left in their raw units, thousands next to fractions.

    python examples/gallery/unnormalised_inputs.py

A tabular pipeline where the standardisation step was lost in a refactor: some columns are
in the thousands (a price, a count of seconds), some are fractions. The big columns swamp
the first layer, the initial loss is far above ln C and training is erratic. Debugging checklists:
"forgetting to normalize"; "subtract the mean and divide by the standard deviation"; "if
feature 1 has an order of magnitude 1 but feature 2 has order of magnitude 1000, ...".
"""

from __future__ import annotations

import torch

import harness

NAME = "unnormalised_inputs"
EXPECTED = "input_scale"

# the units each of the 16 columns was recorded in
UNITS = torch.tensor([1e3, 5e3, 1e4, 2e3] + [1.0] * 8 + [1e-2] * 4)


def build(fast: bool):
    (x, y), (xv, yv) = harness.clusters()
    # BUG: the raw columns go to the model; (x - mean) / std on the training set was forgotten
    train, val = harness.loaders((x * UNITS + 3 * UNITS, y), (xv * UNITS + 3 * UNITS, yv))
    return harness.Classifier(), train, val, 1 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
