"""Agreement between ranks: one small collective that every rank of a run takes together.

Lightning's ``strategy.reduce_boolean_decision`` agrees on one flag; a callback often needs
several at once (its own decision, whether its copy on some rank failed, which rank saw
what). :func:`agree` sums a short vector of integers over the ranks with one
``strategy.reduce`` call, so the cost is the same as Lightning's own decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch


def world_size(trainer: Any) -> int:
    """The number of processes of the run (1 outside distributed training)."""
    try:
        return max(1, int(getattr(trainer, "world_size", 1) or 1))
    except (TypeError, ValueError):
        return 1


def global_rank(trainer: Any) -> int:
    try:
        return int(getattr(trainer, "global_rank", 0) or 0)
    except (TypeError, ValueError):
        return 0


@dataclasses.dataclass(frozen=True)
class Agreement:
    """What the ranks said together: per flag, how many ranks raised it and, when exactly one
    did, which."""

    counts: tuple[int, ...]
    rank_sums: tuple[int, ...]
    world: int

    def __getitem__(self, i: int) -> bool:
        return self.counts[i] > 0

    def rank(self, i: int) -> int | None:
        """The global rank that raised flag ``i`` when exactly one rank did, else ``None``."""
        return self.rank_sums[i] - 1 if self.counts[i] == 1 else None

    def who(self, i: int) -> str:
        """``"rank 1"`` or ``"3 of 8 ranks"``: for messages."""
        r = self.rank(i)
        return f"rank {r}" if r is not None else f"{self.counts[i]} of {self.world} ranks"


def agree(trainer: Any, flags: Sequence[bool]) -> Agreement:
    """Every rank's ``flags`` summed over the ranks, in one collective (none on one process).

    Every rank must call it at the same point, with as many flags, or the ranks hang.
    """
    world = world_size(trainer)
    local = [1 if f else 0 for f in flags]
    if world <= 1:
        return Agreement(tuple(local), tuple(local), 1)
    rank = global_rank(trainer)
    strategy = trainer.strategy
    values = torch.tensor(local + [v * (rank + 1) for v in local], dtype=torch.int64, device=strategy.root_device)
    summed = strategy.reduce(values, reduce_op="sum")
    host = [int(v) for v in summed.tolist()]  # the one host read of this agreement
    n = len(local)
    return Agreement(tuple(host[:n]), tuple(host[n:]), world)


__all__ = ["Agreement", "agree", "global_rank", "world_size"]
