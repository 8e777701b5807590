"""``train_mode``: dropout and batch-norm layers in eval mode while their part of the model learns.

Shared by the pre-flight (modes seen during its training steps) and the in-flight check
(modes seen at the end of real training steps): a ``model.eval()`` left in ``training_step``
or an epoch hook silently turns dropout off and freezes batch-norm statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from flightcheck.checks import Verdict
from flightcheck.utils.modules import MODE_DEPENDENT, parent_name


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



def current_modes(module: nn.Module) -> tuple[dict[str, bool], dict[str, str], dict[str, bool]]:
    """``(modes, kinds, learning)`` of the mode-dependent modules of ``module`` as it is now.

    A module "learns" when its own parameters require gradients, else when a sibling in its
    parent does: a frozen backbone kept in eval mode on purpose is not reported.
    """
    modules = dict(module.named_modules())
    modes = {n: m.training for n, m in modules.items() if isinstance(m, MODE_DEPENDENT)}
    kinds = {n: type(modules[n]).__name__ for n in modes}
    learning = {}
    for name in modes:
        own = list(modules[name].parameters(recurse=False))
        if own:
            learning[name] = any(p.requires_grad for p in own)
        else:
            parent = modules.get(parent_name(name), module)
            learning[name] = any(p.requires_grad for p in parent.parameters())
    return modes, kinds, learning
