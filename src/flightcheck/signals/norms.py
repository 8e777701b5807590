"""Norms of many tensors at once, on the device, without a host synchronisation.

``torch._foreach_norm`` reads every tensor once in a few fused kernels; a Python loop of
``p.grad.norm().item()`` launches one kernel and forces one GPU sync per tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def foreach_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor L2 norms as one float32 tensor on the tensors' device (empty in, empty out).

    Tensors on several devices or of several dtypes are grouped by ``_foreach_norm`` itself;
    half-precision tensors are measured in float32 so a large norm does not overflow to inf.
    Sparse tensors are measured through their values.
    """
    if not tensors:
        return torch.zeros(0)
    dense = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    wide = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in dense]
    norms = torch._foreach_norm(wide)
    device = norms[0].device
    # Skip the no-op ``.to``: it costs a dispatch per tensor, and on a CPU-only machine a
    # ``.to(device=cpu)`` is indistinguishable from a device-to-host copy for SyncCounter.
    return torch.stack(
        [n if n.device == device and n.dtype == torch.float32 else n.to(device=device, dtype=torch.float32)
         for n in norms]
    )


def total_norm(per_tensor: Tensor) -> Tensor:
    """The L2 norm of the concatenation of tensors, from their individual norms."""
    return per_tensor.square().sum().sqrt()


# Gradient norms of one optimizer step, computed once and shared between callbacks
# (GradientMonitor and NonFiniteGuard both need them; the gradients are read once).
_STEP_CACHE: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], list[Tensor], Tensor]] = (
    weakref.WeakKeyDictionary()
)


def step_grad_norms(trainer: Any, optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], Tensor]:
    """``(params, norms)`` for the parameters of ``optimizer`` that hold a gradient now.

    Memoised per (optimizer, global step), so every callback hooked on
    ``on_before_optimizer_step`` shares one fused read of the gradients.
    """
    key = (id(optimizer), int(getattr(trainer, "global_step", 0)))
    cached = _STEP_CACHE.get(trainer)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norms = foreach_norms([p.grad for p in params])
    _STEP_CACHE[trainer] = (key, params, norms)
    return params, norms


def group_sums(values: Tensor, index: Tensor, groups: int) -> Tensor:
    """Sum ``values`` into ``groups`` buckets by ``index`` on the device (one ``index_add_``).

    Squared per-parameter norms summed this way give squared per-layer norms.
    """
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
