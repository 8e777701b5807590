"""The Preflight callback in a Trainer: when it runs, how it reports, how it stops a run."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import flightcheck
from flightcheck import PreflightError
from flightcheck.callbacks.preflight import Preflight
from flightcheck.preflight import register
from flightcheck.preflight.registry import _REGISTRY

from .conftest import TinyClassifier, cluster_data, loader, make_trainer


class FlippedSign(TinyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return -F.cross_entropy(self(x), y)


def _fit(tmp_path, model, callbacks, data=None, **kwargs):
    trainer = make_trainer(tmp_path, callbacks, **{"max_steps": 2, **kwargs})
    trainer.fit(model, data if data is not None else loader(*cluster_data(n=64), batch_size=16))
    return trainer


def test_failed_preflight_raises_before_any_real_step(tmp_path):
    steps = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(PreflightError) as info:
        _fit(tmp_path, FlippedSign(), [Preflight(), Count()])
    assert steps == []
    report = info.value.report
    assert report.failed and {r.check for r in report.failures} >= {"init_loss", "overfit_batch"}
    assert "init_loss" in str(info.value)


def test_on_fail_warn_reports_and_trains(tmp_path):
    cb = Preflight(on_fail="warn")
    trainer = _fit(tmp_path, FlippedSign(), [cb])
    assert trainer.global_step == 2
    checks = {f.check for f in flightcheck.findings(trainer)}
    assert {"init_loss", "overfit_batch"} <= checks
    assert all(f.source == "preflight" and f.step == 0 for f in cb.findings)


def test_report_goes_to_tensorboard_and_the_findings_directory(tmp_path):
    cb = Preflight(on_fail="warn")
    trainer = _fit(tmp_path, FlippedSign(), [cb])
    folder = os.path.join(trainer.log_dir, "flightcheck")
    with open(os.path.join(folder, "preflight_report.json")) as f:
        saved = json.load(f)
    assert saved["failed"] and {r["check"] for r in saved["rows"]} == set(cb.selected_checks())
    assert "| `overfit_batch` | fail |" in open(os.path.join(folder, "preflight_report.md")).read()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert "flightcheck/preflight/report/text_summary" in events.Tags()["tensors"]


def test_healthy_run_has_every_row_pass_or_skip_and_no_finding(tmp_path):
    cb = Preflight()
    trainer = _fit(tmp_path, TinyClassifier(optimizer="adam", lr=1e-2), [cb], logger=CSVLogger(str(tmp_path)))
    report = cb.last_report
    assert {r.status.value for r in report.rows} <= {"pass", "skipped"}
    assert cb.findings == [] and trainer.global_step == 2
    assert report.seconds > 0 and "overfit_batch" in report and report.info["task"] == "multiclass"


def test_checks_and_skip_choose_the_rows(tmp_path):
    cb = Preflight(checks=["init_loss", "overfit_batch", "target_leakage"], skip=["overfit_batch"])
    _fit(tmp_path, TinyClassifier(), [cb], logger=False)
    rows = {r.check: r for r in cb.last_report.rows}
    assert set(rows) == {"init_loss", "target_leakage"}
    if "target_leakage" not in _REGISTRY:
        assert rows["target_leakage"].status.value == "skipped"


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"checks": ["init_los"]}, ValueError, "init_loss"),
        ({"skip": ["nope"]}, ValueError, "accepted"),
        ({"on_fail": "stop"}, ValueError, "'raise', 'warn'"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"max_seconds": -1}, ValueError, "max_seconds"),
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"snapshot": "disk"}, ValueError, "'host', 'device'"),
        ({"target": 1.5}, TypeError, "target"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_parameter(kwargs, error, words):
    with pytest.raises(error, match=words):
        Preflight(**kwargs)


def test_skipped_when_resuming_unless_asked(tmp_path):
    trainer = make_trainer(tmp_path, [], max_steps=2, logger=False, enable_checkpointing=True)
    trainer.fit(TinyClassifier(), loader(*cluster_data(n=64), batch_size=16))
    ckpt = os.path.join(tmp_path, "resume.ckpt")
    trainer.save_checkpoint(ckpt)
    for run_on_resume, ran in ((False, False), (True, True)):
        cb = Preflight(run_on_resume=run_on_resume)
        resumed = make_trainer(tmp_path, [cb], max_steps=4, logger=False)
        resumed.fit(FlippedSign(), loader(*cluster_data(n=64), batch_size=16), ckpt_path=ckpt) if not ran else None
        if ran:
            with pytest.raises(PreflightError):
                resumed.fit(FlippedSign(), loader(*cluster_data(n=64), batch_size=16), ckpt_path=ckpt)
        assert (cb.last_report.skipped is None) is ran


def test_a_check_that_crashes_becomes_an_internal_error_row_and_finding(tmp_path):
    original = _REGISTRY["weight_init"]

    @register("weight_init", phase="fitted")
    def broken(ctx):
        raise RuntimeError("boom")

    try:
        cb = Preflight()
        trainer = _fit(tmp_path, TinyClassifier(), [cb])
    finally:
        _REGISTRY["weight_init"] = original
    row = cb.last_report["weight_init"]
    assert row.status.value == "error" and "boom" in row.message
    assert cb.last_report["overfit_batch"].status.value == "pass"  # the others still ran
    assert [f.target for f in cb.findings] == ["preflight.weight_init"] and cb.findings[0].check == "internal_error"
    assert trainer.global_step == 2


class ManualTwoOptimizers(pl.LightningModule):
    """A GAN-like module: two optimizers stepped by hand, logging through self.log_dict."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt, layer in ((opt_a, self.a), (opt_b, self.b)):
            loss = F.cross_entropy(layer(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        self.log_dict({"loss": loss})

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=1e-2)]


def test_manual_optimisation_with_two_optimizers_runs_and_skips_the_overfit_verdict(tmp_path):
    cb = Preflight()
    trainer = _fit(tmp_path, ManualTwoOptimizers(), [cb])
    report = cb.last_report
    assert report["overfit_batch"].status.value == "skipped" and "several optimizers" in report["overfit_batch"].message
    assert report["gradient_flow"].status.value == "pass"
    assert report["init_loss"].status.value == "skipped"  # two losses a step: no single loss to judge
    assert trainer.global_step == 2


class DictStep(TinyClassifier):
    """Dict batches in, a dict out; every other batch skipped by returning None."""

    def training_step(self, batch, batch_idx):
        if batch_idx % 2:
            return None
        return {"loss": F.cross_entropy(self(batch["x"]), batch["label"])}


class DictData(Dataset):
    def __init__(self):
        self.x, self.y = cluster_data(n=64)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.y[i]}


def test_dict_batches_and_dict_or_none_returns_are_understood(tmp_path):
    cb = Preflight()
    _fit(tmp_path, DictStep(), [cb], data=DataLoader(DictData(), batch_size=16, shuffle=True))
    report = cb.last_report
    assert report.info["target"] == "batch['label']" and report.info["task"] == "multiclass"
    assert not report.failed and report["input_dependence"].status.value == "pass"


def test_training_step_returning_none_on_the_first_batch_skips_the_loss_checks(tmp_path):
    class AlwaysNone(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return None

    cb = Preflight()
    _fit(tmp_path, AlwaysNone(), [cb])
    assert cb.last_report["overfit_batch"].status.value == "skipped"
    assert "no loss" in cb.last_report["overfit_batch"].message


@pytest.mark.parametrize(
    "kwargs", [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5}]
)
def test_mixed_precision_accumulation_and_clipping_stay_quiet(tmp_path, kwargs):
    cb = Preflight()
    _fit(tmp_path, TinyClassifier(optimizer="adam", lr=1e-2), [cb], logger=False, **kwargs)
    assert not [r for r in cb.last_report.rows if r.status.value not in ("pass", "skipped")]


def test_validate_and_test_runs_do_not_run_the_preflight(tmp_path):
    cb = Preflight()
    trainer = make_trainer(tmp_path, [cb], logger=False)
    model = TinyClassifier()
    model.test_step = model.validation_step
    data = loader(*cluster_data(n=32), batch_size=16, shuffle=False)
    trainer.validate(model, data)
    trainer.test(model, data)
    assert cb.last_report is None


def test_no_train_dataloader_batch_skips_with_a_reason(tmp_path):
    cb = Preflight()
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    make_trainer(tmp_path, [cb], max_steps=1, logger=False).fit(TinyClassifier(), empty)
    assert cb.last_report.skipped and "empty" in cb.last_report.skipped


def test_default_callbacks_include_it():
    assert any(isinstance(c, Preflight) for c in flightcheck.default_callbacks())


class _DumpReport(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_start(self, trainer, pl_module):
        report = next(c for c in trainer.callbacks if isinstance(c, Preflight)).last_report
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"steps": report.info["overfit"]["steps"], "rows": [r.status.value for r in report.rows]}, f)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_ddp_ranks_take_the_same_steps_and_agree(tmp_path):
    trainer = make_trainer(
        tmp_path,
        [Preflight(), _DumpReport(str(tmp_path))],
        max_steps=1,
        logger=False,
        strategy="ddp_fork",
        devices=2,
        deterministic=False,
    )
    trainer.fit(TinyClassifier(optimizer="adam", lr=1e-2), loader(*cluster_data(n=64), batch_size=16))
    reports = [json.load(open(os.path.join(tmp_path, f"rank{r}.json"))) for r in (0, 1)]
    assert reports[0] == reports[1] and reports[0]["steps"] > 0


def test_a_second_fit_on_the_same_trainer_does_not_check_again(tmp_path):
    cb = Preflight()
    trainer = _fit(tmp_path, TinyClassifier(), [cb], logger=False)
    model = trainer.lightning_module
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(model, loader(*cluster_data(n=64), batch_size=16))
    assert "already trained for 2 steps" in cb.last_report.skipped
