"""Gradients that were never cleared: each optimizer step applies the sum of every earlier one.

Under manual optimisation zeroing the gradients is the user's job, and a forgotten
``optimizer.zero_grad()`` makes ``.grad`` a running sum: the step size grows with the run and
the run diverges or stalls some tens of steps later, long after the cause. The cause itself
is visible at once: when the next backward begins, ``.grad`` still holds, bit for bit, the
gradient the optimizer's previous step applied.

:class:`StaleGradientWatch` keeps a small strided sample (:data:`SAMPLE` elements) of two of
the optimizer's gradients at a step, compares it with ``.grad`` at every backward until that
optimizer's next step, and counts the steps where every backward saw it unchanged. All of it
stays on the device (a few tiny kernels a step; the count is read with GradientMonitor's
interval). Deliberate accumulation (several backwards, then a step, then ``zero_grad``),
``zero_grad(set_to_none=False)`` and optimizers taking turns on shared gradients (a GAN whose
generator loss back-propagates into the discriminator before the discriminator zeroes its
own) all clear ``.grad`` at least once between a step and the next step of the same
optimizer, and are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flightcheck.signals.norms import local_shard

#: Elements sampled (strided over the whole tensor) from each sentinel gradient. A cleared
#: gradient differs from the applied one in every element that was non-zero; a stale one in none.
SAMPLE = 128


def _sample(grad: Tensor) -> Tensor:
    flat = local_shard(grad).detach().reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE]


class StaleGradientWatch:
    """Per optimizer slot: how many of its steps applied a gradient the backward passes since
    its previous step had only added to (the previous step's gradient was never cleared).

    Call :meth:`stepped` from ``on_before_optimizer_step``, :meth:`before_backward` from
    ``on_before_backward``, :meth:`take` when reading the interval.
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        #: per slot, steps seen applying a stale gradient in this interval (device, no sync)
        self.stale = torch.zeros(slots, device=device)
        #: per slot, steps judged in this interval (host)
        self.judged = [0] * slots
        self._sentinels: dict[int, tuple[list[Tensor], Tensor, Tensor]] = {}
        self._held: dict[int, Tensor | bool] = {}

    def stepped(self, slot: int, params: Sequence[Tensor], snapshot: bool) -> None:
        """Optimizer ``slot`` is about to step on the gradients of ``params``. Judges the pair
        (its previous snapshot, now) when a backward ran in between; then, with ``snapshot``,
        remembers a sample of this step's gradient for its next step."""
        held = self._held.pop(slot, None)
        kept = self._sentinels.pop(slot, None)
        if held is not None and kept is not None:
            self.judged[slot] += 1
            if held is not False:
                self.stale[slot] += (held & kept[2]).float()
        if not snapshot:
            return
        dense = [p for p in params if p.grad is not None and p.grad.layout == torch.strided and p.grad.numel() > 0]
        if not dense:
            return
        chosen = [dense[0]] if len(dense) == 1 else [dense[0], dense[-1]]
        snap = torch.cat([_sample(p.grad) for p in chosen])
        self._sentinels[slot] = (chosen, snap, snap.ne(0).any())  # an all-zero sample tells nothing

    def before_backward(self) -> None:
        """A backward is about to run: does every sentinel still hold its applied gradient?"""
        for slot, (params, snap, _) in self._sentinels.items():
            prev = self._held.get(slot)
            if prev is False:
                continue
            grads = [p.grad for p in params]
            if any(g is None for g in grads):  # zero_grad(set_to_none=True) ran
                self._held[slot] = False
                continue
            now = torch.cat([_sample(g) for g in grads])
            same = now.eq(snap).all() if now.shape == snap.shape else False
            self._held[slot] = same if prev is None or same is False else prev & same

    def take(self) -> tuple[Tensor, list[int]]:
        """The interval's counts ``(stale on the device, judged)``; the next interval starts at zero."""
        stale, judged = self.stale.clone(), self.judged
        self.stale.zero_()
        self.judged = [0] * len(judged)
        return stale, judged
