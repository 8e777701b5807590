"""Grouping parameters into layers by their module names, at a chosen depth.

``encoder.layers.3.attn.in_proj_weight`` at depth 2 is the layer ``encoder.layers.3``: a
numeric name part (an index into a ``Sequential`` or ``ModuleList``) belongs to the part
before it, so the blocks of a stack stay apart instead of merging into one ``encoder.layers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def layer_of(param_name: str, depth: int) -> str:
    """The layer a parameter belongs to: its module path cut to ``depth`` named parts.

    A parameter held by the root module itself (``pos_embedding``) is its own layer.

    Example::

        >>> layer_of("net.0.weight", 2)
        'net.0'
        >>> layer_of("backbone.layer1.0.conv1.weight", 2)
        'backbone.layer1.0'
        >>> layer_of("backbone.layer1.0.conv1.weight", 1)
        'backbone'
    """
    parts = param_name.split(".")
    module_path = parts[:-1]
    if not module_path:
        return param_name
    units: list[list[str]] = []
    for part in module_path:
        if part.isdigit() and units:
            units[-1].append(part)
        else:
            units.append([part])
    return ".".join(".".join(unit) for unit in units[:depth])


def group_by_layer(param_names: Iterable[str], depth: int) -> tuple[list[str], list[int]]:
    """``(layer_names, index)``: the layers in first-seen order and each parameter's layer index."""
    layers: dict[str, int] = {}
    index = [layers.setdefault(layer_of(name, depth), len(layers)) for name in param_names]
    return list(layers), index


def common_scope(names: Sequence[str], default: str = "model") -> str:
    """The longest dotted prefix shared by ``names`` (``default`` when they share none).

    Used to give one finding about several layers a stable target: the detached layers
    ``encoder.0`` and ``encoder.1`` are reported together under ``encoder``.
    """
    if not names:
        return default
    if len(names) == 1:
        return names[0]
    split = [n.split(".") for n in names]
    prefix: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix) or default


__all__ = ["common_scope", "group_by_layer", "layer_of"]
