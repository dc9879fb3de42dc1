"""The quantized form of one tensor, shared by the quantizers and the section layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["EPS", "Codes", "f16_down", "f16_up"]

#: Added to every scale before dividing by it, so that a constant group gives codes of 0.
EPS = np.float32(1e-6)


@dataclass(frozen=True)
class Codes:
    """Metadata arrays (in their stored order) and the two code planes of one tensor.

    ``anchor`` and ``residual`` are [T, H*D] uint8 arrays of unsigned fields of
    ``anchor_bits`` and ``residual_bits`` bits, exactly as they are bit-packed.
    """

    meta: tuple[NDArray[np.generic], ...]
    anchor: NDArray[np.uint8]
    residual: NDArray[np.uint8]


def f16_down(x: NDArray[np.float32]) -> NDArray[np.float16]:
    """Round to float16 towards minus infinity (so a rounded minimum stays a lower bound)."""
    y = x.astype(np.float16)
    low = y.astype(np.float32) > x
    y[low] = np.nextafter(y[low], np.float16(-np.inf))
    return y


def f16_up(x: NDArray[np.float32]) -> NDArray[np.float16]:
    """Round to float16 towards plus infinity (so a rounded range still covers its values)."""
    y = x.astype(np.float16)
    high = y.astype(np.float32) < x
    y[high] = np.nextafter(y[high], np.float16(np.inf))
    return y
