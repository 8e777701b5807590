"""Robust statistics of loss curves: pure functions of ``(steps, values)`` series.

Nothing here knows a Trainer or a threshold; :mod:`flightcheck.checks.curves` judges what
these functions measure. Losses can be negative (log-likelihoods) or sit near zero, so no
function divides by a loss value: scales come from the spread of the series itself or from
differences between two of its levels.

Mini-batch losses are heavy-tailed (one hard batch is many times the typical one), so
levels are medians, spreads are median absolute deviations or inter-quartile ranges, and
trends are Theil–Sen slopes (the median of pairwise slopes), which a few wild points do not
move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: 1.4826 × MAD estimates the standard deviation of Gaussian noise.
MAD_TO_SIGMA = 1.4826
#: The standard error of a median of n Gaussian points is ~1.2533 σ/√n (√(π/2)).
MEDIAN_SE_FACTOR = 1.2533

ArrayLike = Sequence[float] | np.ndarray


def finite_series(steps: ArrayLike, values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Float64 copies of ``steps`` and ``values`` without the non-finite values.

    NaN/Inf losses are the non-finite guard's business; a curve is read from its finite points.
    """
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"steps and values must have the same length, got {s.shape[0]} and {v.shape[0]}")
    keep = np.isfinite(v) & np.isfinite(s)
    return s[keep], v[keep]


def robust_scale(values: ArrayLike) -> float:
    """The median absolute deviation scaled to a Gaussian σ (0 for fewer than two points)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return 0.0
    return float(MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))))


def running_median(values: ArrayLike, width: int) -> np.ndarray:
    """Centred running median of an odd ``width`` (even widths are made odd).

    Near the ends, where the window would stick out, the first and last full window's median
    is repeated: a single noisy first or last point never stands for the curve's level.
    A series shorter than the window gets its overall median.
    """
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    half = max(int(width) // 2, 0)
    if n == 0 or half == 0:
        return v.copy()
    if n < 2 * half + 1:
        return np.full(n, float(np.median(v)))
    inner = np.median(np.lib.stride_tricks.sliding_window_view(v, 2 * half + 1), axis=1)
    return np.concatenate([np.full(half, inner[0]), inner, np.full(half, inner[-1])])


def smoothing_width(n: int) -> int:
    """An odd running-median width for a series of ``n`` points: ~4% of it, 5 to 51 points."""
    width = int(np.clip(n // 25, 5, 51))
    return width if width % 2 else width + 1


def noise_scale(values: ArrayLike, width: int = 5) -> float:
    """Point-to-point noise: the robust spread of the residuals around a short running median.

    A short window follows the curve's bends, so what remains is the mini-batch noise.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 3:
        return 0.0
    return robust_scale(v - running_median(v, width))


def level_noise(values: ArrayLike, points: int) -> float:
    """The standard error of a ``points``-point median level, measured on the series itself.

    The series is cut into blocks of ``points``; the spread of the block medians around
    their own running median is the error. Losses wander (the weights drift), so their noise
    is correlated from step to step and the independent-noise formula ``1.25 σ/√n`` is too
    optimistic; this one is not. Falls back to that formula with fewer than five blocks.
    """
    v = np.asarray(values, dtype=np.float64)
    points = max(int(points), 1)
    blocks = v.size // points
    iid = MEDIAN_SE_FACTOR * noise_scale(v) / np.sqrt(points)
    if blocks < 5:
        return float(iid)
    medians = np.median(v[v.size - blocks * points :].reshape(blocks, points), axis=1)
    return float(max(robust_scale(medians - running_median(medians, 5)), iid))


def block_medians(steps: ArrayLike, values: ArrayLike, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The series cut into consecutive blocks of ``len // blocks`` points (so at least
    ``blocks`` and fewer than ``2 * blocks`` of them; the few oldest points that do not fill a
    block are left out), each reduced to its median step and value."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.size <= blocks:
        return s.copy(), v.copy()
    size = s.size // blocks
    blocks = s.size // size
    keep = blocks * size
    return (
        np.median(s[-keep:].reshape(blocks, size), axis=1),
        np.median(v[-keep:].reshape(blocks, size), axis=1),
    )


def theil_sen(steps: ArrayLike, values: ArrayLike, max_points: int = 64) -> tuple[float, float]:
    """``(slope, intercept)`` of the Theil–Sen line: the median of the pairwise slopes.

    Robust to up to ~29% wild points. Long series are first reduced to ``max_points`` block
    medians, which keeps the cost bounded (the pairwise slopes are quadratic).
    """
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if s.size < 2:
        return 0.0, float(v[0]) if v.size else 0.0
    if s.size > max_points:
        s, v = block_medians(s, v, max_points)
    i, j = np.triu_indices(s.size, k=1)
    dx = s[j] - s[i]
    keep = dx != 0
    if not keep.any():
        return 0.0, float(np.median(v))
    slope = float(np.median((v[j] - v[i])[keep] / dx[keep]))
    intercept = float(np.median(v - slope * s))
    return slope, intercept


def level_shift(values: ArrayLike, noise: float | None = None) -> tuple[float, float]:
    """``(change, standard_error)`` between the first and the last third of a series.

    ``change`` is the median of the last third minus the median of the first; the standard
    error is that of a difference of two medians of noise ``noise`` (estimated when not
    given). ``change / standard_error`` is a z-score for "the level moved".
    """
    v = np.asarray(values, dtype=np.float64)
    k = v.size // 3
    if k < 1:
        return 0.0, float("inf")
    sigma = noise_scale(v) if noise is None else float(noise)
    change = float(np.median(v[-k:]) - np.median(v[:k]))
    return change, MEDIAN_SE_FACTOR * sigma * float(np.sqrt(2.0 / k))


def slope_z(steps: ArrayLike, values: ArrayLike, noise: float | None = None) -> tuple[float, float]:
    """``(change over the span, z-score)`` of the Theil–Sen trend of a series.

    The change is the fitted line's rise from the first to the last step; its standard
    error, for independent noise of scale ``noise``, is σ·√(12/n) (that of a least-squares
    slope times the span). Correlated noise makes the z-score optimistic, which is why the
    checks ask for large ones.
    """
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if s.size < 3:
        return 0.0, 0.0
    slope, _ = theil_sen(s, v)
    change = slope * float(s[-1] - s[0])
    sigma = noise_scale(v) if noise is None else float(noise)
    se = sigma * float(np.sqrt(12.0 / s.size))
    if se <= 0.0:
        return change, 0.0 if change == 0.0 else float(np.sign(change)) * float("inf")
    return change, change / se


def relative_progress(initial: float, now: float, floor: float) -> float:
    """The fraction of the way from ``initial`` down to ``floor`` covered at ``now``.

    0 means no progress, 1 means the floor is reached, negative means worse than at the
    start. Scaled by the distance from the initial loss, never by the loss value itself, so
    it holds for negative losses too. ``nan`` when the floor is not below the initial loss.
    """
    gap = float(initial) - float(floor)
    if not gap > 0.0:
        return float("nan")
    return (float(initial) - float(now)) / gap


def best_index(values: ArrayLike, width: int | None = None) -> int:
    """The index of the lowest point of the running-median-smoothed series (first one on ties)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("best_index of an empty series")
    smooth = running_median(v, smoothing_width(v.size) if width is None else width)
    return int(np.argmin(smooth))


def autocorrelation(values: ArrayLike, max_lag: int) -> np.ndarray:
    """Sample autocorrelation at lags ``1..max_lag`` (by FFT; zeros for a constant series)."""
    v = np.asarray(values, dtype=np.float64)
    max_lag = int(min(max_lag, v.size - 1))
    if max_lag < 1:
        return np.zeros(0)
    d = v - v.mean()
    denom = float(np.dot(d, d))
    if denom <= 0.0:
        return np.zeros(max_lag)
    size = 1 << int(np.ceil(np.log2(2 * v.size)))
    spectrum = np.fft.rfft(d, size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), size)[1 : max_lag + 1]
    return acov / denom


def periodic_trend_width(n: int) -> int:
    """A running-median width (about a third of ``n``, 7 to 255) for removing the trend
    under a repeating pattern. It is 3 modulo 4, so a window centred on a point of a zig-zag
    holds fewer points of that point's parity than of the other, and the zig-zag is not
    taken for the trend."""
    width = int(np.clip(n // 3, 7, 255))
    return width - (width % 4) + 3 if width % 4 != 3 else width


def phase_swing(values: ArrayLike, period: int) -> float:
    """The peak-to-trough size of a pattern repeating every ``period`` points: the range of
    the per-phase medians of the detrended series."""
    v = np.asarray(values, dtype=np.float64)
    if period < 2 or v.size < 2 * period:
        return 0.0
    residuals = v - running_median(v, periodic_trend_width(v.size))
    phases = [np.median(residuals[k::period]) for k in range(period)]
    return float(max(phases) - min(phases))


def repeating_pattern(values: ArrayLike, min_strength: float, min_lag: int = 2) -> tuple[int, float, float]:
    """``(period, strength, swing)`` of the largest pattern that repeats in a series.

    Lags from ``min_lag`` to a third of the series (so three periods are seen) whose
    autocorrelation, once the slow trend is removed, reaches ``min_strength`` are candidate
    periods; the one whose pattern swings most (:func:`phase_swing`) wins. Mini-batch noise
    from shuffled data has no period (autocorrelation ~0 at every lag); a zig-zag has period
    2, a loader that does not shuffle repeats every epoch, a corrupted batch every k steps
    repeats every k. ``(0, strongest autocorrelation, 0.0)`` when no lag qualifies.
    """
    v = np.asarray(values, dtype=np.float64)
    max_lag = v.size // 3
    if max_lag < min_lag:
        return 0, 0.0, 0.0
    acf = autocorrelation(v - running_median(v, periodic_trend_width(v.size)), max_lag)[min_lag - 1 :]
    lags = np.flatnonzero(acf >= min_strength)
    if lags.size == 0:
        return 0, float(acf.max()) if acf.size else 0.0, 0.0
    # The strongest few candidates are enough: multiples of the period score alike.
    lags = lags[np.argsort(acf[lags])[::-1][:8]]
    swings = np.array([phase_swing(v, int(k) + min_lag) for k in lags])
    # Multiples of the period swing alike: the shortest lag with (nearly) the largest swing.
    best = min(np.flatnonzero(swings >= 0.9 * swings.max()), key=lambda i: lags[i])
    return int(lags[best]) + min_lag, float(acf[lags[best]]), float(swings[best])


class SeriesBuffer:
    """A bounded ``(steps, values)`` history: recent points kept exactly, old ones coarsened.

    When the buffer holds more than ``capacity`` points, its older half is coarsened by
    averaging neighbouring pairs, so a run of any length keeps its whole shape in bounded
    memory while the recent window the checks judge stays at full resolution.

    Example::

        buf = SeriesBuffer(capacity=1024)
        buf.extend([1, 2, 3], [0.9, 0.8, 0.85])
        steps, values = buf.arrays()
    """

    def __init__(self, capacity: int = 4096) -> None:
        if not isinstance(capacity, int) or capacity < 16:
            raise ValueError(f"capacity must be an int >= 16, got {capacity!r}")
        self.capacity = capacity
        self._steps: list[float] = []
        self._values: list[float] = []
        #: how many original points the oldest ``coarse`` points stand for (for the record)
        self.coarsened = 0

    def __len__(self) -> int:
        return len(self._values)

    def extend(self, steps: ArrayLike, values: ArrayLike) -> None:
        s, v = finite_series(steps, values)
        self._steps.extend(s.tolist())
        self._values.extend(v.tolist())
        while len(self._values) > self.capacity:
            self._coarsen()

    def _coarsen(self) -> None:
        half = len(self._values) // 2
        half -= half % 2
        old_s = np.asarray(self._steps[:half]).reshape(-1, 2).mean(axis=1)
        old_v = np.asarray(self._values[:half]).reshape(-1, 2).mean(axis=1)
        self._steps = old_s.tolist() + self._steps[half:]
        self._values = old_v.tolist() + self._values[half:]
        self.coarsened += half // 2

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self._steps, dtype=np.float64), np.asarray(self._values, dtype=np.float64)

    def last_step(self) -> float | None:
        return self._steps[-1] if self._steps else None

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "steps": list(self._steps), "values": list(self._values),
                "coarsened": self.coarsened}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = [float(x) for x in state.get("steps", [])]
        self._values = [float(x) for x in state.get("values", [])]
        self.coarsened = int(state.get("coarsened", 0))


__all__ = [
    "SeriesBuffer",
    "best_index",
    "block_medians",
    "finite_series",
    "level_noise",
    "autocorrelation",
    "level_shift",
    "noise_scale",
    "periodic_trend_width",
    "repeating_pattern",
    "phase_swing",
    "relative_progress",
    "robust_scale",
    "running_median",
    "slope_z",
    "smoothing_width",
    "theil_sen",
]
