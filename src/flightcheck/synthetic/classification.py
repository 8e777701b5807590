"""Gaussian-cluster classification whose best possible accuracy is known in closed form."""

from __future__ import annotations

import torch

from flightcheck.synthetic import functional
from flightcheck.synthetic.base import ClassificationAnswers, SyntheticDataModule, _check_float, _check_int


class GaussianClusters(ClassificationAnswers, SyntheticDataModule):
    """Classify points drawn around ``num_classes`` centres: can this classifier learn at all?

    Each class is a unit-variance isotropic Gaussian cloud in ``R^dim``; the centres sit on a
    regular simplex, every pair exactly ``separation`` standard deviations apart, in a random
    orientation. Classes are exactly balanced. Batches are ``(x, y)`` with ``x`` float32
    ``(B, dim)`` and ``y`` int64 class ids ``(B,)``.

    The known answer:

    - ``expected_accuracy`` is the Bayes accuracy, ``∫ φ(z) Φ(z + separation/√2)^(K-1) dz``
      (``Φ(separation/2)`` for two classes). With equal priors and equal spherical covariance
      the optimal decision boundaries are hyperplanes, so plain logistic regression reaches it
      given enough samples, and no model can beat it on fresh data. A validation accuracy well
      above it means the validation set leaks into training; far below it, after training, means
      the model or the loop cannot learn.
    - ``chance_accuracy`` is ``1 / num_classes``, what a constant answer gets.
    - ``chance_loss`` is ``ln(num_classes)``, the cross-entropy of a uniform prediction: where an
      untrained classifier's loss should start.

    Args:
        num_classes: number of classes (at least 2).
        dim: input dimension; at least ``num_classes - 1`` so the centres fit.
        separation: distance between any two class centres in units of the noise's standard
            deviation. The default 4 gives 95.9% Bayes accuracy for three classes: easy enough
            that any working model gets there, noisy enough that 100% is a warning sign.
        n_train, n_val, n_test, batch_size, seed: see :class:`SyntheticDataModule`.

    Example::

        dm = GaussianClusters(num_classes=3, dim=16, seed=0)
        trainer.fit(model, datamodule=dm)
        print(dm.describe())            # ... expected_accuracy 0.959 ...
    """

    def __init__(
        self,
        num_classes: int = 3,
        dim: int = 16,
        separation: float = 4.0,
        *,
        n_train: int = 512,
        n_val: int = 256,
        n_test: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size, seed=seed)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        self.dim = _check_int("dim", dim, 1)
        if self.dim < self.num_classes - 1:
            raise ValueError(
                f"dim must be at least num_classes - 1 = {self.num_classes - 1} so that the class centres "
                f"are equidistant, got dim={dim}"
            )
        self.separation = _check_float("separation", separation, 0.0)
        self.input_shape = (self.dim,)
        self._centers: torch.Tensor | None = None

    def _draw_task(self, generator: torch.Generator) -> None:
        self._centers = functional.simplex_centers(self.num_classes, self.dim, self.separation, generator)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = functional.balanced_labels(n, self.num_classes, generator)
        x = self.centers[y] + torch.randn(n, self.dim, generator=generator)
        return x, y

    @property
    def centers(self) -> torch.Tensor:
        """``(num_classes, dim)`` the class centres (the Bayes rule picks the nearest one)."""
        if self._centers is None:
            self._build()
        assert self._centers is not None
        return self._centers

    def bayes_predict(self, x: torch.Tensor) -> torch.Tensor:
        """The optimal classifier: the class of the nearest centre."""
        return torch.cdist(x.float(), self.centers.to(x.device)).argmin(dim=-1)

    @property
    def expected_accuracy(self) -> float:
        """The Bayes accuracy; a linear classifier reaches it, nothing beats it on fresh data."""
        return functional.simplex_bayes_accuracy(self.num_classes, self.separation)

    def _summary(self) -> str:
        return (
            f"{self.num_classes} balanced Gaussian clusters in {self.dim} dimensions, centres "
            f"{self.separation:g} noise standard deviations apart; x float32 (B, {self.dim}), y int64 (B,)"
        )
