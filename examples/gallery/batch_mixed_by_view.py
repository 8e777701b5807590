"""Samples mixed by a reshape: ``.view(T, B, D)`` where ``.transpose(0, 1)`` belonged.

    python examples/gallery/batch_mixed_by_view.py

A recurrent layer wants time-major input ``(T, B, D)``; the embeddings come batch-major
``(B, T, D)``. ``view`` gives the right shape and the wrong numbers: each "sequence" the GRU
reads is now made of pieces of several samples. Debugging checklists: "check your reshaping";
"mixing information from different samples by using a reshape operation instead of a
transpose" - and the gradient test they describe is flightcheck's ``batch_independence``.
"""

from __future__ import annotations

import torch
from torch import nn

import harness
from flightcheck.synthetic import SequenceClassification

NAME = "batch_mixed_by_view"
EXPECTED = "batch_independence"


class TimeMajorGRU(nn.Module):
    """Token ids ``(B, T)`` -> embeddings -> a GRU that reads time-major ``(T, B, D)`` -> its last state."""

    def __init__(self, vocab_size: int, d: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.rnn = nn.GRU(d, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)  # (B, T, D)
        b, t, d = h.shape
        h = h.view(t, b, d)  # BUG: should be h.transpose(0, 1)
        _, last = self.rnn(h)
        return last[-1]


class SequenceClassifier(harness.Classifier):
    def __init__(self):
        super().__init__(dim=32, num_classes=2, hidden=32)  # dim: the vocabulary size

    def make_encoder(self, dim: int, hidden: int) -> nn.Module:
        return TimeMajorGRU(vocab_size=dim, d=hidden)


def build(fast: bool):
    dm = SequenceClassification(vocab_size=32, seq_len=16, rule="marker", n_train=512, seed=0)
    train, val = harness.loaders(dm.train_set.tensors, dm.val_set.tensors)
    return SequenceClassifier(), train, val, 1 if fast else 5


if __name__ == "__main__":
    harness.main(NAME, build, EXPECTED, __doc__)
