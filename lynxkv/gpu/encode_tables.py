"""Pure numpy plans for the GPU encoder: decision tables and the device output layout.

The encoder's two transcendental steps are monotone functions of one float32:

* the lynx magnitude code ``I = magnitude_codes(|y|)`` (log companding, rounded);
* the u8 chunk scale field ``k = sigma_fields(spread)`` (a log2, rounded up).

Rather than re-deriving them with the GPU's own ``log1pf`` / ``log2f`` (whose last bit
differs from numpy's), the kernel reads *thresholds* found here by bisection over the
float32 bit patterns of numpy's own function: ``thr[k]`` is the smallest float32 at
which the function reaches ``k``, so ``f(a) = max {k : thr[k] <= a}``. Where numpy's
function is monotone (everywhere but a few last-bit glitches of its SIMD log) the GPU's
field equals numpy's exactly; :func:`magnitude_from_thresholds` is that rule in numpy,
for tests on a CPU.

One table read a value is enough: the kernel estimates the function's argument ``e``
(whose steps are at ``k - 1/2``) with the GPU's approximate log2 and takes
``f = floor(e)``; the field is ``f`` or ``f + 1``, whichever ``thr[f + 1]`` says, as long
as the estimate is within 1/2 of ``e`` (:func:`magnitude_estimate`, :func:`sigma_estimate`
model it for the tests, which allow ``ESTIMATE_ERROR``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec import lynx
from lynxkv.codec.sections import KV, payload_size
from lynxkv.codec.spec import CodecSpec

__all__ = [
    "ALIGN",
    "CODE_TABLE",
    "ESTIMATE_ERROR",
    "TABLES",
    "Regions",
    "certain_margin",
    "code_thresholds",
    "encode_tables",
    "magnitude_estimate",
    "magnitude_estimate_error",
    "magnitude_from_thresholds",
    "magnitude_scale",
    "regions",
    "sigma_estimate",
    "sigma_thresholds",
]

#: Entries of the code threshold table (a lynx top code is at most 126).
CODE_TABLE = 128
#: float32 entries of the kernel's table: code thresholds, sigma thresholds, sigma values.
TABLES = CODE_TABLE + 256 + 256
#: Error of the kernel's estimates the tests allow (the window is 1/2 each way; the rest
#: is margin for numpy's own float32 rounding), and gpu_support half of it.
ESTIMATE_ERROR = 0.25
#: Bound of lg2.approx.f32's error (PTX ISA: 2^-22.6 absolute in [0.5, 2], 2^-22
#: relative elsewhere), taken as 2^-21 absolute per unit of |log2|, plus 2^-22 relative
#: error of its argument 1 + (alpha / s) |a| (rcp.approx's ulp, alpha / s and the FMA
#: rounded: the kernel never forms y = a / s).
_LG2_ERROR = 2.0**-21
#: Alignment of every code plane in the device output buffer (bytes).
ALIGN = 16
_ONE = 0x3F800000  # float32 1.0
_MAX = 0x7F7FFFFF  # largest finite float32


def _bisect(
    f: Callable[[NDArray[np.float32]], NDArray[np.integer]], targets: NDArray[np.int64], hi: int
) -> NDArray[np.float32]:
    """For each target k, the smallest non-negative float32 x <= bits ``hi`` with f(x) >= k
    (f is evaluated on whole arrays, as the encoder evaluates it)."""
    lo_b = np.zeros(targets.shape, dtype=np.int64)
    hi_b = np.full(targets.shape, hi, dtype=np.int64)
    while (lo_b < hi_b).any():
        mid = (lo_b + hi_b) // 2
        ok = f(mid.astype(np.uint32).view(np.float32)).astype(np.int64) >= targets
        hi_b = np.where(ok, mid, hi_b)
        lo_b = np.where(ok, lo_b, mid + 1)
    out: NDArray[np.float32] = lo_b.astype(np.uint32).view(np.float32)
    return out


@functools.cache
def code_thresholds(spec: CodecSpec, kv: KV) -> NDArray[np.float32]:
    """[CODE_TABLE] float32: ``thr[k]`` for k in [0, M], then +inf (``M`` the top code)."""
    alpha = spec.alpha(kv)
    top = spec.top_code
    assert top + 2 <= CODE_TABLE
    thr = np.full(CODE_TABLE, np.inf, dtype=np.float32)
    thr[0] = 0.0
    thr[1 : top + 1] = _bisect(
        lambda a: lynx.magnitude_codes(a, spec, alpha), np.arange(1, top + 1), _ONE
    )
    return thr


@functools.cache
def sigma_thresholds() -> NDArray[np.float32]:
    """[256] float32: the smallest spread whose u8 sigma field is k (0 for k = 0)."""
    thr = np.zeros(256, dtype=np.float32)
    thr[1:] = _bisect(lynx.sigma_fields, np.arange(1, 256), _MAX)
    return thr


def encode_tables(spec: CodecSpec, kv: KV) -> NDArray[np.float32]:
    """[TABLES] float32, as the kernel loads them into shared memory."""
    return np.concatenate([code_thresholds(spec, kv), sigma_thresholds(), lynx.sigma_table()])


def magnitude_scale(spec: CodecSpec, kv: KV) -> np.float32:
    """``scale = top / log2(1 + alpha)`` of the kernel's code estimate
    ``floor(log2(1 + alpha * a) * scale)``."""
    return np.float32(spec.top_code * np.log(2.0) / np.log1p(spec.alpha(kv)))


def magnitude_estimate_error(spec: CodecSpec, kv: KV) -> float:
    """Bound, in code steps, of the kernel's code estimate's error (lg2.approx and the
    float32 rounding of its argument) beyond what :func:`magnitude_estimate` models."""
    log_span = max(1.0, float(np.log2(1.0 + spec.alpha(kv))))
    return float(magnitude_scale(spec, kv)) * (_LG2_ERROR * log_span + 2.0**-22 / math.log(2.0))


@functools.cache
def certain_margin(spec: CodecSpec, kv: KV) -> float:
    """How far from a half-integer the kernel's estimate ``e`` must be for its rounding to
    be the code (no table read): numpy's steps lie within ``d_np`` of k - 1/2 in the
    kernel's units (measured here on every threshold: ``e`` of the threshold and of the
    float below it), the estimate within :func:`magnitude_estimate_error` of ``e``, plus
    2^-20 for the rounding of the distance itself. At most 1/2 (then no value is)."""
    thr = code_thresholds(spec, kv)[1 : spec.top_code + 1]
    k = np.arange(1, spec.top_code + 1, dtype=np.float64) - 0.5
    alpha = np.float64(np.float32(spec.alpha(kv)))
    scale = np.float64(magnitude_scale(spec, kv))

    def e(x: NDArray[np.float32]) -> NDArray[np.float64]:
        out: NDArray[np.float64] = np.log2(1.0 + alpha * x.astype(np.float64)) * scale
        return out

    d_np = max(
        0.0, float((e(np.nextafter(thr, np.float32(0))) - k).max()), float((k - e(thr)).max())
    )
    return min(0.5, d_np + magnitude_estimate_error(spec, kv) + 2.0**-20)


def magnitude_estimate(
    a: NDArray[np.float32], spec: CodecSpec, kv: KV, error: float
) -> NDArray[np.int64]:
    """The kernel's ``f`` for ``a``, in float64, its estimate off by ``error`` steps."""
    alpha = np.float64(np.float32(spec.alpha(kv)))
    e = np.log2(1.0 + alpha * a.astype(np.float64)) * np.float64(magnitude_scale(spec, kv))
    out: NDArray[np.int64] = np.floor(e + error).astype(np.int64)
    return out


def sigma_estimate(spread: NDArray[np.float32], error: float) -> NDArray[np.int64]:
    """The kernel's ``f`` for the u8 sigma field of ``spread`` (clamped to [0, 254]: the
    field is at most 255), in float64, its log off by ``error`` steps."""
    with np.errstate(divide="ignore"):
        e = np.log2(spread.astype(np.float64)) * lynx.SIGMA_U8_STEPS + lynx.SIGMA_U8_BIAS
    f = np.floor(e + 0.5 + error)
    out: NDArray[np.int64] = np.clip(np.nan_to_num(f, neginf=0.0), 0, 254).astype(np.int64)
    return out


def magnitude_from_thresholds(a: NDArray[np.float32], spec: CodecSpec, kv: KV) -> NDArray[np.int16]:
    """The kernel's rule for the magnitude code of ``a`` (float32 in [0, 1])."""
    thr = code_thresholds(spec, kv)[: spec.top_code + 1]
    out: NDArray[np.int16] = (np.searchsorted(thr, a, side="right") - 1).astype(np.int16)
    return out


@dataclass(frozen=True)
class Regions:
    """Where one section's payloads go in a job's slice of the device output buffer.

    The anchor payload starts at ``anchor`` so that its code plane (after ``meta``
    bytes of metadata) is ``ALIGN``-aligned; the residual payload at ``residual``.
    A job's slice is ``stride`` bytes.
    """

    meta: int
    anchor_size: int
    residual_size: int
    anchor: int
    residual: int
    stride: int


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def regions(spec: CodecSpec, kv: KV, shape: tuple[int, int, int]) -> Regions:
    """The layout of one section of ``shape`` [T, H, D] (a lynx or uniform codec)."""
    t, heads, dim = shape
    anchor_size = payload_size(spec, "anchor", kv, t, heads, dim)
    residual_size = payload_size(spec, "residual", kv, t, heads, dim)
    codes = -(-t * heads * dim * spec.anchor_bits // 8)
    meta = anchor_size - codes
    pad = (-meta) % ALIGN
    residual = _up(pad + anchor_size)
    return Regions(
        meta=meta,
        anchor_size=anchor_size,
        residual_size=residual_size,
        anchor=pad,
        residual=residual,
        stride=residual + _up(residual_size),
    )
