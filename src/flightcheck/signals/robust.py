"""Robust statistics of short host-side series: medians, MADs and growth over a window.

A mean and a standard deviation are pulled by the very outlier one is looking for; a median
and the median absolute deviation (MAD) are not. Everything here takes plain floats or
arrays already on the host (a monitor moves its figures there once per logging interval)
and ignores NaN, which monitors use for "not measured at this step".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Scales the MAD of normally distributed data to its standard deviation.
MAD_TO_STD = 1.4826


def finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """The finite entries of ``values`` as a float64 array (NaN and inf dropped)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def median_mad(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(median, MAD)`` of the finite entries; ``(nan, nan)`` when there are none."""
    arr = finite(values)
    if arr.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(arr))
    return med, float(np.median(np.abs(arr - med)))


def robust_zscore(value: float, reference: Sequence[float] | np.ndarray, *, log: bool = False,
                  floor: float = 1e-12) -> float:
    """How many robust standard deviations ``value`` lies above the median of ``reference``.

    With ``log=True`` the score is taken on the logarithm of positive values, the natural
    scale of norms, whose noise is multiplicative. ``floor`` keeps a perfectly flat reference
    (MAD 0) from dividing by zero.
    """
    ref = finite(reference)
    if log:
        ref = np.log(ref[ref > 0])
        if value <= 0 or ref.size == 0:
            return float("nan")
        value = float(np.log(value))
    if ref.size == 0:
        return float("nan")
    med, mad = median_mad(ref)
    return (value - med) / max(MAD_TO_STD * mad, floor)


def trailing_medians(values: Sequence[float] | np.ndarray, start: int, window: int) -> np.ndarray:
    """For each index from ``start`` on, the median of the (up to) ``window`` entries before it.

    Vectorised where the window is full, so judging a logging interval's worth of steps
    against their own rolling medians costs one ``np.median`` call, not one per step.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    out = np.full(max(arr.size - start, 0), np.nan)
    for i in range(start, arr.size):
        if i >= window:
            break
        if i > 0:
            out[i - start] = np.median(arr[:i])
    first_full = max(start, window)
    if first_full < arr.size:
        windows = np.lib.stride_tricks.sliding_window_view(arr[first_full - window : arr.size - 1], window)
        out[first_full - start :] = np.median(windows, axis=1)
    return out


def growth_by_part(values: Sequence[float] | np.ndarray, parts: int = 2) -> list[float]:
    """The factor by which a positive series grew across each of ``parts`` consecutive parts.

    ``[2.0, 2.1]`` for a series that doubled in its first half and again in its second: a
    sustained trend. A one-off jump shows up in one part only. Parts share their boundary
    point, so the product of the factors is the growth over the whole series.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size < parts + 1:
        return []
    bounds = np.linspace(0, arr.size - 1, parts + 1).round().astype(int)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        a, b = arr[lo], arr[hi]
        out.append(float(b / a) if a > 0 else float("inf") if b > 0 else float("nan"))
    return out


__all__ = ["MAD_TO_STD", "finite", "growth_by_part", "median_mad", "robust_zscore", "trailing_medians"]
