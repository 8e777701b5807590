"""GradientMonitor on real (tiny) training runs: what a user sees in findings and TensorBoard."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flightcheck
from flightcheck import GradientMonitor
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer


def _fit(tmp_path, model, steps=60, batch_size=32, data=None, monitor=None, **trainer_kwargs):
    monitor = monitor or GradientMonitor()
    x, y = data if data is not None else cluster_data()
    trainer = make_trainer(tmp_path, [monitor], max_steps=steps, max_epochs=1000, **trainer_kwargs)
    trainer.fit(model, loader(x, y, batch_size=batch_size))
    return monitor, trainer


def _loud(monitor):
    return [f for f in monitor.findings if f.severity.value != "info"]


def _noisy_clusters(noise=0.2, n=512, seed=0):
    """Clusters with a share of wrong labels: the loss never reaches zero, gradients stay noisy."""
    x, y = cluster_data(n=n, seed=seed, separation=2.0)
    g = torch.Generator().manual_seed(seed + 1)
    flip = torch.rand(n, generator=g) < noise
    y[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=g)
    return x, y


# ----------------------------------------------------------------------------- models with one bug each
class DeepSigmoid(TinyClassifier):
    """Ten sigmoid layers with default init: the first layers get ~1e-7 of the last one's gradient."""

    def __init__(self):
        super().__init__()
        layers = [nn.Linear(8, 32), nn.Sigmoid()]
        for _ in range(8):
            layers += [nn.Linear(32, 32), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 3))


class HeadMissingFromOptimizer(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.net(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)


class DetachedFirstLayer(TinyClassifier):
    def forward(self, x):
        return self.net[2](self.net[1](self.net[0](x).detach()))


class SpikeAtStep(TinyClassifier):
    """One batch at ``spike_step`` whose loss is 1000x: one huge gradient."""

    def __init__(self, spike_step, **kwargs):
        super().__init__(**kwargs)
        self.spike_step = spike_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1000 if self.global_step == self.spike_step else loss


class LearningRateCutAtStep(TinyClassifier):
    """Adam whose learning rate is cut 1e6-fold at ``cut_step``, long after the start: the
    weights stop moving while the gradients stay alive (noisy labels)."""

    def __init__(self, cut_step):
        super().__init__(optimizer="adam", lr=0.01)
        self.cut_step = cut_step

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.cut_step:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = 1e-8


def test_learning_rate_far_too_high_is_reported_as_a_gradient_explosion(tmp_path):
    monitor, _ = _fit(tmp_path, TinyClassifier(lr=20.0), steps=30)
    explosions = [f for f in monitor.findings if f.check == "grad_explosion"]
    assert explosions and explosions[0].target == "total"
    assert explosions[0].data["ratio"] >= 50 and explosions[0].step < 15


def test_deep_sigmoid_stack_is_reported_as_vanishing_gradients_in_its_first_layers(tmp_path):
    monitor, _ = _fit(tmp_path, DeepSigmoid(), steps=30)
    (vanishing,) = [f for f in monitor.findings if f.check == "grad_vanishing"]
    assert "net.0" in vanishing.data["layers"] and vanishing.data["layers"]["net.0"] < 1e-4
    assert vanishing.data["reference_layer"] == "net.18"
    assert not [f for f in monitor.findings if f.check == "update_ratio"]  # the same cause, not a second finding


def test_single_huge_gradient_is_reported_as_a_spike_at_its_step(tmp_path):
    monitor, _ = _fit(tmp_path, SpikeAtStep(60, lr=0.01), steps=80, data=_noisy_clusters())
    spikes = [f for f in monitor.findings if f.check == "grad_spike"]
    assert spikes and spikes[0].step == 60 and spikes[0].data["ratio"] > 100
    assert not [f for f in monitor.findings if f.check == "grad_explosion"]


def test_parameters_left_out_of_the_optimizer_are_named_as_never_updated(tmp_path):
    monitor, _ = _fit(tmp_path, HeadMissingFromOptimizer(), steps=20)
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio"]
    assert finding.target == "head" and finding.data["not_in_optimizer"] == ["head.weight", "head.bias"]
    assert "never updated" in finding.message


def test_detached_layer_is_named_in_a_gradient_flow_finding(tmp_path):
    monitor, _ = _fit(tmp_path, DetachedFirstLayer(), steps=20)
    (finding,) = [f for f in monitor.findings if f.check == "gradient_flow"]
    assert finding.target == "net.0" and finding.data["no_gradient"] == {"net.0": ["net.0.weight", "net.0.bias"]}


# ----------------------------------------------------------------------------- healthy runs stay quiet
class WarmupCosine(TinyClassifier):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=30)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=90, eta_min=0.0)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[30])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FrozenBackbone(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        self.net[0].requires_grad_(False)


@pytest.mark.parametrize(
    ("model", "batch_size", "trainer_kwargs"),
    [
        pytest.param(lambda: TinyClassifier(), 32, {}, id="sgd-momentum"),
        pytest.param(lambda: TinyClassifier(optimizer="adam", lr=3e-3), 32, {}, id="adam"),
        pytest.param(lambda: WarmupCosine(), 32, {}, id="warmup-cosine-to-zero"),
        pytest.param(lambda: TinyClassifier(lr=0.2), 32, {"gradient_clip_val": 0.5}, id="clipping"),
        pytest.param(lambda: FrozenBackbone(), 32, {}, id="frozen-backbone"),
        pytest.param(lambda: TinyClassifier(lr=0.01), 4, {}, id="batch-size-4"),
        pytest.param(lambda: TinyClassifier(optimizer="adam", lr=1e-3), 4, {"precision": "bf16-mixed"}, id="bf16"),
        pytest.param(lambda: TinyClassifier(), 8, {"accumulate_grad_batches": 4}, id="accumulation"),
    ],
)
def test_healthy_run_raises_no_warning(tmp_path, model, batch_size, trainer_kwargs):
    monitor, trainer = _fit(tmp_path, model(), steps=120, batch_size=batch_size, data=_noisy_clusters(),
                            **trainer_kwargs)
    assert trainer.global_step == 120
    assert _loud(monitor) == []


def test_converged_run_on_separable_data_with_tiny_batches_stays_quiet(tmp_path):
    monitor, _ = _fit(tmp_path, TinyClassifier(), steps=150, batch_size=4)
    assert _loud(monitor) == []


# ----------------------------------------------------------------------------- instruments
def _scalar_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_update_ratio_is_charted_and_judged_past_the_dense_start(tmp_path):
    """After its first 100 steps the monitor measures the update on every 4th step and on
    logging steps: every logging step still charts it, and a learning rate cut late in the
    run is still reported within a few tens of steps."""
    monitor, _ = _fit(tmp_path, LearningRateCutAtStep(160), steps=600, data=_noisy_clusters())
    acc = _scalar_tags(tmp_path / "logs" / "version_0")
    updates = {e.step for e in acc.Scalars("flightcheck/update_ratio/total")}
    logging_steps = {e.step for e in acc.Scalars("flightcheck/grad_norm/total") if (e.step + 1) % 5 == 0}
    assert max(logging_steps) > 500 and logging_steps <= updates
    too_small = [f for f in monitor.findings if f.check == "update_ratio"]
    assert len(too_small) == 1 and "fell to 1.00e-08" in too_small[0].message, [f.message for f in monitor.findings]
    assert 160 <= too_small[0].step <= 160 + 20  # the next logging step
    assert [f for f in _loud(monitor) if f.check != "update_ratio"] == []


class NaNInASideParameter(TinyClassifier):
    """A parameter outside the forward path (a buffer-like side weight) turns NaN at step 7;
    the network itself keeps training normally."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(2, 2)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 7:
            with torch.no_grad():
                self.side.weight[0, 0] = float("nan")


def test_a_nan_in_one_layer_leaves_the_other_layers_charts_intact(tmp_path):
    monitor, _ = _fit(tmp_path, NaNInASideParameter(), steps=15)
    acc = _scalar_tags(tmp_path / "logs" / "version_0")
    net = {e.step for e in acc.Scalars("flightcheck/weight_norm/layers/net.0")}
    side = {e.step for e in acc.Scalars("flightcheck/weight_norm/layers/side")}
    assert {4, 9, 14} <= net  # still charted after the NaN elsewhere
    assert 4 in side and not any(step >= 7 for step in side)  # NaN from step 7: not charted
    assert [f for f in monitor.findings if f.check == "internal_error"] == []


def test_tensorboard_gets_totals_first_and_layers_in_a_sub_folder(tmp_path):
    _fit(tmp_path, TinyClassifier(), steps=20)
    acc = _scalar_tags(tmp_path / "logs" / "version_0")
    tags = set(acc.Tags()["scalars"])
    for kind in ("grad_norm", "weight_norm", "update_ratio"):
        assert f"flightcheck/{kind}/total" in tags
        assert {f"flightcheck/{kind}/layers/net.0", f"flightcheck/{kind}/layers/net.2"} <= tags
    # every logging step (log_every_n_steps=5) and each epoch's end (8 batches an epoch)
    assert [e.step for e in acc.Scalars("flightcheck/weight_norm/layers/net.0")] == [4, 7, 9, 14, 15, 19]
    # no step between two logs is missed: the interval's largest gradient norm is charted too
    total = {e.step: e.value for e in acc.Scalars("flightcheck/grad_norm/total")}
    peak = {e.step: e.value for e in acc.Scalars("flightcheck/grad_norm/interval_max")}
    assert set(total) == set(peak) and all(peak[s] >= total[s] for s in total)


def test_clipped_fraction_is_charted_when_the_trainer_clips(tmp_path):
    _fit(tmp_path, TinyClassifier(), steps=10, gradient_clip_val=1e-6)
    acc = _scalar_tags(tmp_path / "logs" / "version_0")
    values = [e.value for e in acc.Scalars("flightcheck/grad_norm/clipped_fraction")]
    assert len(values) >= 2 and set(values) == {1.0}


def test_many_layers_are_charted_up_to_the_cap_and_the_rest_summed(tmp_path):
    _fit(tmp_path, DeepSigmoid(), steps=5, monitor=GradientMonitor(max_layer_charts=3))
    tags = {t for t in _scalar_tags(tmp_path / "logs" / "version_0").Tags()["scalars"] if "/grad_norm/layers/" in t}
    assert len(tags) == 4 and "flightcheck/grad_norm/layers/other" in tags


def test_histograms_are_opt_in(tmp_path):
    _fit(tmp_path, TinyClassifier(), steps=10, monitor=GradientMonitor(histogram_every_n_steps=5))
    histograms = set(_scalar_tags(tmp_path / "logs" / "version_0").Tags()["histograms"])
    assert "flightcheck/histograms/grad/net.0" in histograms and "flightcheck/histograms/weight/net.2" in histograms


class WithEncoder(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})

    def forward(self, x):
        return self.net(self.encoder["b"](torch.relu(self.encoder["a"](x))))


@pytest.mark.parametrize(("depth", "layers"), [(1, ["net.0", "net.2", "encoder"]),
                                               (2, ["net.0", "net.2", "encoder.a", "encoder.b"])])
def test_layer_depth_sets_the_grouping(tmp_path, depth, layers):
    monitor, _ = _fit(tmp_path, WithEncoder(), steps=5, monitor=GradientMonitor(depth=depth))
    assert monitor._layout.layers == layers


# ----------------------------------------------------------------------------- beyond plain fit
class TwoOptimizersManual(TinyClassifier):
    """Manual optimisation, two optimizers stepping on alternate batches (GAN-style)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()[batch_idx % 2]
        opt.zero_grad()
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.Adam(self.net[2].parameters(), 1e-3))


def test_manual_optimisation_with_two_optimizers_charts_each(tmp_path):
    monitor, trainer = _fit(tmp_path, TwoOptimizersManual(), steps=40, data=_noisy_clusters())
    assert _loud(monitor) == []
    assert set(monitor._history) == {"optimizer_0", "optimizer_1"}
    assert len(monitor._history["optimizer_0"]) == len(monitor._history["optimizer_1"]) == 20
    tags = set(_scalar_tags(tmp_path / "logs" / "version_0").Tags()["scalars"])
    assert {"flightcheck/grad_norm/optimizer_0", "flightcheck/grad_norm/optimizer_1"} <= tags


def test_optimizers_taking_turns_each_get_their_update_ratio_charted_past_the_dense_start(tmp_path):
    """After the first 100 steps each optimizer's update is measured every 4th of its own steps:
    a stride over all steps would never see the optimizer of the odd batches."""
    monitor, _ = _fit(tmp_path, TwoOptimizersManual(), steps=200, data=_noisy_clusters())
    acc = _scalar_tags(tmp_path / "logs" / "version_0")
    for layer in ("net.0", "net.2"):  # net.0 is stepped by optimizer 0, net.2 by optimizer 1
        late = [e for e in acc.Scalars(f"flightcheck/update_ratio/layers/{layer}") if e.step > 150]
        assert late and all(e.value > 0 for e in late), layer
    late_ratios = [step for step, _, _ in monitor._ratios["optimizer_1"] if step > 150]
    assert len(late_ratios) >= 25 // 4  # its 25 steps after step 150, each 4th one at least
    assert _loud(monitor) == []


def test_gradient_accumulation_is_judged_once_per_optimizer_step(tmp_path):
    monitor, trainer = _fit(tmp_path, TinyClassifier(), steps=12, batch_size=8, accumulate_grad_batches=3)
    assert trainer.global_step == 12 and monitor._steps_with_grads == 12
    assert len(monitor._history["total"]) == 12


class ManualSteps(TinyClassifier):
    """Manual optimisation written out by hand; ``zero`` says how (or whether) it clears .grad."""

    def __init__(self, zero="before_backward", accumulate=1, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.zero, self.accumulate = zero, accumulate

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.zero == "before_backward":
            opt.zero_grad()
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            if self.zero == "after_step_keep_tensors":
                opt.zero_grad(set_to_none=False)
            elif self.zero == "after_step":
                opt.zero_grad()
        self.log("train_loss", loss)


def _not_cleared(monitor):
    return [f for f in monitor.findings if f.data.get("cause") == "gradients_not_cleared"]


def test_gradients_never_zeroed_under_manual_optimisation_are_named_at_the_first_look(tmp_path):
    monitor, _ = _fit(tmp_path, ManualSteps(zero="never", lr=0.01), steps=20)
    found = _not_cleared(monitor)
    assert [f.check for f in found] == ["grad_explosion"]
    assert found[0].step < 5  # the first look (log_every_n_steps=5), before the run has blown up
    assert found[0].severity.value == "error"
    assert "zero_grad" in found[0].message and found[0].data["optimizer"] == "SGD"


@pytest.mark.parametrize("zero,accumulate", [
    ("before_backward", 1), ("after_step", 1), ("after_step_keep_tensors", 1), ("after_step", 3),
])
def test_gradients_cleared_any_usual_way_are_not_reported(tmp_path, zero, accumulate):
    monitor, _ = _fit(tmp_path, ManualSteps(zero=zero, accumulate=accumulate, lr=0.01), steps=20,
                      data=_noisy_clusters())
    assert _not_cleared(monitor) == []
    assert _loud(monitor) == []


class StopsZeroingAt(ManualSteps):
    """Clears its gradients until ``step``, then a code path that forgets to (a refactor that
    moved ``zero_grad`` under a condition)."""

    def __init__(self, step, **kwargs):
        super().__init__(zero="before_backward", **kwargs)
        self.stop_at = step

    def training_step(self, batch, batch_idx):
        self.zero = "before_backward" if self.global_step < self.stop_at else "never"
        return super().training_step(batch, batch_idx)


def test_gradients_left_uncleared_late_in_a_run_are_reported_within_a_few_looks(tmp_path):
    # Past the first 100 steps the watch samples on looks only (every 10 steps here).
    monitor, _ = _fit(tmp_path, StopsZeroingAt(150, lr=0.001), steps=220, data=_noisy_clusters(),
                      log_every_n_steps=10)
    found = _not_cleared(monitor)
    assert [f.check for f in found] == ["grad_explosion"]
    assert 150 <= found[0].step <= 150 + 4 * 10


class ZeroGradOverridden(TinyClassifier):
    """Automatic optimisation with ``optimizer_zero_grad`` overridden to do nothing."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        pass


def test_an_automatic_run_whose_zero_grad_hook_does_nothing_is_reported(tmp_path):
    monitor, _ = _fit(tmp_path, ZeroGradOverridden(lr=0.01), steps=20)
    assert [f.check for f in _not_cleared(monitor)] == ["grad_explosion"]


class GeneratorLossReachesTheCritic(TinyClassifier):
    """GAN-style turns: optimizer 1's loss back-propagates through the layer optimizer 0 owns,
    adding onto the gradient optimizer 0 applied, before optimizer 0 zeroes its own."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        second.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))  # reaches net.0 (first's) as well
        second.step()
        first.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        first.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=0.01), torch.optim.SGD(self.net[2].parameters(), lr=0.01))


def test_optimizers_taking_turns_on_shared_gradients_are_not_reported(tmp_path):
    monitor, _ = _fit(tmp_path, GeneratorLossReachesTheCritic(), steps=40, data=_noisy_clusters())
    assert _not_cleared(monitor) == []


class SometimesSkips(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 3 == 1 else {"loss": loss}


def test_training_step_returning_none_or_a_dict_is_fine(tmp_path):
    monitor, _ = _fit(tmp_path, SometimesSkips(), steps=30)
    assert _loud(monitor) == []


class SparseEmbedding(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return F.cross_entropy(self.head(self.emb(tokens).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sparse_gradients_and_int_token_batches_work(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 50, (128, 6), generator=g), torch.randint(0, 2, (128,), generator=g)
    monitor = GradientMonitor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=20, max_epochs=100)
    trainer.fit(SparseEmbedding(), DataLoader(TensorDataset(tokens, y), batch_size=16))
    assert [f.check for f in monitor.findings if f.check == "internal_error"] == []
    assert len(monitor._history["total"]) == 20


class NoTrainableParameters(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net.requires_grad_(False)
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def test_model_without_trainable_parameters_is_left_alone(tmp_path):
    monitor, _ = _fit(tmp_path, NoTrainableParameters(), steps=5)
    assert monitor.findings == []


@pytest.mark.parametrize("logger", [False, "csv"])
def test_runs_without_tensorboard(tmp_path, logger):
    logger = CSVLogger(str(tmp_path)) if logger == "csv" else False
    monitor, _ = _fit(tmp_path, DetachedFirstLayer(), steps=20, logger=logger)
    assert [f.check for f in monitor.findings] == ["gradient_flow"]


def test_validate_runs_do_not_trip_the_monitor(tmp_path):
    monitor = GradientMonitor()
    trainer = make_trainer(tmp_path, [monitor])
    val = loader(*cluster_data(n=64), shuffle=False)
    trainer.validate(TinyClassifier(), val)
    assert monitor.findings == []


class UnfreezeAtEpochOne(pl.Callback):
    """What Lightning's BaseFinetuning does: unfreeze a layer and give it to the optimizer."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.net[0].requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.net[0].parameters()), "lr": 0.01})


class TrainsOnlyWhatIsUnfrozen(FrozenBackbone):
    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def test_layers_unfrozen_mid_run_are_followed_from_then_on(tmp_path):
    monitor = GradientMonitor()
    model = TrainsOnlyWhatIsUnfrozen()
    trainer = make_trainer(tmp_path, [UnfreezeAtEpochOne(), monitor], max_epochs=3)
    trainer.fit(model, loader(*_noisy_clusters(n=256)))
    assert monitor._layout.layers == ["net.0", "net.2", "net.4"]
    assert _loud(monitor) == []


def test_state_survives_a_checkpoint(tmp_path):
    monitor, trainer = _fit(tmp_path, HeadMissingFromOptimizer(), steps=20)
    state = monitor.state_dict()
    fresh = GradientMonitor()
    fresh.load_state_dict(state)
    assert list(fresh._history["total"]) == list(monitor._history["total"])
    assert fresh._steps_with_grads == 20
    assert state["state"]["per_param"]["head.weight"][2] == 0.0  # never changed
    assert [f.check for f in fresh.findings] == ["update_ratio"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "depth must be a positive int"),
        ({"max_layer_charts": -1}, "max_layer_charts must be a non-negative int"),
        ({"histogram_every_n_steps": 0}, "histogram_every_n_steps must be None or a positive int"),
        ({"explosion_factor": 1.0}, "explosion_factor must be a finite number above 1"),
        ({"vanishing_ratio": 2.0}, "vanishing_ratio must be a fraction"),
        ({"min_update_ratio": 1.0, "max_update_ratio": 0.5}, "min_update_ratio"),
    ],
)
def test_misconfiguration_names_the_parameter_and_accepted_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


class _EvalInTrainingStep(TinyClassifier):
    """A model whose training_step switches it to eval mode: dropout silently off."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )

    def training_step(self, batch, batch_idx):
        self.eval()
        return super().training_step(batch, batch_idx)


def test_eval_mode_left_on_during_training_is_reported_as_train_mode(tmp_path, data):
    trainer = make_trainer(tmp_path, [GradientMonitor()], max_steps=12)
    trainer.fit(_EvalInTrainingStep(), loader(*data))
    found = [f for f in flightcheck.findings(trainer) if f.check == "train_mode"]
    assert len(found) == 1 and "net.1 (Dropout)" in found[0].message


def test_dropout_in_train_mode_is_not_reported(tmp_path, data):
    model = _EvalInTrainingStep()
    model.training_step = lambda batch, batch_idx: TinyClassifier.training_step(model, batch, batch_idx)
    trainer = make_trainer(tmp_path, [GradientMonitor()], max_steps=12)
    trainer.fit(model, loader(*data))
    assert [f for f in flightcheck.findings(trainer) if f.check == "train_mode"] == []
