"""Judges of hidden activations on the probe batch: dead units and saturation, per layer.

Each judge takes the history of :class:`ActivationReading` (host-side numbers, one per probe,
oldest first) and returns one :class:`~flightcheck.checks.Verdict` per layer whose condition
held on ``patience`` probes in a row, the latest past the warm-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from flightcheck.checks import Verdict
from flightcheck.findings import Severity

# ---------------------------------------------------------------------------- thresholds

#: A ReLU-family unit is dead when its pre-activation is never positive on the probe batch;
#: a layer is reported when at least this share of its units is dead. Healthy ReLU networks
#: keep a minority of units silent on any one batch (sparse features, a few true casualties);
#: half of a layer gone is half its width wasted, and it does not come back by itself.
DEAD_UNITS_FRACTION = 0.5
#: A layer's units must each have been seen on at least this many values (samples x positions)
#: before "never fired" means dead: a unit that fires on half of its inputs stays silent on 8
#: of them with a chance of 1/256, while on a single sample half of a healthy layer is silent.
DEAD_UNITS_MIN_VALUES = 8
#: LeakyReLU counts as ReLU-like only below this negative slope: at 1e-3 a unit that is never
#: positive passes a thousandth of the gradient, dead in practice; the default 0.01 exists to
#: keep units alive and is not judged.
LEAKY_DEAD_SLOPE = 1e-3

#: A pre-activation is in the flat tail where the non-linearity's slope is under 1% of its
#: peak: |x| > 3 for tanh (1 - tanh(3)^2 = 0.0099) and |x| > 6 for the sigmoid, which is a
#: tanh of x / 2.
TANH_TAIL = 3.0
SIGMOID_TAIL = 6.0
#: A layer is saturated when at least this share of its pre-activations sits in the tails:
#: most of its gradient is then gone. Healthy tanh layers sit at a few percent; the output
#: layer of a confident classifier is not judged (its saturation is its confidence).
SATURATION_FRACTION = 0.5

#: Consecutive probes a condition must hold on before it is reported.
DEFAULT_PATIENCE = 3


@dataclasses.dataclass(frozen=True)
class ActivationReading:
    """The activations of one probe pass.

    Args:
        step: the trainer's global step.
        samples: the probe batch's size.
        dead: per ReLU-family layer ``(dead units, units)``.
        saturated: per tanh/sigmoid layer the share of pre-activations in the flat tails.
        values: per ReLU-family layer how many values each unit was seen on (samples times
            positions: tokens, pixels); the probe's sample count when missing.
    """

    step: int
    samples: int = 0
    dead: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    saturated: Mapping[str, float] = dataclasses.field(default_factory=dict)
    values: Mapping[str, int] = dataclasses.field(default_factory=dict)


def _window(readings: Sequence[ActivationReading], patience: int, warmup_steps: int) -> list[ActivationReading] | None:
    if len(readings) < patience or readings[-1].step < warmup_steps:
        return None
    return list(readings[-patience:])


def dead_fraction(counts: tuple[int, int]) -> float:
    dead, units = counts
    return dead / units if units else 0.0


def is_dead_layer(reading: ActivationReading, layer: str) -> bool:
    counts = reading.dead.get(layer)
    return counts is not None and dead_fraction(counts) >= DEAD_UNITS_FRACTION


def _seen_enough(reading: ActivationReading, layer: str) -> bool:
    seen = reading.values.get(layer) or reading.samples or DEAD_UNITS_MIN_VALUES  # unknown: judged
    return seen >= DEAD_UNITS_MIN_VALUES


def is_saturated_layer(reading: ActivationReading, layer: str) -> bool:
    share = reading.saturated.get(layer)
    return share is not None and share >= SATURATION_FRACTION


def dead_units(
    readings: Sequence[ActivationReading], *, warmup_steps: int = 0, patience: int = DEFAULT_PATIENCE
) -> list[Verdict]:
    """Layers where at least :data:`DEAD_UNITS_FRACTION` of the ReLU-family units never fire on
    the probe batch, on ``patience`` probes in a row. An error when every unit is dead: the
    layer then passes nothing forward and no gradient back."""
    window = _window(readings, patience, warmup_steps)
    if window is None:
        return []
    verdicts = []
    last = window[-1]
    for layer, (dead, units) in last.dead.items():
        if not all(is_dead_layer(r, layer) and _seen_enough(r, layer) for r in window):
            continue
        everything = all(r.dead[layer][0] == r.dead[layer][1] for r in window)
        verdicts.append(
            Verdict(
                "dead_units",
                Severity.ERROR if everything else Severity.WARNING,
                f"{dead} of {units} units ({dead / units:.0%}) of {layer} never fired on the {last.samples}-sample "
                f"probe batch over {patience} probes (steps {window[0].step}-{last.step}).",
                causes=(
                    "learning rate too high: a large update pushed the units' inputs below zero for every sample",
                    "initialisation or bias that starts units negative (a large negative bias, a non-He init)",
                    "inputs on a large or shifted scale (not normalised)",
                ),
                advice=(
                    "lower the learning rate, or add warm-up",
                    "use He (kaiming) initialisation and zero biases; add a normalisation layer before the activation",
                    "try LeakyReLU or GELU, which never stop passing gradient",
                ),
                target=layer,
                data={
                    "steps": [r.step for r in window],
                    "dead_units": dead,
                    "units": units,
                    "dead_fraction": [dead_fraction(r.dead[layer]) for r in window],
                },
            )
        )
    return verdicts


def saturation(
    readings: Sequence[ActivationReading], *, warmup_steps: int = 0, patience: int = DEFAULT_PATIENCE
) -> list[Verdict]:
    """Layers where at least :data:`SATURATION_FRACTION` of the tanh/sigmoid pre-activations sit
    in the flat tails, on ``patience`` probes in a row."""
    window = _window(readings, patience, warmup_steps)
    if window is None:
        return []
    verdicts = []
    last = window[-1]
    for layer, share in last.saturated.items():
        if not all(is_saturated_layer(r, layer) for r in window):
            continue
        verdicts.append(
            Verdict(
                "saturation",
                Severity.WARNING,
                f"{share:.0%} of the pre-activations of {layer} sit in the flat tails of the non-linearity, where "
                f"its slope is under 1% of its peak, over {patience} probes (steps {window[0].step}-{last.step}).",
                causes=(
                    "weights initialised too large for tanh/sigmoid (use Xavier/Glorot initialisation)",
                    "inputs not normalised, so pre-activations start far from zero",
                    "learning rate too high, pushing weights to large values",
                ),
                advice=(
                    "initialise with Xavier/Glorot and normalise the inputs",
                    "add a normalisation layer (LayerNorm, BatchNorm) before the non-linearity",
                    "lower the learning rate; consider ReLU-family activations for hidden layers",
                ),
                target=layer,
                data={"steps": [r.step for r in window], "saturated_fraction": [r.saturated[layer] for r in window]},
            )
        )
    return verdicts


__all__ = [
    "DEAD_UNITS_FRACTION",
    "DEAD_UNITS_MIN_VALUES",
    "DEFAULT_PATIENCE",
    "LEAKY_DEAD_SLOPE",
    "SATURATION_FRACTION",
    "SIGMOID_TAIL",
    "TANH_TAIL",
    "ActivationReading",
    "dead_fraction",
    "dead_units",
    "is_dead_layer",
    "is_saturated_layer",
    "saturation",
]
