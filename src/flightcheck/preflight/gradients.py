"""Gradient and weight checks: ``gradient_flow`` and ``weight_init``."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor, nn

from flightcheck.checks import Verdict
from flightcheck.preflight.context import PreflightContext
from flightcheck.preflight.overfit import GradientFlags
from flightcheck.preflight.registry import Skip, register

# --------------------------------------------------------------------------- gradient_flow
#: How many modules a message names before summarising the rest.
NAMED_MODULES = 5


def module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def describe(names: Iterable[str], numel: Mapping[str, int]) -> tuple[str, dict[str, list[str]]]:
    """``"encoder.0 (weight, bias), head (weight) and 3 more modules"`` and the full grouping."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[module_of(name)].append(name.rsplit(".", 1)[-1])
    shown = [f"{m} ({', '.join(ps)})" for m, ps in list(groups.items())[:NAMED_MODULES]]
    more = len(groups) - len(shown)
    text = ", ".join(shown) + (f" and {more} more module{'s' if more > 1 else ''}" if more > 0 else "")
    return text, dict(groups)


def judge_gradient_flow(
    flags: Mapping[str, GradientFlags],
    in_optimizer: set[str],
    *,
    steps: int,
    frozen_on_purpose: set[str] = frozenset(),
    scaled: bool = False,
) -> list[Verdict]:
    """Every trainable parameter should get a finite, non-zero gradient and belong to an optimizer.

    Args:
        flags: per trainable parameter, what its gradients did over the overfit steps.
        in_optimizer: names of the parameters some optimizer updates.
        steps: how many steps the flags cover.
        frozen_on_purpose: parameters without gradient whose module is in eval mode (a backbone
            frozen with ``torch.no_grad``): reported as a note, not a failure.
        scaled: gradients are loss-scaled (fp16 AMP), where an overflowing step is normal.
    """
    numel = {n: f.numel for n, f in flags.items()}
    verdicts = []
    when = f"in {steps} step{'s' if steps != 1 else ''}"
    missing = [n for n, f in flags.items() if not f.seen and n in in_optimizer and n not in frozen_on_purpose]
    if missing:
        text, groups = describe(missing, numel)
        everything = len(missing) == sum(1 for n in flags if n in in_optimizer)
        verdicts.append(
            Verdict(
                "gradient_flow",
                "error",
                f"{'no' if everything else len(missing)} trainable parameter{'s' if len(missing) != 1 else ''} "
                f"({sum(numel[n] for n in missing):,} values) got {'a' if everything else 'no'} gradient {when}"
                + ("" if everything else f": {text}")
                + ".",
                causes=(
                    "the graph is cut before them: .detach(), .data, .item()/.numpy() round trips, torch.no_grad()",
                    "layers created but never used in forward",
                    "a frozen part left trainable (set requires_grad=False if that is the intent)",
                ),
                advice=(
                    "follow the output back to these modules and look for the cut",
                    "freeze on purpose with module.requires_grad_(False)",
                ),
                target="no_gradient",
                data={"modules": groups},
            )
        )
    zero = [n for n, f in flags.items() if f.seen and not f.nonzero]
    if zero:
        text, groups = describe(zero, numel)
        verdicts.append(
            Verdict(
                "gradient_flow",
                "warning",
                f"{len(zero)} trainable parameter{'s' if len(zero) != 1 else ''} got only all-zero gradients {when}: {text}.",
                causes=(
                    "dead units (every ReLU input negative)",
                    "a multiplication by zero or a mask that blocks everything",
                    "an unused output whose loss weight is 0",
                ),
                advice=("check the activations feeding these modules", "check masks and loss weights"),
                target="zero_gradient",
                data={"modules": groups},
            )
        )
    nonfinite = [n for n, f in flags.items() if f.seen and not f.finite] if not scaled else []
    if nonfinite:
        text, groups = describe(nonfinite, numel)
        verdicts.append(
            Verdict(
                "gradient_flow",
                "error",
                f"{len(nonfinite)} parameter{'s' if len(nonfinite) != 1 else ''} got NaN or infinite gradients {when}: {text}.",
                causes=(
                    "an exp, log, sqrt or division that overflows or divides by zero",
                    "a learning rate that blows up the weights",
                ),
                advice=("add epsilons/clamps to log, sqrt and divisions", "lower the learning rate"),
                target="nonfinite_gradient",
                data={"modules": groups},
            )
        )
    orphans = [n for n, f in flags.items() if f.seen and n not in in_optimizer]
    if orphans:
        text, groups = describe(orphans, numel)
        verdicts.append(
            Verdict(
                "gradient_flow",
                "warning",
                f"{len(orphans)} parameter{'s' if len(orphans) != 1 else ''} get gradients but belong to no optimizer, "
                f"so they never change: {text}.",
                causes=(
                    "configure_optimizers passes only part of the model (e.g. self.backbone.parameters())",
                    "a layer added after the optimizer was built",
                ),
                advice=(
                    "pass self.parameters() (or every part) to the optimizer",
                    "or freeze these parameters with requires_grad_(False)",
                ),
                target="no_optimizer",
                data={"modules": groups},
            )
        )
    quiet = [n for n in frozen_on_purpose if n in flags and not flags[n].seen and n in in_optimizer]
    if quiet and not verdicts:
        text, _ = describe(quiet, numel)
        verdicts.append(
            Verdict(
                "gradient_flow",
                "info",
                f"{len(quiet)} parameters in eval-mode modules get no gradient (frozen?): {text}.",
            )
        )
    return verdicts


@register(
    "gradient_flow",
    phase="fitted",
    summary="every trainable parameter gets a finite, non-zero gradient and is in an optimizer",
)
def gradient_flow(ctx: PreflightContext) -> list[Verdict]:
    run = ctx.overfit
    if run.detached_loss:
        return [
            Verdict(
                "gradient_flow",
                "error",
                "the loss returned by training_step does not require grad: no parameter can get a gradient.",
                causes=(
                    "the loss computed from .detach()ed tensors, .item()/.numpy() values or under torch.no_grad()",
                    "every parameter frozen (requires_grad=False)",
                ),
                advice=("return the loss tensor itself, built from the model's output",),
                target="detached_loss",
            )
        ]
    if not run.gradients:
        raise Skip("no trainable parameters")
    if run.steps == 0:
        raise Skip(f"no optimisation step ran ({run.stopped})")
    names = {id(p): n for n, p in ctx.module.named_parameters()}
    in_optimizer = {
        names[id(p)] for o in ctx.trainer.optimizers for g in o.param_groups for p in g["params"] if id(p) in names
    }
    modules = dict(ctx.module.named_modules())
    frozen = {
        n for n in run.gradients if not getattr(modules.get(module_of(n).replace("(root)", "")), "training", True)
    }
    scaler = getattr(getattr(ctx.trainer, "precision_plugin", None), "scaler", None)
    return judge_gradient_flow(
        run.gradients, in_optimizer, steps=run.steps, frozen_on_purpose=frozen, scaled=scaler is not None
    )


# --------------------------------------------------------------------------- weight_init
#: ``std(W) * sqrt(fan_in)`` of common schemes: PyTorch's default ~0.58, LeCun 1, He ~1.41, Xavier
#: up to ~1.41. Above this (about 3x He) activations grow layer after layer.
WEIGHT_SCALE_MAX = 4.0
#: Below this, the signal shrinks ~100x per layer (GPT-style std 0.02 on small widths stays above).
WEIGHT_SCALE_MIN = 0.01
#: Too few weights to estimate a standard deviation.
MIN_WEIGHTS = 64
#: Rows (output units) within this relative distance of each other are identical.
SYMMETRY_RTOL = 1e-4


def init_scale(weight: Tensor) -> float:
    """``std(W) * sqrt(fan_in)``: about 1 for fan-in-appropriate initialisations."""
    w = weight.detach().float()
    fan_in = w[0].numel()
    return float(w.std()) * math.sqrt(fan_in)


def identical_units(weight: Tensor) -> bool:
    """Whether every output unit (row) of the weight equals the first one."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    if rows.shape[0] < 2:
        return False
    spread = float((rows - rows[:1]).abs().max())
    return spread <= SYMMETRY_RTOL * float(rows.abs().max()) or spread == 0.0


def weight_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Dense and convolution layers with a trainable weight (fan-in scaled initialisation applies)."""
    for name, m in module.named_modules():
        dense = isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed)
        if dense and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.requires_grad:
            yield name, m


def judge_init_scale(name: str, weight: Tensor) -> Verdict | None:
    if weight.numel() < MIN_WEIGHTS or weight[0].numel() < 4 or float(weight.detach().abs().max()) == 0:
        return None
    scale = init_scale(weight)
    fan_in = weight[0].numel()
    data = {"std": float(weight.detach().float().std()), "fan_in": fan_in, "std_times_sqrt_fan_in": scale}
    if scale > WEIGHT_SCALE_MAX:
        return Verdict(
            "weight_init",
            "warning",
            f"{name} starts with weights of std {data['std']:.3g}, {scale / math.sqrt(2):.1f}x what He "
            f"initialisation gives for its fan-in of {fan_in}: activations grow layer by layer.",
            causes=("an explicit normal_(std=1) or uniform_(-1, 1) initialisation",),
            advice=("use the default or nn.init.kaiming_normal_/xavier_uniform_",),
            target=name,
            data=data,
        )
    if scale < WEIGHT_SCALE_MIN:
        return Verdict(
            "weight_init",
            "warning",
            f"{name} starts with weights of std {data['std']:.3g}, {1 / scale:.0f}x smaller than its fan-in "
            f"of {fan_in} calls for: the signal fades layer by layer.",
            causes=("an initialisation std chosen without the layer's width in mind",),
            advice=("use the default or nn.init.kaiming_normal_/xavier_uniform_",),
            target=name,
            data=data,
        )
    return None


def _symmetric(name: str, units: int, still: bool, steps: int | None) -> Verdict:
    if still:
        message = (
            f"the {units} units of {name} started identical and are still identical after {steps} training "
            "steps: they compute the same feature and always will."
        )
        severity = "error"
    else:
        message = f"the {units} units of {name} start identical (a constant initialisation)."
        severity = "warning"
    return Verdict(
        "weight_init",
        severity,
        message,
        causes=("a constant or zero initialisation of a hidden layer (e.g. nn.init.constant_, zeros_)",),
        advice=("initialise weights randomly (the default, kaiming_normal_, xavier_uniform_)",),
        target=name,
        data={"units": units, "steps": steps},
    )


@register(
    "weight_init",
    phase="fitted",
    summary="initial weight scales suit each layer's fan-in and no layer starts with identical units",
)
def weight_init(ctx: PreflightContext) -> Iterator[Verdict]:
    try:
        run = ctx.overfit
    except Skip:
        run = None
    for name, layer in weight_layers(ctx.module):
        initial = ctx.initial_value(f"{name}.weight")
        if initial is None:
            continue
        verdict = judge_init_scale(name, initial)
        if verdict is not None:
            yield verdict
        if not identical_units(initial):
            continue
        flags = run.gradients.get(f"{name}.weight") if run is not None else None
        if flags is not None and flags.seen and run.steps > 0:
            if identical_units(layer.weight):
                yield _symmetric(name, initial.shape[0], True, run.steps)
        elif flags is None and float(initial.abs().max()) > 0:
            yield _symmetric(name, initial.shape[0], False, None)


__all__ = ["describe", "identical_units", "init_scale", "judge_gradient_flow", "judge_init_scale", "module_of"]
