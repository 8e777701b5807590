"""Prediction signals and judges as pure functions: reading an output, measuring how answers
move, and deciding collapse, instability and stagnation from a history of probe readings."""

from __future__ import annotations

import math
from dataclasses import replace as dataclass_replace

import pytest
import torch

from flightcheck.checks.predictions import (
    COLLAPSE_TOP_SHARE,
    INSTABILITY_MIN_CHURN,
    STAGNATION_MAX_CHURN,
    ProbeReading,
    is_collapsed,
    loss_improvement,
    prediction_collapse,
    prediction_instability,
    prediction_stagnation,
    relative_improvement,
)
from flightcheck.signals.predictions import (
    answer_agreement,
    answer_changes,
    answer_confidence,
    churn,
    class_histogram,
    infer_output_kind,
    minority_share,
    normalized_entropy,
    predicted_answers,
    r_squared,
    skill_score,
    spread,
    target_answers,
    valid_positions,
)

g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


# ------------------------------------------------------------------ reading an output
@pytest.mark.parametrize(
    "output, target, kind, task, class_dim",
    [
        (randn(8, 3), torch.randint(0, 3, (8,)), "multiclass", "multiclass", 1),
        (randn(8, 3), None, "multiclass", "multiclass", 1),
        (randn(8, 4), (randn(8, 4) > 0).float(), "multilabel", "multilabel", 1),
        (randn(8, 4), randn(8, 4), "regression", "regression", None),
        (randn(8), randn(8), "regression", "regression", None),
        (randn(8, 1), torch.randint(0, 2, (8,)).float(), "binary", "multilabel", 1),
        (randn(8, 5, 11), torch.randint(0, 11, (8, 5)), "sequence", "multiclass", 2),
        (randn(8, 11, 5), torch.randint(0, 11, (8, 5)), "segmentation", "multiclass", 1),
        (randn(8, 3, 6, 6), torch.randint(0, 3, (8, 6, 6)), "segmentation", "multiclass", 1),
        (randn(8, 1, 6, 6), torch.randint(0, 2, (8, 6, 6)), "segmentation", "multilabel", 1),
        (randn(8, 3, 6, 6), randn(8, 3, 6, 6), "regression", "regression", None),
    ],
    ids=[
        "logits+labels",
        "logits-alone",
        "multilabel",
        "multi-output-regression",
        "scalar-regression",
        "binary-logit",
        "sequence-BTC",
        "sequence-BCL",
        "segmentation",
        "binary-segmentation",
        "dense-regression",
    ],
)
def test_output_kind_is_read_from_shape_and_labels(output, target, kind, task, class_dim):
    spec = infer_output_kind(output, target)
    assert (spec.kind, spec.task, spec.class_dim) == (kind, task, class_dim)


def test_an_output_shaped_like_its_input_without_labels_is_a_reconstruction():
    x = randn(8, 3, 6, 6)
    assert infer_output_kind(randn(8, 3, 6, 6), None, inputs=x).task == "regression"
    assert infer_output_kind(randn(8, 3, 6, 6), torch.randint(0, 3, (8, 6, 6)), inputs=x).task == "multiclass"


def test_softmax_outputs_are_recognised_as_probabilities():
    assert infer_output_kind(randn(8, 3).softmax(-1)).probabilities
    assert not infer_output_kind(randn(8, 3).log_softmax(-1)).probabilities


def test_yes_no_scores_are_probabilities_only_when_a_sigmoid_made_them():
    logits = torch.rand(8, 1, generator=g)  # untrained logits can all sit in [0, 1]
    labels = torch.randint(0, 2, (8,), generator=g)
    assert not infer_output_kind(logits, labels, made_by="other").probabilities
    assert infer_output_kind(logits, labels, made_by="sigmoid").probabilities
    assert infer_output_kind(logits, labels).probabilities  # unknown origin: the range decides


def test_a_forced_task_wins_and_an_unknown_one_is_refused():
    assert infer_output_kind(randn(8, 3), torch.randint(0, 3, (8,)), task="regression").task == "regression"
    assert infer_output_kind(randn(8, 3), task="multilabel").task == "multilabel"
    with pytest.raises(ValueError, match="task must be one of"):
        infer_output_kind(randn(8, 3), task="ranking")


def test_answers_put_the_class_axis_last_and_flatten_positions():
    logits = torch.zeros(2, 3, 4, 5)
    logits[:, 2] = 1.0
    spec = infer_output_kind(logits, torch.zeros(2, 4, 5, dtype=torch.long))
    answers = predicted_answers(logits, spec)
    assert answers.shape == (40,) and bool((answers == 2).all())


def test_ignored_labels_are_left_out_of_the_histogram():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, -100, -100])
    spec = infer_output_kind(logits, labels)
    answers = predicted_answers(logits, spec)
    valid = valid_positions(target_answers(labels, spec, answers), spec, answers)
    assert class_histogram(answers, spec, valid).tolist() == [[2.0, 0.0]]


# ------------------------------------------------------------------ movement and diversity
def test_classification_churn_is_the_share_of_changed_answers():
    spec = infer_output_kind(randn(4, 3))
    assert churn(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 0]), spec).item() == pytest.approx(0.5)


def test_multilabel_churn_counts_flipped_decisions():
    spec = infer_output_kind(randn(2, 4), (randn(2, 4) > 0).float())
    before = torch.tensor([[True, False, False, False], [True, True, False, False]])
    after = torch.tensor([[True, True, False, False], [True, True, False, False]])
    assert answer_changes(before, after, spec).tolist() == [0.25, 0.0]


def test_regression_churn_is_the_rms_change_over_the_expected_spread():
    spec = infer_output_kind(randn(4), randn(4))
    before = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert churn(before, before + 0.5, spec, scale=2.0).item() == pytest.approx(0.25)


def test_diversity_is_one_for_uniform_answers_and_zero_for_one_answer():
    assert normalized_entropy(torch.tensor([[5.0, 5.0, 5.0]])).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([[15.0, 0.0, 0.0]])).item() == pytest.approx(0.0)
    assert minority_share(torch.tensor([[15.0, 3.0, 2.0]])).item() == pytest.approx(0.25)


def test_spread_is_zero_when_every_input_gets_the_same_answer():
    assert spread(torch.ones(8, 2) * 3.0).item() == 0.0
    assert spread(torch.tensor([[0.0], [2.0]])).item() == pytest.approx(1.0)


def test_confidence_is_the_probability_of_the_models_own_answer():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    spec = infer_output_kind(logits)
    expected = logits.softmax(-1).amax(-1)
    assert torch.allclose(answer_confidence(logits, spec), expected)
    probs_spec = infer_output_kind(logits.softmax(-1))
    assert torch.allclose(answer_confidence(logits.softmax(-1), probs_spec), expected)


def test_skill_is_zero_for_the_majority_answer_and_one_for_all_right():
    spec = infer_output_kind(randn(4, 2), torch.zeros(4, dtype=torch.long))
    labels = torch.tensor([0, 0, 0, 1])
    assert answer_agreement(torch.tensor([0, 0, 0, 0]), labels, spec).mean().item() == 0.75
    assert skill_score(0.75, 0.75) == 0.0 and skill_score(1.0, 0.75) == 1.0
    assert r_squared(0.0, 2.0) == 1.0 and r_squared(2.0, 2.0) == 0.0


# ------------------------------------------------------------------ judges
def reading(step, churn=0.0, loss=1.0, top=0.4, label_top=0.4, skill=None, task="multiclass", **kw):
    return ProbeReading(
        step=step,
        task=task,
        answers=32,
        churn=churn,
        drift=kw.pop("drift", 0.5),
        loss=loss,
        skill=skill,
        top_share=(top,) if task != "regression" else (),
        label_top_share=(label_top,) if label_top is not None and task != "regression" else None,
        top_answer=1,
        **kw,
    )


def history(n, every=10, first=None, **kw):
    """An untrained first reading at step 0, then ``n`` readings every ``every`` steps."""
    start = [ProbeReading(step=0, task=kw.get("task", "multiclass"), churn=None)] if first is None else [first]
    return start + [reading((i + 1) * every, **kw) for i in range(n)]


def test_collapse_is_reported_when_one_class_answers_a_diverse_probe():
    verdict = prediction_collapse(history(3, top=1.0, label_top=0.4), warmup_steps=20, patience=3)
    assert verdict is not None and verdict.check == "prediction_collapse" and verdict.target == "probe"
    assert "class 1 for 100%" in verdict.message and "60% of the probe's labels" in verdict.message


def test_collapse_waits_for_the_warmup_and_for_confirmation():
    assert prediction_collapse(history(3, top=1.0), warmup_steps=100, patience=3) is None
    assert prediction_collapse(history(2, top=1.0), warmup_steps=0, patience=3) is None
    flickering = history(3, top=1.0)
    flickering[2] = reading(20, top=0.5)
    assert prediction_collapse(flickering, patience=3) is None


def test_one_answer_that_keeps_switching_class_must_last_twice_the_patience():
    # A model at the label prior: near-uniform outputs, every answer the same class, but which
    # class flips from probe to probe (nearly every answer changed). A sound model passes
    # through this; a stuck one stays.
    wandering = history(3, top=0.99, label_top=0.35)
    wandering[3] = dataclass_replace(wandering[3], churn=0.99, top_answer=0)
    assert prediction_collapse(wandering, patience=3) is None
    settled = history(3, top=0.99, label_top=0.35, churn=0.02)  # the same class each time
    assert prediction_collapse(settled, patience=3) is not None
    stuck = history(6, top=1.0, label_top=0.35, churn=1.0)  # flipping, for six probes
    verdict = prediction_collapse(stuck, patience=3)
    assert verdict is not None and verdict.data["steps"] == [10, 20, 30, 40, 50, 60]
    assert prediction_collapse(stuck[:-1], patience=3) is None


def test_a_regression_collapse_may_drift_while_the_constant_is_learned():
    drifting = history(3, task="regression", spread=0.01, reference_spread=1.0, churn=0.9)
    assert prediction_collapse(drifting, patience=3) is not None


def test_collapse_is_not_judged_while_the_loss_still_falls_fast():
    falling = history(3, top=1.0)
    falling = falling[:1] + [dataclass_replace(r, loss=2.0 / (i + 1)) for i, r in enumerate(falling[1:])]
    assert prediction_collapse(falling, patience=3) is None


def test_an_imbalanced_probe_answered_with_its_majority_is_not_a_collapse():
    # labels 95% one class: answering that class is the prior, not a collapse
    assert not is_collapsed(reading(10, top=1.0, label_top=0.95))
    # labels 85% one class, answers 96% that class: the model still gives minority answers
    assert not is_collapsed(reading(10, top=0.96, label_top=0.85))
    assert is_collapsed(reading(10, top=1.0, label_top=0.85))


def test_a_probe_of_a_few_answers_is_not_judged_for_collapse():
    assert not is_collapsed(dataclass_replace(reading(10, top=1.0), answers=4))


def test_without_labels_only_identical_answers_are_a_collapse():
    assert not is_collapsed(reading(10, top=COLLAPSE_TOP_SHARE, label_top=None))
    assert is_collapsed(reading(10, top=1.0, label_top=None))


def test_regression_collapse_compares_the_spread_with_the_targets():
    collapsed = history(3, task="regression", spread=0.01, reference_spread=1.0)
    verdict = prediction_collapse(collapsed, patience=3)
    assert verdict is not None and "1.0% as much as the targets do" in verdict.message
    assert prediction_collapse(history(3, task="regression", spread=0.3, reference_spread=1.0), patience=3) is None


def test_multilabel_collapse_needs_every_judged_label_to_be_constant():
    def ml(step, tops):
        return ProbeReading(step=step, task="multilabel", answers=32, churn=0.0, loss=0.5, top_share=tops,
                            label_top_share=(0.6, 0.7, 0.99))
    one_label_alive = [ProbeReading(step=0, task="multilabel")] + [ml(s, (1.0, 0.8, 1.0)) for s in (10, 20, 30)]
    assert prediction_collapse(one_label_alive, patience=3) is None
    all_constant = [ProbeReading(step=0, task="multilabel")] + [ml(s, (1.0, 1.0, 1.0)) for s in (10, 20, 30)]
    assert prediction_collapse(all_constant, patience=3) is not None


def test_instability_is_sustained_churn_on_a_flat_loss():
    readings = history(6, churn=0.5, loss=1.0)
    verdict = prediction_instability(readings, patience=3)
    assert verdict is not None and verdict.check == "prediction_instability"
    assert verdict.data["churn"] == [0.5, 0.5, 0.5]


def test_one_quiet_probe_does_not_hide_instability_but_two_do():
    readings = history(6, churn=0.5, loss=1.0)
    readings[-2] = dataclass_replace(readings[-2], churn=0.05)
    assert prediction_instability(readings, patience=3) is not None
    readings[-3] = dataclass_replace(readings[-3], churn=0.05)
    assert prediction_instability(readings, patience=3) is None


def test_churn_while_the_loss_falls_is_learning_not_instability():
    readings = history(6, churn=0.5)
    readings = readings[:1] + [dataclass_replace(r, loss=3.0 - 0.4 * i) for i, r in enumerate(readings[1:])]
    assert prediction_instability(readings, patience=3) is None


def test_instability_is_not_judged_without_a_loss():
    assert prediction_instability(history(6, churn=0.5, loss=None), patience=3) is None


def test_small_churn_is_not_instability():
    assert prediction_instability(history(6, churn=INSTABILITY_MIN_CHURN / 2), patience=3) is None


def test_stagnation_is_still_answers_with_the_loss_near_its_start():
    verdict = prediction_stagnation(history(3, churn=0.0, loss=1.08, skill=0.02), initial_loss=1.1, patience=3)
    assert verdict is not None and verdict.check == "prediction_stagnation"
    assert verdict.data["initial_loss"] == 1.1 and verdict.data["loss"] == 1.08


def test_still_answers_after_the_loss_fell_are_a_converged_model():
    assert prediction_stagnation(history(3, churn=0.0, loss=0.3), initial_loss=1.1, patience=3) is None


def test_still_good_answers_are_not_stagnation_even_with_a_flat_loss():
    # fine-tuning from a good start: nothing to improve, nothing wrong
    assert prediction_stagnation(history(3, churn=0.0, loss=0.3, skill=0.9), initial_loss=0.31, patience=3) is None


def test_stagnation_needs_every_probe_of_the_window_still():
    readings = history(3, churn=0.0, loss=1.08)
    readings[-1] = dataclass_replace(readings[-1], churn=STAGNATION_MAX_CHURN * 3)
    assert prediction_stagnation(readings, initial_loss=1.1, patience=3) is None


def test_without_a_loss_stagnation_means_answers_still_those_of_the_untrained_model():
    assert prediction_stagnation(history(3, loss=None, drift=0.0), initial_loss=None, patience=3) is not None
    assert prediction_stagnation(history(3, loss=None, drift=0.6), initial_loss=None, patience=3) is None


def test_loss_improvement_handles_negative_losses():
    assert relative_improvement(-1.0, -3.0) == pytest.approx(2 / 3)
    assert relative_improvement(0.5, -0.5) == pytest.approx(2.0)
    assert relative_improvement(None, 1.0) is None and relative_improvement(math.nan, 1.0) is None


def test_loss_improvement_compares_medians_of_consecutive_windows():
    readings = history(6)
    losses = [1.0, 5.0, 1.0, 0.5, 0.5, 9.0]  # one wild interval in each window
    readings = readings[:1] + [dataclass_replace(r, loss=v) for r, v in zip(readings[1:], losses)]
    assert loss_improvement(readings, patience=3) == pytest.approx(0.5)
