"""Counting host-device synchronisations a piece of code asks for.

A sync-forcing call (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
``.numpy()``, a data-dependent shape such as ``nonzero``) stalls the CPU until the GPU has
caught up. On a CPU-only machine nothing stalls, but the calls are the same, so counting
them there proves the GPU path is sync-free.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_SYNCING_METHODS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "nonzero",
    "unique",
    "masked_select",
    "any",  # only when its result is then read; counted by __bool__ too, kept out below
}
# ``any``/``all`` return device tensors and do not sync by themselves.
_SYNCING_METHODS.discard("any")
_SYNCING_FUNCTIONS = {torch.nonzero, torch.unique, torch.masked_select, torch.argwhere}


def _name(func: Any) -> str:
    return getattr(func, "__name__", repr(func))


class SyncCounter(TorchFunctionMode):
    """Counts sync-forcing tensor calls made while it is active.

    Example::

        with SyncCounter() as syncs:
            callback.on_before_optimizer_step(trainer, module, optimizer)
        assert syncs.total == 0, syncs.calls
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name in _SYNCING_METHODS or func in _SYNCING_FUNCTIONS:
            self.calls[name] += 1
        elif name == "to" and _to_host(args, kwargs):
            self.calls["to(cpu)"] += 1
        return func(*args, **kwargs)


def _to_host(args: Any, kwargs: Any) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    for t in targets:
        if isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu":
            return True
    return False
