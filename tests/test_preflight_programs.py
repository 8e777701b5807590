"""Whole programs through the pre-flight: healthy ones stay quiet, each seeded bug fires its check.

Every program is small enough to run in a fraction of a second on one CPU core.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flightcheck.testing.preflight import run_preflight

from .conftest import cluster_data


def _loader(*tensors, batch_size=32):
    return DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def _images(n=64, classes=4):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g) * 0.5
    for c in range(classes):
        x[y == c, :, 3 * c : 3 * c + 3] += 1.5
    return x, y


def _tokens(n=64, length=12, vocab=30, classes=3):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, x[:, :3].sum(1) % classes


def _regression(n=128):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 8, generator=g)
    return x, torch.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.1 * torch.randn(n, generator=g)


class Program(pl.LightningModule):
    """Cross-entropy on ``self(x)`` with Adam unless a subclass says otherwise."""

    lr = 1e-3

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MLP(Program):
    def __init__(self, hidden=32, classes=3, dropout=0.0, smoothing=0.0, dim=8):
        super().__init__()
        self.smoothing = smoothing
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=self.smoothing)


class CNN(Program):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.features(x))


class Recurrent(Program):
    lr = 3e-3

    def __init__(self, kind=nn.GRU, batch_first=True):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.rnn = kind(16, 24, batch_first=batch_first)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


class WarmupTransformer(Program):
    """A small encoder with AdamW and a linear warm-up over 500 steps: at step 0 its learning rate is 0."""

    def __init__(self, lr=1e-3, warmup=500):
        super().__init__()
        self.lr, self.warmup = lr, warmup
        self.emb = nn.Embedding(30, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class Regressor(Program):
    def __init__(self, optimizer="adam"):
        super().__init__()
        self.optimizer = optimizer
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.01)
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class FrozenBackbone(Program):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=1e-2)


class Manual(MLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("loss", loss)


class LargeBatchSGD(MLP):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class BinaryLogit(Program):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y.float().unsqueeze(1))


class BinaryLogitInUnitInterval(BinaryLogit):
    """Healthy: its initial logits all lie in [0, 1] (bias 0.5, tiny last-layer weights)."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.fill_(0.5)


class DictModel(Program):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, features):
        return {"logits": self.net(features)}

    def training_step(self, batch, batch_idx):
        return {"loss": F.cross_entropy(self(batch["features"])["logits"], batch["labels"])}


class DictData(Dataset):
    def __init__(self):
        self.x, self.y = cluster_data(n=64)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "labels": self.y[i]}


HEALTHY = {
    "mlp, adam 1e-3": (MLP, lambda: _loader(*cluster_data(n=64))),
    "mlp, adam 3e-4, small noisy batches, dropout": (
        lambda: MLP(dropout=0.3),
        lambda: _loader(*cluster_data(n=64), batch_size=4),
    ),
    "mlp, label smoothing, 10 classes": (
        lambda: MLP(classes=10, smoothing=0.2),
        lambda: _loader(*cluster_data(n=64, classes=10)),
    ),
    "mlp, large-batch sgd": (LargeBatchSGD, lambda: _loader(*cluster_data(n=256), batch_size=256)),
    "cnn with batch norm and dropout": (CNN, lambda: _loader(*_images())),
    "gru on token ids": (Recurrent, lambda: _loader(*_tokens())),
    "lstm on token ids": (lambda: Recurrent(nn.LSTM), lambda: _loader(*_tokens())),
    "transformer with lr warm-up": (WarmupTransformer, lambda: _loader(*_tokens())),
    "regression, adam": (Regressor, lambda: _loader(*_regression())),
    "regression, plain sgd": (lambda: Regressor("sgd"), lambda: _loader(*_regression())),
    "frozen backbone": (FrozenBackbone, lambda: _loader(*cluster_data(n=64))),
    "manual optimisation": (Manual, lambda: _loader(*cluster_data(n=64))),
    "binary logits (B, 1)": (BinaryLogit, lambda: _loader(*cluster_data(n=64, classes=2))),
    "binary logits that all start in [0, 1]": (
        BinaryLogitInUnitInterval,
        lambda: _loader(*cluster_data(n=64, classes=2)),
    ),
    "dict batch and dict output": (DictModel, lambda: DataLoader(DictData(), batch_size=32, shuffle=True)),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_program_passes_without_a_warning(name):
    make_model, make_data = HEALTHY[name]
    report = run_preflight(make_model(), make_data())
    loud = {r.check: r.message for r in report.rows if r.status.value not in ("pass", "skipped")}
    assert not report.skipped and loud == {}
    assert report["overfit_batch"].status.value == "pass"


def test_warm_up_is_replayed_rather_than_run_at_its_zero_learning_rate():
    report = run_preflight(WarmupTransformer(), _loader(*_tokens()), checks=["overfit_batch"])
    (schedule,) = report["overfit_batch"].verdicts[0].data["schedules"]
    assert schedule["start_lr"] == [0.0] and schedule["peak_lr"] == [pytest.approx(1e-3)]


# --------------------------------------------------------------------------- seeded bugs
class FlippedSign(MLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return -F.cross_entropy(self(x), y)


class SoftmaxThenCrossEntropy(MLP):
    def forward(self, x):
        return F.softmax(self.net(x), dim=-1)


class LogitsIntoNLL(MLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(self(x), y)


class SigmoidIntoBCEWithLogits(BinaryLogit):
    def forward(self, x):
        return torch.sigmoid(self.net(x))


class ReluOnOutput(MLP):
    def forward(self, x):
        return F.relu(self.net(x))


class DetachedLoss(MLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).detach(), y)


class DetachedTrunk(MLP):
    def forward(self, x):
        return self.net[4:](self.net[:4](x).detach())


class HeadNotInOptimizer(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.net[:2].parameters(), lr=1e-3)


class MixesSamples(MLP):
    def forward(self, x):
        h = self.net[:2](x)
        return self.net[2:](h - h.mean(0, keepdim=True))


class IgnoresInput(MLP):
    def forward(self, x):
        return self.net(torch.zeros_like(x))


class TrailingDimension(Regressor):
    def forward(self, x):
        return self.net(x)  # (B, 1) against targets (B,)


class UnsqueezedTargetsForgotten(BinaryLogit):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y.float())  # (B, 1) against (B,): the loss refuses


class ConstantInit(MLP):
    def __init__(self):
        super().__init__()
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.constant_(m.weight, 0.1)
                nn.init.zeros_(m.bias)


class HugeInit(MLP):
    def __init__(self):
        super().__init__(dim=64)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1.0)


class LeftInEval(MLP):
    def __init__(self):
        super().__init__(dropout=0.5)
        self.eval()


class LearningRateTooHigh(MLP):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=50.0)


class LearningRateZero(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.0)


class SummedLoss(MLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="sum")


def _with_nan():
    x, y = cluster_data(n=64)
    x[::4, 2] = float("nan")
    return _loader(x, y)


def _raw_pixels():
    x, y = _images()
    return _loader((x * 40 + 100).clamp(0, 255).round(), y)


def _unnormalised():
    x, y = cluster_data(n=64)
    x[:, 0] = x[:, 0] * 1e4 + 5e4
    return _loader(x, y)


def _imbalanced():
    x, y = cluster_data(n=128)
    return _loader(x, torch.where(torch.arange(128) % 20 == 0, y, 0))


BUGS = {
    "loss with a flipped sign": (FlippedSign, _loader, "overfit_batch"),
    "a flipped sign is also a negative initial loss": (FlippedSign, _loader, "init_loss"),
    "learning rate far too high": (LearningRateTooHigh, _loader, "overfit_batch"),
    "learning rate zero": (LearningRateZero, _loader, "overfit_batch"),
    "softmax before cross_entropy": (SoftmaxThenCrossEntropy, _loader, "output_activation"),
    "logits into nll_loss": (LogitsIntoNLL, _loader, "output_activation"),
    "sigmoid before binary_cross_entropy_with_logits": (SigmoidIntoBCEWithLogits, "binary", "output_activation"),
    "relu on the output": (ReluOnOutput, _loader, "output_activation"),
    "loss detached from the graph": (DetachedLoss, _loader, "gradient_flow"),
    "trunk detached from the head": (DetachedTrunk, _loader, "gradient_flow"),
    "head missing from the optimizer": (HeadNotInOptimizer, _loader, "gradient_flow"),
    "samples mixed across the batch": (MixesSamples, _loader, "batch_independence"),
    "recurrent layer reads the batch as time": (lambda: Recurrent(batch_first=False), "tokens", "batch_independence"),
    "model ignores its input": (IgnoresInput, _loader, "input_dependence"),
    "(B, 1) output against (B,) targets": (TrailingDimension, "regression", "target_shape"),
    "(B, 1) logits against (B,) labels": (UnsqueezedTargetsForgotten, "binary", "target_shape"),
    "constant initialisation": (ConstantInit, _loader, "weight_init"),
    "weights initialised at std 1": (HugeInit, "wide", "weight_init"),
    "oversized initial logits": (HugeInit, "wide", "init_loss"),
    "model left in eval mode": (LeftInEval, _loader, "train_mode"),
    "loss summed over the batch": (SummedLoss, _loader, "init_loss"),
    "NaN in the inputs": (MLP, _with_nan, "nonfinite_input"),
    "raw 0-255 pixels": (CNN, _raw_pixels, "input_scale"),
    "a feature in raw units": (MLP, _unnormalised, "input_scale"),
    "labels numbered from 1": (MLP, "one_based", "label_range"),
    "one class dominates": (MLP, _imbalanced, "class_imbalance"),
    "labels in {-1, +1} into BCE with logits": (BinaryLogit, "plus_minus_one", "label_range"),
}


def _bug_data(kind):
    if kind is _loader:
        return _loader(*cluster_data(n=64))
    if callable(kind):
        return kind()
    return {
        "tokens": lambda: _loader(*_tokens()),
        "regression": lambda: _loader(*_regression()),
        "wide": lambda: _loader(*cluster_data(n=64, dim=64)),
        "binary": lambda: _loader(*cluster_data(n=64, classes=2)),
        "one_based": lambda: _loader(cluster_data(n=64)[0], cluster_data(n=64)[1] + 1),
        "plus_minus_one": lambda: _loader(*(lambda x, y: (x, y.float() * 2 - 1))(*cluster_data(n=64, classes=2))),
    }[kind]()


@pytest.mark.parametrize("name", list(BUGS))
def test_seeded_bug_is_reported_by_its_check(name):
    make_model, data, check = BUGS[name]
    report = run_preflight(make_model(), _bug_data(data))
    row = report[check]
    assert row.status.value in ("fail", "warn"), f"{check}: {row.status.value} {row.message}"
    assert row.verdicts and all(v.check == check for v in row.verdicts)


class WeightedMLP(MLP):
    def __init__(self):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(weight=torch.tensor([0.1, 5.0, 5.0]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self(x), y)


class FunctionalWeightedMLP(MLP):
    def __init__(self):
        super().__init__()
        self.register_buffer("class_weights", torch.tensor([0.1, 5.0, 5.0]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, weight=self.class_weights)


@pytest.mark.parametrize("model", [WeightedMLP, FunctionalWeightedMLP])
def test_imbalance_handled_by_a_weighted_loss_is_not_reported(model):
    report = run_preflight(model(), _imbalanced(), checks=["class_imbalance"])
    assert report["class_imbalance"].status.value == "pass", report["class_imbalance"].message
    assert run_preflight(MLP(), _imbalanced(), checks=["class_imbalance"])["class_imbalance"].status.value == "warn"


def _imbalanced_first_batch_lucky(majority_share, n=512, batch_size=32):
    """Labels at ``majority_share`` of class 0 in a shuffled loader, arranged so that the first
    batch the loader yields holds 2 minority samples (93.8%: only a note on its own)."""
    x, _ = cluster_data(n=n)
    minority = round(n * (1 - majority_share))
    # The loader's first epoch, by index (same seed, same shuffle; the pre-flight puts its generator back).
    order = torch.cat([idx for (idx,) in _loader(torch.arange(n), batch_size=batch_size)]).tolist()
    y = torch.zeros(n, dtype=torch.long)
    first, rest = order[:batch_size], order[batch_size:]
    y[first[:2]] = 1
    spread = rest[:: len(rest) // (minority - 2)][: minority - 2]  # the rest evenly over the epoch
    y[spread] = torch.tensor([1, 2]).repeat(minority)[: minority - 2]
    return _loader(x, y)


def test_class_imbalance_pools_the_leading_batches_when_the_first_one_is_unrepresentative():
    first_y = next(iter(_imbalanced_first_batch_lucky(0.97)))[1]
    assert int((first_y != 0).sum()) == 2  # the first batch alone: 30 of 32, a note
    result = run_preflight(MLP(), _imbalanced_first_batch_lucky(0.97), checks=["class_imbalance"])["class_imbalance"]
    assert result.status.value == "warn", result.message
    assert "of the first 8 batches' 256 samples" in result.message


def test_data_at_80_percent_majority_is_not_a_warning_when_pooled():
    result = run_preflight(MLP(), _imbalanced_first_batch_lucky(0.8), checks=["class_imbalance"])["class_imbalance"]
    assert result.status.value != "warn", result.message


class KeywordTokens(Program):
    """Token ids and a mask in a dict batch, the model called with keyword arguments."""

    def __init__(self, mix=False):
        super().__init__()
        self.mix = mix
        self.emb = nn.Embedding(30, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        if self.mix:  # pooled over the batch instead of the sequence: a bug
            h = h - h.mean(0, keepdim=True)
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(
            self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"]
        )


class KeywordData(Dataset):
    def __init__(self):
        self.x, self.y = _tokens()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.y[i]}


@pytest.mark.parametrize("mix", [False, True])
def test_token_ids_given_as_keywords_are_followed_through_the_embedding(mix):
    report = run_preflight(KeywordTokens(mix), DataLoader(KeywordData(), batch_size=16), checks=["batch_independence"])
    assert report["batch_independence"].status.value == ("fail" if mix else "pass")
