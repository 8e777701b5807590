"""Activations of one forward pass: which ReLU-family units fire, how much of a squashing
non-linearity sits in its flat tails. Pure tensor functions, device in, device out.

A *unit* is one feature of a layer: the last axis of ``(B, F)`` and ``(B, T, F)``
activations, the channel axis (1) of convolutional ones ``(B, C, *spatial)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unit_axis(x: Tensor, channels_first: bool) -> int | None:
    """The axis that indexes units: ``None`` for ``(B,)`` (one unit), 1 for ``(B, C, *spatial)``
    with 4+ dimensions or when ``channels_first`` (a convolution or norm layer fed it), else the
    last axis."""
    if x.dim() <= 1:
        return None
    if x.dim() >= 4 or (x.dim() == 3 and channels_first):
        return 1
    return x.dim() - 1


def unit_peaks(pre_activation: Tensor, axis: int | None) -> Tensor:
    """Per unit the largest pre-activation over the batch (and every other axis); NaN when
    any of its values is NaN."""
    if axis is None:
        return pre_activation.amax().reshape(1)
    dims = [d for d in range(pre_activation.dim()) if d != axis]
    return pre_activation.amax(dim=dims)


def units_fired(pre_activation: Tensor, axis: int | None) -> Tensor:
    """Per unit 1.0 if its pre-activation was positive anywhere in the batch, else 0.0 (a
    ReLU-family unit that is never positive outputs zero and passes no gradient)."""
    return (unit_peaks(pre_activation, axis) > 0).float()


def tail_count(pre_activation: Tensor, limit: float) -> Tensor:
    """``[in the tails, total]``: how many pre-activations have ``|x| > limit``, as a float pair."""
    inside = (pre_activation.abs() > limit).sum().float()
    return torch.stack([inside, torch.tensor(float(pre_activation.numel()), device=inside.device)])


__all__ = ["tail_count", "unit_axis", "unit_peaks", "units_fired"]
