"""Facts about a model's modules that several checks share."""

from __future__ import annotations

from torch import nn

#: the modules whose behaviour differs between train and eval mode (dropout, batch norm)
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def parent_name(name: str) -> str:
    """``"encoder.layers.3"`` -> ``"encoder.layers"``; a top-level child's parent is ``""``."""
    return name.rsplit(".", 1)[0] if "." in name else ""
