"""Logger variety: TensorBoard, CSV, none, several, custom ones: training completes and the
findings land where the README says.

Where things go (the rule in ``reporting/hub.py``): the flightcheck folder
(``findings.jsonl``, ``preflight_report.{md,json}``, ``summary.md``) is
``<log_dir>/flightcheck/``, where ``log_dir`` is ``trainer.log_dir``: the first logger's
directory (``<save_dir>/<name>/version_<n>`` for TensorBoard and CSV loggers, ``save_dir`` for
other loggers), else ``default_root_dir`` (no logger, or a logger without a directory).
TensorBoard text (each finding, the running table, the pre-flight report, the summary) goes
to the first TensorBoard logger wherever it is in the list (a subclass counts); flightcheck's
scalar charts go to every logger. Without a TensorBoard logger nothing of that is attempted
and nothing fails.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn

import flightcheck
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer

STEPS = 16


class LeftOut(TinyClassifier):
    """A temperature parameter left out of the optimizer: a pre-flight warning
    (``gradient_flow``) and, after 10 steps, an in-flight one (``update_ratio``)."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.net(x) * self.temperature

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)


class MemoryLogger(Logger):
    """A logger with no directory at all (a metrics service, say)."""

    def __init__(self):
        super().__init__()
        self.keys: set[str] = set()

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return None

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.keys.update(metrics)


class MyTensorBoardLogger(TensorBoardLogger):
    """A user's TensorBoard logger subclass."""


def _fit(root, logger, **kwargs):
    x, y = cluster_data(n=320)
    trainer = make_trainer(root, flightcheck.default_callbacks(), logger=logger, max_steps=STEPS, max_epochs=-1,
                           **kwargs)
    trainer.fit(LeftOut(), loader(x[:256], y[:256]), loader(x[256:], y[256:], shuffle=False))
    assert trainer.global_step == STEPS
    return trainer


def _assert_flightcheck_folder(folder, trainer):
    """Every file flightcheck writes is in ``folder``, with every finding of the run."""
    assert sorted(os.listdir(folder)) == ["findings.jsonl", "preflight_report.json", "preflight_report.md",
                                          "summary.md"]
    with open(os.path.join(folder, "findings.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["check"], r["target"]) for r in rows] == [(f.check, f.target) for f in flightcheck.findings(trainer)]
    checks = {r["check"] for r in rows}
    assert {"gradient_flow", "update_ratio"} <= checks and "internal_error" not in checks


def _flightcheck_folders(root):
    return sorted(os.path.relpath(d, root) for d, _, _ in os.walk(root) if os.path.basename(d) == "flightcheck")


def _tensorboard_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["tensors"])


def _assert_tensorboard_charts(log_dir):
    scalars, texts = _tensorboard_tags(log_dir)
    for tag in ("flightcheck/grad_norm/total", "flightcheck/weight_norm/total", "flightcheck/update_ratio/total",
                "flightcheck/nonfinite/batches", "flightcheck/predictions/churn"):
        assert tag in scalars, sorted(scalars)
    for tag in ("flightcheck/findings/gradient_flow", "flightcheck/findings/update_ratio",
                "flightcheck/findings_table", "flightcheck/preflight/report", "flightcheck/summary"):
        assert f"{tag}/text_summary" in texts, sorted(texts)


def _csv_columns(log_dir):
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return set(next(csv.reader(f)))


def test_tensorboard_logger(tmp_path):
    trainer = _fit(tmp_path, TensorBoardLogger(str(tmp_path), name="tb"))
    log_dir = os.path.join(tmp_path, "tb", "version_0")
    assert _flightcheck_folders(tmp_path) == [os.path.join("tb", "version_0", "flightcheck")]
    _assert_flightcheck_folder(os.path.join(log_dir, "flightcheck"), trainer)
    _assert_tensorboard_charts(log_dir)


def test_tensorboard_charts_follow_the_loggers_prefix_and_read_back_like_lightnings(tmp_path):
    """flightcheck writes a flush's scalars as one TensorBoard event (the per-scalar path waits
    on the writer's queue): the charts must read back as Lightning's own do, prefix included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit(tmp_path, TensorBoardLogger(str(tmp_path), name="tb", prefix="run"))
    acc = EventAccumulator(os.path.join(tmp_path, "tb", "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"run-train_loss", "run-flightcheck/grad_norm/total", "run-flightcheck/weight_norm/total"} <= scalars
    steps = [e.step for e in acc.Scalars("run-flightcheck/grad_norm/total")]
    assert steps == sorted(steps) and steps[-1] == STEPS - 1
    assert all(e.value > 0 for e in acc.Scalars("run-flightcheck/weight_norm/total"))


def test_csv_logger_gets_the_charts_as_columns_and_no_tensorboard_is_needed(tmp_path):
    trainer = _fit(tmp_path, CSVLogger(str(tmp_path), name="csv"))
    log_dir = os.path.join(tmp_path, "csv", "version_0")
    assert _flightcheck_folders(tmp_path) == [os.path.join("csv", "version_0", "flightcheck")]
    _assert_flightcheck_folder(os.path.join(log_dir, "flightcheck"), trainer)
    columns = _csv_columns(log_dir)
    assert {"flightcheck/grad_norm/total", "flightcheck/predictions/churn"} <= columns
    assert not [f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents")]


def test_no_logger_writes_to_default_root_dir(tmp_path):
    trainer = _fit(tmp_path, False)
    assert _flightcheck_folders(tmp_path) == ["flightcheck"]
    _assert_flightcheck_folder(os.path.join(tmp_path, "flightcheck"), trainer)


@pytest.mark.parametrize("order", ["csv_first", "tensorboard_first"])
def test_several_loggers_first_one_holds_the_findings_tensorboard_gets_the_text(tmp_path, order):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    loggers = [csv_logger, tb] if order == "csv_first" else [tb, csv_logger]
    trainer = _fit(tmp_path, loggers)
    first = "csv" if order == "csv_first" else "tb"
    assert _flightcheck_folders(tmp_path) == [os.path.join(first, "version_0", "flightcheck")]
    _assert_flightcheck_folder(os.path.join(tmp_path, first, "version_0", "flightcheck"), trainer)
    _assert_tensorboard_charts(os.path.join(tmp_path, "tb", "version_0"))
    assert "flightcheck/grad_norm/total" in _csv_columns(os.path.join(tmp_path, "csv", "version_0"))


def test_default_logger_under_a_custom_default_root_dir(tmp_path):
    root = os.path.join(tmp_path, "runs", "exp1")
    trainer = _fit(root, None, default_root_dir=root)  # logger=None: Lightning's own default logger
    log_dir = os.path.join(root, "lightning_logs", "version_0")
    assert trainer.log_dir == log_dir
    assert _flightcheck_folders(tmp_path) == [os.path.join("runs", "exp1", "lightning_logs", "version_0",
                                                           "flightcheck")]
    _assert_flightcheck_folder(os.path.join(log_dir, "flightcheck"), trainer)
    _assert_tensorboard_charts(log_dir)


def test_a_logger_without_a_directory_falls_back_to_default_root_dir(tmp_path):
    memory = MemoryLogger()
    trainer = _fit(tmp_path, memory)
    assert _flightcheck_folders(tmp_path) == ["flightcheck"]
    _assert_flightcheck_folder(os.path.join(tmp_path, "flightcheck"), trainer)
    assert {"flightcheck/grad_norm/total", "flightcheck/predictions/churn"} <= memory.keys


def test_a_tensorboard_logger_subclass_gets_the_text_too(tmp_path):
    trainer = _fit(tmp_path, MyTensorBoardLogger(str(tmp_path), name="mine"))
    log_dir = os.path.join(tmp_path, "mine", "version_0")
    _assert_flightcheck_folder(os.path.join(log_dir, "flightcheck"), trainer)
    _assert_tensorboard_charts(log_dir)


def test_outside_fit_findings_follow_the_same_rule(tmp_path):
    """``trainer.validate`` alone (no fit): a callback that reports goes to the same folder."""

    class Reporter(flightcheck.FlightcheckCallback):
        name = "reporter"

        def on_validation_end(self, trainer, pl_module):
            self.report(trainer, "overfitting", "info", "validation seen")

    x, y = cluster_data(n=64)
    trainer = make_trainer(tmp_path, [Reporter()], logger=CSVLogger(str(tmp_path), name="csv"))
    trainer.validate(TinyClassifier(), loader(x, y, shuffle=False), verbose=False)
    assert _flightcheck_folders(tmp_path) == [os.path.join("csv", "version_0", "flightcheck")]
