"""Bugs in the data: scale, labels, missing values, imbalance, too little of it, a broken transform."""

from __future__ import annotations

import torch

from . import common as C
from . import program


@program(
    "unnormalised_images", kind="bug",
    expected={"input_scale", "init_loss", "grad_explosion", "loss_spike", "loss_oscillation", "prediction_instability"},
    summary="Pixel values 0-255 go straight into a CNN without BatchNorm (ToTensor/normalise forgotten): huge initial logits, erratic training.",
)
def unnormalised_images(seed):
    (x, y), (xv, yv) = C.image_split(seed)
    model = C.Classifier(C.SmallCNN(batch_norm=False), lr=1e-3)
    return model, C.loaders((x * 255, y), (xv * 255, yv), seed=seed), C.steps(250)


@program(
    "features_scales_1e4_apart", kind="bug",
    expected={"input_scale", "init_loss", "grad_explosion", "loss_spike", "loss_oscillation", "prediction_instability"},
    summary="Tabular features left in raw units, scales from 1e-2 to 1e4 (standardisation forgotten): large features swamp the rest.",
)
def features_scales_1e4_apart(seed):
    train, val = C.nonlinear_split(seed)
    scale = torch.logspace(-2, 4, 8)  # e.g. a ratio, a count, a price in cents, ...
    shift = torch.linspace(0, 5000, 8)
    (x, y), (xv, yv) = train, val
    model = C.Classifier(C.mlp([8, 64, 64, 3]), lr=1e-3)
    return model, C.loaders((x * scale + shift, y), (xv * scale + shift, yv), seed=seed), C.steps(250)


@program(
    "shuffled_labels", kind="bug", phase="inflight",
    expected={"overfitting", "underfitting", "loss_plateau"},
    summary="Training labels were shuffled apart from their inputs (a misaligned join): train loss falls only by memorising, validation stays at chance.",
)
def shuffled_labels(seed):
    (x, y), val = C.cluster_split(seed, n_train=1024)
    y = y[torch.randperm(len(y), generator=C.gen(seed, 11))]
    model = C.Classifier(C.mlp([16, 256, 256, 4]), lr=2e-3)
    return model, C.loaders((x, y), val, seed=seed), C.steps(300)


@program(
    "nan_in_data", kind="bug", phase="inflight",
    expected={"nonfinite", "nonfinite_input"},
    summary="Three training rows out of 2048 carry NaN in one feature (missing values never imputed): the first batch holding one poisons the weights.",
)
def nan_in_data(seed):
    (x, y), val = C.cluster_split(seed)
    rows = torch.randperm(len(x), generator=C.gen(seed, 12))[:3]
    x = x.clone()
    x[rows, 5] = float("nan")
    model = C.Classifier(C.mlp([16, 64, 64, 4]), lr=1e-3)
    return model, C.loaders((x, y), val, seed=seed), C.steps(300)


@program(
    "class_imbalance_97_3", kind="bug",
    expected={"class_imbalance", "prediction_collapse"},
    summary="97% of the samples are class 0 and the loss is unweighted: the model settles on always answering the majority class.",
)
def class_imbalance_97_3(seed):
    g = C.gen(seed, 13)
    centers = torch.randn(2, 16, generator=g) * 2.5 / (2 * 16) ** 0.5  # overlapping classes

    def draw(n):
        y = (torch.rand(n, generator=g) < 0.03).long()
        return centers[y] + torch.randn(n, 16, generator=g), y

    model = C.Classifier(C.mlp([16, 32, 2]), lr=1e-3)
    return model, C.loaders(draw(2048), draw(512), seed=seed), C.steps(250)


@program(
    "overfitting_tiny_train_set", kind="bug", phase="inflight",
    expected={"overfitting"},
    summary="48 training samples, a 2x512 MLP, 300 steps, validation from the same distribution: training loss goes to 0, validation loss climbs.",
)
def overfitting_tiny_train_set(seed):
    (x, y), val = C.nonlinear_split(seed, n_train=48)
    model = C.Classifier(C.mlp([8, 512, 512, 3]), lr=1e-3)
    return model, C.loaders((x, y), val, batch_size=16, seed=seed), C.steps(300)


@program(
    "inputs_zeroed_by_cast", kind="bug",
    expected={"input_dependence", "input_scale", "loss_plateau", "underfitting", "prediction_collapse", "prediction_stagnation"},
    summary="A transform casts [0,1) pixel floats to an integer type and back: every input is all zeros, the model can only learn the prior.",
)
def inputs_zeroed_by_cast(seed):
    (x, y), (xv, yv) = C.image_split(seed)
    to_model = lambda t: t.to(torch.uint8).float()  # noqa: E731 - truncates [0, 1) to 0
    model = C.Classifier(C.SmallCNN(batch_norm=True), lr=1e-3)
    return model, C.loaders((to_model(x), y), (to_model(xv), yv), seed=seed), C.steps(250)
