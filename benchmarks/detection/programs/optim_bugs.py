"""Bugs in the optimisation: learning rates, schedules, what the optimizer holds, the manual loop, regularisation."""

from __future__ import annotations

import torch
from torch import nn

from . import common as C
from . import program
from .healthy import ManualClassifier


@program(
    "lr_far_too_high_sgd", kind="bug", phase="inflight",
    expected={"loss_divergence", "grad_explosion", "nonfinite", "weight_growth", "update_ratio",
              "loss_oscillation", "loss_spike", "grad_spike", "dead_units", "underfitting", "loss_plateau",
              "prediction_collapse"},
    summary="SGD momentum 0.9 at lr 3.0 (the healthy value is ~0.05): the first steps blow up, the ReLUs die, every input gets the same answer.",
)
def lr_far_too_high_sgd(seed):
    train, val = C.nonlinear_split(seed)
    model = C.Classifier(C.mlp([8, 64, 64, 3]), lr=3.0, optimizer="sgd")
    return model, C.loaders(train, val, seed=seed), C.steps(250)


@program(
    "lr_far_too_high_adam", kind="bug", phase="inflight",
    expected={"loss_oscillation", "loss_spike", "loss_divergence", "update_ratio", "dead_units", "underfitting",
              "prediction_instability", "weight_growth", "grad_spike", "loss_plateau"},
    summary="Adam at lr 0.3 (100x too high): no NaN, but the loss thrashes, units die and accuracy stays near chance.",
)
def lr_far_too_high_adam(seed):
    train, val = C.nonlinear_split(seed)
    model = C.Classifier(C.mlp([8, 64, 64, 3]), lr=0.3)
    return model, C.loaders(train, val, seed=seed), C.steps(250)


@program(
    "lr_far_too_low", kind="bug", phase="inflight",
    expected={"update_ratio", "loss_plateau", "underfitting", "prediction_stagnation"},
    summary="Adam at lr 1e-6: weights barely move, the loss stays at its initial value for the whole run.",
)
def lr_far_too_low(seed):
    train, val = C.cluster_split(seed)
    model = C.Classifier(C.mlp([16, 64, 64, 4]), lr=1e-6)
    return model, C.loaders(train, val, seed=seed), C.steps(300)


class PerStepStepLR(C.Classifier):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)  # meant: every 10 epochs
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@program(
    "scheduler_stepped_per_batch", kind="bug", phase="inflight",
    expected={"update_ratio", "loss_plateau", "underfitting", "prediction_stagnation"},
    summary="StepLR(step_size=10, gamma=0.1) meant per epoch is stepped per batch: the LR is 1e-9 by step 60 and learning stops early.",
)
def scheduler_stepped_per_batch(seed):
    train, val = C.cluster_split(seed)
    return PerStepStepLR(C.mlp([16, 64, 64, 4]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


class HeadOnlyOptimizer(C.Classifier):
    """Fine-tuning meant to train everything; the optimizer was given the head only."""

    def __init__(self, **kw):
        super().__init__(nn.Identity(), **kw)
        self.encoder = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.encoder(x))

    def optimized_parameters(self):
        return self.head.parameters()


@program(
    "encoder_missing_from_optimizer", kind="bug",
    expected={"gradient_flow", "update_ratio"},
    summary="Layers meant to train get gradients but only the head was passed to the optimizer (frozen by mistake): the encoder never changes.",
)
def encoder_missing_from_optimizer(seed):
    train, val = C.nonlinear_split(seed)
    return HeadOnlyOptimizer(lr=3e-3), C.loaders(train, val, seed=seed), C.steps(250)


class DecayGroups(C.Classifier):
    """Weight-decay parameter groups built by name; the filter silently drops the LayerNorm weights."""

    def configure_optimizers(self):
        named = list(self.named_parameters())
        decay = [p for n, p in named if n.endswith("weight") and p.dim() > 1]
        no_decay = [p for n, p in named if n.endswith("bias")]  # LayerNorm .weight is in neither list
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=self.lr
        )


@program(
    "norm_weights_missing_from_optimizer", kind="bug",
    expected={"gradient_flow", "update_ratio"},
    summary="AdamW parameter groups built by name filters miss the LayerNorm weights: they get gradients but are never updated.",
)
def norm_weights_missing_from_optimizer(seed):
    train, val = C.nonlinear_split(seed)
    model = DecayGroups(C.mlp([8, 64, 64, 64, 3], norm=True), lr=2e-3)
    return model, C.loaders(train, val, seed=seed), C.steps(250)


class NoZeroGrad(ManualClassifier):
    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = self.unpack(batch)
        loss = self.loss(self(x), y)
        self.manual_backward(loss)  # opt.zero_grad() forgotten: gradients pile up step after step
        opt.step()
        self.log("train_loss", loss)
        return loss.detach()


@program(
    "missing_zero_grad_manual", kind="bug", phase="inflight",
    expected={"grad_explosion", "weight_growth", "loss_divergence", "loss_oscillation", "update_ratio", "grad_spike",
              "loss_spike", "nonfinite", "prediction_collapse"},
    summary="Manual optimisation without optimizer.zero_grad(): the gradient is the sum of all past gradients, SGD overshoots more each step and ends answering one class.",
)
def missing_zero_grad_manual(seed):
    train, val = C.cluster_split(seed)
    model = NoZeroGrad(C.mlp([16, 64, 64, 4]), lr=0.02, optimizer="sgd")
    return model, C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "weight_decay_far_too_high", kind="bug", phase="inflight",
    expected={"underfitting", "loss_plateau", "prediction_collapse", "prediction_stagnation", "update_ratio", "grad_vanishing"},
    summary="SGD with weight_decay=0.5 (typical 1e-4..5e-4): the decay overwhelms the data term, weights shrink and the model underfits.",
)
def weight_decay_far_too_high(seed):
    train, val = C.nonlinear_split(seed)
    model = C.Classifier(C.mlp([8, 64, 64, 3]), lr=0.05, optimizer="sgd", weight_decay=0.5)
    return model, C.loaders(train, val, seed=seed), C.steps(250)
