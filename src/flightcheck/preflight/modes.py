"""``train_mode``: dropout and batch-norm layers found in eval mode during a training step."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import nn

from flightcheck.checks import Verdict
from flightcheck.preflight.context import PreflightContext
from flightcheck.preflight.registry import Skip, register

#: How many modules a message names.
NAMED_MODULES = 5


def judge_train_mode(
    modes: Mapping[str, bool], kinds: Mapping[str, str], learning: Mapping[str, bool]
) -> Verdict | None:
    """Modules in eval mode during a training step, among those whose part of the model learns.

    Args:
        modes: each dropout/batch-norm module's ``training`` flag when the step called it.
        kinds: each module's class name.
        learning: whether the module's part of the model (its own parameters, else its parent's)
            receives gradients; a frozen backbone kept in eval mode on purpose is not reported.
    """
    found = [name for name, training in modes.items() if not training and learning.get(name, False)]
    if not found:
        return None
    shown = ", ".join(f"{n} ({kinds.get(n, '?')})" for n in found[:NAMED_MODULES])
    more = len(found) - NAMED_MODULES
    return Verdict(
        "train_mode",
        "warning",
        f"{len(found)} module{'s were' if len(found) != 1 else ' was'} in eval mode during a training step: {shown}"
        + (f" and {more} more" if more > 0 else "")
        + ". Dropout is off and batch norm uses (and never updates) its running statistics.",
        causes=(
            "model.eval() called in __init__, setup or a hook, and never undone",
            "a submodule switched to eval for inference and left there",
        ),
        advice=(
            "call self.train() at the start of training (or remove the eval() call)",
            "to freeze a part on purpose, also set requires_grad_(False) on it",
        ),
        data={"modules": found},
    )


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


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
        learning[name] = any(learns.get(n, False) for n in own) if own else subtree_learns(_parent(name))
    kinds = {n: type(modules[n]).__name__ for n in modes if n in modules}
    verdict = judge_train_mode(modes, kinds, learning)
    if verdict is not None:
        yield verdict


__all__ = ["judge_train_mode"]
