"""Models and data written the way other people write them: the callbacks never crash and a
healthy model gets no false alarm.

Each case trains a small healthy model with ``default_callbacks(activation_monitor=True)``
(the pre-flight in its default ``raise`` mode) and asserts: ``fit`` (or ``validate`` /
``test`` / ``predict``) completes, no flightcheck callback failed internally, no finding is a
warning or an error, and the monitors really watched the run (the probes were predicted, the
losses read). An ``info`` finding is allowed only where the case says so, for the documented
reason: ``CANNOT_PROBE`` (the probes cannot call a forward that takes no batch input).
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import flightcheck
from tests.conftest import TinyClassifier, cluster_data, make_trainer

#: PredictionStability and ActivationMonitor cannot call a model whose forward takes no batch
#: input (a GAN generator fed noise): each says so once, as information, and stays off.
CANNOT_PROBE = {("prediction_stability", "internal_error"), ("activation_monitor", "internal_error")}

#: Every check of every flightcheck callback runs on the same tiny problem.
N_TRAIN, N_VAL = 256, 64


def _data(n_train=N_TRAIN, n_val=N_VAL):
    x, y = cluster_data(n=n_train + n_val)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _loaders(batch_size=32, n_train=N_TRAIN, collate=None, dataset=TensorDataset):
    (x, y), (vx, vy) = _data(n_train)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(dataset(x, y), batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate)
    val = DataLoader(dataset(vx, vy), batch_size=batch_size, collate_fn=collate)
    return train, val


def _callbacks():
    return flightcheck.default_callbacks(activation_monitor=True)


def _trainer(tmp_path, **kwargs):
    kwargs.setdefault("max_epochs", 3)
    return make_trainer(tmp_path, _callbacks(), **kwargs)


def _callback(trainer, name):
    return next(cb for cb in trainer.callbacks if type(cb).__name__ == name)


def _assert_quiet(trainer, allowed=frozenset()):
    """No flightcheck callback failed, and nothing but the allowed notes was reported."""
    findings = flightcheck.findings(trainer)
    loud = [f.format() for f in findings if f.severity.value != "info"]
    assert not loud, "\n\n".join(loud)
    unexpected = [f.format() for f in findings if (f.source, f.check) not in allowed]
    assert not unexpected, "\n\n".join(unexpected)
    failed = [type(cb).__name__ for cb in trainer.callbacks if getattr(cb, "_failed", False)]
    assert not failed, failed


def _fit(tmp_path, model, loaders=None, probes=2, **kwargs):
    """Fit, assert quiet, and that the probe was predicted at least ``probes`` times."""
    trainer = _trainer(tmp_path, **kwargs)
    train, val = loaders if loaders is not None else _loaders()
    trainer.fit(model, train, val)
    _assert_quiet(trainer)
    stability = _callback(trainer, "PredictionStability")
    assert not stability._off and len(stability.readings) >= probes, len(stability.readings)
    assert len(_callback(trainer, "LossCurveMonitor").watch.train) > 0
    return trainer


# ---------------------------------------------------------------------- the shapes of models
class MLP(nn.Module):
    def __init__(self, dim=8, hidden=32, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


class Wrapped(pl.LightningModule):
    """An ``nn.Module`` kept in ``self.model``; the LightningModule has no ``forward`` of its own."""

    def __init__(self):
        super().__init__()
        self.model = MLP()
        self.criterion = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", self.criterion(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=3e-3)


def test_nn_module_wrapped_in_self_model(tmp_path):
    trainer = _fit(tmp_path, Wrapped())
    assert trainer.global_step == 24
    # the probes predict through self.model (the LightningModule has no forward)
    assert _callback(trainer, "PredictionStability").prediction_fn.via == "model"
    activations = _callback(trainer, "ActivationMonitor")
    assert not activations._off and activations.readings and "model.body.1" in activations.readings[-1].dead


class FrozenScorer(pl.LightningModule):
    """No trainable parameter at all: a frozen model evaluated in a training loop (manual
    optimisation, no optimizer, nothing to backpropagate)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = MLP()
        self.net.requires_grad_(False)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return None


def test_model_with_no_trainable_parameters(tmp_path):
    trainer = _fit(tmp_path, FrozenScorer(), max_epochs=2, probes=1)
    assert trainer.global_step == 0  # no optimizer ever stepped
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 16


class Factorization(pl.LightningModule):
    """Matrix factorisation on sparse embeddings (``sparse=True``) with ``SparseAdam``."""

    def __init__(self, users=64, items=48, dim=8):
        super().__init__()
        self.users = nn.Embedding(users, dim, sparse=True)
        self.items = nn.Embedding(items, dim, sparse=True)

    def forward(self, pairs):
        return (self.users(pairs[:, 0]) * self.items(pairs[:, 1])).sum(-1)

    def training_step(self, batch, batch_idx):
        pairs, rating = batch
        loss = F.mse_loss(self(pairs), rating)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        pairs, rating = batch
        self.log("val_loss", F.mse_loss(self(pairs), rating))

    def configure_optimizers(self):
        return torch.optim.SparseAdam(self.parameters(), lr=0.01)


def _ratings():
    """Ratings of distinct (user, item) pairs from a rank-4 matrix plus noise: 512 to train on,
    128 others to validate on."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 4, generator=g), torch.randn(48, 4, generator=g)
    cells = torch.randperm(64 * 48, generator=g)[:640]
    pairs = torch.stack([cells // 48, cells % 48], 1)
    rating = (u[pairs[:, 0]] * v[pairs[:, 1]]).sum(-1) + 0.1 * torch.randn(640, generator=g)
    return (pairs[:512], rating[:512]), (pairs[512:], rating[512:])


def test_sparse_gradients_with_sparse_adam(tmp_path):
    train_set, val_set = _ratings()
    train = DataLoader(TensorDataset(*train_set), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(*val_set), batch_size=64)
    model = Factorization()
    trainer = _fit(tmp_path, model, (train, val))
    assert trainer.global_step == 24
    assert all(torch.isfinite(p).all() for p in model.parameters())


class GAN(pl.LightningModule):
    """Two optimizers, manual optimisation: a generator and a discriminator on 2-D points."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, z):
        return self.generator(z)

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4, device=self.device)
        ones = torch.ones(real.shape[0], 1, device=self.device)

        fake = self(z)
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), 1 - ones)) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z)), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999)))


def test_gan_with_two_optimizers_and_manual_optimisation(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(256, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0])
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(GAN(), DataLoader(TensorDataset(real), batch_size=32, shuffle=True, generator=g))
    _assert_quiet(trainer, allowed=CANNOT_PROBE)
    assert _callback(trainer, "GradientMonitor")._steps_with_grads == 2 * 24
    assert trainer.global_step == 2 * 24  # Lightning counts each optimizer's step


# ---------------------------------------------------------------------- the shapes of batches
class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i]}


class DictBatches(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["features"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["features"], batch["label"]), batch_idx)


def test_dict_batches(tmp_path):
    _fit(tmp_path, DictBatches(), _loaders(dataset=DictDataset))


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor


def _dataclass_collate(items):
    return Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class DataclassBatches(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch.inputs, batch.targets), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch.inputs, batch.targets), batch_idx)


def test_dataclass_batches(tmp_path):
    _fit(tmp_path, DataclassBatches(), _loaders(collate=_dataclass_collate))


Sample = namedtuple("Sample", ["x", "y"])


def _namedtuple_collate(items):
    return Sample(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class NamedTupleBatches(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch.x, batch.y), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch.x, batch.y), batch_idx)


def test_namedtuple_batches(tmp_path):
    _fit(tmp_path, NamedTupleBatches(), _loaders(collate=_namedtuple_collate))


def _nested_collate(items):
    x = torch.stack([x for x, _ in items])
    return {"inputs": (x[:, :4], x[:, 4:]), "meta": {"label": torch.stack([y for _, y in items])}}


class NestedBatches(TinyClassifier):
    """A dict holding a tuple and another dict: ``{"inputs": (a, b), "meta": {"label": y}}``."""

    def forward(self, batch):
        return self.net(torch.cat(batch["inputs"], dim=1))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch), batch["meta"]["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch), batch["meta"]["label"]))


def test_nested_batches(tmp_path):
    trainer = _fit(tmp_path, NestedBatches(), _loaders(collate=_nested_collate))
    assert _callback(trainer, "PredictionStability").prediction_fn.form == "batch"


def test_batches_of_one(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(lr=0.01), _loaders(batch_size=1, n_train=48), max_epochs=1,
                   log_every_n_steps=8)
    assert trainer.global_step == 48


class TiedWeights(TinyClassifier):
    """One weight shared by two modules: two blocks of the same width, one weight matrix."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                                 nn.ReLU(), nn.Linear(32, 3))
        self.net[4].weight = self.net[2].weight  # tied: each block keeps its own bias


def test_a_parameter_shared_by_two_modules(tmp_path):
    model = TiedWeights()
    assert model.net[2].weight is model.net[4].weight
    trainer = _fit(tmp_path, model)
    assert trainer.global_step == 24


class TokenClassifier(pl.LightningModule):
    """Integer inputs: token ids through an embedding and a GRU, one label per sequence."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        loss = F.cross_entropy(self(tokens), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        tokens, y = batch
        self.log("val_loss", F.cross_entropy(self(tokens), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_integer_token_inputs(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (320, 12), generator=g)
    y = (tokens[:, -1] < 25).long()  # the label is readable from the last token
    train = DataLoader(TensorDataset(tokens[:256], y[:256]), batch_size=32, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(tokens[256:], y[256:]), batch_size=32)
    _fit(tmp_path, TokenClassifier(), (train, val))


class Batches:
    """A user's own iterable of batches (not a DataLoader, not a Dataset), re-iterable per epoch."""

    def __init__(self, x, y, batch_size=32):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.epochs = 0

    def __len__(self):
        return len(self.x) // self.batch_size

    def __iter__(self):
        self.epochs += 1
        for i in range(len(self)):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self.x[s], self.y[s]


def test_a_plain_iterable_of_batches(tmp_path):
    (x, y), (vx, vy) = _data()
    train = Batches(x, y)
    trainer = _fit(tmp_path, TinyClassifier(), (train, Batches(vx, vy)))
    assert trainer.global_step == 24
    preflight = _callback(trainer, "Preflight").last_report
    assert {r.check: r.status.value for r in preflight.rows}["split_overlap"] == "skipped"


# ---------------------------------------------------------------------- what training_step returns
class ReturnsDict(TinyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return {"loss": loss, "logits": logits.detach()}


def test_training_step_returning_a_dict(tmp_path):
    trainer = _fit(tmp_path, ReturnsDict())
    curve = _callback(trainer, "LossCurveMonitor")
    assert len(curve.watch.train) == 24  # the loss was read from the dict


class SkipsSomeSteps(TinyClassifier):
    """Returns ``None`` (Lightning skips the step) on every third batch."""

    def training_step(self, batch, batch_idx):
        if batch_idx % 3 == 1:
            return None
        return super().training_step(batch, batch_idx)


def test_training_step_returning_none_on_some_steps(tmp_path):
    trainer = _fit(tmp_path, SkipsSomeSteps(), max_epochs=4)
    curve = _callback(trainer, "LossCurveMonitor")
    assert len(curve.watch.train) == 4 * 5  # 8 batches an epoch, 3 of them skipped


# ---------------------------------------------------------------------- trainer settings
def test_variable_size_last_batch(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), _loaders(n_train=250))  # 7 batches of 32 and one of 26
    assert trainer.global_step == 3 * 8


def test_gradient_accumulation(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), accumulate_grad_batches=4, max_epochs=6)
    assert trainer.global_step == 6 * 2


def test_gradient_clipping(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), gradient_clip_val=0.5)
    assert trainer.global_step == 24


def test_bf16_mixed_precision_on_cpu(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), precision="bf16-mixed")
    assert trainer.global_step == 24


def test_max_steps_shorter_than_log_every_n_steps(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), max_steps=3, log_every_n_steps=50, probes=1)
    assert trainer.global_step == 3


def test_fast_dev_run(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), fast_dev_run=True, probes=0)
    assert trainer.global_step == 1


def test_limit_train_batches_fraction(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), limit_train_batches=0.25)  # 2 of 8 batches an epoch
    assert trainer.global_step == 3 * 2


def test_overfit_batches(tmp_path):
    trainer = _fit(tmp_path, TinyClassifier(), overfit_batches=1, max_epochs=10)
    assert trainer.global_step == 10


# ---------------------------------------------------------------------- other entry points
class Evaluated(TinyClassifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)


@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
def test_validate_test_predict_without_fit(tmp_path, entry):
    trainer = _trainer(tmp_path)
    _, val = _loaders()
    out = getattr(trainer, entry)(Evaluated(), val, **({} if entry == "predict" else {"verbose": False}))
    assert out is not None and len(out) == (2 if entry == "predict" else 1)
    _assert_quiet(trainer)
    assert _callback(trainer, "Preflight").last_report is None  # the pre-flight belongs to fit


def test_validate_test_predict_after_fit(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=2)
    model = Evaluated()
    train, val = _loaders()
    trainer.fit(model, train, val)
    trainer.validate(model, val, verbose=False)
    trainer.test(model, val, verbose=False)
    assert len(trainer.predict(model, val)) == 2
    _assert_quiet(trainer)


def test_dead_units_need_enough_values_per_unit_to_be_judged():
    """On a one-sample probe about half of a healthy ReLU layer is silent: not judged. The same
    share silent over 64 values (one sample of 64 tokens, or 64 samples) is."""
    from flightcheck.checks.activations import ActivationReading, dead_units

    def readings(samples, values):
        return [ActivationReading(step=s, samples=samples, dead={"net.1": (20, 32)}, values={"net.1": values})
                for s in (10, 20, 30)]

    assert dead_units(readings(1, 1)) == []
    assert [v.target for v in dead_units(readings(1, 64))] == ["net.1"]
    assert [v.target for v in dead_units(readings(64, 64))] == ["net.1"]


class SkipsEmptyBatches(TinyClassifier):
    """A collate that filters bad samples can hand over a batch with none left: skipped."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        if x.shape[0] == 0:
            return None
        return super().training_step(batch, batch_idx)


def test_an_empty_batch_in_the_stream_is_skipped_quietly(tmp_path):
    (x, y), (vx, vy) = _data()
    calls = []

    def drop_every_third_batch(samples):
        xs, ys = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        calls.append(xs.shape[0])
        if len(calls) % 3 == 0:  # a filter that happens to reject the whole batch
            calls[-1] = 0
            return xs[:0], ys[:0]
        return xs, ys

    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g, collate_fn=drop_every_third_batch)
    trainer = _trainer(tmp_path)
    trainer.fit(SkipsEmptyBatches(), train, DataLoader(TensorDataset(vx, vy), batch_size=32))
    _assert_quiet(trainer)
    assert calls.count(0) >= 3 and trainer.global_step > 0
