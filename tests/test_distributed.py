"""flightcheck under DDP and FSDP2: two CPU processes (gloo, forked), as a user would run them.

Each run happens in a watchdog process with a time limit, so a hang fails the test instead
of freezing the suite; the gloo timeout is short too, so a collective that one rank never
joins raises instead of waiting for half an hour. Every rank writes what its callbacks saw
to a JSON file; the tests compare the ranks.

DDP runs use Lightning's ``ddp_fork``. The sharded runs use ``ModelParallelStrategy`` with
``fully_shard`` (FSDP2, ``DTensor`` parameters), the FSDP Lightning runs on CPU: its
``FSDPStrategy`` (FSDP1) refuses ``accelerator="cpu"``, and torch's FSDP1 needs an
accelerator. ``ModelParallelStrategy`` launches ranks by re-running the script, which
pytest cannot be, so the two ranks are forked here with the environment a launcher sets.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import math
import multiprocessing
import os
import signal
import socket
import time
import traceback

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

import flightcheck
from flightcheck.callbacks.activation_monitor import ActivationMonitor
from flightcheck.callbacks.base import FlightcheckCallback
from flightcheck.callbacks.gradient_monitor import GradientMonitor
from flightcheck.callbacks.nonfinite_guard import NonFiniteGuard
from flightcheck.callbacks.prediction_stability import PredictionStability
from flightcheck.callbacks.preflight import Preflight
from flightcheck.signals.norms import is_dtensor, shard_weights, sum_over_ranks
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs os.fork and torch.distributed with the gloo backend",
)

#: seconds a whole two-rank run may take before it counts as a hang
RUN_LIMIT = 120
#: seconds a collective may wait for the other rank (gloo) before it raises
COLLECTIVE_LIMIT = 45

BAD_STEP = 2


# ---------------------------------------------------------------------- running two ranks
def _whole(t):
    return t.full_tensor() if is_dtensor(t) else t  # a collective for a DTensor: every rank calls it


class RankRecorder(pl.Callback):
    """Writes, per rank, the weights after every step, the whole model's gradient norm before
    it, and what each flightcheck callback saw."""

    def __init__(self, folder: str, launcher: int) -> None:
        self.folder = folder
        self.launcher = launcher  # the process that started the ranks
        self.steps: list[list] = []
        self.grad_norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [_whole(p.grad).detach() for p in pl_module.parameters() if p.grad is not None]
        # none left when NonFiniteGuard dropped the step's update
        self.grad_norms.append(float(torch.stack([g.norm() for g in grads]).norm()) if grads else math.nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = [_whole(p).detach() for p in pl_module.parameters()]
        weights = [p.double().numpy().tobytes() for p in params]
        finite = all(torch.isfinite(p).all() for p in params)
        self.steps.append([trainer.global_step, hashlib.sha1(b"".join(weights)).hexdigest(), bool(finite)])

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, None)

    def on_exception(self, trainer, pl_module, exception):
        self._write(trainer, exception)

    def _write(self, trainer, exception):
        if os.getpid() == self.launcher:
            return  # the process that forked the ranks, not a rank
        callbacks = {}
        for cb in trainer.callbacks:
            if isinstance(cb, FlightcheckCallback):
                callbacks[cb.name] = {
                    "failed": cb._failed,
                    "findings": [f.to_dict() for f in cb.findings],
                    "skipped_steps": getattr(cb, "skipped_steps", None),
                    "state": cb.state_dict()["state"] if isinstance(cb, GradientMonitor) else None,
                }
        record = {
            "rank": trainer.global_rank,
            "global_step": trainer.global_step,
            "should_stop": trainer.should_stop,
            "error": None if exception is None else f"{type(exception).__name__}: {exception}",
            "steps": self.steps,
            "grad_norms": self.grad_norms,
            "names": [n for n, _ in trainer.lightning_module.named_parameters()],
            "callbacks": callbacks,
        }
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f, default=str)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(tmp_path, model, callbacks, *, max_steps=6, batch_size=16, sharded=False, **trainer_kwargs):
    """Fit ``model`` on two forked CPU ranks; returns ``(error, [rank 0 record, rank 1 record])``.

    The fit runs in a child process in its own process group, so that a hang (in either rank)
    is ended by killing that group and reported as a failure. ``sharded``: FSDP2 through
    ``ModelParallelStrategy`` (the model shards itself in ``configure_model``), else DDP.
    """
    folder = str(tmp_path)
    data = loader(*cluster_data(n=128), batch_size=batch_size, shuffle=False)
    limit = datetime.timedelta(seconds=COLLECTIVE_LIMIT)

    def trainer_for(strategy, devices, launcher):
        kwargs = dict(max_steps=max_steps, max_epochs=None, strategy=strategy, devices=devices, deterministic=False)
        kwargs.update(trainer_kwargs)
        return make_trainer(tmp_path, [*callbacks, RankRecorder(folder, launcher)], **kwargs)

    def write_error(name: str, err: BaseException) -> None:
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")

    def sharded_rank(rank: int, port: int, launcher: int) -> None:
        # what a launcher (torchrun, SLURM) sets: Lightning then starts no processes itself
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                          RANK=str(rank), LOCAL_RANK=str(rank))
        code = 0
        try:
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=limit)
            trainer_for(strategy, 2, launcher).fit(model, data)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            write_error(f"error{rank}.txt", err)
            code = 1
        os._exit(code)

    def fit() -> None:
        os.setsid()
        code = 0
        try:
            if sharded:
                port = _free_port()
                ranks = [multiprocessing.get_context("fork").Process(target=sharded_rank, args=(r, port, os.getpid()))
                         for r in (0, 1)]
                for p in ranks:
                    p.start()
                for p in ranks:
                    p.join()
                code = max(p.exitcode or 0 for p in ranks)
            else:
                os.environ["MASTER_PORT"] = str(_free_port())  # not one an earlier run in this process left behind
                trainer_for(DDPStrategy(start_method="fork", timeout=limit), 2, os.getpid()).fit(model, data)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            write_error("error.txt", err)
            code = 1
        os._exit(code)

    child = multiprocessing.get_context("fork").Process(target=fit)
    began = time.monotonic()
    child.start()
    child.join(RUN_LIMIT)
    if child.is_alive():
        os.killpg(child.pid, signal.SIGKILL)  # the group holds the child and the two ranks it forked
        child.join()
        pytest.fail(f"the two-rank run did not end within {RUN_LIMIT} s: a hang")
    elapsed = time.monotonic() - began
    assert elapsed < COLLECTIVE_LIMIT, f"the run took {elapsed:.0f} s: a collective waited for its timeout"
    errors = [open(os.path.join(folder, name)).read() for name in ("error.txt", "error0.txt", "error1.txt")
              if os.path.exists(os.path.join(folder, name))]
    records = []
    for rank in (0, 1):
        path = os.path.join(folder, f"rank{rank}.json")
        records.append(json.load(open(path)) if os.path.exists(path) else None)
    return "\n".join(errors) or None, records


def findings_file_lines(tmp_path) -> list[dict]:
    """The lines of the run's one findings.jsonl (rank 0's), checked to be unique."""
    files = glob.glob(os.path.join(str(tmp_path), "**", "findings.jsonl"), recursive=True)
    assert len(files) == 1, files
    lines = open(files[0]).read().splitlines()
    assert len(lines) == len(set(lines)), "a finding was written twice"
    return [json.loads(line) for line in lines]


def of(record, source, check=None):
    findings = record["callbacks"][source]["findings"]
    return [f for f in findings if check is None or f["check"] == check]


def weights_after(record, step):
    """The weights' hash after the optimizer step of ``step`` (the step counter has moved on)."""
    return {s: h for s, h, _ in record["steps"]}[step + 1]


# ---------------------------------------------------------------------- models
class NaNOnRank1(TinyClassifier):
    """Its loss turns NaN on global rank 1 only, at one step."""

    def __init__(self, at_step: int = BAD_STEP, **kwargs):
        super().__init__(**kwargs)
        self.at_step = at_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.global_step == self.at_step:
            loss = loss * float("nan")
        return loss


class ZeroGradientParameter(TinyClassifier):
    """A trainable parameter multiplied by zero: its gradient is exactly zero on every step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.unused = nn.Parameter(torch.ones(4))

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.0 * self.unused.sum()


# ---------------------------------------------------------------------- tests
def test_default_callbacks_on_a_healthy_two_rank_run_stay_quiet_and_agree(tmp_path):
    error, records = run_two_ranks(tmp_path, TinyClassifier(optimizer="adam", lr=1e-2),
                                   flightcheck.default_callbacks(), max_steps=8)
    assert error is None, error
    assert all(r is not None and r["global_step"] == 8 for r in records)
    for record in records:
        loud = [f["message"] for cb in record["callbacks"].values() for f in cb["findings"] if f["severity"] != "info"]
        assert loud == [], f"rank {record['rank']}: {loud}"
        assert not any(cb["failed"] for cb in record["callbacks"].values())
    # the ranks trained in step and the pre-flight left both at the same weights
    assert records[0]["steps"] == records[1]["steps"]
    reports = glob.glob(os.path.join(str(tmp_path), "**", "preflight_report.json"), recursive=True)
    assert len(reports) == 1, reports  # rank 0 writes, once
    assert not glob.glob(os.path.join(str(tmp_path), "**", "findings.jsonl"), recursive=True) or all(
        f["severity"] == "info" for f in findings_file_lines(tmp_path))


def test_a_nan_on_one_rank_stops_both_ranks_and_is_written_once(tmp_path):
    callbacks = flightcheck.default_callbacks(nonfinite_guard={"action": "stop"})
    error, records = run_two_ranks(tmp_path, NaNOnRank1(optimizer="adam", lr=1e-2), callbacks, max_steps=8)
    assert error is None, error
    for record in records:
        assert record["global_step"] == BAD_STEP + 1 and record["should_stop"], record["rank"]
        assert weights_after(record, BAD_STEP) == weights_after(record, BAD_STEP - 1)  # the bad update not applied
        assert all(finite for _, _, finite in record["steps"])
        assert len(of(record, "nonfinite_guard", "nonfinite")) == 1
        assert not any(cb["failed"] for cb in record["callbacks"].values()), record["rank"]
    assert records[0]["steps"] == records[1]["steps"]
    lines = findings_file_lines(tmp_path)
    assert [f["check"] for f in lines] == ["nonfinite"], [f["message"] for f in lines]  # and no other alarm
    finding = lines[0]
    assert finding["step"] == BAD_STEP and finding["data"]["action"] == "stop"
    assert "rank 1" in finding["message"], finding["message"]  # rank 0 writes, and names the rank that saw it
    checkpoint = finding["data"]["checkpoint"]
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_a_nan_on_one_rank_is_skipped_on_both_ranks(tmp_path):
    error, records = run_two_ranks(tmp_path, NaNOnRank1(), [NonFiniteGuard(action="skip")], max_steps=6)
    assert error is None, error
    for record in records:
        assert record["global_step"] == 6 and not record["should_stop"]
        assert record["callbacks"]["nonfinite_guard"]["skipped_steps"] == 1
        assert weights_after(record, BAD_STEP) == weights_after(record, BAD_STEP - 1)
        assert weights_after(record, BAD_STEP + 1) != weights_after(record, BAD_STEP)  # training went on
        assert all(finite for _, _, finite in record["steps"])
    assert records[0]["steps"] == records[1]["steps"]


class _MarksItsAction(NonFiniteGuard):
    """Leaves a file per rank the moment the ranks have agreed to act (the raise ends the rank
    before any callback hook could write)."""

    def __init__(self, folder, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def _act_on(self, trainer, pl_module, optimizer, look, **kwargs):
        with open(os.path.join(self.folder, f"acted{trainer.global_rank}.txt"), "w") as f:
            f.write(f"{self.action} at step {trainer.global_step}")
        return super()._act_on(trainer, pl_module, optimizer, look, **kwargs)


def test_a_nan_on_one_rank_raises_on_both_ranks_without_a_hang(tmp_path):
    guard = _MarksItsAction(str(tmp_path), action="raise")
    error, _ = run_two_ranks(tmp_path, NaNOnRank1(), [guard], max_steps=6)
    assert error is not None and "NonFiniteError" in error and "Non-finite values at step 2" in error, error
    for rank in (0, 1):  # both ranks took the decision (the launcher ends a rank once the other raised)
        assert open(os.path.join(str(tmp_path), f"acted{rank}.txt")).read() == f"raise at step {BAD_STEP}"


class _BrokenOnRank1(NonFiniteGuard):
    """A guard whose internals fail on rank 1 only, at one step, at a chosen point."""

    def __init__(self, where: str, **kwargs):
        super().__init__(**kwargs)
        self.where = where

    def _maybe_fail(self, trainer, where):
        if self.where == where and trainer.global_rank == 1 and trainer.global_step == BAD_STEP:
            raise RuntimeError(f"injected failure in {where}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_fail(trainer, "on_train_batch_start")  # a hook that takes no collective
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _decide(self, trainer, pl_module, optimizer, *args):
        self._maybe_fail(trainer, "before_agreement")  # inside the hook that agrees, before it does
        super()._decide(trainer, pl_module, optimizer, *args)

    def _look(self, trainer, pl_module, **kwargs):
        if kwargs.get("forced"):
            self._maybe_fail(trainer, "after_agreement")  # the ranks agreed to skip; rank 1 then fails
        return super()._look(trainer, pl_module, **kwargs)


@pytest.mark.parametrize("where", ["on_train_batch_start", "before_agreement", "after_agreement"])
def test_a_guard_failing_on_one_rank_steps_aside_on_both_without_a_hang(tmp_path, where):
    model = NaNOnRank1() if where == "after_agreement" else TinyClassifier()
    error, records = run_two_ranks(tmp_path, model, [_BrokenOnRank1(where, action="skip")], max_steps=6)
    assert error is None, error
    for record in records:
        assert record["global_step"] == 6, record["rank"]  # the user's training completed on both ranks
        assert record["callbacks"]["nonfinite_guard"]["failed"], record["rank"]  # and the guard is off on both
        assert all(finite for _, _, finite in record["steps"])
    assert records[0]["steps"] == records[1]["steps"]
    if where == "after_agreement":  # both ranks still skipped the update they had agreed to skip
        assert all(weights_after(r, BAD_STEP) == weights_after(r, BAD_STEP - 1) for r in records)
    own = of(records[1], "nonfinite_guard", "internal_error")
    assert len(own) == 1 and "injected failure" in own[0]["message"]
    lines = [f for f in findings_file_lines(tmp_path) if f["check"] == "internal_error"]
    assert len(lines) == 1 and "rank 1" in lines[0]["message"], lines  # reported by rank 0, once


class _PublishFailsOnRank0(Preflight):
    def _publish(self, trainer, report):
        if trainer.global_rank == 0:
            raise OSError("injected: no space left on device")
        super()._publish(trainer, report)


def test_a_preflight_failing_on_rank_0_before_the_agreement_does_not_hang_rank_1(tmp_path):
    error, records = run_two_ranks(tmp_path, TinyClassifier(optimizer="adam", lr=1e-2),
                                   [_PublishFailsOnRank0()], max_steps=2)
    assert error is None, error
    assert all(r["global_step"] == 2 and r["callbacks"]["preflight"]["failed"] for r in records)
    assert "no space left" in of(records[0], "preflight", "internal_error")[0]["message"]
    assert "rank 0" in of(records[1], "preflight", "internal_error")[0]["message"]


class _PredictionFailingOnRank1:
    """A ``prediction_fn`` that fails on rank 1 from one step on (an out-of-memory on one GPU)."""

    def __call__(self, pl_module, batch):
        if pl_module.global_rank == 1 and pl_module.trainer.global_step >= 4:
            raise RuntimeError("injected: out of memory on rank 1")
        return pl_module(batch[0])


class UnreachableOnRank1(TinyClassifier):
    """Its forward cannot be called the default way on rank 1 outside training."""

    def forward(self, x):
        if self.global_rank == 1 and not self.training:
            raise TypeError("forward() missing 1 required positional argument: 'mask'")
        return super().forward(x)


@pytest.mark.parametrize("case", ["prediction_stability", "activation_monitor", "unreachable_on_rank_1"])
def test_a_probe_failing_on_one_rank_stops_on_both_ranks_without_a_hang(tmp_path, case):
    if case == "unreachable_on_rank_1":  # the first probe: the callback goes off on both ranks, as information
        model, callback = UnreachableOnRank1(), PredictionStability(every_n_steps=2)
    elif case == "prediction_stability":  # a later probe fails: an internal error, stepped aside together
        model, callback = TinyClassifier(), PredictionStability(every_n_steps=2, prediction_fn=_PredictionFailingOnRank1())
    else:
        model, callback = TinyClassifier(), ActivationMonitor(every_n_steps=2, prediction_fn=_PredictionFailingOnRank1())
    error, records = run_two_ranks(tmp_path, model, [callback], max_steps=8)
    assert error is None, error
    assert all(r["global_step"] == 8 for r in records)
    lines = findings_file_lines(tmp_path)
    assert [f["check"] for f in lines] == ["internal_error"] and "rank 1" in lines[0]["message"], lines
    assert lines[0]["severity"] == ("info" if case == "unreachable_on_rank_1" else "warning")


def test_gradient_monitor_reports_a_seeded_bug_once_with_norms_equal_on_both_ranks(tmp_path):
    error, records = run_two_ranks(tmp_path, ZeroGradientParameter(), [GradientMonitor(flow_after_steps=4)],
                                   max_steps=6, log_every_n_steps=3)
    assert error is None, error
    history = [r["callbacks"]["gradient_monitor"]["state"]["history"]["total"] for r in records]
    assert len(history[0]) == 6 and all(math.isfinite(v) for v in history[0])
    assert history[0] == pytest.approx(history[1], rel=1e-6)  # the all-reduced gradients: same norms
    for record in records:
        flow = of(record, "gradient_monitor", "gradient_flow")
        assert len(flow) == 1 and flow[0]["data"]["zero_gradient"] == {"unused": ["unused"]}
    lines = findings_file_lines(tmp_path)
    assert [f["check"] for f in lines] == ["gradient_flow"]  # written by rank 0 only: once, not once per rank


# ---------------------------------------------------------------------- sharded training (FSDP2)
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
        except ImportError:
            return None
    return fully_shard


def _no_fsdp2() -> str | None:
    """Why no sharded run can happen here, or ``None``."""
    import lightning.pytorch.strategies as strategies

    if not hasattr(strategies, "ModelParallelStrategy"):
        return "Lightning's ModelParallelStrategy (FSDP2 on CPU) needs lightning >= 2.4"
    if _fully_shard() is None:
        return "torch's fully_shard (FSDP2) needs torch >= 2.4"
    return None


class ShardedClassifier(NaNOnRank1):
    """Sharded with FSDP2 (each Linear, then the whole), with a parameter whose gradient is
    always zero (the seeded bug), and a loss that turns NaN on rank 1 at one step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.unused = nn.Parameter(torch.ones(4))

    def configure_model(self):
        fully_shard, mesh = _fully_shard(), self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.0 * self.unused.sum()


@pytest.mark.skipif(_no_fsdp2() is not None, reason=_no_fsdp2() or "")
def test_fsdp2_norms_are_the_whole_models_and_ranks_agree(tmp_path):
    callbacks = [GradientMonitor(flow_after_steps=4), NonFiniteGuard(action="skip"),
                 PredictionStability(every_n_steps=2)]
    error, records = run_two_ranks(tmp_path, ShardedClassifier(), callbacks, max_steps=8, batch_size=8,
                                   sharded=True, log_every_n_steps=2)
    assert error is None, error
    for record in records:
        assert record["global_step"] == 8
        assert record["names"] == ["unused", "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
        # each rank held half of every tensor; the monitor judged the whole model's norms
        whole = [n for n in record["grad_norms"] if math.isfinite(n)]
        history = record["callbacks"]["gradient_monitor"]["state"]["history"]["total"]
        assert len(whole) == 7 and history == pytest.approx(whole, rel=1e-5)
        # the NaN of rank 1's loss: both ranks dropped that update
        assert record["callbacks"]["nonfinite_guard"]["skipped_steps"] == 1
        assert weights_after(record, BAD_STEP) == weights_after(record, BAD_STEP - 1)
        assert all(finite for _, _, finite in record["steps"])
        flow = of(record, "gradient_monitor", "gradient_flow")
        assert len(flow) == 1 and flow[0]["data"]["zero_gradient"] == {"unused": ["unused"]}
        assert not any(cb["failed"] for cb in record["callbacks"].values())
    assert records[0]["steps"] == records[1]["steps"]
    lines = findings_file_lines(tmp_path)
    assert sorted(f["check"] for f in lines) == ["gradient_flow", "nonfinite"]
    assert "rank 1" in next(f for f in lines if f["check"] == "nonfinite")["message"]


class _MonitorFailingOnRank1(GradientMonitor):
    def __init__(self, where, **kwargs):
        super().__init__(**kwargs)
        self.where = where

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.where == "before" and trainer.global_rank == 1 and trainer.global_step == 3:
            raise RuntimeError("injected failure on rank 1 before a flush")
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _judge_series(self, lay, rows, step, progress):
        if self.where == "after" and self._rank == 1 and step >= 3:
            raise RuntimeError("injected failure on rank 1 after the reduction")
        return super()._judge_series(lay, rows, step, progress)

    def on_fit_start(self, trainer, pl_module):
        self._rank = trainer.global_rank


@pytest.mark.skipif(_no_fsdp2() is not None, reason=_no_fsdp2() or "")
@pytest.mark.parametrize("where", ["before", "after"])
def test_fsdp2_gradient_monitor_failing_on_one_rank_steps_aside_on_both(tmp_path, where):
    error, records = run_two_ranks(tmp_path, ShardedClassifier(at_step=-1), [_MonitorFailingOnRank1(where)],
                                   max_steps=8, batch_size=8, sharded=True, log_every_n_steps=2)
    assert error is None, error
    assert all(r["global_step"] == 8 and r["callbacks"]["gradient_monitor"]["failed"] for r in records)
    lines = [f for f in findings_file_lines(tmp_path) if f["check"] == "internal_error"]
    assert len(lines) == 1 and "rank 1" in lines[0]["message"], lines


def test_shard_weights_make_sums_over_ranks_whole_norms():
    """The sharded-norm reduction without processes: HSDP on 4 ranks (2 replicas x 2 shards)."""
    from torch.distributed.tensor import Replicate, Shard

    from flightcheck.signals.norms import shard_count

    x = torch.randn(6, 5)
    placements, sizes, world = (Replicate(), Shard(0)), (2, 2), 4
    shards = shard_count(placements, sizes)
    assert shards == 2 and shard_count((Shard(0), Shard(1)), (2, 3)) == 6 and shard_count((Replicate(),), (8,)) == 1
    held = [x.chunk(2)[rank % 2] for rank in range(world)]  # rank r holds shard r % 2 (each shard twice)
    summed = sum(shards / world * float(part.norm()) ** 2 for part in held)
    assert summed == pytest.approx(float(x.norm()) ** 2, rel=1e-6)
    # nothing sharded (one process, DDP): nothing to reduce, and no collective outside a process group
    assert shard_weights([torch.zeros(3)], world=4) is None and shard_weights([torch.zeros(3)], world=1) is None
    values = torch.tensor([1.0, 2.0])
    assert sum_over_ranks(values) is values and values.tolist() == [1.0, 2.0]


def test_two_ranks_find_what_one_process_finds_on_the_same_data(tmp_path):
    """DDP on two ranks, 16 samples each per step, against one process with the same 32 samples
    per step: the all-reduced gradients are the one-process gradients, so the findings match."""
    max_steps, log_every = 12, 3

    def model():
        torch.manual_seed(0)
        return ZeroGradientParameter(lr=0.5)

    def callbacks():
        return flightcheck.default_callbacks(preflight=False, prediction_stability=False)

    error, _ = run_two_ranks(tmp_path / "ddp", model(), callbacks(), max_steps=max_steps, log_every_n_steps=log_every)
    assert error is None, error
    two = {(f["check"], f["target"]) for f in findings_file_lines(tmp_path / "ddp")}

    single = tmp_path / "one"
    trainer = make_trainer(single, callbacks(), max_steps=max_steps, max_epochs=None, log_every_n_steps=log_every)
    trainer.fit(model(), loader(*cluster_data(n=128), batch_size=32, shuffle=False))
    one = {(f["check"], f["target"]) for f in findings_file_lines(single)}
    assert ("gradient_flow", "unused") in one
    assert two == one
