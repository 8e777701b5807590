"""Resume: a run interrupted and resumed from its checkpoint reports what the straight run reports.

The model carries two seeded bugs, one per half of the run: a temperature parameter left out
of the optimizer (never updated: the pre-flight's ``gradient_flow`` and the in-flight
``update_ratio`` at step 9) and a learning rate that jumps 40x at step 40 (the loss diverges,
the weights grow, answers flip: GradientMonitor, LossCurveMonitor and PredictionStability
report it between steps 44 and 74, one problem cleared and reported again). The run is
interrupted (an exception, as a killed job) before, between and after those findings, at an
epoch boundary and in the middle of an epoch, and resumed with ``trainer.fit(..., ckpt_path=...)`` from the last
checkpoint ``ModelCheckpoint`` wrote. With the same data order and the same weights, the
findings file of the interrupted-and-resumed run must be line for line the straight run's: no
finding lost, none reported twice, every message (with its numbers) the same.

Pre-flight on resume: not run again (``Preflight(run_on_resume=False)``, the default). The
weights are no longer an initialisation (``init_loss``, ``weight_init`` and the overfit test
would judge a half-trained model), the checks already ran on this model, and a pre-empted job
that restarts every few hours should not pay for them each time. Its findings from the first
run travel in the checkpoint, so ``flightcheck.findings(trainer)`` still lists them, and they
are not written to the findings file again.
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import flightcheck
from flightcheck.callbacks import _probe
from flightcheck.callbacks.nonfinite_guard import NonFiniteGuard
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer

EPOCHS = 10  # 8 batches of 32 an epoch: 80 optimizer steps
JUMP_AT = 40


class Buggy(TinyClassifier):
    """Two seeded bugs: ``temperature`` is in no optimizer, and the learning rate jumps 40x at
    step ``JUMP_AT`` (lr 2.0 with momentum 0.9 on overlapping clusters: the run diverges)."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.net(x) * self.temperature

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < JUMP_AT else 40.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ResumableLoader:
    """Batches in a fixed order that remembers where it is, so that a checkpoint taken in the
    middle of an epoch resumes at the next batch (Lightning saves and restores its state); a
    plain ``DataLoader`` would start the epoch again and the weights would differ."""

    def __init__(self, x, y, batch_size=32):
        self.x, self.y, self.batch_size = x, y, batch_size
        self._pos = self._start = 0

    def __len__(self):
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        start, self._start = self._start, 0
        for i in range(start, len(self)):
            self._pos = i + 1
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self.x[s], self.y[s]
        self._pos = 0

    def state_dict(self):
        return {"pos": self._pos}

    def load_state_dict(self, state):
        self._start = state["pos"]


class Preempted(Exception):
    """Stands for a killed job."""


class PreemptAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Preempted(f"killed at step {self.step}")


def _run(root, *, ckpt_path=None, preempt_at=None, every_n_train_steps=None, logger=False):
    """One ``fit`` of the buggy model; every piece seeded so two runs train bit-identically."""
    pl.seed_everything(0, verbose=False)
    (x, y), (vx, vy) = _split(cluster_data(n=320, separation=1.5))
    checkpoint = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True,
                                 every_n_train_steps=every_n_train_steps)
    callbacks = flightcheck.default_callbacks(preflight={"on_fail": "warn"}) + [checkpoint]
    if preempt_at is not None:
        callbacks.append(PreemptAt(preempt_at))
    trainer = make_trainer(root, callbacks, logger=logger, max_epochs=EPOCHS, enable_checkpointing=True,
                           num_sanity_val_steps=1)
    model = Buggy()
    trainer.fit(model, ResumableLoader(x, y), loader(vx, vy, shuffle=False), ckpt_path=ckpt_path)
    return trainer, model


def _split(data, n_train=256):
    """Training and validation sets cut from one draw, by index (no sample in both)."""
    x, y = data
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _keys(findings):
    return [(f.step, f.source, f.check, f.target, f.severity.value, f.message) for f in findings]


def _callback(trainer, cls_name):
    return next(c for c in trainer.callbacks if type(c).__name__ == cls_name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted runs, one per checkpoint schedule (a checkpoint is a point where the
    monitors hand over their state, so the straight run keeps the same schedule)."""
    runs = {}
    for every in (None, 3):
        root = str(tmp_path_factory.mktemp(f"straight_{every}"))
        trainer, model = _run(root, every_n_train_steps=every)
        runs[every] = (_rows(os.path.join(root, "flightcheck", "findings.jsonl")), _keys(flightcheck.findings(trainer)),
                       {k: v.clone() for k, v in model.state_dict().items()})
    return runs


def test_the_straight_run_finds_both_seeded_bugs(straight):
    rows, _, _ = straight[None]
    found = {(r["check"], r["target"]): r["step"] for r in rows}
    assert ("internal_error", "preflight.split_overlap") not in found  # a plain iterable loader is not read
    assert "internal_error" not in {r["check"] for r in rows}, found
    assert found[("gradient_flow", "no_optimizer")] == 0  # pre-flight
    assert found[("update_ratio", "temperature")] < JUMP_AT  # first half: never updated
    late = [(r["source"], r["check"]) for r in rows if r["step"] > JUMP_AT]
    # second half: the learning rate jump, seen by several monitors, one problem reported twice
    assert len({source for source, _ in late}) >= 3 and len(late) > len(set(late)), late


@pytest.mark.parametrize(
    "preempt_at, every_n_train_steps",
    [
        (24, None),  # epoch boundary, between the first findings and the jump
        (56, None),  # epoch boundary, in the middle of the second half's findings
        (45, 3),  # mid-epoch, just after the jump was first reported
        (52, 3),  # mid-epoch, checkpoint (step 51) between two logging steps
        (66, 3),  # mid-epoch, before a problem that cleared comes back
    ],
)
def test_interrupted_and_resumed_run_reports_the_same_findings(tmp_path, straight, preempt_at, every_n_train_steps):
    expected_rows, expected_findings, expected_weights = straight[every_n_train_steps]
    root = str(tmp_path)
    with pytest.raises(Preempted):
        _run(root, preempt_at=preempt_at, every_n_train_steps=every_n_train_steps)
    ckpt = os.path.join(root, "ckpt", "last.ckpt")
    resumed_from = torch.load(ckpt, weights_only=False)["global_step"]
    assert 0 < resumed_from <= preempt_at

    trainer, model = _run(root, ckpt_path=ckpt, every_n_train_steps=every_n_train_steps)

    assert trainer.global_step == EPOCHS * 8
    for name, value in model.state_dict().items():  # the comparison below is between equal runs
        assert torch.equal(value, expected_weights[name]), name
    # The findings file (logger=False: one file for both halves) is the straight run's, line for line.
    rows = _rows(os.path.join(root, "flightcheck", "findings.jsonl"))
    assert rows == expected_rows
    # In Python too: the findings from before the checkpoint came back with it.
    assert _keys(flightcheck.findings(trainer)) == expected_findings
    # The pre-flight did not run again; its finding of the first run is still known.
    preflight = _callback(trainer, "Preflight")
    assert preflight.last_report.skipped is not None and "resuming from a checkpoint" in preflight.last_report.skipped
    assert not preflight.last_report.rows
    assert _keys(preflight.findings) == [k for k in expected_findings if k[1] == "preflight"]
    assert "gradient_flow" in [f.check for f in preflight.findings]


def test_probe_series_continues_from_its_fingerprint_when_the_batch_is_not_saved(tmp_path, straight, monkeypatch):
    """A probe too large to travel in the checkpoint is taken again (the same first validation
    batch, after the sanity check) and recognised by its fingerprint."""
    monkeypatch.setattr(_probe, "PORTABLE_PROBE_BYTES", 0)
    expected_rows, _, _ = straight[None]
    root = str(tmp_path)
    with pytest.raises(Preempted):
        _run(root, preempt_at=56)
    ckpt = os.path.join(root, "ckpt", "last.ckpt")
    assert torch.load(ckpt, weights_only=False)["callbacks"]["PredictionStability"]["state"]["probe"]["batch"] is None
    trainer, _ = _run(root, ckpt_path=ckpt)
    assert _callback(trainer, "PredictionStability")._source.origin == "validation"
    assert _rows(os.path.join(root, "flightcheck", "findings.jsonl")) == expected_rows


def test_resumed_run_with_a_new_log_version_writes_only_the_new_findings_there(tmp_path, straight):
    """A new TensorBoard version directory for the resumed run: its findings file has the
    findings made after the checkpoint, its summary all of them."""
    expected_rows, expected_findings, _ = straight[None]
    root = str(tmp_path)

    def logger():
        return TensorBoardLogger(root, name="logs")

    with pytest.raises(Preempted):
        _run(root, preempt_at=56, logger=logger())
    trainer, _ = _run(root, ckpt_path=os.path.join(root, "ckpt", "last.ckpt"), logger=logger())
    before = _rows(os.path.join(root, "logs", "version_0", "flightcheck", "findings.jsonl"))
    after = _rows(os.path.join(root, "logs", "version_1", "flightcheck", "findings.jsonl"))
    assert before + after == expected_rows
    assert after and all(r["step"] >= 56 for r in after)
    assert _keys(flightcheck.findings(trainer)) == expected_findings
    summary = open(os.path.join(root, "logs", "version_1", "flightcheck", "summary.md")).read()
    for row in expected_rows:
        assert row["check"] in summary


# ---------------------------------------------------------------------- NonFiniteGuard(action="stop")
class NanAt(TinyClassifier):
    """A loss that turns NaN on one step (global step ``bad_step``) only."""

    bad_step = 5

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.bad_step and not getattr(self, "healed", False):
            loss = loss * float("nan")
        return loss


def test_stop_action_stops_gracefully_and_training_resumes_from_last_good_checkpoint(tmp_path):
    (x, y), (vx, vy) = _split(cluster_data(n=320))
    root = str(tmp_path)
    callbacks = flightcheck.default_callbacks(nonfinite_guard={"action": "stop"})
    trainer = make_trainer(root, callbacks, logger=False, max_steps=24, max_epochs=-1)
    model = NanAt()
    trainer.fit(model, loader(x, y), loader(vx, vy, shuffle=False))  # returns: a graceful stop

    guard = _callback(trainer, "NonFiniteGuard")
    stop = [f for f in guard.findings if f.check == "nonfinite"]
    assert len(stop) == 1 and stop[0].step == NanAt.bad_step
    assert trainer.state.status == "finished" and trainer.global_step == NanAt.bad_step + 1
    assert guard.skipped_steps == 1
    ckpt = stop[0].data["checkpoint"]
    assert ckpt == os.path.join(root, "flightcheck", f"nonfinite_step{NanAt.bad_step}", "last_good.ckpt")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in weights.values())
    internal = [f for f in flightcheck.findings(trainer) if f.check == "internal_error"]
    assert not internal, [f.message for f in internal]
    # The run was killed now: the finding is already on disk (flushed per finding).
    rows = _rows(os.path.join(root, "flightcheck", "findings.jsonl"))
    assert [(r["check"], r["step"]) for r in rows] == [("nonfinite", NanAt.bad_step)]

    # Resume from the last good checkpoint (loaded the default way, weights_only) with the
    # cause fixed: training goes on from the good weights to the end.
    saved = torch.load(ckpt)  # weights_only=True by default: the callbacks' state must load that way
    for name, value in saved["state_dict"].items():
        assert torch.equal(value, weights[name]), name
    pl.seed_everything(0, verbose=False)
    resumed_callbacks = flightcheck.default_callbacks(nonfinite_guard={"action": "stop"})
    resumed = make_trainer(root, resumed_callbacks, logger=False, max_steps=24, max_epochs=-1)
    healed = NanAt()
    healed.healed = True
    resumed.fit(healed, loader(x, y), loader(vx, vy, shuffle=False), ckpt_path=ckpt)
    assert resumed.global_step == 24
    assert all(torch.isfinite(p).all() for p in healed.parameters())
    resumed_guard = _callback(resumed, "NonFiniteGuard")
    assert resumed_guard.skipped_steps == 1  # restored, nothing new
    assert [f.step for f in resumed_guard.findings if f.check == "nonfinite"] == [NanAt.bad_step]
    rows = _rows(os.path.join(root, "flightcheck", "findings.jsonl"))
    assert [(r["check"], r["step"]) for r in rows] == [("nonfinite", NanAt.bad_step)]  # not reported twice
