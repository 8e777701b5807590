"""NaN-producing operations written without a guard: a log that reaches 0, an exp that overflows, a division by 0."""

from __future__ import annotations

import torch

from . import common as C
from . import program


class HandWrittenBCE(C.BinaryClassifier):
    def loss(self, out, y):
        p = torch.sigmoid(out)
        y = y.float()
        # no clamp / no BCEWithLogits: once p rounds to exactly 1.0, (1 - y) * log(1 - p) is 0 * -inf = NaN
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


@program(
    "nan_from_log_of_zero", kind="bug", phase="inflight",
    expected={"nonfinite"},
    summary="Hand-written BCE log(sigmoid(z)) without clamping: on separable data z grows until sigmoid rounds to 1.0 and log(0) gives NaN mid-run.",
)
def nan_from_log_of_zero(seed):
    train, val = C.cluster_split(seed, classes=2, separation=7.0, label_noise=0.0)
    model = HandWrittenBCE(C.mlp([16, 32, 32, 1]), lr=1e-2)
    return model, C.loaders(train, val, seed=seed), C.steps(300)


class UndoLogTransform(C.Classifier):
    """Column 0 was stored as log(amount); forward turns it back into an amount with exp."""

    def forward(self, x):
        amount = torch.exp(x[:, :1])  # overflows to inf where the column holds the missing-value code 999
        return self.net(torch.cat([amount / 10.0, x[:, 1:]], dim=1))


@program(
    "nan_from_exp_overflow", kind="bug", phase="inflight",
    expected={"nonfinite", "input_scale"},
    summary="forward applies exp to a log-scaled column; 3 of 2048 rows hold the missing-value code 999, exp(999) = inf and the weights turn NaN.",
)
def nan_from_exp_overflow(seed):
    (x, y), val = C.cluster_split(seed)
    x = x.clone()
    x[:, 0] = 1.0 + 0.5 * x[:, 0] / x[:, 0].std()  # log(amount), amounts around e^1
    rows = torch.randperm(len(x), generator=C.gen(seed, 22))[:3]
    x[rows, 0] = 999.0
    xv, yv = val
    xv = xv.clone()
    xv[:, 0] = 1.0 + 0.5 * xv[:, 0] / xv[:, 0].std()
    model = UndoLogTransform(C.mlp([16, 64, 64, 4]), lr=1e-3)
    return model, C.loaders((x, y), (xv, yv), seed=seed), C.steps(300)


class PerSampleStandardised(C.Classifier):
    """Standardises each sequence by its own std inside forward, without an epsilon."""

    def __init__(self, **kw):
        from .healthy import SequenceClassifier

        super().__init__(torch.nn.Identity(), **kw)
        self.inner = SequenceClassifier(torch.nn.GRU(2, 32, batch_first=True), 32, 3)

    def forward(self, x):
        x = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)  # 0 / 0 on a flat sequence
        return self.inner(x)


@program(
    "nan_from_division_by_zero", kind="bug", phase="inflight",
    expected={"nonfinite"},
    summary="Sequences standardised per sample by their own std without epsilon; 4 of 2048 are flat (a dropped-out sensor), 0/0 = NaN when one is drawn.",
)
def nan_from_division_by_zero(seed):
    (x, y), val = C.wave_split(seed)
    rows = torch.randperm(len(x), generator=C.gen(seed, 21))[:4]
    x = x.clone()
    x[rows] = 0.0
    return PerSampleStandardised(lr=3e-3), C.loaders((x, y), val, seed=seed), C.steps(250, gradient_clip_val=1.0)

