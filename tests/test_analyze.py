"""``flightcheck analyze LOGDIR`` on real TensorBoard event files, as a CI job would call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from flightcheck.analyze import pick_train_tag, pick_val_tag
from flightcheck.cli import main
from tests.conftest import cluster_data


class _PlainOverfitter(pl.LightningModule):
    """Written without flightcheck: a 2x256 MLP, Adam, logging train_loss and val_loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.fixture(scope="module")
def overfit_logdir(tmp_path_factory):
    """A TensorBoard run of an overfitting model: 48 noisy training samples, 30 epochs."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("tb")
    x, y = cluster_data(n=560, separation=1.0, seed=1)
    g = torch.Generator().manual_seed(0)
    yt = y[:48].clone()
    flip = torch.rand(48, generator=g) < 0.3
    yt[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=g)
    trainer = pl.Trainer(
        max_epochs=30, logger=TensorBoardLogger(str(root), name="overfit"), log_every_n_steps=5,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )
    trainer.fit(
        _PlainOverfitter(),
        DataLoader(TensorDataset(x[:48], yt), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(TensorDataset(x[48:], y[48:]), batch_size=256),
    )
    return root


def _best_val_step(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    events = acc.Scalars("val_loss")
    return min(events, key=lambda e: e.value).step


def _write_run(path, tags):
    writer = SummaryWriter(str(path))
    for tag, (steps, values) in tags.items():
        for s, v in zip(steps, values):
            writer.add_scalar(tag, float(v), int(s))
    writer.close()


STEPS = np.arange(1, 401)


def _healthy(seed=0):
    return 0.05 + np.exp(-STEPS / 60) + 0.03 * np.random.default_rng(seed).standard_normal(STEPS.size)


def _flat(seed=0):
    return 1.386 + 0.03 * np.random.default_rng(seed).standard_normal(STEPS.size)


# ----------------------------------------------------------------------------- the overfitting run
def test_overfitting_run_made_without_flightcheck_is_diagnosed_with_its_start(overfit_logdir, capsys):
    code = main(["analyze", str(overfit_logdir)])
    out = capsys.readouterr().out
    best = _best_val_step(overfit_logdir / "overfit" / "version_0")
    assert code == 1  # an error-severity finding: the CI job fails
    assert "Curve diagnosis: overfitting" in out
    assert f"overfitting began around step {best}" in out


def test_json_output_names_the_problem_and_the_step_it_began(overfit_logdir, capsys):
    main(["analyze", str(overfit_logdir), "--json"])
    report = json.loads(capsys.readouterr().out)
    run = report["runs"][0]
    assert run["run"] == os.path.join("overfit", "version_0")
    assert (run["train_tag"], run["val_tag"]) == ("train_loss", "val_loss")
    problem = run["diagnosis"]["problems"][0]
    assert problem["check"] == "overfitting"
    assert problem["began_step"] == _best_val_step(overfit_logdir / "overfit" / "version_0")
    assert report["worst"] == "error"


def test_python_dash_m_runs_the_same_command(overfit_logdir):
    done = subprocess.run(
        [sys.executable, "-m", "flightcheck", "analyze", str(overfit_logdir), "--fail-on", "never"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "overfitting" in done.stdout


# ----------------------------------------------------------------------------- many runs, bad runs
def test_several_runs_empty_and_corrupt_ones_each_get_a_clear_line(tmp_path, capsys):
    _write_run(tmp_path / "good", {"train_loss": (STEPS, _healthy())})
    _write_run(tmp_path / "stuck", {"train/loss": (STEPS, _flat())})
    _write_run(tmp_path / "empty", {})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "events.out.tfevents.1.host").write_bytes(b"not an event file" * 20)
    code = main(["analyze", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1  # the stuck run's plateau persisted long enough to become an error
    assert "== run good (training: train_loss, 400 points; no validation)" in out
    assert "Curve diagnosis: healthy" in out
    assert "run stuck" in out and "error     loss_plateau" in out
    assert "run empty\nnot judged: no scalars" in out
    assert "run broken\nwarning: an event file could not be read to the end" in out
    assert main(["analyze", str(tmp_path), "--fail-on", "never"]) == 0


def test_truncated_event_file_is_read_up_to_the_damage(tmp_path, capsys):
    _write_run(tmp_path / "run", {"train_loss": (STEPS, _healthy())})
    (event_file,) = (tmp_path / "run").iterdir()
    data = event_file.read_bytes()
    event_file.write_bytes(data[: len(data) // 2])
    main(["analyze", str(tmp_path), "--json"])
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert 100 < run["train_points"] < 400
    assert run["reading_problems"] and "truncated" in run["reading_problems"][0].lower()


def test_tags_with_unusual_names_are_given_on_the_command_line(tmp_path, capsys):
    val_steps = np.arange(40, 401, 40)
    _write_run(tmp_path, {"loss/training": (STEPS, _healthy()), "metrics/holdout": (val_steps, 1.5 + 0.002 * val_steps)})
    main(["analyze", str(tmp_path), "--json"])
    auto = json.loads(capsys.readouterr().out)["runs"][0]
    assert auto["train_tag"] == "loss/training" and auto["val_tag"] is None
    code = main(["analyze", str(tmp_path), "--json", "--val-tag", "metrics/holdout", "--fail-on", "warning"])
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["val_tag"] == "metrics/holdout"
    assert [(p["check"], p["severity"]) for p in run["diagnosis"]["problems"]] == [("overfitting", "warning")]
    assert run["diagnosis"]["problems"][0]["data"]["validation_never_improved"]
    assert code == 1
    main(["analyze", str(tmp_path), "--train-tag", "nope"])
    assert "--train-tag 'nope' is not among its tags" in capsys.readouterr().out


def test_nothing_to_judge_exits_two(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path)]) == 2  # a directory without event files
    _write_run(tmp_path / "r", {"lr-Adam": (STEPS, np.full(STEPS.size, 1e-3))})
    assert main(["analyze", str(tmp_path)]) == 2
    assert "no training loss found; tags: lr-Adam" in capsys.readouterr().out


# ----------------------------------------------------------------------------- choosing the series
def test_training_tag_prefers_the_step_series_unless_it_is_too_short():
    assert pick_train_tag(["train_loss_epoch", "train_loss_step", "val_loss"]) == "train_loss_step"
    lengths = {"train_loss_step": 3, "train_loss_epoch": 20}
    assert pick_train_tag(["train_loss_epoch", "train_loss_step"], lengths) == "train_loss_epoch"
    assert pick_train_tag(["Loss/Train_CE", "Loss/Val_CE", "lr"]) == "Loss/Train_CE"
    assert pick_train_tag(["val_loss", "test_loss", "lr-SGD"]) is None


def test_validation_tag_variants_are_recognised():
    assert pick_val_tag(["train_loss", "val/loss"]) == "val/loss"
    assert pick_val_tag(["train_loss", "validation/loss_epoch"]) == "validation/loss_epoch"
    assert pick_val_tag(["loss", "eval_ce_loss"]) == "eval_ce_loss"
    assert pick_val_tag(["train_loss", "test_loss"]) is None
