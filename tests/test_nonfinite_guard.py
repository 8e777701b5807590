"""NonFiniteGuard: NaN/Inf in the loss, logged parts, gradients and weights; where it was
made; what is saved to reproduce it; and what each action does to the run."""

from __future__ import annotations

import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from flightcheck.callbacks.base import looking_due
from flightcheck.callbacks.nonfinite_guard import NonFiniteGuard
from flightcheck.checks.nonfinite import (
    ModuleCall,
    first_nonfinite_rows,
    NonFiniteEvent,
    Origin,
    locate_origin,
    loss_scale_verdict,
    nonfinite_verdict,
)
from flightcheck.errors import NonFiniteError
from flightcheck.testing.syncs import SyncCounter
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer

BAD_BATCH = 3  # batches of 32 in order: sample 3 * 32 + 5 sits in batch 3


def poisoned_data(value: float = float("nan"), batch: int = BAD_BATCH):
    x, y = cluster_data()
    x[batch * 32 + 5, 2] = value
    return x, y


def fit(tmp_path, model, data, guard, **kwargs):
    trainer = make_trainer(tmp_path, [guard], **kwargs)
    trainer.fit(model, loader(*data, shuffle=False))
    return trainer


def only_finding(guard):
    findings = [f for f in guard.findings if f.check == "nonfinite"]
    assert len(findings) == 1, [f.format() for f in guard.findings]
    return findings[0]


# ------------------------------------------------------------------ models with seeded bugs
class Elementwise(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class LogLayer(Elementwise):
    def __init__(self):
        super().__init__(torch.log)


class ExpLayer(Elementwise):
    def __init__(self):
        super().__init__(torch.exp)


class FirstLayerModel(TinyClassifier):
    """``layer`` then a linear classifier: the layer is ``net.0``."""

    def __init__(self, layer: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(layer, nn.Linear(8, 3))


def positive_data(bad_value: float, batch: int = 2):
    x, y = cluster_data()
    x = x.abs() + 1.0
    x[batch * 32 + 7, 1] = bad_value
    return x, y


class FunctionalLog(TinyClassifier):
    """A log in ``forward`` between two submodules, on a value that can reach 0."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.log(h.sum(dim=1, keepdim=True) * 0 + h))


class LogInLoss(TinyClassifier):
    """A hand-written loss that takes the log of probabilities: -inf once one underflows to 0."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        probs = torch.softmax(self(x) * (1e4 if batch_idx == 2 else 1.0), dim=1)
        loss = -torch.log(probs[torch.arange(len(y)), y]).mean()
        self.log("train_loss", loss)
        return loss


class SqrtOfZeroWeight(TinyClassifier):
    """Forward finite, backward NaN: d sqrt(w)/dw is infinite at w = 0."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.net(x) + torch.sqrt(self.gate)


class TwoPartLoss(TinyClassifier):
    """Classification plus a 'box' loss averaged over positives: 0/0 when a batch has none."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss_cls = F.cross_entropy(logits, y)
        positive = (y == 0) if batch_idx != 2 else torch.zeros_like(y, dtype=torch.bool)
        loss_box = (logits[:, 0] * positive).square().sum() / positive.sum()
        self.log("loss_cls", loss_cls)
        self.log("loss_box", loss_box)
        return loss_cls + loss_box


# ------------------------------------------------------------------ where it was made
def test_nan_in_the_data_is_traced_to_the_data_with_its_step_and_batch(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, TinyClassifier(), poisoned_data(), guard, max_steps=6)
    finding = only_finding(guard)
    assert finding.step == BAD_BATCH
    assert finding.data["batch_idx"] == BAD_BATCH
    assert finding.data["origin"] == "data"
    assert finding.data["data_paths"] == ["batch[0]"]
    assert "came in with the data" in finding.message
    assert finding.severity.value == "error"


def test_log_of_zero_is_traced_to_the_module_that_made_it(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, FirstLayerModel(LogLayer()), positive_data(0.0), guard, max_steps=4)
    finding = only_finding(guard)
    assert (finding.step, finding.data["origin"]) == (2, "module")
    assert (finding.data["module"], finding.data["module_type"]) == ("net.0", "LogLayer")
    assert "made inside `net.0` (LogLayer)" in finding.message
    assert finding.causes[0].startswith("log of zero")


def test_log_of_a_negative_value_is_traced_to_the_module(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, FirstLayerModel(LogLayer()), positive_data(-2.0), guard, max_steps=4)
    finding = only_finding(guard)
    assert (finding.data["module"], finding.data["module_type"]) == ("net.0", "LogLayer")
    assert finding.causes[0].startswith("log or sqrt of a negative")


def test_exp_overflow_is_traced_to_the_module_that_made_it(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, FirstLayerModel(ExpLayer()), positive_data(200.0), guard, max_steps=4)
    finding = only_finding(guard)
    assert (finding.step, finding.data["module"], finding.data["module_type"]) == (2, "net.0", "ExpLayer")
    assert finding.causes[0].startswith("exp overflow")


def test_code_between_submodules_is_blamed_on_the_enclosing_model(tmp_path):
    guard = NonFiniteGuard(action="skip")
    x, y = cluster_data()
    fit(tmp_path, FunctionalLog(), (x, y), guard, max_steps=2)
    finding = only_finding(guard)
    assert finding.data["origin"] == "between_modules"
    assert (finding.data["module"], finding.data["module_type"]) == ("", "FunctionalLog")
    assert "made by `FunctionalLog.forward` itself, not a submodule: `b` already received it" in finding.message


def test_a_log_in_the_loss_is_blamed_on_the_loss_computation(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, LogInLoss(), cluster_data(), guard, max_steps=4)
    finding = only_finding(guard)
    assert (finding.step, finding.data["origin"]) == (2, "loss")
    assert "loss computation" in finding.message


def test_a_nan_made_in_the_backward_pass_names_the_op_and_the_layer(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, SqrtOfZeroWeight(), cluster_data(), guard, max_steps=2)
    finding = only_finding(guard)
    assert finding.data["origin"] == "backward"
    assert finding.data["op"] == "SqrtBackward0"
    assert [q["name"] for q in finding.data["quantities"]] == ["gate"]


def test_a_multi_part_loss_names_the_part_that_went_bad(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, TwoPartLoss(), cluster_data(), guard, max_steps=4)
    finding = only_finding(guard)
    assert finding.target == "loss_box"
    assert finding.step == 2
    assert "loss_box=nan" in finding.message and "loss_cls stayed finite" in finding.message
    assert finding.data["finite_metrics"] == ["loss_cls"]


def test_a_logged_metric_alone_going_nan_is_a_warning_and_no_update_is_skipped(tmp_path):
    class NanMetric(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("ratio", torch.tensor(0.0) / torch.tensor(0.0 if batch_idx == 1 else 1.0))
            return loss

    guard = NonFiniteGuard(action="skip")
    trainer = fit(tmp_path, NanMetric(), cluster_data(), guard, max_steps=6, log_every_n_steps=2)
    finding = only_finding(guard)
    assert (finding.target, finding.severity.value, finding.data["origin"]) == ("ratio", "warning", "logged_only")
    assert guard.skipped_steps == 0 and trainer.global_step == 6


def test_huge_but_finite_gradients_are_not_called_non_finite(tmp_path):
    class HugeLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e25  # gradient norms overflow float32

    guard = NonFiniteGuard(action="skip")
    trainer = fit(tmp_path, HugeLoss(optimizer="adam"), cluster_data(), guard, max_steps=6, log_every_n_steps=2)
    assert guard.skipped_steps == 0 and trainer.global_step == 6
    assert guard.findings == []


# ------------------------------------------------------------------ actions
def test_warn_reports_once_and_lets_training_continue(tmp_path):
    guard = NonFiniteGuard()
    trainer = fit(tmp_path, TinyClassifier(), poisoned_data(), guard, max_epochs=2, log_every_n_steps=1)
    finding = only_finding(guard)  # the weights stay NaN for two epochs: still one finding
    assert (finding.step, finding.data["origin"], finding.data["action"]) == (BAD_BATCH, "data", "warn")
    assert trainer.global_step == 16


def test_warn_still_traces_a_late_look_to_the_data(tmp_path):
    guard = NonFiniteGuard()  # looks every 5 steps: the NaN batch at step 1 is long gone by then
    fit(tmp_path, TinyClassifier(), poisoned_data(batch=1), guard, max_steps=8, log_every_n_steps=5)
    finding = only_finding(guard)
    assert (finding.step, finding.data["batch_idx"], finding.data["origin"]) == (1, 1, "data")
    assert finding.data["data_paths"] == ["batch[0]"]
    assert "weight" in {q["kind"] for q in finding.data["quantities"]}  # the update reached the weights


class LinearRegression(pl.LightningModule):
    """Least squares on inputs of scale 10 with SGD at 0.03: each step overshoots ~5x more."""

    def __init__(self, lr: float = 0.03):
        super().__init__()
        self.lr = lr
        self.fc = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.fc(x).squeeze(1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def scaled_regression_data(n: int = 2048):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g) * 10
    return x, x.sum(dim=1)


def test_warn_blames_a_diverging_run_on_the_learning_rate_without_a_misleading_replay(tmp_path):
    guard = NonFiniteGuard()  # looks every 50 steps: the weights are long gone by then
    fit(tmp_path, LinearRegression(), scaled_regression_data(), guard, max_steps=60, log_every_n_steps=50)
    finding = only_finding(guard)
    assert finding.data["origin"] == "not_replayed"  # the loss overflowed to inf, the batch is gone
    assert "gradient norm grew from" in finding.message
    assert finding.causes[0].startswith("learning rate too high")
    assert finding.data["reproducer"] is None


def test_warn_calls_a_nan_after_steady_gradients_sudden(tmp_path):
    guard = NonFiniteGuard()  # the log-of-zero batch at step 5 is gone by the look at step 7
    fit(tmp_path, FirstLayerModel(LogLayer()), positive_data(0.0, batch=5), guard, max_steps=8, log_every_n_steps=8)
    finding = only_finding(guard)
    assert finding.step == 5 and finding.data["origin"] == "weights"
    assert "steady before" in finding.message
    assert finding.causes[0].startswith("log of zero")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_skip_leaves_weights_and_optimizer_state_untouched_and_training_continues(tmp_path, optimizer):
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, opt):
            if trainer.global_step == BAD_BATCH:
                snapshots["before"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == BAD_BATCH:
                snapshots["after"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    guard = NonFiniteGuard(action="skip")
    model = TinyClassifier(optimizer=optimizer, lr=0.01)
    trainer = make_trainer(tmp_path, [guard, Snapshot()], max_steps=8)
    trainer.fit(model, loader(*poisoned_data(), shuffle=False))
    assert trainer.global_step == 8 and guard.skipped_steps == 1
    for k, before in snapshots["before"].items():
        assert torch.equal(before, snapshots["after"][k]), k
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if optimizer == "adam":
        state = trainer.optimizers[0].state[model.net[0].weight]
        assert int(state["step"]) == 7  # 8 steps, one skipped
    assert only_finding(guard).data["action"] == "skip"


def test_skip_replays_the_bad_micro_batch_of_an_accumulation_window(tmp_path):
    guard = NonFiniteGuard(action="skip")
    trainer = fit(tmp_path, TinyClassifier(), poisoned_data(batch=2), guard, max_steps=4, accumulate_grad_batches=2)
    finding = only_finding(guard)
    assert (finding.step, finding.data["replayed_batch"], finding.data["origin"]) == (1, 2, "data")
    assert trainer.global_step == 4 and guard.skipped_steps == 1


def test_skip_works_under_manual_optimisation_with_two_optimizers(tmp_path):
    guard = NonFiniteGuard(action="skip")
    model = ManualTwoOptimizers()
    trainer = fit(tmp_path, model, poisoned_data(), guard, max_steps=12)
    finding = only_finding(guard)
    assert finding.data["origin"] == "data" and finding.data["batch_idx"] == BAD_BATCH
    assert guard.skipped_steps == 2  # both optimizers' updates of the bad batch
    assert trainer.global_step == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stop_stops_with_a_checkpoint_of_the_last_good_weights(tmp_path):
    guard = NonFiniteGuard(action="stop")
    model = TinyClassifier()
    trainer = fit(tmp_path, model, poisoned_data(), guard, max_steps=8)
    finding = only_finding(guard)
    assert trainer.global_step == BAD_BATCH + 1  # the bad step was counted but not applied
    path = finding.data["checkpoint"]
    assert path.endswith(os.path.join(f"nonfinite_step{BAD_BATCH}", "last_good.ckpt"))
    state = torch.load(path, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    for name, p in model.state_dict().items():
        assert torch.equal(state[name], p), name


def test_raise_raises_nonfinite_error_with_the_finding(tmp_path):
    guard = NonFiniteGuard(action="raise")
    with pytest.raises(NonFiniteError) as raised:
        fit(tmp_path, TinyClassifier(), poisoned_data(), guard, max_steps=8)
    assert "came in with the data" in str(raised.value)
    assert raised.value.finding is not None and raised.value.finding.step == BAD_BATCH


def test_the_reproducer_holds_the_batch_and_the_weights_before_the_update(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, TinyClassifier(), poisoned_data(), guard, max_steps=6)
    folder = only_finding(guard).data["reproducer"]
    assert os.path.basename(folder) == f"nonfinite_step{BAD_BATCH}"
    x, y = torch.load(os.path.join(folder, "batch.pt"), weights_only=False)
    assert math.isnan(x[5, 2]) and x.shape == (32, 8)
    info = json.load(open(os.path.join(folder, "info.json")))
    assert (info["step"], info["batch_idx"], info["origin"]) == (BAD_BATCH, BAD_BATCH, "data")
    fresh = TinyClassifier()
    fresh.load_state_dict(torch.load(os.path.join(folder, "weights_before_update.pt")))
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert torch.isnan(F.cross_entropy(fresh(x), y))


def test_charts_count_bad_batches_and_skipped_updates(tmp_path):
    import csv

    guard = NonFiniteGuard(action="skip")
    logger = CSVLogger(str(tmp_path))
    fit(tmp_path, TinyClassifier(), poisoned_data(), guard, max_steps=8, log_every_n_steps=4, logger=logger)
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    charted = [(int(r["step"]), float(r["flightcheck/nonfinite/batches"]), float(r["flightcheck/nonfinite/skipped_updates"]))
               for r in rows if r.get("flightcheck/nonfinite/batches")]
    assert charted[0] == (3, 1.0, 0.0)  # the look at the bad step 3, before its update is dropped
    assert charted[1] == (7, 0.0, 1.0)  # steps 4-7 are clean; one update skipped in all


def test_the_replay_leaves_no_trace_on_the_model(tmp_path):
    class Stateful(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch_idx)
            return super().training_step(batch, batch_idx)

    guard = NonFiniteGuard(action="skip")
    model = Stateful()
    fit(tmp_path, model, poisoned_data(), guard, max_steps=6)
    assert only_finding(guard).data["origin"] == "data"
    assert model.seen == list(range(6))
    assert int(model.net[1].num_batches_tracked) == 6
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------ fp16 loss scaler
def fp16_plugin(init_scale: float):
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_fp16_overflow_steps_the_scaler_skips_are_not_alarms(tmp_path):
    guard = NonFiniteGuard(action="raise")  # any alarm would end the run
    trainer = fit(tmp_path, TinyClassifier(), cluster_data(), guard, max_steps=8, plugins=[fp16_plugin(2.0**40)])
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**40  # it did overflow and back off
    assert guard.findings == []


def test_a_collapsed_fp16_loss_scale_is_reported(tmp_path):
    guard = NonFiniteGuard()
    fit(tmp_path, SqrtOfZeroWeight(), cluster_data(), guard, max_steps=8, plugins=[fp16_plugin(4.0)])
    finding = only_finding(guard)
    assert finding.target == "loss_scale"
    assert finding.data["min_scale"] < 1.0


def test_loss_scale_judge_keeps_quiet_above_the_floor():
    assert loss_scale_verdict(2.0**10, overflow_steps=6, skipped_in_a_row=6) is None
    assert loss_scale_verdict(0.25, overflow_steps=18, skipped_in_a_row=18).target == "loss_scale"


# ------------------------------------------------------------------ pure judges
def call(name, inputs_finite=True, outputs_finite=True, **kw):
    return ModuleCall(name, "Linear", inputs_finite, outputs_finite, **kw)


def test_locate_origin_reads_the_first_bad_output_in_completion_order():
    calls = [call("enc.0"), call("enc.1", outputs_finite=False), call("enc", outputs_finite=False),
             call("head", inputs_finite=False, outputs_finite=False)]
    assert locate_origin(calls).module == "enc.1"
    assert locate_origin(calls, ["batch['x']"]).kind == "data"
    inside_enc = [call("enc.0"), call("enc.1", inputs_finite=False, outputs_finite=False),
                  call("enc", outputs_finite=False)]
    assert locate_origin(inside_enc).module == "enc"
    before_enc = [call("enc.0", inputs_finite=False, outputs_finite=False),
                  call("enc", inputs_finite=False, outputs_finite=False), call("", outputs_finite=False)]
    assert locate_origin(before_enc).module == ""  # the model's own forward, before calling enc
    assert locate_origin(before_enc[:2]).module is None  # training_step, before the model
    assert locate_origin([call("a")], loss_finite=False).kind == "loss"
    assert locate_origin([call("a"), call("b")], grad_bad_parameters=["a.weight", "b.weight"],
                         forward_order=["a", "b"]).module == "b"


def test_first_nonfinite_rows_finds_the_first_bad_step_of_each_quantity():
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[1.0, 2.0, 3.0, 4.0], [nan, 2.0, inf, 4.0], [nan, -inf, 1.0, 4.0]])
    has, first, value = first_nonfinite_rows(rows)
    assert has.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert first[:3].tolist() == [1.0, 2.0, 1.0]
    assert math.isnan(value[0]) and value[1] == -inf and value[2] == inf


def test_verdict_names_every_quantity_and_the_action():
    events = [NonFiniteEvent("loss", "loss", 7, 7), NonFiniteEvent("gradient", "fc.weight", 7, 7, float("inf"))]
    verdict = nonfinite_verdict(events, Origin("not_replayed"), action="skip")
    assert verdict.target == "loss" and verdict.check == "nonfinite"
    assert "step 7" in verdict.message and "fc.weight" in verdict.message and "skipped" in verdict.message


# ------------------------------------------------------------------ healthy runs stay silent
class TokenModel(TinyClassifier):
    """Integer token ids in a dict batch, an embedding, training_step returning a dict."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(self.emb(batch["tokens"]).mean(1)), batch["label"])
        self.log("train_loss", loss)
        return {"loss": loss, "tokens_seen": batch["tokens"].numel()}


class ManualTwoOptimizers(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.Adam(self.net[2].parameters())]


class WarmupAdam(TinyClassifier):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * 0.9**s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FrozenFirstLayer(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)


class ReturnsNone(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 3 == 2 else loss


def token_loader():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (64, 5), generator=g)
    label = tokens[:, 0] % 3
    rows = [{"tokens": t, "label": lab} for t, lab in zip(tokens, label)]
    return DataLoader(rows, batch_size=8)


@pytest.mark.parametrize(
    "model_class, trainer_kwargs",
    [
        (TinyClassifier, {}),
        (WarmupAdam, {"gradient_clip_val": 0.5}),
        (FrozenFirstLayer, {}),
        (TinyClassifier, {"precision": "bf16-mixed"}),
        (TinyClassifier, {"accumulate_grad_batches": 3}),
        (ManualTwoOptimizers, {}),
        (ReturnsNone, {"logger": False}),
        (TokenModel, {"logger": "csv"}),
    ],
    ids=["sgd", "adam-warmup-clipping", "frozen-layer", "bf16-mixed", "accumulation", "manual-2-optimizers",
         "returns-none-no-logger", "token-ids-dict-batch-csv"],
)
@pytest.mark.parametrize("action", ["warn", "skip"])
def test_healthy_runs_stay_silent(tmp_path, model_class, trainer_kwargs, action):
    model = model_class()
    guard = NonFiniteGuard(action=action)
    if trainer_kwargs.get("logger") == "csv":
        trainer_kwargs = {**trainer_kwargs, "logger": CSVLogger(str(tmp_path))}
    trainer = make_trainer(tmp_path, [guard], max_steps=10, log_every_n_steps=3, **trainer_kwargs)
    data = token_loader() if isinstance(model, TokenModel) else loader(*cluster_data(n=128), batch_size=8)
    trainer.fit(model, data)
    trainer.validate(model, loader(*cluster_data(n=64, seed=1)))
    assert guard.findings == [], [f.format() for f in guard.findings]
    assert guard.skipped_steps == 0


def test_small_noisy_batches_with_a_high_but_stable_learning_rate_stay_silent(tmp_path):
    guard = NonFiniteGuard(action="raise")
    x, y = cluster_data(n=96, separation=0.5)
    trainer = make_trainer(tmp_path, [guard], max_epochs=2, log_every_n_steps=4)
    trainer.fit(TinyClassifier(lr=0.5), loader(x, y, batch_size=4))
    assert guard.findings == []


# ------------------------------------------------------------------ cost and configuration
def test_default_mode_makes_no_host_sync_on_ordinary_steps(tmp_path):
    counts = {"ordinary": 0, "logging": 0}

    class Counted(NonFiniteGuard):
        pass

    def counting(hook_name):
        hook = getattr(NonFiniteGuard, hook_name)

        def run(self, trainer, *args):
            # a look happens on the logging step's optimizer step (and at epoch end)
            due = looking_due(trainer) if hook_name == "on_before_optimizer_step" else False
            with SyncCounter() as syncs:
                out = hook(self, trainer, *args)
            counts["logging" if due else "ordinary"] += syncs.total
            return out

        setattr(Counted, hook_name, run)

    for name in ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end"):
        counting(name)
    guard = Counted()
    trainer = make_trainer(tmp_path, [guard], max_steps=12, log_every_n_steps=5)
    trainer.fit(TwoPartLoss(), loader(*cluster_data(), batch_size=16))
    assert counts["ordinary"] == 0
    assert counts["logging"] > 0  # the counter does see the guard's one read per logging interval


def test_a_bad_action_is_refused_naming_the_accepted_values():
    with pytest.raises(ValueError, match=r"action='ignore'.*\['warn', 'skip', 'stop', 'raise'\]"):
        NonFiniteGuard(action="ignore")
    with pytest.raises(ValueError, match="min_loss_scale"):
        NonFiniteGuard(min_loss_scale=0)
    with pytest.raises(TypeError, match="replay"):
        NonFiniteGuard(replay="yes")


def test_state_dict_round_trip_keeps_findings_and_skipped_steps(tmp_path):
    guard = NonFiniteGuard(action="skip")
    fit(tmp_path, TinyClassifier(), poisoned_data(), guard, max_steps=6)
    restored = NonFiniteGuard(action="skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped_steps == 1
    assert [f.to_dict() for f in restored.findings] == [f.to_dict() for f in guard.findings]
