"""The shell every synthetic data module shares: sizes, seeding, splits, loaders, description."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flightcheck._compat import pl

_SPLITS = ("train", "val", "test")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value: Any, minimum: float, maximum: float | None = None) -> float:
    accepted = f"a number >= {minimum}" + (f" and < {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value >= minimum and (maximum is None or value < maximum)):  # NaN fails too
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


class SyntheticDataModule(pl.LightningDataModule):
    """A ``LightningDataModule`` whose data comes from a known rule, so the answer is known.

    The data is generated in memory the first time it is needed (``setup`` or any of the
    ``*_set`` properties), from ``seed`` alone: the same seed gives identical tensors on every
    machine and every rank, and generation never draws from the global random streams, so
    building the module does not shift the user's training. Every loader, shuffled or not,
    carries its own seeded ``torch.Generator`` for the same reason.

    Subclasses implement :meth:`_draw_task` (the hidden rule's parameters), :meth:`_sample`
    (``n`` samples of it), :meth:`expectations` (what a working model should reach) and
    :meth:`_summary`.

    Args:
        n_train, n_val: samples in the training and validation splits.
        n_test: samples in the test split; ``None`` makes it as large as the validation split.
        batch_size: samples per batch in every loader.
        seed: the seed everything is generated from.
    """

    def __init__(
        self,
        *,
        n_train: int = 512,
        n_val: int = 256,
        n_test: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_train = _check_int("n_train", n_train, 1)
        self.n_val = _check_int("n_val", n_val, 1)
        self.n_test = self.n_val if n_test is None else _check_int("n_test", n_test, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self._sets: dict[str, Dataset] | None = None

    # ------------------------------------------------------------------ generation
    def _draw_task(self, generator: torch.Generator) -> None:
        """Draw the hidden rule's parameters (cluster centres, weights) and keep them on ``self``."""

    def _sample(self, n: int, generator: torch.Generator) -> Sequence[torch.Tensor] | Dataset:
        """``n`` samples of the task: a tuple of tensors (made a ``TensorDataset``) or a ``Dataset``."""
        raise NotImplementedError

    def _build(self) -> dict[str, Dataset]:
        if self._sets is None:
            root = torch.Generator().manual_seed(self.seed)
            # one independent stream per part, so changing n_val leaves the training data as it was
            task_seed, *split_seeds = (int(s) for s in torch.randint(0, 2**62, (1 + len(_SPLITS),), generator=root))
            self._draw_task(torch.Generator().manual_seed(task_seed))
            sizes = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
            sets: dict[str, Dataset] = {}
            for split, split_seed in zip(_SPLITS, split_seeds, strict=True):
                part = self._sample(sizes[split], torch.Generator().manual_seed(split_seed))
                sets[split] = part if isinstance(part, Dataset) else TensorDataset(*part)
            self._sets = sets
        return self._sets

    @property
    def train_set(self) -> Dataset:
        """The training split (generated on first access)."""
        return self._build()["train"]

    @property
    def val_set(self) -> Dataset:
        """The validation split (generated on first access)."""
        return self._build()["val"]

    @property
    def test_set(self) -> Dataset:
        """The test split (generated on first access)."""
        return self._build()["test"]

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        self._build()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._build()[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=0,
            # even an unshuffled loader draws a base seed per epoch, from the global stream
            # unless it has a generator of its own
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # ------------------------------------------------------------------ the known answer
    def expectations(self) -> dict[str, float]:
        """The figures a working model should reach (and the chance level), by name."""
        raise NotImplementedError

    def _summary(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """A short description: the task, the splits, and what a working model should reach."""
        figures = ", ".join(f"{name} {value:.3g}" for name, value in self.expectations().items())
        return (
            f"{type(self).__name__}: {self._summary()}; "
            f"{self.n_train}/{self.n_val}/{self.n_test} train/val/test samples, seed {self.seed}. "
            f"Known answer: {figures}."
        )


class ClassificationAnswers:
    """The known answer shared by the classification modules, given their ``expected_accuracy``
    and ``num_classes`` (classes are exactly balanced)."""

    num_classes: int
    expected_accuracy: float

    @property
    def chance_accuracy(self) -> float:
        """``1 / num_classes``: what a constant answer gets on balanced classes."""
        return 1.0 / self.num_classes

    @property
    def chance_loss(self) -> float:
        """``ln(num_classes)``, the cross-entropy of a uniform prediction: an untrained classifier
        starts about here."""
        return math.log(self.num_classes)

    def expectations(self) -> dict[str, float]:
        return {
            "expected_accuracy": self.expected_accuracy,
            "chance_accuracy": self.chance_accuracy,
            "chance_loss": self.chance_loss,
        }
