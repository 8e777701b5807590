"""Regression on a known function with known noise, so the lowest reachable error is known."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flightcheck.synthetic.base import SyntheticDataModule, _check_float, _check_int

_NAMED_FUNCTIONS = ("linear", "sine")
# the sine's frequency along its hidden direction: two periods over ±3 standard deviations,
# so a straight line explains only a small part of it (see KnownFunctionRegression)
_SINE_FREQUENCY = 2.0
# samples used to estimate the figures of a user's function, where no closed form exists
_ESTIMATE_SAMPLES = 16384


class KnownFunctionRegression(SyntheticDataModule):
    """Regress ``y = fn(x) + noise``: the lowest error a model can reach is the noise's variance.

    Inputs are standard normal, ``x ~ N(0, I_dim)``; targets are ``fn(x)`` plus Gaussian noise of
    standard deviation ``noise_std``. Batches are ``(x, y)`` with ``x`` float32 ``(B, dim)`` and
    ``y`` float32 ``(B, 1)`` (``(B, k)`` for a callable with ``k`` outputs). The targets keep their
    trailing dimension on purpose: comparing a ``(B, 1)`` output with ``(B,)`` targets silently
    broadcasts to ``(B, B)``.

    The functions:

    - ``"linear"``: ``y = w·x`` with a random unit vector ``w``, so the signal has unit variance;
    - ``"sine"``: ``y = sin(2 w·x)``, a ridge a straight line cannot follow;
    - a callable taking the ``(N, dim)`` inputs and returning ``(N,)`` or ``(N, k)`` targets.

    The known answer (mean squared error, averaged over outputs):

    - ``noise_floor = noise_std**2``: the error of the true function itself on fresh data. A model
      that can represent ``fn`` gets close to it; no model beats it on held-out data, so a validation
      MSE clearly below it means leakage or a mistake in the metric.
    - ``linear_mse``: the best a linear model can do, ``noise_floor`` for ``"linear"`` and
      ``noise_floor + (1 - e^-8)/2 - 4e^-4 ≈ noise_floor + 0.43`` for ``"sine"`` (with ``u = w·x``
      standard normal, ``Var sin 2u = (1 - e^-8)/2`` and ``Cov(sin 2u, u) = 2e^-2`` by Stein's lemma).
      A model stuck here has lost its nonlinearity.
    - ``baseline_mse = signal_variance + noise_floor``: predicting the mean; an untrained model that
      outputs about zero starts near it.

    For a callable these figures are estimated on 16384 extra draws of the same seed.

    Args:
        fn: ``"linear"``, ``"sine"`` or a callable (see above).
        dim: input dimension.
        noise_std: standard deviation of the target noise (0 for noiseless targets).
        n_train, n_val, n_test, batch_size, seed: see :class:`SyntheticDataModule`.

    Example::

        dm = KnownFunctionRegression("sine", dim=8, noise_std=0.1)
        trainer.fit(model, datamodule=dm)
        # validation MSE near dm.noise_floor (0.01): the model learns; near dm.linear_mse: it is linear
    """

    def __init__(
        self,
        fn: str | Callable[[torch.Tensor], torch.Tensor] = "linear",
        dim: int = 8,
        noise_std: float = 0.1,
        *,
        n_train: int = 512,
        n_val: int = 256,
        n_test: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size, seed=seed)
        if not callable(fn) and fn not in _NAMED_FUNCTIONS:
            raise ValueError(f"fn must be one of {list(_NAMED_FUNCTIONS)} or a callable, got {fn!r}")
        self.fn = fn
        self.dim = _check_int("dim", dim, 1)
        self.noise_std = _check_float("noise_std", noise_std, 0.0)
        self.input_shape = (self.dim,)
        self._direction: torch.Tensor | None = None
        self._estimates: tuple[float, float] | None = None

    # ------------------------------------------------------------------ generation
    def _draw_task(self, generator: torch.Generator) -> None:
        w = torch.randn(self.dim, generator=generator)
        self._direction = w / w.norm()
        if callable(self.fn):
            x = torch.randn(_ESTIMATE_SAMPLES, self.dim, generator=generator)
            self._estimates = _linear_fit_figures(x, self.target_function(x))

    def target_function(self, x: torch.Tensor) -> torch.Tensor:
        """The noiseless targets for inputs ``x`` of shape ``(N, dim)``: ``(N, 1)`` or ``(N, k)``."""
        if callable(self.fn):
            y = torch.as_tensor(self.fn(x))
            if y.dim() == 1:
                y = y.unsqueeze(1)
            if y.dim() != 2 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"fn must map inputs of shape (N, dim) = {tuple(x.shape)} to (N,) or (N, k), "
                    f"got shape {tuple(y.shape)}"
                )
            return y.to(torch.float32)
        if self._direction is None:
            self._build()
        assert self._direction is not None
        u = x.float() @ self._direction.to(x.device)
        y = u if self.fn == "linear" else torch.sin(_SINE_FREQUENCY * u)
        return y.unsqueeze(1)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.dim, generator=generator)
        clean = self.target_function(x)
        return x, clean + self.noise_std * torch.randn(clean.shape, generator=generator)

    # ------------------------------------------------------------------ the known answer
    @property
    def noise_floor(self) -> float:
        """``noise_std**2``: the MSE of the true function; nothing beats it on fresh data."""
        return self.noise_std**2

    @property
    def expected_mse(self) -> float:
        """What a model that can represent ``fn`` should approach: the noise floor."""
        return self.noise_floor

    @property
    def signal_variance(self) -> float:
        """Variance of the noiseless targets (averaged over outputs)."""
        if self.fn == "linear":
            return 1.0
        if self.fn == "sine":
            return (1.0 - math.exp(-2.0 * _SINE_FREQUENCY**2)) / 2.0
        return self._callable_estimates()[0]

    @property
    def linear_mse(self) -> float:
        """The lowest MSE a linear (affine) model reaches."""
        if self.fn == "linear":
            return self.noise_floor
        if self.fn == "sine":
            covariance = _SINE_FREQUENCY * math.exp(-(_SINE_FREQUENCY**2) / 2.0)  # E[u sin(au)] = a e^{-a²/2}
            return self.noise_floor + self.signal_variance - covariance**2
        return self.noise_floor + self._callable_estimates()[1]

    @property
    def baseline_mse(self) -> float:
        """The MSE of predicting the targets' mean, where an untrained model starts."""
        return self.signal_variance + self.noise_floor

    def _callable_estimates(self) -> tuple[float, float]:
        if self._estimates is None:
            self._build()
        assert self._estimates is not None
        return self._estimates

    def expectations(self) -> dict[str, float]:
        return {
            "noise_floor": self.noise_floor,
            "linear_mse": self.linear_mse,
            "baseline_mse": self.baseline_mse,
        }

    def _summary(self) -> str:
        if callable(self.fn):
            name, out = getattr(self.fn, "__name__", "fn"), "(B, 1) or (B, k)"
        else:
            name, out = {"linear": "w·x", "sine": "sin(2 w·x)"}[self.fn], "(B, 1)"
        return (
            f"y = {name} + N(0, {self.noise_std:g}²) with x ~ N(0, I_{self.dim}); "
            f"x float32 (B, {self.dim}), y float32 {out}"
        )


def _linear_fit_figures(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(variance of ``y``, residual variance of its least-squares affine fit on ``x``), per output averaged."""
    x64, y64 = x.double(), y.double()
    design = torch.cat([x64, torch.ones(len(x64), 1, dtype=torch.float64)], dim=1)
    coef = torch.linalg.lstsq(design, y64).solution
    residual = y64 - design @ coef
    return float(y64.var(dim=0, unbiased=False).mean()), float(residual.pow(2).mean())
