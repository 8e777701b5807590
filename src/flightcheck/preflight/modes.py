"""``train_mode``: dropout and batch-norm layers found in eval mode during a training step."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from flightcheck.checks import Verdict
from flightcheck.checks.modes import judge_train_mode
from flightcheck.preflight.context import PreflightContext
from flightcheck.preflight.registry import Skip, register
from flightcheck.utils.modules import parent_name


@register("train_mode", phase="fitted", summary="dropout and batch norm layers are in training mode during a step")
def train_mode(ctx: PreflightContext) -> Iterator[Verdict]:
    modes = ctx.initial.modes
    if not modes:
        raise Skip("the model has no dropout or batch norm layer")
    try:
        gradients = ctx.overfit.gradients
        learns = {n: f.seen and f.nonzero for n, f in gradients.items()}
    except Skip:
        learns = {n: p.requires_grad for n, p in ctx.module.named_parameters()}
    modules: dict[str, nn.Module] = dict(ctx.module.named_modules())

    def subtree_learns(prefix: str) -> bool:
        dotted = prefix + "." if prefix else ""
        return any(learns.get(n, False) for n in learns if n.startswith(dotted))

    learning = {}
    for name in modes:
        own = [f"{name}.{p}" for p, _ in modules[name].named_parameters(recurse=False)] if name in modules else []
        learning[name] = any(learns.get(n, False) for n in own) if own else subtree_learns(parent_name(name))
    kinds = {n: type(modules[n]).__name__ for n in modes if n in modules}
    verdict = judge_train_mode(modes, kinds, learning)
    if verdict is not None:
        yield verdict


__all__ = ["judge_train_mode"]
