"""Asymmetric min-max int8, split into high and low bits: the int4 / int8 baselines.

Groups follow KIVI: K per channel over ``chunk_tokens`` consecutive tokens (K has
outlier channels), V per token over one head's ``head_dim`` channels. Each group
stores ``min`` and ``scale = max - min`` in float16; a value's level is
``u = round((x - min) / (scale + EPS) * 255)``. The anchor is ``u >> R`` (the plain
int4 code, read back at the middle of its 16 levels), the residual ``u & (2**R - 1)``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec.codes import EPS, Codes, f16_down, f16_up
from lynxkv.codec.spec import CodecSpec

__all__ = ["dequantize", "levels", "meta_layout", "quantize"]

KV = Literal["k", "v"]
Part = Literal["anchor", "full"]
_TOP = 255


def meta_layout(
    spec: CodecSpec, kv: KV, t: int, heads: int, dim: int
) -> list[tuple[str, np.dtype[np.generic], tuple[int, int]]]:
    """Name, dtype and shape of each stored metadata array, in stored order."""
    shape = (-(-t // spec.chunk_tokens), heads * dim) if _by_channel(spec, kv) else (t, heads)
    return [("min", np.dtype("<f2"), shape), ("scale", np.dtype("<f2"), shape)]


def _by_channel(spec: CodecSpec, kv: KV) -> bool:
    return kv == "k" and spec.groups == "kivi"


def _per_element(
    per_group: NDArray[np.float32], spec: CodecSpec, kv: KV, t: int, dim: int
) -> NDArray[np.float32]:
    """Broadcast group values to [T, C]."""
    if _by_channel(spec, kv):
        return np.repeat(per_group, spec.chunk_tokens, axis=0)[:t]
    return np.repeat(per_group, dim, axis=1)


def quantize(x: NDArray[np.float32], spec: CodecSpec, kv: KV) -> Codes:
    """Encode ``x`` [T, H, D] float32 (finite)."""
    t, heads, dim = x.shape
    flat = x.reshape(t, heads * dim)
    if _by_channel(spec, kv):
        n = -(-t // spec.chunk_tokens)
        pad = np.concatenate([flat, np.repeat(flat[-1:], n * spec.chunk_tokens - t, axis=0)])
        groups = pad.reshape(n, spec.chunk_tokens, heads * dim)
        lo, hi = groups.min(axis=1), groups.max(axis=1)
    else:
        lo, hi = x.min(axis=2), x.max(axis=2)
    g_min = f16_down(lo)
    g_scale = f16_up(hi - g_min.astype(np.float32))
    base = _per_element(g_min.astype(np.float32), spec, kv, t, dim)
    step = _per_element(g_scale.astype(np.float32), spec, kv, t, dim) + EPS
    u = np.clip(np.rint((flat - base) / step * _TOP), 0, _TOP).astype(np.uint8)
    r_bits = spec.residual_bits
    return Codes(meta=(g_min, g_scale), anchor=u >> r_bits, residual=u & np.uint8(2**r_bits - 1))


def levels(codes: Codes, spec: CodecSpec, part: Part) -> NDArray[np.float32]:
    """The (possibly fractional) level each element is read back at."""
    r_bits = spec.residual_bits
    high = codes.anchor.astype(np.float32) * 2**r_bits
    low = np.float32((2**r_bits - 1) / 2) if part == "anchor" else codes.residual.astype(np.float32)
    out: NDArray[np.float32] = high + low
    return out


def dequantize(
    codes: Codes, spec: CodecSpec, kv: KV, heads: int, dim: int, part: Part
) -> NDArray[np.float32]:
    """Reconstruct [T, H*D] float32."""
    t = codes.anchor.shape[0]
    base = _per_element(codes.meta[0].astype(np.float32), spec, kv, t, dim)
    step = _per_element(codes.meta[1].astype(np.float32), spec, kv, t, dim) + EPS
    out: NDArray[np.float32] = base + levels(codes, spec, part) / np.float32(_TOP) * step
    return out
