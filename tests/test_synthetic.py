"""flightcheck.synthetic: data modules whose answer is known, reproducible under a seed.

Each known answer is checked two ways where it can be: the rule that defines it (the Bayes
classifier, the true function, the per-pixel threshold) scores it on a large sample, and a
small model trained for a few dozen to a few hundred steps gets near it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flightcheck.synthetic import (
    GaussianClusters,
    KnownFunctionRegression,
    SequenceClassification,
    ShapesDetection,
    ShapesSegmentation,
    box_iou,
    mean_iou,
)
from flightcheck.synthetic.functional import SHAPE_LEVELS
from flightcheck.utils import tensors_in
from tests.conftest import TinyClassifier, make_trainer

SMALL = dict(n_train=64, n_val=32, batch_size=16)
MODULES = {
    "clusters": lambda seed: GaussianClusters(seed=seed, **SMALL),
    "linear": lambda seed: KnownFunctionRegression("linear", seed=seed, **SMALL),
    "sine": lambda seed: KnownFunctionRegression("sine", seed=seed, **SMALL),
    "callable": lambda seed: KnownFunctionRegression(lambda x: x[:, :2] ** 2, dim=3, seed=seed, **SMALL),
    "segmentation": lambda seed: ShapesSegmentation(image_size=16, max_radius=4, seed=seed, **SMALL),
    "detection": lambda seed: ShapesDetection(image_size=16, num_objects=2, max_radius=3, seed=seed, **SMALL),
    "marker": lambda seed: SequenceClassification(rule="marker", seed=seed, **SMALL),
    "majority": lambda seed: SequenceClassification(rule="majority", seed=seed, **SMALL),
    "parity": lambda seed: SequenceClassification(rule="parity", label_noise=0.1, seed=seed, **SMALL),
}


def all_tensors(dm):
    """Every tensor of every split, in loader order."""
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    return [t for loader in loaders for batch in loader for _, t in tensors_in(batch)]


def train(model, dm, loss_fn, steps, lr=0.05, one_cycle=False):
    """Adam on the module's training loader for ``steps`` steps (over as many epochs as that takes)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps) if one_cycle else None
    step = 0
    while step < steps:
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            step += 1
            if step == steps:
                break
    return model.eval()


class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(1)


# ---------------------------------------------------------------------------- every module
@pytest.mark.parametrize("name", MODULES)
def test_same_seed_gives_identical_tensors(name):
    first, second = all_tensors(MODULES[name](3)), all_tensors(MODULES[name](3))
    assert len(first) == len(second)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("name", MODULES)
def test_different_seeds_give_different_data(name):
    first, second = MODULES[name](0), MODULES[name](1)
    x0 = next(tensors_in(first.train_set[0]))[1]
    x1 = next(tensors_in(second.train_set[0]))[1]
    assert not torch.equal(x0, x1)


@pytest.mark.parametrize("name", MODULES)
def test_building_and_loading_leaves_the_global_random_streams_untouched(name):
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    dm = MODULES[name](0)
    dm.setup("fit")
    all_tensors(dm)
    dm.expectations()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


@pytest.mark.parametrize("name", MODULES)
def test_describe_states_every_known_answer(name):
    dm = MODULES[name](0)
    text = dm.describe()
    assert type(dm).__name__ in text
    for figure, value in dm.expectations().items():
        assert figure in text and math.isfinite(value)


def test_training_loader_reshuffles_each_epoch_in_a_reproducible_order():
    def first_batches(dm):
        loader = dm.train_dataloader()
        return [next(iter(loader))[1] for _ in range(2)]  # two epochs of the same loader

    epoch1, epoch2 = first_batches(GaussianClusters(**SMALL))
    again1, again2 = first_batches(GaussianClusters(**SMALL))
    assert not torch.equal(epoch1, epoch2)
    assert torch.equal(epoch1, again1) and torch.equal(epoch2, again2)


def test_validation_size_does_not_change_the_training_data():
    small = GaussianClusters(n_train=64, n_val=32)
    large = GaussianClusters(n_train=64, n_val=500)
    assert torch.equal(small.train_set.tensors[0], large.train_set.tensors[0])
    assert not torch.equal(small.train_set.tensors[0][:32], small.val_set.tensors[0])


@pytest.mark.parametrize(
    ("make", "error", "names"),
    [
        (lambda: GaussianClusters(num_classes=1), ValueError, "num_classes"),
        (lambda: GaussianClusters(num_classes=5, dim=3), ValueError, "dim"),
        (lambda: GaussianClusters(separation=-1.0), ValueError, "separation"),
        (lambda: GaussianClusters(n_train=1.5), TypeError, "n_train"),
        (lambda: GaussianClusters(batch_size=0), ValueError, "batch_size"),
        (lambda: GaussianClusters(seed=-1), ValueError, "seed"),
        (lambda: KnownFunctionRegression("cubic"), ValueError, "'linear', 'sine'"),
        (lambda: KnownFunctionRegression(noise_std=-0.1), ValueError, "noise_std"),
        (lambda: ShapesSegmentation(image_size=16, max_radius=8), ValueError, "max_radius"),
        (lambda: ShapesSegmentation(min_radius=5, max_radius=3), ValueError, "min_radius"),
        (lambda: ShapesSegmentation(min_radius=0), ValueError, "min_radius"),
        (lambda: ShapesDetection(image_size=32, num_objects=4, max_radius=6), ValueError, "4 strips"),
        (lambda: SequenceClassification(rule="xor"), ValueError, "'marker', 'majority', 'parity'"),
        (lambda: SequenceClassification(label_noise=1.0), ValueError, "label_noise"),
        (lambda: SequenceClassification(rule="majority", num_classes=5, vocab_size=6), ValueError, "vocab_size"),
    ],
)
def test_misconfiguration_raises_naming_the_parameter(make, error, names):
    with pytest.raises(error, match=names):
        make()


def test_fits_as_a_lightning_datamodule(tmp_path):
    dm = GaussianClusters(num_classes=3, dim=8, n_train=256, n_val=128)
    trainer = make_trainer(tmp_path, max_epochs=2, logger=False)
    model = TinyClassifier(dim=8, classes=3)
    trainer.fit(model, datamodule=dm)
    (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
    assert metrics["val_loss"] < 0.5 * dm.chance_loss


# ---------------------------------------------------------------------------- Gaussian clusters
def test_cluster_centres_are_all_separation_apart():
    dm = GaussianClusters(num_classes=5, dim=4, separation=2.5)
    distances = torch.pdist(dm.centers)
    assert distances.shape == (10,)
    assert torch.allclose(distances, torch.full_like(distances, 2.5), atol=1e-5)


def test_two_cluster_expected_accuracy_is_the_normal_cdf_of_half_the_separation():
    dm = GaussianClusters(num_classes=2, dim=1, separation=2.0)
    assert dm.expected_accuracy == pytest.approx(0.841345, abs=1e-5)  # Φ(1)


@pytest.mark.parametrize(("classes", "separation"), [(2, 1.5), (4, 2.5), (10, 3.0)])
def test_bayes_classifier_scores_the_stated_expected_accuracy(classes, separation):
    dm = GaussianClusters(num_classes=classes, dim=12, separation=separation, n_train=8, n_val=20000)
    x, y = dm.val_set.tensors
    accuracy = (dm.bayes_predict(x) == y).float().mean().item()
    p = dm.expected_accuracy
    assert abs(accuracy - p) < 4 * math.sqrt(p * (1 - p) / len(y))


@pytest.mark.parametrize("seed", [0, 1])
def test_logistic_regression_reaches_but_does_not_beat_expected_accuracy(seed):
    dm = GaussianClusters(num_classes=4, dim=8, separation=2.5, n_train=512, n_val=2000, seed=seed)
    model = train(nn.Linear(8, 4), dm, F.cross_entropy, steps=60)
    x, y = dm.val_set.tensors
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    assert dm.expected_accuracy == pytest.approx(0.771, abs=1e-3)
    assert dm.expected_accuracy - 0.04 < accuracy < dm.expected_accuracy + 0.03


def test_classes_are_exactly_balanced():
    dm = GaussianClusters(num_classes=3, n_train=300)
    assert torch.bincount(dm.train_set.tensors[1]).tolist() == [100, 100, 100]
    assert dm.chance_accuracy == pytest.approx(1 / 3)
    assert dm.chance_loss == pytest.approx(math.log(3))


# ---------------------------------------------------------------------------- regression
def val_mse(model_or_fn, dm):
    x, y = dm.val_set.tensors
    with torch.no_grad():
        return F.mse_loss(model_or_fn(x), y).item()


@pytest.mark.parametrize("fn", ["linear", "sine"])
def test_true_function_scores_the_noise_floor(fn):
    dm = KnownFunctionRegression(fn, dim=4, noise_std=0.3, n_train=8, n_val=20000)
    # the squared noise's sample mean has standard deviation noise_floor·sqrt(2/n) ≈ 1% here
    assert val_mse(dm.target_function, dm) == pytest.approx(dm.noise_floor, rel=0.05)
    assert dm.noise_floor == pytest.approx(0.09)


def test_mean_prediction_scores_the_baseline_mse():
    dm = KnownFunctionRegression("sine", dim=4, noise_std=0.3, n_train=8, n_val=20000)
    assert dm.baseline_mse == pytest.approx(0.5 + 0.09, abs=1e-3)
    assert val_mse(lambda x: torch.zeros(len(x), 1), dm) == pytest.approx(dm.baseline_mse, rel=0.05)


def test_linear_model_reaches_the_noise_floor_of_a_linear_function():
    dm = KnownFunctionRegression("linear", dim=8, noise_std=0.3, n_val=2000)
    model = train(nn.Linear(8, 1), dm, F.mse_loss, steps=60)
    assert dm.noise_floor * 0.85 < val_mse(model, dm) < dm.noise_floor * 1.2


def test_linear_model_stalls_at_linear_mse_on_the_sine():
    dm = KnownFunctionRegression("sine", dim=4, noise_std=0.1, n_train=1024, n_val=2000)
    model = train(nn.Linear(4, 1), dm, F.mse_loss, steps=100)
    assert dm.linear_mse == pytest.approx(0.437, abs=1e-3)
    assert val_mse(model, dm) == pytest.approx(dm.linear_mse, rel=0.1)


def test_small_mlp_approaches_the_noise_floor_on_the_sine():
    dm = KnownFunctionRegression("sine", dim=2, noise_std=0.1, n_train=1024, n_val=2000)
    model = train(nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 1)), dm, F.mse_loss, 300, 0.03, True)
    mse = val_mse(model, dm)
    # closes at least 90% of the gap a linear model leaves, without beating the noise
    assert dm.noise_floor * 0.85 < mse < dm.noise_floor + 0.1 * (dm.linear_mse - dm.noise_floor)


def test_figures_of_a_callable_are_estimated_from_it():
    dm = KnownFunctionRegression(lambda x: x[:, 0] ** 2, dim=3, noise_std=0.5)
    # x0² has variance 2 and no linear part (E[x0³] = 0)
    assert dm.signal_variance == pytest.approx(2.0, rel=0.05)
    assert dm.linear_mse == pytest.approx(0.25 + 2.0, rel=0.05)
    assert dm.train_set.tensors[1].shape == (512, 1)


def test_callable_with_a_wrong_output_shape_is_refused():
    dm = KnownFunctionRegression(lambda x: x.sum(), dim=3)
    with pytest.raises(ValueError, match=r"fn must map inputs of shape"):
        dm.setup("fit")


# ---------------------------------------------------------------------------- shapes: segmentation
def test_masks_are_the_painted_pixels():
    dm = ShapesSegmentation(image_size=24, noise_std=0.0, n_train=64)
    images, masks = dm.train_set.tensors
    assert torch.equal(images[:, 0], torch.tensor(SHAPE_LEVELS)[masks])
    assert set(masks.unique().tolist()) == {0, 1, 2}
    assert (masks.flatten(1) > 0).any(1).all()  # every image holds a shape


def test_noiseless_shapes_are_segmented_perfectly_by_the_per_pixel_rule():
    assert ShapesSegmentation(noise_std=0.0, n_val=32).expected_iou == 1.0


def test_one_by_one_convolution_reaches_but_does_not_beat_the_per_pixel_rule():
    dm = ShapesSegmentation(noise_std=0.3, n_train=256, n_val=128)
    model = train(nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1)), dm, F.cross_entropy, 60)
    images, masks = dm.val_set.tensors
    with torch.no_grad():
        iou = mean_iou(model(images).argmax(1), masks, 3)
    assert dm.chance_iou < 0.5 < dm.expected_iou
    assert dm.expected_iou - 0.04 < iou < dm.expected_iou + 0.01


def test_convolution_over_neighbours_goes_beyond_the_per_pixel_rule():
    dm = ShapesSegmentation(noise_std=0.3, n_train=256, n_val=128)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    model = train(net, dm, F.cross_entropy, 60)
    images, masks = dm.val_set.tensors
    with torch.no_grad():
        assert mean_iou(model(images).argmax(1), masks, 3) > dm.expected_iou + 0.02


# ---------------------------------------------------------------------------- shapes: detection
def test_boxes_are_tight_around_the_painted_pixels_on_pixel_edges():
    dm = ShapesDetection(image_size=20, num_objects=1, noise_std=0.0, n_train=64)
    data = dm.train_set
    for image, box in zip(data.images, data.boxes[:, 0], strict=True):
        rows, cols = image[0].nonzero(as_tuple=True)
        tight = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
        assert torch.equal(box, tight)


def test_objects_sit_left_to_right_in_their_own_strips():
    dm = ShapesDetection(image_size=30, num_objects=3, max_radius=4, n_train=128)
    boxes = dm.train_set.boxes
    strips = torch.tensor([0.0, 10.0, 20.0])
    assert (boxes[..., 0] >= strips).all() and (boxes[..., 2] <= strips + 10).all()
    assert set(dm.train_set.labels.unique().tolist()) == {1, 2}


def test_batches_stack_targets_and_convert_to_torchvision_lists():
    dm = ShapesDetection(num_objects=2, max_radius=5, batch_size=8)
    images, target = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 32, 32) and images.dtype == torch.float32
    assert target["boxes"].shape == (8, 2, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (8, 2) and target["labels"].dtype == torch.int64
    per_image = dm.as_target_list(target)
    assert len(per_image) == 8 and per_image[0]["boxes"].shape == (2, 4)


class BoxFromMask(nn.Module):
    """A tiny detector: per-pixel class scores, boxed by the rows and columns shapes occupy."""

    def __init__(self):
        super().__init__()
        self.pixels = nn.Sequential(nn.Conv2d(1, 16, 1), nn.ReLU(), nn.Conv2d(16, 3, 1))

    def forward(self, x):
        logits = self.pixels(x)
        shape = 1 - logits.softmax(1)[:, 0]

        def extent(occupied):  # differentiable first and one-past-last occupied index
            before = (1 - occupied.cummax(1).values).sum(1)
            after = (1 - occupied.flip(1).cummax(1).values).sum(1)
            return before, occupied.shape[1] - after

        x1, x2 = extent(shape.amax(1))
        y1, y2 = extent(shape.amax(2))
        weights = shape.unsqueeze(1) / shape.sum((1, 2)).clamp(min=1).view(-1, 1, 1, 1)
        scores = (logits * weights).sum((2, 3))
        return torch.stack([x1, y1, x2, y2], 1).unsqueeze(1), scores.unsqueeze(1)


def detection_loss(out, target):
    boxes, scores = out
    return F.l1_loss(boxes, target["boxes"]) / 4 + F.cross_entropy(scores.flatten(0, 1), target["labels"].flatten())


def test_tiny_detector_reaches_the_expected_iou_and_labels():
    dm = ShapesDetection(image_size=32, num_objects=1)
    model = train(BoxFromMask(), dm, detection_loss, steps=120)
    val = dm.val_set
    with torch.no_grad():
        boxes, scores = model(val.images)
    assert dm.expected_iou > 0.99 and dm.expected_label_accuracy > 0.99 and dm.chance_iou < 0.2
    assert box_iou(boxes, val.boxes).mean().item() > dm.expected_iou - 0.05
    assert (scores.argmax(-1) == val.labels).float().mean().item() > dm.expected_label_accuracy - 0.05


# ---------------------------------------------------------------------------- sequences
def count_of(tokens, token):
    return (tokens == token).sum(1)


@pytest.mark.parametrize("rule", ["marker", "majority", "parity"])
def test_labels_follow_the_stated_rule(rule):
    dm = SequenceClassification(vocab_size=20, seq_len=12, rule=rule, num_classes=4, n_train=400)
    tokens, y = dm.train_set.tensors
    if rule == "marker":
        expected = (count_of(tokens, 1) > 0).long()
    elif rule == "parity":
        expected = count_of(tokens, 1) % 2
    else:
        counts = torch.stack([count_of(tokens, t) for t in range(1, 5)], 1)
        top2 = counts.topk(2, dim=1).values
        assert (top2[:, 0] > top2[:, 1]).all()  # the majority is strict
        expected = counts.argmax(1)
    assert torch.equal(y, expected)
    assert tokens.dtype == torch.int64 and tokens.min() >= 1 and tokens.max() < 20
    assert torch.bincount(y).min() == torch.bincount(y).max()


def test_label_noise_flips_the_stated_fraction():
    dm = SequenceClassification(rule="majority", label_noise=0.2, n_train=5000)
    tokens, y = dm.train_set.tensors
    flipped = (dm.rule_labels(tokens) != y).float().mean().item()
    assert flipped == pytest.approx(0.2, abs=4 * math.sqrt(0.2 * 0.8 / 5000))
    assert dm.expected_accuracy == pytest.approx(0.8)


@pytest.mark.parametrize("rule", ["marker", "majority"])
def test_bag_of_embeddings_reaches_the_expected_accuracy(rule):
    dm = SequenceClassification(vocab_size=32, seq_len=16, rule=rule, label_noise=0.1, n_train=2048, n_val=1000)
    model = nn.Sequential(
        nn.Embedding(32, 16), MeanOverPositions(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, dm.num_classes)
    )
    train(model, dm, F.cross_entropy, steps=150, lr=0.02)
    tokens, y = dm.val_set.tensors
    with torch.no_grad():
        accuracy = (model(tokens).argmax(-1) == y).float().mean().item()
    assert dm.expected_accuracy - 0.05 < accuracy < dm.expected_accuracy + 0.04


def test_parity_defeats_a_linear_bag_of_embeddings():
    dm = SequenceClassification(vocab_size=32, seq_len=16, rule="parity", n_val=1000)
    model = train(nn.Sequential(nn.Embedding(32, 16), MeanOverPositions(), nn.Linear(16, 2)), dm, F.cross_entropy, 100)
    tokens, y = dm.val_set.tensors
    with torch.no_grad():
        accuracy = (model(tokens).argmax(-1) == y).float().mean().item()
    assert accuracy < dm.chance_accuracy + 0.1
