"""One place for the Lightning import, so the rest of the package never guesses."""

from __future__ import annotations

try:  # the unified package
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

Callback = pl.Callback
LightningModule = pl.LightningModule
Trainer = pl.Trainer

__all__ = ["Callback", "LightningModule", "Trainer", "pl"]
