"""PredictionStability in real runs: it names collapse, instability and stagnation, stays quiet
on healthy runs of every output kind, and leaves training exactly as it would have been."""

from __future__ import annotations

import csv
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flightcheck.callbacks.prediction_stability import PredictionStability
from flightcheck.testing.syncs import SyncCounter
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer


def fit(tmp_path, model, train, val=None, callback=None, **trainer_kwargs):
    callback = callback if callback is not None else PredictionStability()
    trainer_kwargs.setdefault("max_epochs", 5)
    trainer = make_trainer(tmp_path, [callback], **trainer_kwargs)
    trainer.fit(model, train, val)
    return callback


def checks(callback):
    return [f.check for f in callback.findings]


def noisy_labels(y, share, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < share
    return torch.where(flip, torch.randint(0, classes, y.shape, generator=g), y)


class Generic(pl.LightningModule):
    """``net`` trained with ``loss_fn`` on ``(x, y)`` batches."""

    def __init__(self, net, loss_fn, lr=0.01, optimizer="adam"):
        super().__init__()
        self.net, self.loss_fn, self.lr, self.optimizer = net, loss_fn, lr, optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def mlp(outputs, inputs=8):
    return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, outputs))


class BiasOnly(nn.Module):
    """A classifier that never looks at its input: the same logits for every sample."""

    def __init__(self, classes=3):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1)


# ------------------------------------------------------------------ sick runs are named
def test_a_model_that_ignores_its_input_collapses_to_one_class(tmp_path, data):
    cb = fit(tmp_path, Generic(BiasOnly(), F.cross_entropy), loader(*data), loader(*data, shuffle=False))
    collapse = next(f for f in cb.findings if f.check == "prediction_collapse")
    assert collapse.target == "probe" and collapse.source == "prediction_stability"
    assert collapse.data["top_share"] == [1.0]
    assert collapse.step <= 20  # early: warm-up of two 5-step intervals, three probes


def test_labels_unrelated_to_inputs_collapse_a_model_to_the_majority(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(256, 8)  # a bug that zeroes the features
    y = torch.multinomial(torch.tensor([0.6, 0.2, 0.2]), 256, replacement=True, generator=g)
    cb = fit(tmp_path, Generic(mlp(3), F.cross_entropy), loader(x, y), loader(x, y, shuffle=False))
    assert "prediction_collapse" in checks(cb)


def test_a_learning_rate_far_too_high_makes_answers_flip(tmp_path, data):
    cb = fit(tmp_path, TinyClassifier(lr=3.0), loader(*data), loader(*data, shuffle=False))
    unstable = next(f for f in cb.findings if f.check == "prediction_instability")
    assert min(unstable.data["churn"]) >= 0 and sorted(unstable.data["churn"])[1] >= 0.2


def test_a_learning_rate_of_almost_zero_stagnates(tmp_path, data):
    cb = fit(tmp_path, TinyClassifier(lr=1e-9), loader(*data), loader(*data, shuffle=False))
    stagnation = next(f for f in cb.findings if f.check == "prediction_stagnation")
    assert max(stagnation.data["churn"]) == 0.0
    assert stagnation.data["loss_improvement"] < 0.1


def test_a_regression_model_with_frozen_weights_stagnates(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 2, generator=g)
    cb = fit(tmp_path, Generic(mlp(2), F.mse_loss, lr=1e-10), loader(x, y), loader(x, y, shuffle=False))
    assert checks(cb) == ["prediction_stagnation"]


# ------------------------------------------------------------------ healthy runs stay quiet
def test_noisy_small_batches_with_label_noise_stay_quiet(tmp_path, data):
    x, y = data
    y = noisy_labels(y, 0.4)
    cb = fit(tmp_path, TinyClassifier(lr=0.01, optimizer="adam"), loader(x, y, batch_size=4), loader(x, y, shuffle=False), max_epochs=2)
    assert cb.findings == []
    assert len(cb.readings) > 10


class ScheduledClassifier(TinyClassifier):
    """SGD with linear warm-up then cosine decay per step, gradient clipping and a frozen first layer."""

    def __init__(self):
        super().__init__(lr=0.1)
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        opt = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr, momentum=0.9)
        total = self.trainer.estimated_stepping_batches

        def factor(step):
            return (step + 1) / 10 if step < 10 else 0.5 * (1 + math.cos(math.pi * step / total))

        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}]


def test_warmup_decay_clipping_and_frozen_layers_stay_quiet(tmp_path, data):
    cb = fit(tmp_path, ScheduledClassifier(), loader(*data, batch_size=8), loader(*data, shuffle=False), gradient_clip_val=1.0, max_epochs=3)
    assert cb.findings == []


def test_label_smoothing_floor_stays_quiet(tmp_path, data):
    model = Generic(mlp(3), lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2))
    cb = fit(tmp_path, model, loader(*data, batch_size=16), loader(*data, shuffle=False), max_epochs=6)
    assert cb.findings == []


def test_healthy_regression_stays_quiet(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 2, generator=g) + torch.randn(256, 2, generator=g)
    cb = fit(tmp_path, Generic(mlp(2), F.mse_loss), loader(x, y, batch_size=8), loader(x, y, shuffle=False), max_epochs=3)
    assert cb.findings == []
    assert cb.readings[-1].task == "regression" and cb.readings[-1].diversity > 0.5


def test_healthy_segmentation_stays_quiet(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 8, 8, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.5).long()  # 69% / 24% / 7% of pixels
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    cb = fit(tmp_path, Generic(net, F.cross_entropy), loader(x, y, batch_size=16), loader(x, y, shuffle=False))
    assert cb.findings == []
    assert cb.readings[-1].answers == 32 * 64  # every pixel of the probe is an answer


def test_healthy_multilabel_stays_quiet(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :4] > 0.3).float()
    cb = fit(tmp_path, Generic(mlp(4), F.binary_cross_entropy_with_logits), loader(x, y), loader(x, y, shuffle=False))
    assert cb.findings == []
    assert len(cb.readings[-1].top_share) == 4


class TokenDataset(Dataset):
    """Dict samples of int token ids: each sequence counts up from a random start, 10% noise."""

    def __init__(self, n=256, length=12, vocab=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        seq = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(length + 1)) % vocab
        noise = torch.rand(seq.shape, generator=g) < 0.1
        self.seq = torch.where(noise, torch.randint(0, vocab, seq.shape, generator=g), seq)

    def __len__(self):
        return len(self.seq)

    def __getitem__(self, i):
        return {"input_ids": self.seq[i, :-1], "labels": self.seq[i, 1:]}


class TinyLM(pl.LightningModule):
    """A GRU language model taking dict batches and returning a dict."""

    def __init__(self, vocab=10):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(vocab, 32), nn.GRU(32, 32, batch_first=True), nn.Linear(32, vocab)

    def forward(self, ids):
        hidden, _ = self.rnn(self.emb(ids))
        return {"hidden": hidden, "logits": self.head(hidden)}

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])["logits"]
        return {"loss": F.cross_entropy(logits.transpose(1, 2), batch["labels"]), "tokens": batch["labels"].numel()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_sequence_model_with_dict_batches_and_outputs_stays_quiet(tmp_path):
    data = DataLoader(TokenDataset(), batch_size=16, shuffle=True)
    cb = fit(tmp_path, TinyLM(), data, max_epochs=3)
    assert cb.findings == []
    assert cb._spec.kind == "sequence" and cb._spec.num_classes == 10
    assert cb.readings[-1].skill > 0.5  # it learned, and the probe saw it


class BinaryHead(nn.Module):
    """One logit per sample, starting inside [0, 1] for every input (a small positive bias);
    with ``sigmoid=True`` the head returns the probability instead."""

    def __init__(self, sigmoid=False):
        super().__init__()
        self.linear, self.sigmoid = nn.Linear(8, 1), sigmoid
        with torch.no_grad():
            self.linear.weight.mul_(0.01)
            self.linear.bias.fill_(0.5)

    def forward(self, x):
        z = self.linear(x).squeeze(1)
        return torch.sigmoid(z) if self.sigmoid else z


@pytest.mark.parametrize("sigmoid", [False, True], ids=["logits", "probabilities"])
def test_binary_logits_and_probabilities_are_told_apart_by_how_they_are_made(tmp_path, data, sigmoid):
    x, y = data
    y = (y == 0).float()
    loss = F.binary_cross_entropy if sigmoid else F.binary_cross_entropy_with_logits
    cb = fit(tmp_path, Generic(BinaryHead(sigmoid), loss, lr=0.05), loader(x, y), loader(x, y, shuffle=False), max_epochs=3)
    assert cb._spec.kind == "binary" and cb._spec.probabilities is sigmoid
    assert cb.findings == []
    assert all(0.5 <= r.confidence <= 1.0 for r in cb.readings)
    assert cb.readings[-1].skill > 0.8


def test_prediction_fn_picks_the_prediction_out_of_a_tuple_output(tmp_path, data):
    class TupleOut(TinyClassifier):
        def forward(self, x):
            return self.net[0](x), self.net(x)  # (features, logits)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x)[1], y)

    cb = PredictionStability(prediction_fn=lambda module, batch: module(batch[0])[1])
    fit(tmp_path, TupleOut(), loader(*data), callback=cb, max_epochs=2)
    assert cb._spec.num_classes == 3 and cb.findings == []


class WholeBatchForward(TinyLM):
    """``forward(batch)`` takes the whole dict batch, as some users write it."""

    def forward(self, batch):
        return super().forward(batch["input_ids"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch)["logits"].transpose(1, 2), batch["labels"])


def test_a_forward_that_takes_the_whole_batch_is_called_with_it(tmp_path):
    cb = fit(tmp_path, WholeBatchForward(), DataLoader(TokenDataset(), batch_size=16), max_epochs=1)
    assert cb.prediction_fn.form == "batch" and len(cb.readings) >= 3 and cb.findings == []


def test_a_model_it_cannot_call_switches_it_off_with_a_note_not_a_warning(tmp_path, data):
    class NeedsMask(TinyClassifier):
        def forward(self, x, mask):
            return self.net(x * mask)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x, torch.ones_like(x)), y)

        def validation_step(self, batch, batch_idx):
            pass

    cb = fit(tmp_path, NeedsMask(), loader(*data), loader(*data, shuffle=False), max_epochs=1)
    assert [(f.check, f.severity.value, f.target) for f in cb.findings] == [
        ("internal_error", "info", "PredictionStability.prediction_fn")
    ]
    assert "prediction_fn" in cb.findings[0].advice[0] and cb.readings == []


# ------------------------------------------------------------------ leaves no trace
class Recorder(TinyClassifier):
    """Dropout and batch norm (so RNG and modes matter) and a public attribute the forward changes."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
        self.forward_calls = 0

    def forward(self, x):
        self.forward_calls += 1
        return self.net(x)


def run_recorder(tmp_path, callbacks):
    pl.seed_everything(0, verbose=False)
    model = Recorder()
    x, y = cluster_data()
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, logger=False)
    trainer.fit(model, loader(x, y, batch_size=16), loader(x, y, shuffle=False))
    return model, torch.get_rng_state()


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    cb = PredictionStability(every_n_steps=3)
    with_model, with_rng = run_recorder(tmp_path / "with", [cb])
    without_model, without_rng = run_recorder(tmp_path / "without", [])
    assert len(cb.readings) > 5  # it did probe, many times
    for (name, a), b in zip(with_model.state_dict().items(), without_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(with_rng, without_rng)  # no random number was drawn for the probes
    assert with_model.forward_calls == without_model.forward_calls  # the model's own state is restored
    assert with_model.training


class CountingDataset(TensorDataset):
    reads = 0

    def __getitem__(self, i):
        CountingDataset.reads += 1
        return super().__getitem__(i)


def test_the_probe_is_the_first_validation_batch_and_the_loader_is_not_read_again(tmp_path, data):
    x, y = data
    reads = []
    for callbacks in ([PredictionStability()], []):
        CountingDataset.reads = 0
        val = DataLoader(CountingDataset(x, y), batch_size=32)
        trainer = make_trainer(tmp_path, callbacks, max_epochs=2, logger=False)
        trainer.fit(TinyClassifier(), loader(x, y), val)
        reads.append(CountingDataset.reads)
        if callbacks:
            assert callbacks[0]._source.origin == "validation"
            assert torch.equal(callbacks[0]._source._batch[0], x[:32])
    assert reads[0] == reads[1]


def test_without_validation_the_probe_is_the_first_training_batch(tmp_path, data):
    cb = fit(tmp_path, TinyClassifier(), loader(*data, shuffle=False), max_epochs=1)
    assert cb._source.origin == "training" and torch.equal(cb._source._batch[0], data[0][:32])


def test_a_given_probe_batch_is_used(tmp_path, data):
    x, y = data
    cb = PredictionStability(probe_batch=(x[:10], y[:10]))
    fit(tmp_path, TinyClassifier(), loader(x, y), loader(x, y, shuffle=False), callback=cb, max_epochs=1)
    assert cb._source.origin == "given" and cb.readings[-1].answers == 10


# ------------------------------------------------------------------ instruments
def test_churn_diversity_and_confidence_are_charted(tmp_path, data):
    logger = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, TinyClassifier(), loader(*data), loader(*data, shuffle=False), logger=logger, max_epochs=2)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for name in ("churn", "diversity", "confidence"):
        values = [float(r[f"flightcheck/predictions/{name}"]) for r in rows if r.get(f"flightcheck/predictions/{name}")]
        assert values and all(0.0 <= v <= 1.0 for v in values), name


# ------------------------------------------------------------------ odd configurations
class ManualTwoOptimizers(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        loss = F.cross_entropy(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        self.log("train_loss", loss)  # nothing returned: the loss is read from the logged metrics

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.Adam(self.net[2].parameters(), lr=0.01)]


@pytest.mark.parametrize(
    "model, trainer_kwargs",
    [
        (ManualTwoOptimizers(), {}),
        (TinyClassifier(), {"accumulate_grad_batches": 2}),
        (TinyClassifier(), {"precision": "bf16-mixed"}),
        (TinyClassifier(), {"logger": False}),
    ],
    ids=["manual-two-optimizers", "grad-accumulation", "bf16-mixed", "no-logger"],
)
def test_odd_configurations_are_probed_and_stay_quiet(tmp_path, data, model, trainer_kwargs):
    cb = fit(tmp_path, model, loader(*data, batch_size=16), loader(*data, shuffle=False), max_epochs=3, **trainer_kwargs)
    assert cb.findings == []
    assert len(cb.readings) >= 4 and cb.readings[-1].loss is not None


def test_validate_and_test_runs_do_not_probe(tmp_path, data):
    class WithTest(TinyClassifier):
        def test_step(self, batch, batch_idx):
            self.validation_step(batch, batch_idx)

    cb = PredictionStability()
    trainer = make_trainer(tmp_path, [cb])
    trainer.validate(WithTest(), loader(*data, shuffle=False))
    trainer.test(WithTest(), loader(*data, shuffle=False))
    assert cb.readings == [] and cb.findings == []


class TransferCounter(SyncCounter):
    """SyncCounter, less moves onto the device a tensor is already on: torchmetrics' ``reset``
    puts its default state on the state's device, which names the CPU only on a CPU run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "to" and args and isinstance(args[0], torch.Tensor):
            target = next((a for a in list(args[1:]) + [kwargs.get("device")] if isinstance(a, (str, torch.device))), None)
            if target is not None and torch.device(target) == args[0].device:
                return func(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def test_no_host_sync_on_ordinary_steps_and_one_per_probe(tmp_path, data):
    class Counted(PredictionStability):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            before = len(self.readings)
            with TransferCounter() as syncs:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            (self.probe_syncs if len(self.readings) > before else self.quiet_syncs).append(dict(syncs.calls))

    cb = Counted()
    cb.probe_syncs, cb.quiet_syncs = [], []
    fit(tmp_path, TinyClassifier(), loader(*data), callback=cb, max_epochs=2)
    assert len(cb.quiet_syncs) > 10 and all(not calls for calls in cb.quiet_syncs), cb.quiet_syncs
    first, *later = cb.probe_syncs  # the first probe also reads what kind of output it is
    assert first["tolist"] == 1 and sum(first.values()) <= 4, first
    assert later and all(calls == {"tolist": 1} for calls in later), later


def test_readings_survive_a_checkpoint(tmp_path, data):
    cb = fit(tmp_path, TinyClassifier(), loader(*data), max_epochs=1)
    restored = PredictionStability()
    restored.load_state_dict(cb.state_dict())
    assert restored.readings == cb.readings and restored.initial_loss == cb.initial_loss


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"task": "ranking"}, ValueError, "task must be one of"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be"),
        ({"patience": 0}, ValueError, "patience must be"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps must be"),
        ({"prediction_fn": "logits"}, TypeError, "prediction_fn must be a callable"),
        ({"probe_batch": ["no", "tensors"]}, TypeError, "probe_batch must contain"),
    ],
)
def test_misconfiguration_is_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        PredictionStability(**kwargs)
