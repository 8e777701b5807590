"""Which part of a batch is the input and which the target, and rebuilding batches with parts swapped.

Pre-flight checks perturb one role of the batch (zero the inputs, permute the targets) and run
the user's ``training_step`` again, so they need to find a role and put a modified tensor back
into the user's own batch structure (tuples, lists, named tuples, dicts, dataclasses).

A location in a batch is a *path*: a tuple of keys, indices or attribute names from the top,
e.g. ``(1,)`` for ``batch[1]`` or ``("labels",)`` for ``batch["labels"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

Path = tuple[Any, ...]

#: Keys of a dict batch taken as the target, in order of preference (compared in lower case).
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels")


def path_str(path: Path) -> str:
    """``("x", 0)`` -> ``batch['x'][0]``: the spelling of :func:`flightcheck.utils.tensors_in`."""
    out = "batch"
    for part in path:
        out += f".{part.name}" if isinstance(part, _Attr) else f"[{part!r}]"
    return out


@dataclasses.dataclass(frozen=True)
class _Attr:
    """A dataclass field on a path (``batch.x``), as opposed to a key or an index."""

    name: str

    def __repr__(self) -> str:
        return self.name


def leaves(batch: Any, path: Path = ()) -> Iterator[tuple[Path, Tensor]]:
    """Every tensor of ``batch`` with its path, in the order :func:`flightcheck.utils.tensors_in` walks."""
    if isinstance(batch, Tensor):
        yield path, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from leaves(value, (*path, key))
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from leaves(value, (*path, i))
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            yield from leaves(getattr(batch, field.name), (*path, _Attr(field.name)))


def get_at(batch: Any, path: Path) -> Any:
    for part in path:
        batch = getattr(batch, part.name) if isinstance(part, _Attr) else batch[part]
    return batch


def map_tensors(batch: Any, fn: Callable[[Path, Tensor], Tensor], path: Path = ()) -> Any:
    """A copy of ``batch`` with every tensor replaced by ``fn(path, tensor)``; the structure is kept."""
    if isinstance(batch, Tensor):
        return fn(path, batch)
    if isinstance(batch, Mapping):
        items = {k: map_tensors(v, fn, (*path, k)) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except Exception:  # noqa: BLE001 - mappings whose constructor takes other arguments
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(map_tensors(v, fn, (*path, i)) for i, v in enumerate(batch)))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn, (*path, i)) for i, v in enumerate(batch))
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: map_tensors(getattr(batch, f.name), fn, (*path, _Attr(f.name))) for f in dataclasses.fields(batch)
        }
        return dataclasses.replace(batch, **changes)
    return batch


def replace_at(batch: Any, replacements: Mapping[Path, Tensor]) -> Any:
    """A copy of ``batch`` with the tensors at the given paths replaced (the others are shared)."""
    return map_tensors(batch, lambda path, t: replacements.get(path, t))


def find_target(batch: Any, target: int | str | None = None) -> Path | None:
    """The path of the batch's target tensor, or ``None`` when none can be identified.

    Args:
        batch: the batch as ``training_step`` receives it.
        target: where the user said the target is: an index into a tuple/list batch or a key
            of a dict batch (a field name of a dataclass batch). ``None`` guesses: the last
            element of a tuple/list of two or more, or a key named like :data:`TARGET_KEYS`.
    """
    if target is not None:
        if isinstance(batch, Mapping) and target in batch:
            path: Path = (target,)
        elif isinstance(batch, (list, tuple)) and isinstance(target, int) and -len(batch) <= target < len(batch):
            path = (target % len(batch),)
        elif dataclasses.is_dataclass(batch) and isinstance(target, str) and hasattr(batch, target):
            path = (_Attr(target),)
        else:
            return None
        return path if isinstance(get_at(batch, path), Tensor) else None
    if isinstance(batch, Mapping):
        lowered = {str(k).lower(): k for k in batch}
        for name in TARGET_KEYS:
            key = lowered.get(name)
            if key is not None and isinstance(batch[key], Tensor):
                return (key,)
        return None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[-1], Tensor):
        return (len(batch) - 1,)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for name in TARGET_KEYS:
            if isinstance(getattr(batch, name, None), Tensor):
                return (_Attr(name),)
    return None


def input_leaves(batch: Any, target_path: Path | None) -> list[tuple[Path, Tensor]]:
    """The batch's tensors that are not (inside) the target."""
    n = len(target_path) if target_path is not None else 0
    return [(p, t) for p, t in leaves(batch) if target_path is None or p[:n] != target_path]


def shared_batch_size(batch: Any) -> int | None:
    """The leading dimension every non-scalar tensor of the batch shares, else ``None``."""
    sizes = {int(t.shape[0]) for _, t in leaves(batch) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def is_float(t: Tensor) -> bool:
    return torch.is_floating_point(t)


def is_integer(t: Tensor) -> bool:
    return not torch.is_floating_point(t) and not torch.is_complex(t) and t.dtype != torch.bool


__all__ = [
    "TARGET_KEYS",
    "Path",
    "find_target",
    "get_at",
    "input_leaves",
    "is_float",
    "is_integer",
    "leaves",
    "map_tensors",
    "path_str",
    "replace_at",
    "shared_batch_size",
]
