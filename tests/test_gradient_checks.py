"""The gradient judges and their signals on synthetic series: no Trainer, no training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flightcheck.checks import gradients as judge
from flightcheck.signals.layers import common_scope, group_by_layer, layer_of
from flightcheck.signals.robust import growth_by_part, median_mad, robust_zscore
from flightcheck.signals.updates import UpdateSample, block_span


def _noisy(n: int, sigma: float, seed: int = 0, level: float = 1.0) -> np.ndarray:
    """Log-normal noise around ``level``: how mini-batch gradient norms scatter."""
    return level * np.exp(np.random.default_rng(seed).normal(0.0, sigma, n))


# ----------------------------------------------------------------------------- signals
def test_median_and_mad_ignore_missing_steps():
    assert median_mad([1.0, np.nan, 3.0, 2.0, np.inf]) == (2.0, 1.0)
    assert all(math.isnan(v) for v in median_mad([np.nan]))


def test_robust_zscore_is_not_inflated_by_the_outlier_it_measures():
    reference = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1000.0]  # one earlier outlier
    assert robust_zscore(1000.0, reference) > 100


def test_growth_by_part_separates_a_trend_from_a_jump():
    assert growth_by_part(2.0 ** np.arange(9), parts=2) == pytest.approx([16.0, 16.0])
    jump = [1.0] * 5 + [10.0] * 4
    assert growth_by_part(jump, parts=2) == pytest.approx([1.0, 10.0])


@pytest.mark.parametrize(
    ("name", "depth", "layer"),
    [
        ("net.0.weight", 2, "net.0"),
        ("encoder.layers.3.attn.in_proj_weight", 2, "encoder.layers.3"),
        ("encoder.layers.3.attn.in_proj_weight", 1, "encoder"),
        ("backbone.layer1.0.conv1.weight", 3, "backbone.layer1.0.conv1"),
        ("pos_embedding", 2, "pos_embedding"),
    ],
)
def test_layer_of_counts_an_index_with_the_name_before_it(name, depth, layer):
    assert layer_of(name, depth) == layer


def test_group_by_layer_keeps_first_seen_order():
    layers, index = group_by_layer(["b.0.weight", "b.0.bias", "a.weight", "b.1.weight"], depth=2)
    assert layers == ["b.0", "a", "b.1"] and index == [0, 0, 1, 2]
    assert common_scope(["encoder.0", "encoder.1"]) == "encoder"
    assert common_scope(["net.0", "head"]) == "model"


def test_update_sample_is_exact_for_small_tensors():
    w = torch.nn.Parameter(torch.randn(10, 20))
    sample = UpdateSample([w], ["w"], size=4096)
    before = w.detach().clone()
    sample.snapshot()
    with torch.no_grad():
        w.add_(torch.randn_like(w) * 0.01)
    delta_sq, before_sq = sample.measure()
    assert delta_sq.item() == pytest.approx((w.detach() - before).square().sum().item(), rel=1e-5)
    assert before_sq.item() == pytest.approx(before.square().sum().item(), rel=1e-5)


def test_update_sample_estimates_a_large_layer_from_a_block_of_rows():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(512, 256) * 0.05)
    opt = torch.optim.SGD([w], lr=0.1)
    sample = UpdateSample([w], ["encoder.weight"], size=4096)
    assert sample.spans[0][1] == 4096 and sample.spans[0][0] % 256 == 0  # whole rows
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    sample.snapshot()
    opt.step()
    delta_sq, before_sq = sample.measure()
    exact = ((w.detach() - before).norm() / before.norm()).item()
    assert (delta_sq / before_sq).sqrt().item() == pytest.approx(exact, rel=0.15)


def test_block_span_fits_the_tensor():
    assert block_span((3,), 4096, "bias") == (0, 3)
    start, length = block_span((100_000, 7), 4096, "emb.weight")
    assert length == (4096 // 7) * 7 and start % 7 == 0 and start + length <= 700_000


# ----------------------------------------------------------------------------- grad_explosion
def test_sustained_rise_far_above_the_start_is_an_explosion():
    verdict = judge.grad_explosion([80.0, 95.0, 120.0, 150.0, 200.0], [1.0, 1.2, 0.9, 1.1, 1.0], top_layer="net.2")
    assert verdict is not None and verdict.check == "grad_explosion" and verdict.target == "total"
    assert verdict.data["ratio"] == pytest.approx(120.0)
    assert "net.2" in verdict.message and verdict.severity.value == "warning"


def test_explosion_thousands_of_times_over_is_an_error():
    verdict = judge.grad_explosion([1e6] * 5, [1.0] * 5)
    assert verdict is not None and verdict.severity.value == "error"


def test_one_outlier_among_recent_steps_is_not_an_explosion():
    assert judge.grad_explosion([1.0, 1.1, 5000.0, 0.9, 1.0], [1.0] * 5) is None


def test_gradients_rising_a_few_times_is_not_an_explosion():
    assert judge.grad_explosion([8.0] * 5, [1.0] * 5) is None


# ----------------------------------------------------------------------------- grad_spike
def test_huge_step_against_a_noisy_history_is_a_spike():
    history = _noisy(100, sigma=0.3)
    verdict = judge.grad_spike(40.0 * np.median(history), history, step=321)
    assert verdict is not None and verdict.check == "grad_spike" and verdict.data["step"] == 321
    assert verdict.data["ratio"] == pytest.approx(40.0)
    assert "step 321" in verdict.message


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_noisy_healthy_series_has_no_spikes(sigma):
    values = _noisy(600, sigma=sigma, seed=3)
    spikes = [judge.grad_spike(v, values[max(0, i - judge.SPIKE_WINDOW) : i]) for i, v in enumerate(values)]
    assert not [s for s in spikes if s is not None]


def test_jump_that_stays_below_the_early_gradient_level_is_not_a_spike():
    converged = _noisy(100, sigma=0.2, level=1e-6)
    assert judge.grad_spike(1e-3, converged) is not None
    assert judge.grad_spike(1e-3, converged, early_level=0.5) is None


def test_spike_needs_a_history_to_stand_out_of():
    assert judge.grad_spike(1000.0, [1.0] * (judge.SPIKE_MIN_HISTORY - 1)) is None


# ----------------------------------------------------------------------------- grad_vanishing
def test_layers_far_below_the_liveliest_one_have_vanishing_gradients():
    rms = {"net.0": 1e-9, "net.2": 1e-7, "net.4": 1e-3, "net.6": 1e-1}
    verdict = judge.grad_vanishing(rms)
    assert verdict is not None and verdict.target == "net"
    assert set(verdict.data["layers"]) == {"net.0", "net.2"}
    assert verdict.data["layers"]["net.0"] == pytest.approx(1e-8)


def test_ordinary_spread_between_layers_is_not_vanishing():
    assert judge.grad_vanishing({"embed": 3e-3, "block.0": 0.05, "head": 0.3}) is None


def test_layers_without_any_gradient_are_left_to_gradient_flow():
    assert judge.grad_vanishing({"frozen": 0.0, "head": 0.3, "body": 0.1, "stem": math.nan}) is None


# ----------------------------------------------------------------------------- weight_growth
def test_weights_growing_exponentially_are_runaway_growth():
    verdict = judge.weight_growth(10.0 * 1.08 ** np.arange(30), top_layer="head")
    assert verdict is not None and verdict.data["growth"] == pytest.approx(1.08**20)
    assert "head" in verdict.message


def test_a_single_jump_in_the_weights_is_not_a_trend():
    assert judge.weight_growth([10.0] * 12 + [40.0] * 9) is None


def test_weights_growing_from_a_zero_start_and_slowing_are_not_runaway():
    steps = np.arange(10, 31)
    assert judge.weight_growth(0.01 * steps**2.0) is None  # momentum from a zero init: t^2, slowing
    assert judge.weight_growth(0.01 * steps) is None


def test_weights_measured_every_few_steps_are_judged_over_the_same_span_of_steps():
    steps = np.arange(100, 200, 4)  # GradientMonitor's sparse phase: every 4th step
    verdict = judge.weight_growth(10.0 * 1.08 ** steps / 1.08**100, steps=steps)
    assert verdict is not None and verdict.data["growth"] == pytest.approx(1.08**20)
    assert "in the last 20 steps" in verdict.message
    # the same trends that are not runaway growth when measured every step are not when sparse
    assert judge.weight_growth([10.0] * 12 + [40.0] * 12, steps=np.arange(0, 96, 4)) is None
    assert judge.weight_growth(0.01 * (steps - 90.0) ** 2, steps=steps) is None


def test_sparse_weights_need_enough_points_across_the_window():
    growing = 10.0 * 2.0 ** np.arange(4)
    assert judge.weight_growth(growing, steps=[0, 7, 14, 21]) is None  # four points only
    assert judge.weight_growth(10.0 * 2.0 ** np.arange(6), steps=[20, 21, 22, 23, 24, 25]) is None  # 5 of 20 steps


def test_cpu_norms_match_linalg_norms_for_large_small_and_strided_tensors():
    from flightcheck.signals.norms import foreach_norms

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, 200, generator=g), torch.randn(7, generator=g),
               torch.randn(400, 300, generator=g).t(), torch.randn(1, generator=g) * 1e3]
    expected = torch.stack([torch.linalg.vector_norm(t) for t in tensors])
    assert torch.allclose(foreach_norms(tensors), expected, rtol=1e-5)
    bad = [torch.full((200, 100), float("nan")), torch.tensor([1.0, float("inf")]), torch.ones(3)]
    norms = foreach_norms(bad)
    assert torch.isnan(norms[0]) and torch.isinf(norms[1]) and norms[2] == pytest.approx(3**0.5)


# ----------------------------------------------------------------------------- update_ratio
def test_one_step_larger_than_the_weights_is_a_too_large_update():
    verdict = judge.update_ratio([1e-3, 55.0, 0.3, 0.1], steps=[0, 1, 2, 3])
    assert verdict is not None and verdict.check == "update_ratio" and verdict.data["ratio"] == 55.0
    assert "step 1" in verdict.message


def test_first_steps_of_a_zero_initialised_model_may_be_as_large_as_the_weights():
    assert judge.update_ratio([2.0, 0.9, 0.5, 0.3], from_zero=True) is None


def test_sustained_large_updates_are_too_large():
    verdict = judge.update_ratio([0.7] * judge.UPDATE_RATIO_WINDOW)
    assert verdict is not None and verdict.data["median"] == pytest.approx(0.7)


def test_tiny_updates_at_a_steady_learning_rate_are_too_small():
    verdict = judge.update_ratio([5e-6] * 20, learning_rates=[1e-6] * 20, peak_learning_rate=1e-6, gradient_level=1.0)
    assert verdict is not None and "only" in verdict.message and verdict.data["learning_rate"] == 1e-6


@pytest.mark.parametrize(
    ("what", "kwargs"),
    [
        ("warm-up", dict(learning_rates=list(np.linspace(1e-6, 1e-4, 20)), peak_learning_rate=1e-4)),
        ("decay late in the run", dict(learning_rates=[1e-7] * 20, peak_learning_rate=1e-3, progress=0.9)),
        ("converged model", dict(learning_rates=[1e-3] * 20, peak_learning_rate=1e-3, gradient_level=0.01)),
    ],
)
def test_tiny_updates_are_expected_during(what, kwargs):
    assert judge.update_ratio([5e-6] * 20, **kwargs) is None, what


def test_learning_rate_collapsing_early_in_the_run_is_too_small():
    verdict = judge.update_ratio([1e-9] * 20, learning_rates=[1e-9] * 20, peak_learning_rate=0.1, progress=0.2)
    assert verdict is not None and "before half the run" in verdict.message


def test_learning_rate_a_thousandfold_below_its_peak_early_is_reported_at_once():
    # a few ratios only: the collapse itself is the evidence, no window needed
    verdict = judge.update_ratio([1e-4, 1e-6], learning_rates=[1e-4, 1e-6], steps=[20, 30], peak_learning_rate=1e-3,
                                 progress=0.1)
    assert verdict is not None and "by step 30" in verdict.message and "per epoch" not in verdict.message
    assert "every epoch" in verdict.causes[0]
    # the same level at the end of a planned decay, or with no planned end known, is not
    for progress in (0.6, None):
        assert judge.update_ratio([1e-6] * 2, learning_rates=[1e-6] * 2, peak_learning_rate=1e-3,
                                  progress=progress) is None
    # a hundredfold decay early is a schedule, not a collapse
    assert judge.update_ratio([1e-5] * 2, learning_rates=[1e-5] * 2, peak_learning_rate=1e-3, progress=0.1) is None


def test_parameters_with_gradients_that_never_change_are_named():
    verdict = judge.never_updated({"head2": ["head2.weight", "head2.bias"]}, steps=12, orphans=["head2.weight",
                                                                                               "head2.bias"])
    assert verdict is not None and verdict.check == "update_ratio" and verdict.target == "head2"
    assert verdict.data["not_in_optimizer"] == ["head2.weight", "head2.bias"]
    assert judge.never_updated({}, steps=12) is None


# ----------------------------------------------------------------------------- gradient_flow
def test_trainable_parameters_without_gradient_are_named_by_layer():
    verdict = judge.gradient_flow({"encoder.0": ["encoder.0.weight", "encoder.0.bias"]},
                                  {"encoder.1": ["encoder.1.weight"]}, steps=10)
    assert verdict is not None and verdict.target == "encoder"
    assert "2 got no gradient at all" in verdict.message and "1 only exactly zero" in verdict.message
    assert judge.gradient_flow({}, {}, steps=10) is None
