"""Walking the nested batches users write: tensors, tuples, lists, dicts, dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch


def tensors_in(batch: Any, path: str = "batch") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor in ``batch``; paths read like ``batch["x"][0]``."""
    if isinstance(batch, torch.Tensor):
        yield path, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from tensors_in(value, f"{path}[{key!r}]")
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from tensors_in(value, f"{path}[{i}]")
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            yield from tensors_in(getattr(batch, field.name), f"{path}.{field.name}")


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension shared by the batch's tensors, or ``None`` when there is none."""
    for _, t in tensors_in(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    return None


def step_loss(outputs: Any, key: str = "loss") -> torch.Tensor | None:
    """The loss in what ``training_step`` returned: the tensor itself, the tensor under ``key``
    of a dict, or ``None`` (``None`` returned, or no tensor there)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        value = outputs.get(key)
        return value if isinstance(value, torch.Tensor) else None
    return None
