"""Take one training batch at ``on_fit_start`` without consuming anything the run will use.

At ``on_fit_start`` Lightning has not loaded the train dataloader yet (the fit loop does it
right before the first epoch). The pre-flight asks the same source Lightning will ask (the
LightningModule's or datamodule's ``train_dataloader()``, or the loaders given to ``fit``) and
iterates a single-process copy of it, so workers are not started and a persistent loader's
iterator is not created. Every generator that drawing the batch advances — the global RNGs and
the loader's and samplers' own ``generator`` — is put back, so the run shuffles exactly as it
would have. The batch then goes through the same hooks as a real one
(``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from flightcheck.utils import preserved_rng


class NoBatch(Exception):  # noqa: N818
    """No batch could be taken; the message says why (it becomes the pre-flight's skip reason)."""


def loader_generators(loader: Any) -> list[torch.Generator]:
    seen: dict[int, torch.Generator] = {}
    objects = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    objects.append(getattr(objects[-1], "sampler", None))
    for obj in objects:
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            seen.setdefault(id(g), g)
    return list(seen.values())


@contextlib.contextmanager
def generators_preserved(loaders: list[Any]) -> Iterator[None]:
    gens = [g for loader in loaders for g in loader_generators(loader)]
    states = [g.get_state() for g in gens]
    try:
        yield
    finally:
        for g, state in zip(gens, states):
            g.set_state(state)


def single_process(loader: DataLoader) -> DataLoader:
    """The same batches as ``loader`` from the main process (no workers, no pinning, no persistence)."""
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn
        )
    # The loader's own generator too: starting an iterator draws a base seed from it before the
    # sampler shuffles with it, and without that draw the copy would shuffle differently.
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                          generator=loader.generator)
    return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn,
                      generator=loader.generator)


def _first(iterable: Any) -> Any:
    if isinstance(iterable, DataLoader):
        iterable = single_process(iterable)
    elif iter(iterable) is iterable:
        raise NoBatch("the training data is a one-shot iterator; taking a batch from it would consume it")
    try:
        return next(iter(iterable))
    except StopIteration:
        raise NoBatch("the training data loader is empty") from None


def flatten_loaders(obj: Any) -> list[Any]:
    from lightning.pytorch.utilities import CombinedLoader

    if isinstance(obj, CombinedLoader):
        return flatten_loaders(obj.iterables)
    if isinstance(obj, Mapping):
        return [x for v in obj.values() for x in flatten_loaders(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in flatten_loaders(v)]
    return [obj]


def _first_batch_of(train_data: Any) -> Any:
    """The batch ``training_step`` would receive first from ``train_data`` (a loader or a collection)."""
    from lightning.pytorch.utilities import CombinedLoader

    if isinstance(train_data, CombinedLoader):
        if train_data._mode not in ("max_size_cycle", "min_size", "max_size"):
            raise NoBatch(f"a CombinedLoader in {train_data._mode!r} mode feeds one loader at a time")
        return _first_batch_of(train_data.iterables)
    if isinstance(train_data, Mapping):
        return {k: _first_batch_of(v) for k, v in train_data.items()}
    if isinstance(train_data, (list, tuple)) and not isinstance(train_data, torch.Tensor):
        return [_first_batch_of(v) for v in train_data]
    return _first(train_data)


def request_train_data(trainer: Any) -> Any:
    """What the fit loop will get from its data source (its ``train_dataloader()`` call)."""
    return request_data(trainer.fit_loop._data_source, "train_dataloader")


def request_data(source: Any, name: str) -> Any:
    """What a Lightning data source (``trainer.fit_loop._data_source``, or the validation loop's
    ``trainer.fit_loop.epoch_loop.val_loop._data_source``) hands its loop: a loader or a collection."""
    if not source.is_defined():
        raise NoBatch(f"no {name} is defined")
    try:
        from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader

        return _request_dataloader(source)
    except ImportError:  # pragma: no cover - private API moved
        return source.dataloader()


def first_batch(trainer: Any, module: Any) -> Any:
    """The first training batch, on the model's device, ready for ``training_step``.

    Leaves the global RNGs, the loaders' generators and the loaders themselves as they were.
    """
    with preserved_rng():
        train_data = request_train_data(trainer)
        loaders = flatten_loaders(train_data)
        with generators_preserved(loaders):
            batch = _first_batch_of(train_data)
        batch = trainer.precision_plugin.convert_input(batch)
        batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def leading_batches(trainer: Any, module: Any, n: int, seconds: float) -> list[Any]:
    """Up to ``n`` of the first training batches (the first included), as ``training_step``
    would receive them but left on the host, taken within about ``seconds``; the same care as
    :func:`first_batch` (a single-process copy, every generator put back). Only for training
    data that is one ``DataLoader``; otherwise, or when none can be taken, an empty list."""
    batches: list[Any] = []
    with preserved_rng():
        try:
            train_data = request_train_data(trainer)
        except Exception:  # noqa: BLE001 - no data source: nothing more to read
            return batches
        if not isinstance(train_data, DataLoader):
            return batches
        with generators_preserved([train_data]):
            deadline = time.perf_counter() + seconds
            try:
                for batch in single_process(train_data):
                    batches.append(module._on_before_batch_transfer(batch, dataloader_idx=0))
                    if len(batches) >= n or time.perf_counter() > deadline:
                        break
            except Exception:  # noqa: BLE001 - a loader that fails past its first batch: keep what came
                pass
    return batches


__all__ = [
    "NoBatch",
    "first_batch",
    "leading_batches",
    "flatten_loaders",
    "generators_preserved",
    "loader_generators",
    "request_data",
    "request_train_data",
    "single_process",
]
