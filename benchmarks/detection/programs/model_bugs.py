"""Bugs in the model: broken gradient paths, samples mixed across the batch, initialisation, activations, depth, modes."""

from __future__ import annotations

import torch
from torch import nn

from . import common as C
from . import program


class DetachedEncoder(C.Classifier):
    def __init__(self, **kw):
        super().__init__(nn.Identity(), **kw)
        self.encoder = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        h = self.encoder(x).detach()  # left over from feature caching: cuts the graph
        return self.head(h)


@program(
    "detached_encoder", kind="bug",
    expected={"gradient_flow"},
    summary="The encoder's output is .detach()ed before the head: the encoder gets no gradient and stays at its random init.",
)
def detached_encoder(seed):
    train, val = C.nonlinear_split(seed)
    return DetachedEncoder(lr=3e-3), C.loaders(train, val, seed=seed), C.steps(250)


class ViewInsteadOfTranspose(C.Classifier):
    def __init__(self, **kw):
        super().__init__(nn.Identity(), **kw)
        self.rnn = nn.GRU(2, 32)  # time-major
        self.head = nn.Linear(32, 3)

    def forward(self, x):  # x: (B, T, C)
        b, t, c = x.shape
        x = x.view(t, b, c)  # meant x.transpose(0, 1): this interleaves samples of the batch
        out, _ = self.rnn(x)
        return self.head(out[-1])


@program(
    "batch_mixed_by_view", kind="bug",
    expected={"batch_independence", "underfitting", "loss_plateau"},
    summary="A (B,T,C) batch is reshaped to time-major with .view(T,B,C) instead of .transpose(0,1): each sequence is a mix of several samples.",
)
def batch_mixed_by_view(seed):
    train, val = C.wave_split(seed)
    return ViewInsteadOfTranspose(lr=3e-3), C.loaders(train, val, seed=seed), C.steps(250, gradient_clip_val=1.0)


class BatchStandardised(C.Classifier):
    def forward(self, x):
        x = (x - x.mean(0)) / (x.std(0) + 1e-5)  # "normalise the inputs", with the batch's own statistics, also at eval
        return self.net(x)


@program(
    "batch_statistics_leak", kind="bug",
    expected={"batch_independence"},
    summary="Inputs standardised inside forward by the current batch's mean/std, in eval too: predictions depend on which samples share the batch.",
)
def batch_statistics_leak(seed):
    train, val = C.cluster_split(seed)
    return BatchStandardised(C.mlp([16, 64, 64, 4]), lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


def _init_(net: nn.Module, weight=None, bias=None) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                if weight is not None:
                    weight(m.weight)
                if bias is not None:
                    bias(m.bias)
    return net


@program(
    "dead_relus_negative_bias", kind="bug",
    expected={"dead_units", "gradient_flow", "grad_vanishing", "loss_plateau", "underfitting", "weight_init",
              "prediction_collapse", "prediction_stagnation"},
    summary="Hidden biases initialised to -2 (a 'sparsity' trick gone wrong): nearly every ReLU is off for every input, little gradient gets through.",
)
def dead_relus_negative_bias(seed):
    train, val = C.cluster_split(seed)
    net = C.mlp([16, 64, 64, 64, 4])
    for layer in list(net)[:-1]:
        if isinstance(layer, nn.Linear):
            nn.init.constant_(layer.bias, -2.0)
    return C.Classifier(net, lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "saturated_sigmoids_big_init", kind="bug",
    expected={"saturation", "grad_vanishing", "weight_init", "loss_plateau", "underfitting"},
    summary="Sigmoid MLP initialised with N(0, 5^2) weights: pre-activations are ~20 wide, units sit at 0 or 1 with zero slope.",
)
def saturated_sigmoids_big_init(seed):
    train, val = C.cluster_split(seed)
    net = _init_(C.mlp([16, 64, 64, 4], act=nn.Sigmoid), weight=lambda w: nn.init.normal_(w, 0.0, 5.0))
    return C.Classifier(net, lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "huge_init", kind="bug",
    expected={"weight_init", "init_loss", "grad_explosion", "loss_spike", "loss_oscillation"},
    summary="ReLU MLP initialised with N(0, 1) weights (instead of ~1/sqrt(fan_in)): activations grow ~6x per layer, initial loss in the hundreds.",
)
def huge_init(seed):
    train, val = C.cluster_split(seed)
    net = _init_(C.mlp([16, 64, 64, 64, 4]), weight=lambda w: nn.init.normal_(w, 0.0, 1.0))
    return C.Classifier(net, lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "zero_init", kind="bug",
    expected={"weight_init", "gradient_flow", "grad_vanishing", "dead_units", "loss_plateau", "underfitting",
              "prediction_collapse", "prediction_stagnation"},
    summary="Every weight and bias initialised to 0: hidden ReLUs output 0, no gradient reaches the hidden layers, only the output bias learns.",
)
def zero_init(seed):
    train, val = C.cluster_split(seed)
    net = _init_(C.mlp([16, 64, 64, 4]), weight=nn.init.zeros_, bias=nn.init.zeros_)
    return C.Classifier(net, lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


@program(
    "symmetric_constant_init", kind="bug",
    expected={"weight_init", "loss_plateau", "underfitting"},
    summary="Every weight initialised to the same constant 0.05: all hidden units compute the same thing and stay identical, the net has width 1.",
)
def symmetric_constant_init(seed):
    train, val = C.cluster_split(seed)
    net = _init_(C.mlp([16, 64, 64, 4], act=nn.Tanh), weight=lambda w: nn.init.constant_(w, 0.05), bias=nn.init.zeros_)
    return C.Classifier(net, lr=1e-3), C.loaders(train, val, seed=seed), C.steps(300)


class ProbeLeavesEvalMode(C.Classifier):
    def on_train_epoch_start(self):
        self.eval()  # a quick probe on a fixed batch ...
        with torch.no_grad():
            self.probe = self(torch.zeros(1, 1, 12, 12, device=self.device)).softmax(-1)
        # ... and self.train() forgotten: BatchNorm uses its init statistics, dropout is off


@program(
    "eval_mode_during_training", kind="bug", phase="inflight",
    expected={"train_mode"},
    summary="on_train_epoch_start runs a probe under self.eval() and never calls self.train(): the whole run trains with BatchNorm and dropout in eval mode.",
)
def eval_mode_during_training(seed):
    (x, y), (xv, yv) = C.image_split(seed)
    model = ProbeLeavesEvalMode(C.SmallCNN(batch_norm=True, dropout=0.3), lr=0.02, optimizer="sgd")
    return model, C.loaders((C.normalise_images(x), y), (C.normalise_images(xv), yv), seed=seed), C.steps(250)


@program(
    "exploding_deep_plain_net", kind="bug",
    expected={"grad_explosion", "weight_init", "loss_divergence", "nonfinite", "loss_spike", "grad_spike", "init_loss"},
    summary="16-layer ReLU MLP, no normalisation, init gain 1.3x He: activations and gradients grow ~60x through the stack, SGD blows up.",
)
def exploding_deep_plain_net(seed):
    train, val = C.cluster_split(seed)
    net = _init_(
        C.mlp([16] + [64] * 15 + [4]),
        weight=lambda w: nn.init.normal_(w, 0.0, 1.3 * (2.0 / w.shape[1]) ** 0.5),
        bias=nn.init.zeros_,
    )
    return C.Classifier(net, lr=0.05, optimizer="sgd"), C.loaders(train, val, seed=seed), C.steps(250)


@program(
    "vanishing_deep_sigmoid_net", kind="bug",
    expected={"grad_vanishing", "gradient_flow", "saturation", "loss_plateau", "underfitting",
              "prediction_collapse", "prediction_stagnation"},
    summary="12-layer sigmoid MLP with default init: each layer shrinks the gradient ~4-10x, the first layers get ~1e-8 and the loss sits at ln 4.",
)
def vanishing_deep_sigmoid_net(seed):
    train, val = C.cluster_split(seed)
    net = C.mlp([16] + [32] * 11 + [4], act=nn.Sigmoid)
    return C.Classifier(net, lr=0.05, optimizer="sgd"), C.loaders(train, val, seed=seed), C.steps(250)
