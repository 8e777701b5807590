"""Bugs in the loss: its sign, what it is fed (probabilities, log-probabilities, logits), its axis, target shapes and ranges."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import common as C
from . import program


class NegatedLoss(C.Classifier):
    def loss(self, out, y):
        return -F.cross_entropy(out, y)  # meant to be a "score to maximise", minimised instead


@program(
    "wrong_loss_sign", kind="bug",
    expected={"init_loss", "loss_divergence", "weight_growth", "grad_explosion", "overfit_batch"},
    summary="The cross-entropy is negated, so training maximises the error; the loss runs off to minus infinity.",
)
def wrong_loss_sign(seed):
    train, val = C.cluster_split(seed)
    return NegatedLoss(C.mlp([16, 64, 64, 4]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "softmax_then_cross_entropy", kind="bug",
    expected={"output_activation", "overfit_batch", "loss_plateau", "underfitting", "grad_vanishing"},
    summary="The network ends in Softmax and its probabilities go into F.cross_entropy, which wants logits: the loss cannot fall below ~0.74.",
)
def softmax_then_cross_entropy(seed):
    train, val = C.cluster_split(seed)
    net = nn.Sequential(C.mlp([16, 64, 64, 4]), nn.Softmax(dim=1))
    return C.Classifier(net, lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "sigmoid_then_bce_with_logits", kind="bug",
    expected={"output_activation", "overfit_batch", "loss_plateau", "underfitting", "grad_vanishing"},
    summary="Binary head ends in Sigmoid and the probability goes into BCEWithLogits (a double sigmoid): the loss floor is 0.31.",
)
def sigmoid_then_bce_with_logits(seed):
    train, val = C.cluster_split(seed, classes=2)
    net = nn.Sequential(C.mlp([16, 32, 32, 1]), nn.Sigmoid())
    return C.BinaryClassifier(net, lr=1e-3), C.loaders(train, val, seed=seed), C.steps(250)


class NLLOnLogits(C.Classifier):
    def loss(self, out, y):
        return F.nll_loss(out, y)  # nll_loss wants log-probabilities; log_softmax forgotten


@program(
    "nll_on_logits", kind="bug",
    expected={"output_activation", "init_loss", "loss_divergence", "weight_growth", "grad_explosion"},
    summary="Raw logits go into F.nll_loss (log_softmax forgotten): the loss is -logit[y], unbounded below, starting at 0 not ln 4.",
)
def nll_on_logits(seed):
    train, val = C.cluster_split(seed)
    return NLLOnLogits(C.mlp([16, 64, 64, 4]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


class NLLOnProbabilities(C.Classifier):
    def forward(self, x):
        return F.softmax(self.net(x), dim=1)

    def loss(self, out, y):
        return F.nll_loss(out, y)  # fed probabilities, not log-probabilities


@program(
    "nll_on_probabilities", kind="bug",
    expected={"output_activation", "init_loss", "overfit_batch", "loss_plateau", "underfitting", "grad_vanishing"},
    summary="Softmax probabilities go into F.nll_loss (which wants log-probabilities): loss is -p[y], starts at -0.25, gradients are weak.",
)
def nll_on_probabilities(seed):
    train, val = C.cluster_split(seed)
    return NLLOnProbabilities(C.mlp([16, 64, 64, 4]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


class LogProbsIntoBCE(C.Classifier):
    """Multi-label style loss by mistake: log-probabilities scored as if they were logits against one-hot targets."""

    def forward(self, x):
        return F.log_softmax(self.net(x), dim=1)

    def loss(self, out, y):
        return F.binary_cross_entropy_with_logits(out, F.one_hot(y, out.shape[1]).float())


@program(
    "log_probs_into_bce", kind="bug",
    expected={"output_activation", "overfit_batch", "loss_plateau", "underfitting", "init_loss"},
    summary="log_softmax outputs (all <= 0) go into BCEWithLogits against one-hot targets: the positive class can never pass p=0.5, loss floors high.",
)
def log_probs_into_bce(seed):
    train, val = C.cluster_split(seed)
    return LogProbsIntoBCE(C.mlp([16, 64, 64, 4]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


class SoftmaxWrongAxis(C.Classifier):
    def forward(self, x):
        return F.log_softmax(self.net(x), dim=0)  # normalised over the batch, not over the classes

    def loss(self, out, y):
        return F.nll_loss(out, y)


@program(
    "softmax_wrong_axis", kind="bug",
    expected={"batch_independence", "output_activation", "init_loss"},
    summary="log_softmax over dim=0 (the batch) instead of the classes: each prediction depends on the other samples; initial loss ln(32) not ln(4).",
)
def softmax_wrong_axis(seed):
    train, val = C.cluster_split(seed)
    return SoftmaxWrongAxis(C.mlp([16, 64, 64, 4]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


class BroadcastRegressor(C.Regressor):
    def forward(self, x):
        return self.net(x)  # (B, 1), the squeeze forgotten

    def loss(self, out, y):
        return F.mse_loss(out, y)  # (B, 1) - (B,) broadcasts to (B, B): every prediction fits every target


@program(
    "target_broadcast_mse", kind="bug",
    expected={"target_shape", "overfit_batch", "underfitting", "loss_plateau", "prediction_collapse", "input_dependence"},
    summary="Regression output (B,1) against target (B,) in MSE broadcasts to (B,B): the model learns to predict the mean.",
)
def target_broadcast_mse(seed):
    train, val = C.regression_split(seed)
    return BroadcastRegressor(C.mlp([8, 64, 64, 1], act=nn.SiLU), lr=2e-3), C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "labels_minus_one_bce", kind="bug",
    expected={"label_range", "loss_divergence", "weight_growth", "grad_explosion"},
    summary="Binary labels in {-1, +1} (an SVM convention) go into BCEWithLogits, which wants {0, 1}: the loss is unbounded below.",
)
def labels_minus_one_bce(seed):
    (x, y), (xv, yv) = C.cluster_split(seed, classes=2)
    to_pm1 = lambda t: t.float() * 2 - 1  # noqa: E731
    model = C.BinaryClassifier(C.mlp([16, 32, 32, 1]), lr=1e-3)
    return model, C.loaders((x, to_pm1(y)), (xv, to_pm1(yv)), seed=seed), C.steps(250)


class ReluOnLogits(C.Classifier):
    def forward(self, x):
        return torch.relu(self.net(x))  # a stray activation after the last layer


@program(
    "relu_on_logits", kind="bug",
    expected={"output_activation", "dead_units"},
    summary="A ReLU after the last layer clips the logits at 0: negative evidence is lost, samples whose logits are all <= 0 get no gradient (accuracy barely suffers: a silent bug).",
)
def relu_on_logits(seed):
    train, val = C.nonlinear_split(seed)
    return ReluOnLogits(C.mlp([8, 64, 64, 3]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)
