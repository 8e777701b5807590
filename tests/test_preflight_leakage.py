"""The leakage checks on models written several ways, trained on real text (stdlib docstrings):
each leak is caught by its check, and each healthy counterpart gets no leakage finding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler, TensorDataset

from flightcheck import Preflight
from flightcheck.preflight.leakage import next_token_relation, shuffled_targets
from flightcheck.preflight.overlap import digest, find_split_overlap
from flightcheck.preflight.report import Status
from flightcheck.testing import (
    assert_causal,
    assert_no_split_overlap,
    assert_no_target_leakage,
    run_preflight,
)

from .conftest import TinyClassifier, cluster_data, make_trainer
from .leakage_models import (
    ArcFaceClassifier,
    AttentionLM,
    ConvLM,
    EncoderClassifier,
    HFStyleLM,
    MaskedLM,
    NanoGPTModule,
    ReadsLabels,
    RecurrentLM,
    Seq2Seq,
    SingleTensorLM,
    TabularMLP,
    lm_batch,
    mlm_batch,
    reverse_batch,
    tabular,
)

LEAK_CHECKS = ["target_leakage", "causal_leakage"]


@pytest.fixture(scope="module")
def text():
    (x, y), vocab = lm_batch()
    return x, y, vocab


def rows(model, batch, **options):
    report = run_preflight(model, batch, checks=LEAK_CHECKS, **options)
    return {row.check: row for row in report.rows}


def assert_no_leak_finding(result):
    for row in result.values():
        assert row.status in (Status.PASS, Status.SKIPPED), f"{row.check}: {row.status.value}: {row.message}"


# --------------------------------------------------------------------------- causal_leakage
@pytest.mark.parametrize(
    "make, where",
    [
        (lambda v: AttentionLM(v, mask="none"), "block.self_attn"),
        (lambda v: AttentionLM(v, mask="off_by_one"), "block.self_attn"),
        (lambda v: RecurrentLM(v, bidirectional=True), "rnn"),
        (lambda v: ConvLM(v, causal=False), "conv"),
        (lambda v: NanoGPTModule(v, causal=False), "model.proj"),
    ],
    ids=["attention-no-mask", "mask-off-by-one", "bidirectional-lstm", "conv-both-sides", "nanogpt-sdpa-not-causal"],
)
def test_causal_leakage_catches_models_that_see_the_future(text, make, where):
    x, y, vocab = text
    result = rows(make(vocab), (x, y))
    row = result["causal_leakage"]
    assert row.status is Status.FAIL, row.message
    verdict = row.verdicts[0]
    assert verdict.data["position"] == 0
    assert verdict.data["future_positions"][0] == 1  # the very next token is visible
    assert verdict.data["module"].startswith(where)
    assert "one position ahead" in row.message


@pytest.mark.parametrize(
    "make",
    [
        lambda v: AttentionLM(v, mask="causal"),
        lambda v: RecurrentLM(v),
        lambda v: ConvLM(v, causal=True),
        lambda v: NanoGPTModule(v, causal=True),
    ],
    ids=["attention-causal-mask", "lstm", "left-padded-conv", "nanogpt-sdpa-causal"],
)
def test_causal_models_pass(text, make):
    x, y, vocab = text
    result = rows(make(vocab), (x, y))
    assert result["causal_leakage"].status is Status.PASS, result["causal_leakage"].message
    assert_no_leak_finding(result)


def test_hugging_face_style_labels_equal_to_inputs(text):
    x, _, vocab = text
    batch = {"input_ids": x, "labels": x.clone()}
    assert rows(HFStyleLM(vocab, causal=True), batch)["causal_leakage"].status is Status.PASS
    bad = rows(HFStyleLM(vocab, causal=False), batch)["causal_leakage"]
    assert bad.status is Status.FAIL
    assert "equals batch['input_ids']" in bad.message


def test_single_tensor_batch_needs_causal_declared(text):
    x, y, vocab = text
    seq = torch.cat([x, y[:, -1:]], dim=1)
    undeclared = rows(SingleTensorLM(vocab, causal=False), seq)["causal_leakage"]
    assert undeclared.status is Status.SKIPPED and "causal=True" in undeclared.message
    assert rows(SingleTensorLM(vocab, causal=False), seq, causal=True)["causal_leakage"].status is Status.FAIL
    assert rows(SingleTensorLM(vocab, causal=True), seq, causal=True)["causal_leakage"].status is Status.PASS


def test_lightning_demo_transformer_reads_its_targets(text):
    """Lightning's own demo feeds the target sequence to the decoder under a mask that lets
    position t see target t: both leakage checks see it."""
    from lightning.pytorch.demos.transformer import LightningTransformer

    class Demo(LightningTransformer):
        def prepare_data(self):  # the demo downloads WikiText-2; the batch here is our own text
            pass

    x, y, vocab = text
    result = rows(Demo(vocab_size=vocab), (x, y))
    assert result["causal_leakage"].status is Status.FAIL
    assert "fed batch[1]" in result["causal_leakage"].message
    assert result["target_leakage"].status is Status.FAIL


@pytest.mark.parametrize(
    "make, batch",
    [
        (lambda v: EncoderClassifier(v), lambda x, y, v: (x, torch.arange(len(x)) % 4)),
        (lambda v: MaskedLM(v), lambda x, y, v: mlm_batch(x, v)),
        (lambda v: Seq2Seq(v, shift=True), lambda x, y, v: reverse_batch(x)),
    ],
    ids=["bidirectional-encoder-classifier", "masked-lm", "seq2seq-teacher-forcing"],
)
def test_non_autoregressive_models_are_not_judged_causal(text, make, batch):
    x, y, vocab = text
    result = rows(make(vocab), batch(x, y, vocab))
    assert result["causal_leakage"].status is Status.SKIPPED
    assert "not a next-token problem" in result["causal_leakage"].message
    assert_no_leak_finding(result)


def test_causal_false_switches_the_check_off(text):
    x, y, vocab = text
    row = rows(AttentionLM(vocab, mask="none"), (x, y), causal=False)["causal_leakage"]
    assert row.status is Status.SKIPPED


def test_next_token_relation():
    seq = torch.randint(0, 50, (4, 11))
    assert next_token_relation(seq[:, :-1], seq[:, 1:]) == "shifted"
    assert next_token_relation(seq, seq.clone()) == "equal"
    labels = seq[:, 1:].clone()
    labels[:, -3:] = -100  # padding ignored by the loss
    assert next_token_relation(seq[:, :-1], labels) == "shifted"
    assert next_token_relation(seq[:, :-1], torch.randint(0, 50, (4, 10))) is None
    series = torch.randn(4, 21, 3)
    assert next_token_relation(series[:, :-1], series[:, 1:]) == "shifted"


# --------------------------------------------------------------------------- target_leakage
def test_seq2seq_decoder_fed_unshifted_targets_copies_them(text):
    x, _, vocab = text
    row = rows(Seq2Seq(vocab, shift=False), reverse_batch(x))["target_leakage"]
    assert row.status is Status.FAIL, row.message
    assert row.verdicts[0].target == "batch[1]"
    assert "copying" in row.message


def test_seq2seq_with_teacher_forcing_reads_targets_but_does_not_copy(text):
    x, _, vocab = text
    row = rows(Seq2Seq(vocab, shift=True), reverse_batch(x))["target_leakage"]
    assert row.status is Status.PASS
    assert "does not copy" in row.message


@pytest.mark.parametrize("kind", ["raw", "standardised", "one_hot"])
def test_label_column_in_the_features(kind):
    x, y = tabular()
    extra = {
        "raw": y[:, None].float(),
        "standardised": ((y.float() - 1.0) / 0.8)[:, None],
        "one_hot": F.one_hot(y, 3).float(),
    }[kind]
    features = torch.cat([x, extra], dim=1)
    row = rows(TabularMLP(features.shape[1]), (features, y))["target_leakage"]
    assert row.status is Status.FAIL
    assert "column" in row.message and "batch[0]" in row.message


def test_regression_target_in_the_features():
    x, _ = tabular()
    y = 100.0 + 0.5 * x[:, 0] + 0.1 * torch.randn(len(x), generator=torch.Generator().manual_seed(1))
    assert rows(TabularMLP(9, regression=True), (torch.cat([x, y[:, None]], 1), y))["target_leakage"].status is (
        Status.FAIL
    )
    # healthy, with a large offset in the targets: the outputs do not depend on the targets at all
    healthy = rows(TabularMLP(8, regression=True), (x, y))["target_leakage"]
    assert healthy.status is Status.PASS and "does not read" in healthy.message


def test_labels_passed_into_the_model():
    g = torch.Generator().manual_seed(1)
    _, y = tabular()
    row = rows(ReadsLabels(8), (torch.randn(64, 8, generator=g), y))["target_leakage"]
    assert row.status is Status.FAIL
    assert "follow the shuffled" in row.message


def test_labels_passed_into_the_model_next_to_informative_features():
    """The model learns mostly from its features within the overfit budget, but its answers
    already lean towards whatever label it is handed."""
    torch.manual_seed(0)
    row = rows(ReadsLabels(8), tabular())["target_leakage"]
    assert row.status is Status.FAIL, row.message
    assert row.verdicts[0].data["fed_label_logprob_rise"] > 0.2


def test_margin_head_reading_labels_is_no_leak():
    """An ArcFace-style head reads the labels to make the true class harder: not a copier."""
    torch.manual_seed(0)
    row = rows(ArcFaceClassifier(8), tabular())["target_leakage"]
    assert row.status is Status.PASS, row.message
    assert row.verdicts[0].data["output_changed"] and row.verdicts[0].data["fed_label_logprob_rise"] < 0


@pytest.mark.parametrize("norm", [True, False], ids=["batchnorm-dropout", "plain"])
def test_healthy_tabular_classifier(norm):
    x, y = tabular()
    result = rows(TabularMLP(8, norm=norm), (x, y))
    assert result["target_leakage"].status is Status.PASS
    assert_no_leak_finding(result)


def test_dict_batch_with_named_target(text):
    x, y = tabular()
    row = rows(TabularMLPDict(9), {"features": torch.cat([x, y[:, None].float()], 1), "cls": y}, target="cls")
    assert row["target_leakage"].status is Status.FAIL


class TabularMLPDict(TabularMLP):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["features"]), batch["cls"])


def test_no_target_is_a_skip_with_a_reason(text):
    x, y, vocab = text
    row = rows(SingleTensorLM(vocab), torch.cat([x, y[:, -1:]], dim=1))["target_leakage"]
    assert row.status is Status.SKIPPED and "no target" in row.message


def test_shuffled_targets_leave_ignored_entries_in_place():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 20, (8, 16))
    t[:, -4:] = -100
    out, changed = shuffled_targets(t, g)
    assert torch.equal(out == -100, t == -100)
    assert sorted(out[t != -100].tolist()) == sorted(t[t != -100].tolist())
    assert changed > 0.8


def test_leakage_checks_leave_no_trace(text):
    """The pre-flight's guarantee: training after it is bit-identical (weights, RNG)."""
    x, y, vocab = text
    torch.manual_seed(3)
    model = AttentionLM(vocab, mask="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = []
    for checks in (["nonfinite_input"], LEAK_CHECKS):  # the throw-away Trainer draws from the RNG itself
        torch.manual_seed(4)
        run_preflight(model, (x, y), checks=checks)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- split_overlap
def _fit_with_val(tmp_path, train, val, **options):
    callback = Preflight(checks=["split_overlap"], on_fail="warn", **options)
    trainer = make_trainer(tmp_path, [callback], logger=False, max_steps=1, num_sanity_val_steps=0)
    trainer.fit(TinyClassifier(), train_dataloaders=train, val_dataloaders=val)
    return callback.last_report["split_overlap"]


@pytest.fixture(scope="module")
def clusters():
    x, y = cluster_data(1200)
    return TensorDataset(x, y)


def test_split_overlap_clean_split(tmp_path, clusters):
    row = _fit_with_val(
        tmp_path, DataLoader(Subset(clusters, range(1000)), 32, shuffle=True), DataLoader(Subset(clusters, range(1000, 1200)), 32)
    )
    assert row.status is Status.PASS and "no overlap" in row.message


def test_split_overlap_validation_cut_from_the_training_data(tmp_path, clusters):
    row = _fit_with_val(tmp_path, DataLoader(clusters, 32, shuffle=True), DataLoader(Subset(clusters, range(1000, 1200)), 32))
    assert row.status is Status.FAIL
    verdict = row.verdicts[0]
    assert verdict.data["found"] == 200 and verdict.data["estimated_share"] == pytest.approx(1.0)


def test_split_overlap_same_loader_twice(tmp_path, clusters):
    loader = DataLoader(clusters, 32)
    row = _fit_with_val(tmp_path, loader, loader)
    assert row.status is Status.FAIL and "is the training data" in row.message


def test_split_overlap_respects_disjoint_samplers_over_one_dataset(tmp_path, clusters):
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(0)).tolist()
    train = DataLoader(clusters, 32, sampler=SubsetRandomSampler(order[:1000]))
    val = DataLoader(clusters, 32, sampler=SubsetRandomSampler(order[1000:]))
    assert _fit_with_val(tmp_path, train, val).status is Status.PASS


def test_split_overlap_partial_sample_estimates_the_share(clusters):
    """With only part of the training data hashed, the share is corrected for the sample size."""
    result = find_split_overlap(DataLoader(clusters, 10), DataLoader(Subset(clusters, range(600)), 10), batches=60)
    assert len(result.train.digests) == 600
    assert 0 < result.found < 600
    assert 0.6 < result.estimated_share <= 1.0


class Augmented(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.01 * torch.randn_like(x), y


def test_split_overlap_skips_random_augmentation(tmp_path, clusters):
    row = _fit_with_val(tmp_path, DataLoader(Augmented(clusters), 32, shuffle=True), DataLoader(clusters, 32))
    assert row.status is Status.SKIPPED and "augmentation" in row.message


def test_split_overlap_reports_heavy_duplication(tmp_path, clusters):
    doubled = Subset(clusters, list(range(500)) * 2)
    row = _fit_with_val(tmp_path, DataLoader(doubled, 32, shuffle=True), DataLoader(Subset(clusters, range(1000, 1200)), 32))
    assert row.status is Status.WARN and "exact copies" in row.message


def test_split_overlap_does_not_consume_loaders_or_rngs(tmp_path, clusters):
    """The loaders shuffle exactly as they would have: same first batch with and without the check."""

    def first_batches(check):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        g = torch.Generator().manual_seed(5)
        train = DataLoader(Subset(clusters, range(1000)), 32, shuffle=True, generator=g)
        val = DataLoader(Subset(clusters, range(1000, 1200)), 32)
        if check:
            find_split_overlap(train, val)
        return next(iter(train))[0], torch.rand(1), random.random(), np.random.rand()

    a, b = first_batches(False), first_batches(True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def test_text_blocks_overlap(text):
    """Real text cut into blocks: a validation set taken from the training stream overlaps."""
    from .leakage_models import BlockDataset, char_tokens

    ids, _ = char_tokens()
    train = BlockDataset(ids, 32, start=0)
    assert len(train) > 100
    cut = BlockDataset(ids, 32, start=len(train) - 40)
    held_out = BlockDataset(ids[: len(ids) * 4 // 5], 32, start=0)
    clean_train = BlockDataset(ids[len(ids) * 4 // 5 :], 32, start=0)
    assert find_split_overlap(train, cut).estimated_share == pytest.approx(1.0)
    assert_no_split_overlap(clean_train, held_out)
    with pytest.raises(AssertionError, match="also in the training data"):
        assert_no_split_overlap(train, cut)


def test_digest_ignores_the_target_and_reads_structures():
    x = torch.arange(6.0)
    assert digest((x, 1)) == digest((x.clone(), 2))  # same input, different label: the same sample
    assert digest((x, 1)) != digest((x + 1, 1))
    assert digest({"text": "hello", "label": 0}) == digest({"text": "hello", "label": 1})
    assert digest({"text": "hello"}) != digest({"text": "hullo"})
    assert digest(np.arange(3)) != digest(np.arange(3).astype(np.float32))


# --------------------------------------------------------------------------- flightcheck.testing
def test_testing_asserts(text):
    x, y, vocab = text
    assert_causal(AttentionLM(vocab, mask="causal"), (x, y))
    with pytest.raises(AssertionError, match="causal_leakage fail"):
        assert_causal(AttentionLM(vocab, mask="none"), (x, y))
    xt, yt = tabular()
    assert_no_target_leakage(TabularMLP(8), (xt, yt))
    with pytest.raises(AssertionError, match="target_leakage fail"):
        assert_no_target_leakage(TabularMLP(9), (torch.cat([xt, yt[:, None].float()], 1), yt))


def test_position_ids_as_long_as_the_batch_are_not_samples():
    """A block length equal to the batch size made arange(T) position ids look like one id per
    sample, and batch_independence accused every healthy language model of mixing samples."""
    (x, y), vocab = lm_batch(batch_size=32, block=32)
    report = run_preflight(AttentionLM(vocab, mask="causal"), (x, y), checks=["batch_independence", "causal_leakage"])
    assert report["batch_independence"].status is Status.PASS, report["batch_independence"].message
    assert report["causal_leakage"].status is Status.PASS


def test_outputs_with_nan_compare_without_error():
    """An exploding model's outputs hold NaN/Inf: comparing them must not fail the check."""
    from flightcheck.preflight.leakage import _same_outputs

    a = torch.tensor([1.0, float("nan"), float("inf")])
    assert _same_outputs([a], [a.clone()])
    assert not _same_outputs([a], [torch.tensor([2.0, float("nan"), float("inf")])])


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_time_major_word_language_model(kind):
    """PyTorch's word_language_model layout: (time, batch) inputs and flattened targets."""
    from .leakage_models import WordLanguageModel, char_tokens, time_major_batch

    ids, vocab = char_tokens()
    batch = time_major_batch(ids)
    healthy = rows(WordLanguageModel(vocab, kind, has_mask=True), batch)["causal_leakage"]
    assert healthy.status is Status.PASS, healthy.message
    leaky = rows(WordLanguageModel(vocab, kind, has_mask=False), batch)["causal_leakage"]
    assert leaky.status is Status.FAIL, leaky.message
    assert "time-major" in leaky.message and leaky.verdicts[0].data["future_positions"][0] == 1


def test_binary_single_logit_copier_is_caught():
    class Copier(TabularMLP):
        def forward(self, x, y=None):
            return self.net(torch.cat([x, y[:, None].float()], dim=1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.binary_cross_entropy_with_logits(self(x, y).squeeze(-1), y.float())

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
    torch.manual_seed(0)
    row = rows(Copier(9, classes=1), (x, y))["target_leakage"]
    assert row.status is Status.FAIL, row.message


def test_a_per_sample_loss_module_kept_as_an_attribute_does_not_count_as_reading_targets():
    class WithCriterion(TabularMLP):
        def __init__(self):
            super().__init__(8)
            self.criterion = torch.nn.CrossEntropyLoss(reduction="none")

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self(x), y).mean()

    row = rows(WithCriterion(), tabular())["target_leakage"]
    assert row.status is Status.PASS and "does not read" in row.message


def test_sample_weights_derived_from_the_label_are_not_a_leak():
    """Class-balancing weights in the batch are a function of the label, read by the loss only."""

    class Weighted(TabularMLP):
        def training_step(self, batch, batch_idx):
            x, w, y = batch
            return (F.cross_entropy(self(x), y, reduction="none") * w).mean()

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
    w = torch.where(y == 1, 3.0, 1.0)
    row = rows(Weighted(8, classes=2), (x, w, y))["target_leakage"]
    assert row.status is Status.PASS, row.message


def test_a_few_repeated_samples_in_a_large_validation_set_are_only_a_note():
    """Five exact repeats among 1000 validation samples (a repeated heading, say) is no alarm."""
    from flightcheck.preflight.overlap import SplitHashes, compare_splits, judge_split_overlap

    train = SplitHashes([bytes([i % 256, i // 256]) for i in range(5000)], list(range(5000)), 5000, 0.0, "dataset")
    val_digests = [bytes([i % 256, i // 256 + 100]) for i in range(995)] + train.digests[:5]
    val = SplitHashes(val_digests, list(range(1000)), 1000, 0.0, "dataset")
    verdicts = judge_split_overlap(compare_splits(train, val))
    assert [v.severity.value for v in verdicts] == ["info"]
    many = SplitHashes(val_digests[:900] + train.digests[:100], list(range(1000)), 1000, 0.0, "dataset")
    assert [v.severity.value for v in judge_split_overlap(compare_splits(train, many))] == ["error"]
