"""Host-device synchronisations the monitors ask for on ordinary (non-logging) training steps.

Every sync-forcing tensor call (``.item()``, ``float()``, ``bool()``, ``.tolist()``,
``.cpu()``, a data-dependent shape) stalls a GPU run until the device catches up. The
monitors may move their figures to the host once per logging interval; on every other step
their hooks must make none. On a CPU-only machine nothing stalls, but the calls are the
same, so :class:`~flightcheck.testing.SyncCounter` counting them here proves the GPU path.

To put another callback under this rule, add one line to ``MONITORS``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from torch.nn import functional as F

from flightcheck import ActivationMonitor, GradientMonitor, NonFiniteGuard, PredictionStability
from flightcheck.callbacks.base import FlightcheckCallback
from flightcheck.testing import SyncCounter
from tests.conftest import TinyClassifier, cluster_data, loader, make_trainer

#: Monitors that must be sync-free outside logging steps, in their default configuration.
MONITORS: list[Any] = [
    pytest.param(GradientMonitor, id="GradientMonitor"),
    pytest.param(NonFiniteGuard, id="NonFiniteGuard"),
    pytest.param(PredictionStability, id="PredictionStability"),
    pytest.param(ActivationMonitor, id="ActivationMonitor"),
]

#: Hooks Lightning calls inside a training batch: the ones that run on every step.
IN_BATCH_HOOKS = frozenset({
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
})


def _logging_batch(trainer: Any) -> bool:
    """Lightning's own rule for the batch being trained now: will it log?"""
    return bool(trainer._logger_connector.should_update_logs)


class HookSyncs:
    """Runs each Lightning hook of ``callback`` under a :class:`SyncCounter` and records
    ``(hook, logging batch?, sync calls)`` for every call."""

    def __init__(self, callback: Any) -> None:
        self.records: list[tuple[str, bool, Counter[str]]] = []
        hooks = [n for n in dir(type(callback)) if n.startswith("on_") and callable(getattr(callback, n))]
        for name in hooks:
            setattr(callback, name, self._counted(name, getattr(callback, name)))

    def _counted(self, name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        def counted(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            logging = name in IN_BATCH_HOOKS and _logging_batch(trainer)
            with SyncCounter() as syncs:
                result = hook(trainer, *args, **kwargs)
            self.records.append((name, logging, syncs.calls))
            return result

        return counted

    def ordinary_steps(self) -> list[tuple[str, Counter[str]]]:
        """In-batch hook calls on non-logging batches, with the syncs each made."""
        return [(name, calls) for name, logging, calls in self.records if name in IN_BATCH_HOOKS and not logging]


class ManualOptimisation(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        opt.step()


SCENARIOS = [
    pytest.param(TinyClassifier, {}, id="plain"),
    pytest.param(lambda: TinyClassifier(optimizer="adam"), {"precision": "bf16-mixed", "accumulate_grad_batches": 2},
                 id="bf16-accumulation"),
    pytest.param(ManualOptimisation, {}, id="manual"),
]


def _train(tmp_path, callback, model, **trainer_kwargs) -> HookSyncs:
    counted = HookSyncs(callback)
    trainer = make_trainer(tmp_path, [callback], max_steps=20, max_epochs=100, log_every_n_steps=5, **trainer_kwargs)
    trainer.fit(model, loader(*cluster_data(n=512)))
    return counted


@pytest.mark.parametrize(("model", "trainer_kwargs"), SCENARIOS)
@pytest.mark.parametrize("monitor", MONITORS)
def test_monitor_makes_no_sync_on_ordinary_steps(tmp_path, monitor, model, trainer_kwargs):
    callback = monitor()
    counted = _train(tmp_path, callback, model(), **trainer_kwargs)
    ordinary = counted.ordinary_steps()
    assert len({name for name, _ in ordinary} & {"on_before_optimizer_step", "on_train_batch_end"}) > 0
    assert [(name, dict(calls)) for name, calls in ordinary if calls] == []
    assert [f for f in getattr(callback, "findings", []) if f.check == "internal_error"] == []


class _ReadsEveryStep(FlightcheckCallback):
    name = "reads_every_step"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.last = next(pl_module.parameters()).grad.norm().item()


def test_the_counter_sees_a_sync_in_a_hook(tmp_path):
    counted = _train(tmp_path, _ReadsEveryStep(), TinyClassifier())
    steps = [calls for name, calls in counted.ordinary_steps() if name == "on_before_optimizer_step"]
    assert len(steps) == 16 and all(calls == Counter({"item": 1}) for calls in steps)  # 4 of 20 steps log
