"""The pre-flight's pure judges: numbers in, verdicts out, no Trainer."""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flightcheck.preflight.batch import judge_batch_independence, judge_input_dependence
from flightcheck.preflight.data import (
    judge_bce_targets,
    judge_class_imbalance,
    judge_input_scale,
    judge_label_range,
    judge_nonfinite,
    judge_target_shape,
    loss_weighting,
)
from flightcheck.preflight.gradients import identical_units, init_scale, judge_gradient_flow, judge_init_scale
from flightcheck.preflight.loss import classify_curve, judge_init_loss, judge_output_activation, judge_overfit
from flightcheck.preflight.modes import judge_train_mode
from flightcheck.preflight.overfit import GradientFlags, OverfitRun, WarmupRamp, probe_schedules
from flightcheck.preflight.registry import Skip
from flightcheck.preflight.roles import find_target, path_str, replace_at
from flightcheck.preflight.task import infer_task

torch.manual_seed(0)


def _decay(start, rate, n, noise=0.0, floor=0.0):
    g = torch.Generator().manual_seed(1)
    return [
        floor + (start - floor) * math.exp(-rate * i) * (1 + noise * float(torch.randn(1, generator=g)))
        for i in range(n)
    ]


def _noise(n):
    return torch.randn(n, generator=torch.Generator().manual_seed(2)).tolist()


# --------------------------------------------------------------------------- overfit curve
@pytest.mark.parametrize(
    ("losses", "kind"),
    [
        (_decay(2.3, 0.1, 60), "reached"),
        (_decay(2.3, 0.02, 60, noise=0.05), "falling"),  # not fitted within budget, but learning
        ([2.3 - 0.001 * i for i in range(100)], "slow"),  # a small learning rate: steady, not a bug
        ([1.1] * 50, "plateaus"),
        ([2.3 - 0.003 * i + 0.01 * n for i, n in enumerate(_noise(100))], "slow"),  # noisy steps, steady trend
        ([1.1 + 0.01 * n for n in _noise(100)], "plateaus"),
        (_decay(1.0, 0.3, 10, floor=0.9) + [0.9] * 60, "plateaus"),  # stalls right away far from zero
        ([1.0 + 0.02 * i for i in range(40)], "rises"),
        ([1.0, 1.5, 4.0, 30.0, float("nan")], "explodes"),
        ([1.0, 2.0, 5.0, 20.0, 80.0, 300.0], "explodes"),
        ([1.0, 1.6, 0.9, 1.7, 1.0, 1.5, 0.95, 1.65, 1.0, 1.6, 1.0, 1.55], "oscillates"),
        ([1.0, 0.9, 0.8], "short"),
        ([0.5 - 0.05 * i for i in range(40)], "reached"),  # a loss that may go negative (Gaussian NLL)
    ],
)
def test_overfit_curves_are_named_by_shape(losses, kind):
    assert classify_curve(losses)[0] == kind


def test_a_loss_that_falls_while_the_task_error_rises_is_being_maximised():
    losses = [-1.1 - 0.5 * i for i in range(30)]
    errors = [1.1 + 0.5 * i for i in range(30)]
    assert classify_curve(losses, errors=errors)[0] == "maximised"
    assert classify_curve(losses, correct=[0.9] * 15 + [0.1] * 15)[0] == "maximised"


def test_every_sample_right_passes_even_when_label_smoothing_keeps_the_loss_up():
    losses = _decay(2.3, 0.2, 40, floor=0.9)
    assert classify_curve(losses, correct=[0.3] * 39 + [1.0])[0] == "reached"


def test_reached_overfit_quotes_the_loss_that_reached_the_target_not_a_later_bounce():
    # the forgotten-zero_grad curve: down, touches a fiftieth of the start, then swings back above it
    losses = _decay(1.0, 0.08, 25) + [0.4, 1.2, 0.02, 1.3, 1.4]
    verdict = judge_overfit(OverfitRun(losses=losses, steps=30, stopped="reached"))
    assert verdict.message == "fitted one batch in 30 steps (loss 1 -> 0.02)."


# --------------------------------------------------------------------------- init_loss
def _classification(logit_scale=0.1, n=64, classes=10):
    z = torch.randn(n, classes) * logit_scale
    y = torch.randint(0, classes, (n,))
    return z, y, infer_task(z, y)


def test_cross_entropy_near_ln_c_passes_and_overconfident_logits_warn():
    z, y, task = _classification()
    assert judge_init_loss(float(F.cross_entropy(z, y)), task) == []
    z, y, task = _classification(logit_scale=8.0)
    (v,) = judge_init_loss(float(F.cross_entropy(z, y)), task)
    assert v.severity == "warning" and "ln 10" in v.message and v.data["logit_std"] > 5


def test_label_smoothing_keeps_the_initial_loss_at_ln_c():
    z, y, task = _classification()
    assert judge_init_loss(float(F.cross_entropy(z, y, label_smoothing=0.2)), task) == []


def test_negative_or_sign_flipped_losses_are_errors():
    z, y, task = _classification()
    (v,) = judge_init_loss(-float(F.cross_entropy(z, y)), task)
    assert v.severity == "error" and "sign flipped" in v.message
    p = torch.softmax(z, -1)
    (v,) = judge_init_loss(float(F.nll_loss(p, y)), infer_task(p, y))
    assert v.severity == "error" and "cannot be negative" in v.message


def test_a_summed_loss_is_recognised():
    z, y, task = _classification()
    (v,) = judge_init_loss(float(F.cross_entropy(z, y, reduction="sum")), task)
    assert v.severity == "warning" and "summed" in v.message


def test_binary_cross_entropy_expects_ln_2():
    z, y = torch.randn(64) * 0.1, (torch.rand(64) > 0.5).float()
    task = infer_task(z, y)
    assert task.kind == "binary" and judge_init_loss(float(F.binary_cross_entropy_with_logits(z, y)), task) == []
    assert judge_init_loss(float(F.binary_cross_entropy_with_logits(z * 200, y)), infer_task(z * 200, y))


def test_regression_targets_far_from_zero_warn_about_the_offset():
    z, y = torch.randn(64) * 0.1, 300.0 + torch.randn(64)
    (v,) = judge_init_loss(float(F.mse_loss(z, y)), infer_task(z, y))
    assert "offset" in v.message and v.data["target_mean"] > 290
    y = torch.randn(64)
    assert judge_init_loss(float(F.mse_loss(z, y)), infer_task(z, y)) == []


def test_a_stated_expectation_is_checked_both_ways_and_unknown_tasks_skip():
    z, y, task = _classification()
    assert judge_init_loss(9.0, task, expected=2.3)
    assert judge_init_loss(0.1, task, expected=2.3)
    with pytest.raises(Skip, match="expected_init_loss"):
        judge_init_loss(0.5, infer_task(torch.randn(4, 3), None))


# --------------------------------------------------------------------------- output_activation
def test_probabilities_into_cross_entropy_are_caught_and_logits_pass():
    z, y, _ = _classification(logit_scale=3.0)
    p = torch.softmax(z, -1)
    v = judge_output_activation(p, y, float(F.cross_entropy(p, y)))
    assert v.severity == "error" and "softmax is applied twice" in v.message
    assert judge_output_activation(z, y, float(F.cross_entropy(z, y))) is None
    logp = torch.log_softmax(z, -1)  # cross_entropy(log_softmax(z)) == cross_entropy(z): harmless
    assert judge_output_activation(logp, y, float(F.cross_entropy(logp, y))) is None
    assert judge_output_activation(logp, y, float(F.nll_loss(logp, y))) is None


def test_nll_loss_on_logits_or_probabilities_is_caught():
    z, y, _ = _classification(logit_scale=3.0)
    assert "log-probabilities" in judge_output_activation(z, y, float(F.nll_loss(z, y))).message
    p = torch.softmax(z, -1)
    assert "nll_loss on them" in judge_output_activation(p, y, float(F.nll_loss(p, y))).message


def test_softmax_over_the_batch_axis_is_caught():
    z, y, _ = _classification(logit_scale=3.0, n=16, classes=4)
    p = torch.softmax(z, dim=0)
    assert "batch dimension" in judge_output_activation(p, y, float(F.cross_entropy(p, y))).message


def test_sigmoid_into_bce_with_logits_is_caught():
    z, y = torch.randn(64) * 3, (torch.rand(64) > 0.5).float()
    p = torch.sigmoid(z)
    assert (
        "sigmoid is applied twice"
        in judge_output_activation(p, y, float(F.binary_cross_entropy_with_logits(p, y))).message
    )
    assert judge_output_activation(p, y, float(F.binary_cross_entropy(p, y))) is None
    assert judge_output_activation(p, y, float(F.binary_cross_entropy_with_logits(p, y)), producer="sigmoid")


def test_logits_that_happen_to_lie_in_zero_one_are_not_probabilities():
    z, y = 0.5 + 0.05 * torch.randn(64), (torch.rand(64) > 0.5).float()  # a bias of 0.5, tiny weights
    assert bool((z >= 0).all() and (z <= 1).all())
    assert judge_output_activation(z, y, float(F.binary_cross_entropy_with_logits(z, y)), producer="addmm") is None


def test_rectified_outputs_warn_but_constant_ones_do_not():
    z, y, _ = _classification(logit_scale=3.0)
    r = F.relu(z)
    assert judge_output_activation(r, y, float(F.cross_entropy(r, y))).severity == "warning"
    const = torch.zeros(64, 10)
    const[:20] = 0.5
    assert judge_output_activation(const, y, float(F.cross_entropy(const, y))) is None


# --------------------------------------------------------------------------- data
def test_target_shape_flags_silent_broadcasting_only_when_the_loss_proves_it():
    out, y = torch.randn(32, 1), torch.randn(32)
    v = judge_target_shape(out, y, float(F.mse_loss(*torch.broadcast_tensors(out, y))))
    assert v.severity == "error" and v.data["broadcast_shape"] == [32, 32]
    assert judge_target_shape(out, y, float(F.mse_loss(out.squeeze(1), y))) is None  # the step squeezes itself
    logits, labels = torch.randn(32, 32), torch.randint(0, 32, (32,))
    assert judge_target_shape(logits, labels, float(F.cross_entropy(logits, labels))) is None


def test_label_range_needs_evidence():
    y = torch.tensor([1, 2, 3, 3])
    crash = IndexError("Target 3 is out of bounds.")
    v = judge_label_range(y, 3, crash)
    assert v.severity == "error" and "do not start at 0" in v.causes[0]
    assert judge_label_range(y, 3, None) is None  # the loss read them fine: the captured output was not the logits
    assert judge_label_range(y, 3, None, stated=True) is not None
    assert judge_label_range(torch.tensor([0, 1, -100]), 2, None, stated=True) is None


def test_class_imbalance_in_the_batch():
    severe = judge_class_imbalance(torch.tensor([0] * 62 + [1, 2]))  # 97%, unweighted
    assert severe.severity == "warning" and severe.data["share"] == pytest.approx(62 / 64)
    assert judge_class_imbalance(torch.tensor([1.0] * 31 + [0.0])).severity == "warning"
    # 91% in one batch happens with healthy skewed data: a note, not an alarm
    assert judge_class_imbalance(torch.tensor([0] * 29 + [1, 2, 1])).severity == "info"
    assert judge_class_imbalance(torch.tensor([0, 1, 2] * 11)) is None
    assert judge_class_imbalance(torch.tensor([0] * 10)) is None  # too few samples to say


def test_class_imbalance_is_quiet_when_the_loss_is_class_weighted():
    y = torch.tensor([0] * 62 + [1, 2])
    assert judge_class_imbalance(y, weighted="criterion.weight") is None

    class Module(nn.Module):
        def __init__(self, criterion=None, buffer=False):
            super().__init__()
            self.net = nn.Linear(4, 3)
            self.criterion = criterion
            if buffer:
                self.register_buffer("class_weights", torch.ones(3))

    assert loss_weighting(Module(nn.CrossEntropyLoss(weight=torch.ones(3)))) == "criterion.weight"
    assert loss_weighting(Module(nn.BCEWithLogitsLoss(pos_weight=torch.ones(1)))) == "criterion.pos_weight"
    assert loss_weighting(Module(buffer=True)) == "class_weights"  # for F.cross_entropy(..., weight=self.class_weights)
    assert loss_weighting(Module(nn.CrossEntropyLoss())) is None
    assert loss_weighting(Module()) is None


def test_bce_targets_outside_zero_one_are_caught():
    z = torch.randn(64, 1)
    y = (torch.rand(64, 1) > 0.5).float() * 2 - 1  # {-1, +1}
    v = judge_bce_targets(z, y, float(F.binary_cross_entropy_with_logits(z, y)))
    assert v.check == "label_range" and v.severity == "error" and "-1, 1" in v.message
    assert judge_bce_targets(z, y, float(F.mse_loss(z, y))) is None  # a regression on the same values
    y01 = (y + 1) / 2
    assert judge_bce_targets(z, y01, float(F.binary_cross_entropy_with_logits(z, y01))) is None


def test_input_scale():
    pixels = torch.randint(0, 256, (8, 3, 4, 4)).float()
    assert "0-255" in judge_input_scale("x", pixels).message
    assert judge_input_scale("x", pixels / 255) is None
    feats = torch.randn(32, 4)
    assert judge_input_scale("x", feats) is None
    feats[:, 0] = feats[:, 0] * 5e4
    assert "not normalised" in judge_input_scale("x", feats).message
    spread = torch.randn(32, 4)
    spread[:, 1] *= 1e-4
    assert "apart" in judge_input_scale("x", spread).message
    assert "squashed" in judge_input_scale("x", torch.randn(32, 4) * 1e-5).message


def test_nonfinite_inputs_name_the_samples():
    x = torch.randn(8, 3)
    x[2, 1], x[5, 0] = float("nan"), float("inf")
    v = judge_nonfinite("batch[0]", x)
    assert v.data == {"nan": 1, "inf": 1, "samples": [2, 5]} and v.target == "batch[0]"
    assert judge_nonfinite("batch[1]", torch.arange(3)) is None


# --------------------------------------------------------------------------- gradients and weights
def _flags(**kinds):
    table = {
        "ok": (True, True, True),
        "none": (False, False, True),
        "zero": (True, False, True),
        "nan": (True, True, False),
    }
    return {name: GradientFlags(*table[kind], numel=10) for name, kind in kinds.items()}


def test_gradient_flow_names_what_is_wrong_grouped_by_module():
    flags = _flags(
        **{
            "enc.0.weight": "none",
            "enc.0.bias": "none",
            "head.weight": "ok",
            "mid.weight": "zero",
            "out.weight": "nan",
            "extra.weight": "ok",
        }
    )
    in_opt = {"enc.0.weight", "enc.0.bias", "head.weight", "mid.weight", "out.weight"}
    verdicts = {v.target: v for v in judge_gradient_flow(flags, in_opt, steps=5)}
    assert verdicts["no_gradient"].severity == "error" and "enc.0 (weight, bias)" in verdicts["no_gradient"].message
    assert verdicts["zero_gradient"].severity == "warning" and verdicts["nonfinite_gradient"].severity == "error"
    assert "no optimizer" in verdicts["no_optimizer"].message and "extra" in verdicts["no_optimizer"].message
    assert "nonfinite_gradient" not in {v.target for v in judge_gradient_flow(flags, in_opt, steps=5, scaled=True)}


def test_a_backbone_frozen_by_eval_and_no_grad_is_a_note_not_a_failure():
    flags = _flags(**{"backbone.weight": "none", "head.weight": "ok"})
    (v,) = judge_gradient_flow(
        flags, {"backbone.weight", "head.weight"}, steps=5, frozen_on_purpose={"backbone.weight"}
    )
    assert v.severity == "info"


def test_weight_scale_and_symmetry():
    layer = nn.Linear(256, 64)
    assert 0.4 < init_scale(layer.weight) < 0.8 and judge_init_scale("fc", layer.weight) is None
    assert "He" in judge_init_scale("fc", torch.randn(64, 256)).message
    assert "smaller" in judge_init_scale("fc", torch.randn(64, 256) * 1e-5).message
    assert identical_units(torch.full((8, 4), 0.1)) and identical_units(torch.zeros(8, 4))
    assert not identical_units(layer.weight)


def test_train_mode_ignores_frozen_parts():
    modes = {"backbone.bn": False, "head.drop": False, "head.bn": True}
    kinds = {"backbone.bn": "BatchNorm1d", "head.drop": "Dropout", "head.bn": "BatchNorm1d"}
    v = judge_train_mode(modes, kinds, {"backbone.bn": False, "head.drop": True, "head.bn": True})
    assert v.data["modules"] == ["head.drop"]
    assert judge_train_mode(modes, kinds, {"backbone.bn": False, "head.drop": False}) is None


# --------------------------------------------------------------------------- batch
def test_batch_independence_names_the_other_samples():
    dep = torch.zeros(8, dtype=torch.float64)
    dep[4] = 1.0
    assert judge_batch_independence(dep, 4, "forward") is None
    dep[:4] = 0.3
    v = judge_batch_independence(dep, 4, "forward")
    assert v.data["other_samples"] == [0, 1, 2, 3] and v.data["earlier"] == 4
    with pytest.raises(Skip):
        judge_batch_independence(torch.zeros(8, dtype=torch.float64), 4, "forward")


def test_input_dependence():
    assert judge_input_dependence(2.3, 0.1, 0.1, same_output=True).severity == "error"
    assert judge_input_dependence(2.3, 1.000, 1.004, same_output=False).severity == "error"
    assert judge_input_dependence(2.3, 0.1, 3.5, same_output=False) is None
    assert judge_input_dependence(30.0, 1.1, 1.3, same_output=False) is None  # unfitted, not ignoring
    with pytest.raises(Skip):
        judge_input_dependence(1.10, 1.09, 1.09, same_output=False)


# --------------------------------------------------------------------------- task and roles
def test_tasks_are_inferred_from_output_and_target():
    assert infer_task(torch.randn(4, 5, 8, 8), torch.randint(0, 5, (4, 8, 8))).num_classes == 5  # segmentation
    lm = infer_task(torch.randn(2, 7, 50), torch.full((2, 7), -100).index_fill_(1, torch.tensor([0]), 3))
    assert lm.kind == "multiclass" and lm.targets.tolist() == [3, 3]  # ignore_index dropped
    assert infer_task(torch.randn(8, 1), torch.randint(0, 2, (8, 1)).float()).kind == "binary"
    assert infer_task(torch.randn(8, 3), torch.eye(3)[torch.randint(0, 3, (8,))]).kind == "multiclass"
    assert infer_task(torch.randn(8), torch.randn(8)).kind == "regression"


Pair = collections.namedtuple("Pair", "x y")


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    label: torch.Tensor


def test_targets_are_found_and_batches_rebuilt_in_their_own_structure():
    x, y = torch.randn(4, 2), torch.arange(4)
    assert find_target((x, y)) == (1,) and find_target({"image": x, "Labels": y}) == ("Labels",)
    assert find_target([x]) is None and find_target({"a": x, "b": y}, target="a") == ("a",)
    assert path_str(find_target(Sample(x, y))) == "batch.label"
    rebuilt = replace_at(Pair(x, y), {(0,): torch.zeros(4, 2)})
    assert isinstance(rebuilt, Pair) and rebuilt.y is y and not rebuilt.x.any()
    assert replace_at(Sample(x, y), {find_target(Sample(x, y)): y + 1}).label.tolist() == [1, 2, 3, 4]


# --------------------------------------------------------------------------- learning-rate warm-up
def test_a_warm_up_is_found_and_replayed_compressed():
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 4000))

    class Config:
        scheduler, interval, reduce_on_plateau = sched, "step", False

    class Trainer:
        lr_scheduler_configs, max_steps = [Config()], -1

    (info,) = probe_schedules(Trainer(), advance=False)
    assert info["peak_step"] == 4000 and info["peak_lr"] == [pytest.approx(1e-3)]
    assert opt.param_groups[0]["lr"] == 0.0 and sched.last_epoch == 0  # put back
    ramp = WarmupRamp([info], max_steps=100)
    ramp.apply(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 25)
    ramp.apply(30)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def _one_hot_batch(classes=4, n=32):
    y = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))
    return F.one_hot(y, classes).float()


def test_log_softmax_outputs_into_bce_with_logits_are_an_output_activation_error():
    t = _one_hot_batch()
    out = F.log_softmax(torch.randn(32, 4, requires_grad=True), -1)
    loss = F.binary_cross_entropy_with_logits(out, t).item()
    v = judge_output_activation(out.detach(), t, loss, producer="logsoftmax")
    assert v is not None and v.severity.value == "error" and "log-probabilities" in v.message


def test_raw_logits_that_happen_to_be_all_negative_are_not_log_probabilities():
    t = _one_hot_batch()
    raw = torch.randn(32, 4, generator=torch.Generator().manual_seed(2)) - 3.0  # a strongly negative bias
    loss = F.binary_cross_entropy_with_logits(raw, t).item()
    assert judge_output_activation(raw, t, loss, producer="addmm") is None
    assert judge_output_activation(raw, t, loss, producer=None) is None


def test_log_softmax_outputs_scored_by_bce_against_one_hot_class_ids_are_an_output_activation_error():
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(3))
    out = F.log_softmax(torch.randn(32, 4, requires_grad=True), -1)
    loss = F.binary_cross_entropy_with_logits(out, F.one_hot(y, 4).float()).item()
    v = judge_output_activation(out.detach(), y, loss, producer="logsoftmax")
    assert v is not None and v.check == "output_activation" and "log-probabilities" in v.message
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(4))
    healthy = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, 4).float()).item()
    assert judge_output_activation(logits, y, healthy, producer="addmm") is None
