"""What the programs share: seeded synthetic data, loaders, and the ordinary Lightning modules.

The modules here are written the way users write them; a bug program subclasses one and
changes the one thing its bug is about, so the difference between a healthy program and a
buggy one is the bug and nothing else (as in TheDeepChecker's mutation testing).

All data comes from a ``torch.Generator`` seeded by the program's seed: no draw from the
global random streams, identical tensors on every machine.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset


def gen(seed: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + salt)


# ----------------------------------------------------------------------------- data
def clusters(
    g: torch.Generator,
    n: int,
    *,
    dim: int = 16,
    classes: int = 4,
    separation: float = 3.0,
    label_noise: float = 0.05,
    centers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian clouds around random centres, with a fraction of labels flipped: ~85-90% accuracy reachable."""
    if centers is None:
        # pairwise distance between centres is about `separation` noise standard deviations
        centers = torch.randn(classes, dim, generator=g) * separation / math.sqrt(2.0 * dim)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    flip = torch.rand(n, generator=g) < label_noise
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)
    return x, y, centers


def cluster_split(seed: int, n_train: int = 2048, n_val: int = 512, **kw: Any):
    """Train and validation sets of the same cluster task."""
    g = gen(seed, 1)
    x, y, centers = clusters(g, n_train, **kw)
    xv, yv, _ = clusters(g, n_val, centers=centers, **kw)
    return (x, y), (xv, yv)


def nonlinear_split(seed: int, n_train: int = 2048, n_val: int = 512, dim: int = 8, classes: int = 3):
    """Classes from a nonlinear rule (a two-layer teacher), so depth and non-linearity matter."""
    g = gen(seed, 2)
    w1 = torch.randn(dim, 32, generator=g)
    w2 = torch.randn(32, classes, generator=g)

    def draw(n: int):
        x = torch.randn(n, dim, generator=g)
        logits = 2.0 * torch.tanh(x @ w1 / math.sqrt(dim)) @ w2
        gumbel = -torch.log(-torch.log(torch.rand(n, classes, generator=g)))
        return x, (logits + gumbel).argmax(1)  # a sample of softmax(logits): noisy labels

    return draw(n_train), draw(n_val)


def regression_split(seed: int, n_train: int = 2048, n_val: int = 512, dim: int = 8, noise: float = 0.2):
    """A smooth nonlinear target with noise, standardised: R^2 of about 0.9 is reachable."""
    g = gen(seed, 3)
    w1 = torch.randn(dim, generator=g) / math.sqrt(dim)
    w2 = torch.randn(dim, generator=g) / math.sqrt(dim)

    def draw(n: int):
        x = torch.randn(n, dim, generator=g)
        y = torch.sin(2.0 * x @ w1) + 0.5 * (x @ w2) + 0.3 * x[:, 0] * x[:, 1]
        return x, y + noise * torch.randn(n, generator=g)

    (x, y), (xv, yv) = draw(n_train), draw(n_val)
    mu, sd = y.mean(), y.std()
    return (x, (y - mu) / sd), (xv, (yv - mu) / sd)


def images(g: torch.Generator, n: int, prototypes: torch.Tensor, *, noise: float = 0.35):
    """Images in [0, 1): a class's smooth prototype, shifted by up to 2 pixels, contrast-jittered, noisy."""
    classes, channels, size, _ = prototypes.shape
    y = torch.randint(0, classes, (n,), generator=g)
    x = prototypes[y].clone()
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    for s in range(-2, 3):  # roll by group: 5 + 5 tensor ops instead of n
        rows = shifts[:, 0] == s
        x[rows] = torch.roll(x[rows], s, dims=2)
        cols = shifts[:, 1] == s
        x[cols] = torch.roll(x[cols], s, dims=3)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    x = 0.5 + contrast * (x - 0.5) + noise * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 0.999), y


def image_split(seed: int, n_train: int = 2048, n_val: int = 512, classes: int = 4, size: int = 12, channels: int = 1):
    """Small images of ``classes`` smooth random patterns; pixel values in [0, 1)."""
    g = gen(seed, 4)
    low = torch.rand(classes, channels, 4, 4, generator=g)
    prototypes = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    prototypes = (prototypes - prototypes.mean()) / prototypes.std() * 0.25 + 0.5
    return images(g, n_train, prototypes), images(g, n_val, prototypes)


def normalise_images(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


def wave_split(seed: int, n_train: int = 2048, n_val: int = 512, length: int = 24, classes: int = 3, channels: int = 2):
    """Float sequences (B, T, C): class c is a noisy sinusoid of its own frequency, random phase."""
    g = gen(seed, 5)
    freqs = 0.25 + 0.35 * torch.arange(classes, dtype=torch.float32)

    def draw(n: int):
        y = torch.randint(0, classes, (n,), generator=g)
        t = torch.arange(length, dtype=torch.float32)
        phase = 2 * math.pi * torch.rand(n, channels, generator=g)
        amp = 0.7 + 0.6 * torch.rand(n, channels, generator=g)
        x = amp[:, None, :] * torch.sin(freqs[y][:, None, None] * t[None, :, None] + phase[:, None, :])
        return x + 0.6 * torch.randn(n, length, channels, generator=g), y

    return draw(n_train), draw(n_val)


def token_split(seed: int, n_train: int = 2048, n_val: int = 512, length: int = 16, vocab: int = 32, classes: int = 4):
    """Token-id sequences (B, T): each class favours its own few tokens (35% of draws), the rest uniform."""
    g = gen(seed, 6)
    favourite = torch.randperm(vocab, generator=g)[: classes * 4].view(classes, 4)

    def draw(n: int):
        y = torch.randint(0, classes, (n,), generator=g)
        uniform = torch.randint(0, vocab, (n, length), generator=g)
        pick = favourite[y][torch.arange(n)[:, None], torch.randint(0, 4, (n, length), generator=g)]
        use = torch.rand(n, length, generator=g) < 0.35
        return torch.where(use, pick, uniform), y

    return draw(n_train), draw(n_val)


class DictDataset(Dataset):
    """Samples as dicts, the way many real pipelines hand them out."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def loaders(train, val, *, batch_size: int = 32, seed: int = 0, val_batch_size: int = 256, drop_last: bool = False):
    """(shuffled train loader with its own generator, ordered validation loader)."""
    train_ds = train if isinstance(train, Dataset) else TensorDataset(*train)
    val_ds = val if isinstance(val, Dataset) else TensorDataset(*val)
    return (
        DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen(seed, 7), drop_last=drop_last),
        DataLoader(val_ds, batch_size=val_batch_size),
    )


# ----------------------------------------------------------------------------- models
def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, dropout: float = 0.0, norm: bool = False) -> nn.Sequential:
    """Linear layers with ``act`` between them (not after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if norm:
                layers.append(nn.LayerNorm(b))
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 1, classes: int = 4, width: int = 16, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), norm(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 9, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def warmup_cosine(warmup: int, total: int, floor: float = 0.0):
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Classifier(pl.LightningModule):
    """A classifier trained with cross-entropy, written the ordinary Lightning way.

    Args:
        net: the network, mapping a batch's inputs to logits.
        lr, optimizer ("adam", "adamw", "sgd"), weight_decay, momentum: the optimizer.
        schedule: ``None`` or a multiplier function of the step (``LambdaLR``, stepped per step).
        label_smoothing: passed to ``F.cross_entropy``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        schedule=None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.schedule = schedule
        self.label_smoothing = label_smoothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, label_smoothing=self.label_smoothing)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(-1)

    def unpack(self, batch):
        return batch[0], batch[1]

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        out = self(x)
        self.log("val_loss", self.loss(out, y))
        self.log("val_acc", (self.predict(out) == y).float().mean())

    def optimized_parameters(self):
        return self.parameters()

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def configure_optimizers(self):
        opt = self.make_optimizer(self.optimized_parameters())
        if self.schedule is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class BinaryClassifier(Classifier):
    """One logit per sample, ``BCEWithLogits`` against float 0/1 targets."""

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def loss(self, out, y):
        return F.binary_cross_entropy_with_logits(out, y.float())

    def predict(self, out):
        return (out > 0).long()

    def validation_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        out = self(x)
        self.log("val_loss", self.loss(out, y))
        self.log("val_acc", (self.predict(out) == (y > 0).long()).float().mean())


class Regressor(Classifier):
    """Mean-squared error on a standardised target; reports validation R^2 as ``val_acc``'s cousin ``val_r2``."""

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def loss(self, out, y):
        return F.mse_loss(out, y)

    def validation_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        out = self(x)
        mse = F.mse_loss(out.reshape(y.shape), y)
        self.log("val_loss", mse)
        self.log("val_r2", 1.0 - mse / y.var())


def steps(n: int, **extra: Any) -> dict[str, Any]:
    """Trainer arguments for a run of ``n`` optimizer steps."""
    return {"max_steps": n, "max_epochs": -1, **extra}
