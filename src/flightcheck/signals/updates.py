"""How far an optimizer step moved the weights, without copying the weights.

The update-to-weight ratio ``||w_after - w_before|| / ||w||`` needs the weights from before
the step. A copy of every weight doubles the model's memory; instead each tensor lends one
fixed contiguous block (whole rows where they fit, at most ``size`` elements, the whole
tensor when it is smaller). The block is copied before the step and compared after it, and
the block's squared norms are scaled up by ``numel / block`` to estimate the tensor's.
Rows of a layer are exchangeable (same initialisation, same optimizer), so a few of them
estimate the layer's ratio well; tensors up to ``size`` elements are measured exactly.

Copy, difference and norms are fused multi-tensor ops on the device; nothing is read back.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from flightcheck.signals.norms import float32_on, foreach_norms, local_shard

#: Elements per tensor in the block; 4096 floats is 16 KiB per tensor.
DEFAULT_BLOCK_SIZE = 4096


def block_span(shape: Sequence[int], size: int, key: str) -> tuple[int, int]:
    """``(start, length)`` of the block a tensor of ``shape`` lends to the update estimate.

    Whole rows (slices along the first dimension) when a row fits in ``size``; the start is a
    deterministic pseudo-random row chosen from ``key`` (the parameter's name), so the block
    does not always sit on the first rows (an embedding's padding and special tokens).
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if numel <= size:
        return 0, numel
    unit = numel // int(shape[0]) if len(shape) > 1 else 1
    if unit > size:
        unit = 1
    length = (size // unit) * unit
    slots = (numel - length) // unit + 1
    return (zlib.crc32(key.encode()) % slots) * unit, length


def blocks(tensors: Sequence[Tensor], spans: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Flat views of each tensor's block (a copy only for a tensor that cannot be flattened in place)."""
    return [t.detach().reshape(-1)[start : start + length] for t, (start, length) in zip(tensors, spans)]


class UpdateSample:
    """Per-tensor estimates of ``||Δw||²`` and ``||w||²`` (before the step) for one optimizer step.

    Args:
        params: the tensors to follow (the same list, in the same order, for the whole run);
            for a sharded parameter (``DTensor``), this rank's local shard.
        names: their names; they seed where each block sits.
        size: the most elements a tensor lends.

    Example::

        sample = UpdateSample(params, names)
        sample.snapshot()          # before optimizer.step()
        optimizer.step()
        delta_sq, before_sq = sample.measure()
        ratio = (delta_sq.sum() / before_sq.sum()).sqrt()
    """

    def __init__(self, params: Sequence[Tensor], names: Sequence[str], size: int = DEFAULT_BLOCK_SIZE) -> None:
        if size < 1:
            raise ValueError(f"size must be a positive number of elements, got {size}")
        self.params = list(params)
        self.spans = [block_span(tuple(p.shape), size, name) for p, name in zip(self.params, names)]
        device = self.params[0].device if self.params else torch.device("cpu")
        #: per tensor, ``numel / block``: scales a block's squared norm to the whole tensor's
        self.scale_host = [p.numel() / length if length else 0.0 for p, (_, length) in zip(self.params, self.spans)]
        self.scale = torch.tensor(self.scale_host, dtype=torch.float32, device=device)
        self._before = [torch.empty(length, dtype=p.dtype, device=p.device) for p, (_, length) in
                        zip(self.params, self.spans)]
        self._views = blocks(self.params, self.spans)
        # norms come out float32 on one device: stacked straight into the caller's buffer
        self._half = any(p.dtype in (torch.float16, torch.bfloat16) for p in self.params)
        self._plain = all(p.device == device and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                          for p in self.params)

    def refresh(self) -> None:
        """Re-take the block views of tensors whose storage was replaced (``param.data = ...``).

        Views are kept from step to step (building them costs a few dispatches per tensor);
        optimizers update in place, so this is only needed when user code swaps a storage.
        """
        for i, (p, view) in enumerate(zip(self.params, self._views)):
            if view.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                self._views[i] = blocks([p], [self.spans[i]])[0]

    def snapshot(self) -> None:
        """Copy every block; call it before the optimizer step."""
        if self.params:
            with torch.no_grad():
                torch._foreach_copy_(self._before, self._views)

    def measure(self) -> Tensor:
        """A ``(2, tensors)`` float32 device tensor: per tensor, the squared norms of the step's
        change (row 0) and of the weights before it (row 1), scaled to whole-tensor estimates.

        The ratio is taken against the weights *before* the step, so a step that blows the
        weights up reads as the huge ratio it is, not as ~1 against the blown-up weights.
        """
        if not self.params:
            return torch.zeros(2, 0)
        out = torch.empty(2 * len(self.params), dtype=torch.float32, device=self.scale.device)
        self.measure_into(out)
        return out.square().view(2, -1) * self.scale

    def measure_into(self, out: Tensor) -> None:
        """Write the step's per-tensor norms into ``out`` (a float32 device tensor of ``2 *
        tensors`` elements): the norms of the change, then of the weights before it; *not*
        squared and *not* scaled (multiply the squares by :attr:`scale` for whole-tensor
        estimates). Three fused ops and no allocation beyond the difference: the cheap form
        of :meth:`measure` for a caller that keeps its own buffer."""
        if not self.params:
            return
        with torch.no_grad():
            delta = torch._foreach_sub(self._views, self._before)
            norms = torch._foreach_norm(self._wide([*delta, *self._before]))
            if self._plain:
                torch.stack(norms, out=out)
            else:
                out.copy_(torch.stack([float32_on(n, out.device) for n in norms]))

    def _wide(self, tensors: list[Tensor]) -> list[Tensor]:
        return tensors if not self._half else [t.float() for t in tensors]

    def grad_block_norms(self, positions: Sequence[int], grads: Sequence[Tensor]) -> Tensor:
        """Norms of the gradient over the same blocks, for the tensors at ``positions``.

        The evidence that a block *received* gradient: a block whose gradient is zero (an
        embedding row no batch used) may rightly stay unchanged. Sparse gradients have no
        flat block and are measured whole.
        """
        views = [g.coalesce().values() if g.is_sparse else local_shard(g).detach().reshape(-1)[s : s + n]
                 for g, (s, n) in zip(grads, (self.spans[i] for i in positions))]
        return foreach_norms(views)


__all__ = ["DEFAULT_BLOCK_SIZE", "UpdateSample", "block_span", "blocks"]
