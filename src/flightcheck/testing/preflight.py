"""The pre-flight checks as plain functions and pytest assertions, to run on every commit.

    from flightcheck.testing import assert_overfits, assert_gradients_flow

    def test_model_can_learn():
        model = MyModel()
        assert_overfits(model, train_loader)       # or a datamodule, or one batch
        assert_gradients_flow(model, train_loader)

Each call builds a throw-away CPU Trainer that runs only the pre-flight (no training step is
taken, nothing is logged or written), on the same sandbox as the callback: the model's weights
and optimizer state are as they were afterwards.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterable
from typing import Any

from torch.utils.data import DataLoader, Dataset

from flightcheck.preflight.report import CheckRow, PreflightReport, Status


class _OneBatch(Dataset):
    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        return self.batch


def _fit_arguments(data: Any) -> dict[str, Any]:
    from lightning.pytorch import LightningDataModule

    if data is None:
        return {}
    if isinstance(data, LightningDataModule):
        return {"datamodule": data}
    if isinstance(data, DataLoader):
        return {"train_dataloaders": data}
    return {"train_dataloaders": DataLoader(_OneBatch(data), batch_size=None)}


def run_preflight(
    model: Any,
    data: Any = None,
    *,
    checks: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    accelerator: str = "cpu",
    precision: Any = None,
    **options: Any,
) -> PreflightReport:
    """Run the pre-flight on ``model`` and return its report (no training happens).

    Args:
        model: a LightningModule.
        data: a DataLoader, a LightningDataModule, one batch (as ``training_step`` takes it),
            or ``None`` to use the model's own ``train_dataloader()``.
        checks, skip: which checks to run, by name (see :class:`~flightcheck.Preflight`).
        accelerator: where to run (``"cpu"`` by default, for CI).
        precision: the Trainer's ``precision`` (e.g. ``"bf16-mixed"``), default full precision.
        **options: any other :class:`~flightcheck.Preflight` argument (``max_steps``,
            ``num_classes``, ``target``, ...).
    """
    from lightning.pytorch import Trainer

    from flightcheck.callbacks.preflight import Preflight

    callback = Preflight(checks=checks, skip=skip, on_fail="warn", **options)
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            trainer = Trainer(
                accelerator=accelerator,
                devices=1,
                max_steps=0,
                max_epochs=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
                default_root_dir=root,
                callbacks=[callback],
                **({"precision": precision} if precision is not None else {}),
            )
            trainer.fit(model, **_fit_arguments(data))
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    assert callback.last_report is not None
    return callback.last_report


def _row(check: str, model: Any, data: Any, options: dict[str, Any]) -> CheckRow:
    report = run_preflight(model, data, checks=[check], **options)
    if report.skipped:
        raise AssertionError(f"{check} could not run: the pre-flight was skipped ({report.skipped})")
    return report[check]


def _assert_passes(check: str, model: Any, data: Any, options: dict[str, Any]) -> CheckRow:
    row = _row(check, model, data, options)
    if row.status is Status.SKIPPED:
        raise AssertionError(f"{check} could not be checked: {row.message}")
    if row.status is not Status.PASS:
        details = [row.message]
        for verdict in row.verdicts:
            details += [f"  likely cause: {c}" for c in verdict.causes[:2]]
        raise AssertionError(f"{check} {row.status.value}: " + "\n".join(details))
    return row


def assert_overfits(model: Any, data: Any = None, **options: Any) -> CheckRow:
    """Assert that the model can drive its loss down on one batch with its own optimizer.

    Passes when the loss falls to a tenth of its start, every sample is right, or the loss is
    still falling steadily when the budget (``max_steps``, ``max_seconds``) runs out.
    """
    return _assert_passes("overfit_batch", model, data, options)


def assert_init_loss(
    model: Any, data: Any = None, *, num_classes: int | None = None, expected: float | None = None, **options: Any
) -> CheckRow:
    """Assert that the loss at initialisation is what the loss predicts (ln C, ln 2, or ``expected``)."""
    return _assert_passes(
        "init_loss", model, data, {"num_classes": num_classes, "expected_init_loss": expected, **options}
    )


def assert_gradients_flow(model: Any, data: Any = None, **options: Any) -> CheckRow:
    """Assert that every trainable parameter gets a finite, non-zero gradient and is in an optimizer."""
    return _assert_passes("gradient_flow", model, data, options)


def assert_batch_independent(model: Any, data: Any = None, **options: Any) -> CheckRow:
    """Assert that each sample's output depends on no other sample's input (model in eval mode)."""
    return _assert_passes("batch_independence", model, data, options)


def assert_no_target_leakage(model: Any, data: Any = None, **options: Any) -> CheckRow:
    """Assert that the model cannot read its targets: no input column is the label, and after
    overfitting the batch, the model does much worse with the targets shuffled (it is not copying
    them). Name the target with ``target=`` when it is not the batch's last element or a
    ``y``/``label(s)``/``target(s)`` key."""
    return _assert_passes("target_leakage", model, data, options)


def assert_causal(model: Any, data: Any = None, **options: Any) -> CheckRow:
    """Assert that an autoregressive model's output at position t depends on no input after t
    (attention masks, recurrent directions and convolution padding are causal). The model is
    declared autoregressive (``causal=True``), so a batch of one token tensor works too."""
    options.setdefault("causal", True)
    return _assert_passes("causal_leakage", model, data, options)


def assert_no_split_overlap(
    train: Any, val: Any, *, batches: int | None = None, target: int | str | None = None
) -> Any:
    """Assert that no validation sample is also a training sample (content hashes of the samples'
    inputs) and the training data is not mostly duplicates. ``train`` and ``val`` are DataLoaders
    or Datasets; neither is consumed. Returns the :class:`~flightcheck.preflight.overlap.OverlapResult`.
    """
    from flightcheck.preflight.overlap import OVERLAP_BATCHES, Unhashable, find_split_overlap, judge_split_overlap

    try:
        result = find_split_overlap(train, val, batches=batches or OVERLAP_BATCHES, target=target)
    except Unhashable as err:
        raise AssertionError(f"split_overlap could not be checked: {err}") from None
    bad = [v for v in judge_split_overlap(result) if v.severity.value in ("warning", "error")]
    if bad:
        raise AssertionError("split_overlap: " + "\n".join(v.message for v in bad))
    return result


__all__ = [
    "assert_batch_independent",
    "assert_causal",
    "assert_no_split_overlap",
    "assert_no_target_leakage",
    "assert_gradients_flow",
    "assert_init_loss",
    "assert_overfits",
    "run_preflight",
]
