"""The Lynx hierarchical log quantizer (docs/codec.md has the derivation and choices).

Per layer and per K/V, on a [T, C] tensor (C = kv heads x head dim channels):

1. page normalisation per channel over ``page_tokens`` tokens:
   ``xn = (x - g_min) / (g_scale + EPS)`` in [0, 1];
2. chunk isolation per channel over ``chunk_tokens`` tokens:
   ``y = (xn - mu) / (sigma + EPS)`` in [-1, 1];
3. log companding of ``|y|`` to ``I`` in [0, M], sign kept apart;
4. split: anchor ``q`` (sign-aware, ``anchor_bits``), residual ``r`` (the other bits).

Every metadata value is rounded to its stored precision *before* it is used to encode,
so the decoder applies exactly the numbers the encoder used.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec.codes import EPS, Codes, f16_down, f16_up
from lynxkv.codec.spec import CodecSpec

__all__ = [
    "SIGMA_U8_BIAS",
    "SIGMA_U8_STEPS",
    "anchor_levels",
    "dequantize",
    "full_codes",
    "full_levels",
    "magnitude_codes",
    "meta_layout",
    "quantize",
    "sigma_fields",
    "sigma_table",
]

Part = Literal["anchor", "full"]

#: u8 chunk scales are ``sigma = 2 ** ((k - SIGMA_U8_BIAS) / SIGMA_U8_STEPS)``: a 4.4%
#: step, from 3.3e-5 (k = 0) to 2 (k = 255).
SIGMA_U8_BIAS = 239
SIGMA_U8_STEPS = 16


def _pages_chunks(t: int, spec: CodecSpec) -> tuple[int, int]:
    return -(-t // spec.page_tokens), -(-t // spec.chunk_tokens)


def _by_token(spec: CodecSpec, kv: str) -> bool:
    return kv == "v" and spec.v_chunk == "token"


def meta_layout(
    spec: CodecSpec, kv: str, t: int, heads: int, dim: int
) -> list[tuple[str, np.dtype[np.generic], tuple[int, int]]]:
    """Name, dtype and shape of each stored metadata array, in stored order."""
    pages, chunks = _pages_chunks(t, spec)
    c = heads * dim
    chunk_dtype = np.dtype(np.uint8) if spec.chunk_meta == "u8" else np.dtype("<f2")
    chunk_shape = (t, heads) if _by_token(spec, kv) else (chunks, c)
    return [
        ("g_min", np.dtype("<f2"), (pages, c)),
        ("g_scale", np.dtype("<f2"), (pages, c)),
        ("mu", chunk_dtype, chunk_shape),
        ("sigma", chunk_dtype, chunk_shape),
    ]


@functools.cache
def sigma_table() -> NDArray[np.float32]:
    """The 256 chunk scales a u8 ``sigma`` field stands for."""
    k = np.arange(256, dtype=np.float64)
    return (2.0 ** ((k - SIGMA_U8_BIAS) / SIGMA_U8_STEPS)).astype(np.float32)


def _expand(code: NDArray[np.float64], spec: CodecSpec, alpha: float) -> NDArray[np.float64]:
    """Inverse companding: code (float, in units of I) to |y|."""
    result: NDArray[np.float64] = np.expm1(code / spec.top_code * np.log1p(alpha)) / alpha
    return result


@functools.cache
def full_levels(spec: CodecSpec, alpha: float) -> NDArray[np.float32]:
    """|y| for each full magnitude code I in [0, M]."""
    return _expand(np.arange(spec.top_code + 1, dtype=np.float64), spec, alpha).astype(np.float32)


@functools.cache
def anchor_levels(spec: CodecSpec, alpha: float) -> NDArray[np.float32]:
    """|y| reconstructed from the anchor magnitude m alone: the middle, in |y|, of the
    interval of |y| whose codes fall in bucket m (so the worst-case error is smallest)."""
    r = spec.residual_bits
    m = np.arange(2 ** (spec.anchor_bits - 1), dtype=np.float64)
    lo = np.maximum(m * 2**r - 2 ** (r - 1) + 1, 0)
    hi = np.minimum(m * 2**r + 2 ** (r - 1), spec.top_code)
    y_lo = np.clip(_expand(lo - 0.5, spec, alpha), 0.0, 1.0)
    y_hi = np.clip(_expand(hi + 0.5, spec, alpha), 0.0, 1.0)
    return ((y_lo + y_hi) / 2).astype(np.float32)


def _pad_rows(x: NDArray[np.float32], rows: int) -> NDArray[np.float32]:
    """Pad to ``rows`` rows by repeating the last row (min and max are unchanged)."""
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


def _groups(x: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    """[T, C] -> [ceil(T/size), size, C], the short last group padded by repetition."""
    n = -(-x.shape[0] // size)
    return _pad_rows(x, n * size).reshape(n, size, x.shape[1])


def _expand_rows(per_group: NDArray[np.float32], size: int, t: int) -> NDArray[np.float32]:
    return np.repeat(per_group, size, axis=0)[:t]


def _page_meta(
    x: NDArray[np.float32], spec: CodecSpec
) -> tuple[NDArray[np.float16], NDArray[np.float16]]:
    pages = _groups(x, spec.page_tokens)
    g_min = f16_down(pages.min(axis=1))
    g_scale = f16_up(pages.max(axis=1) - g_min.astype(np.float32))
    return g_min, g_scale


def _chunk_groups(
    xn: NDArray[np.float32], spec: CodecSpec, kv: str, heads: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The chunks of ``xn`` [T, C] as [G, n, W] (statistics run over axis 1), and the
    count of real (not padding) entries of each of the G rows."""
    t = xn.shape[0]
    if _by_token(spec, kv):  # [T, H, D] -> [T, D, H]: one chunk per token and head
        dim = xn.shape[1] // heads
        return xn.reshape(t, heads, dim).transpose(0, 2, 1), np.full(t, dim)
    size = spec.chunk_tokens
    chunks = _groups(xn, size)
    return chunks, np.minimum(size, t - size * np.arange(chunks.shape[0]))


def _broadcast_chunks(
    per_chunk: NDArray[np.float32], spec: CodecSpec, kv: str, t: int, c: int
) -> NDArray[np.float32]:
    """Chunk values ([G, W]) to every element ([T, C])."""
    if _by_token(spec, kv):
        return np.repeat(per_chunk, c // per_chunk.shape[1], axis=1)
    return _expand_rows(per_chunk, spec.chunk_tokens, t)


def _chunk_meta(
    chunks: NDArray[np.float32], counts: NDArray[np.int64], spec: CodecSpec
) -> tuple[NDArray[np.generic], NDArray[np.generic], NDArray[np.float32], NDArray[np.float32]]:
    """Stored mu and sigma fields, and the float32 values they stand for."""
    if spec.center == "mean":
        real = (np.arange(chunks.shape[1])[None, :] < counts[:, None])[:, :, None]
        mean = np.where(real, chunks, 0).sum(axis=1) / counts[:, None]
    else:  # the middle of the range: the tightest sigma (chunks pad by repetition)
        mean = (chunks.max(axis=1) + chunks.min(axis=1)) / 2
    if spec.chunk_meta == "u8":
        mu_field: NDArray[np.generic] = np.clip(np.rint(mean * 255), 0, 255).astype(np.uint8)
        mu = mu_field.astype(np.float32) / np.float32(255)
    else:
        mu_field = mean.astype(np.float16)
        mu = mu_field.astype(np.float32)
    spread = np.abs(chunks - mu[:, None, :]).max(axis=1)
    if spec.chunk_meta == "u8":
        sigma_field: NDArray[np.generic] = sigma_fields(spread)
        sigma = sigma_table()[sigma_field]
    else:
        sigma_field = f16_up(spread.astype(np.float32))
        sigma = sigma_field.astype(np.float32)
    return mu_field, sigma_field, mu.astype(np.float32), sigma


def sigma_fields(spread: NDArray[np.float32]) -> NDArray[np.uint8]:
    """The u8 ``sigma`` field of each chunk spread (float32, >= 0): about the smallest k
    whose scale ``sigma_table()[k]`` covers it."""
    with np.errstate(divide="ignore"):
        k = np.ceil(np.log2(spread) * SIGMA_U8_STEPS + SIGMA_U8_BIAS)
    k = np.clip(np.nan_to_num(k, neginf=0.0), 0, 255).astype(np.int64)
    table = sigma_table()
    k = np.where((table[k] < spread) & (k < 255), k + 1, k)  # float rounding guard
    fields: NDArray[np.uint8] = k.astype(np.uint8)
    return fields


def magnitude_codes(a: NDArray[np.float32], spec: CodecSpec, alpha: float) -> NDArray[np.int16]:
    """The magnitude code I of ``a = |y|`` (float32 in [0, 1]): log companding, rounded."""
    compand = np.log1p(np.float32(alpha) * a) / np.float32(np.log1p(alpha))
    codes: NDArray[np.int16] = np.clip(np.rint(compand * spec.top_code), 0, spec.top_code).astype(
        np.int16
    )
    return codes


def _chunk_values(
    meta: tuple[NDArray[np.generic], ...], spec: CodecSpec
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    mu_field, sigma_field = meta[2], meta[3]
    if spec.chunk_meta == "u8":
        return mu_field.astype(np.float32) / np.float32(255), sigma_table()[sigma_field]
    return mu_field.astype(np.float32), sigma_field.astype(np.float32)


def quantize(x: NDArray[np.float32], spec: CodecSpec, kv: str, heads: int = 1) -> Codes:
    """Encode ``x`` [T, C] float32 (finite), K (``"k"``) or V, into metadata, anchor and
    residual fields."""
    alpha = spec.alpha(kv)
    t = x.shape[0]
    a_bits, r_bits = spec.anchor_bits, spec.residual_bits
    g_min, g_scale = _page_meta(x, spec)
    xn = (x - _expand_rows(g_min.astype(np.float32), spec.page_tokens, t)) / (
        _expand_rows(g_scale.astype(np.float32), spec.page_tokens, t) + EPS
    )
    mu_field, sigma_field, mu, sigma = _chunk_meta(*_chunk_groups(xn, spec, kv, heads), spec)
    c = x.shape[1]
    y = (xn - _broadcast_chunks(mu, spec, kv, t, c)) / (
        _broadcast_chunks(sigma, spec, kv, t, c) + EPS
    )
    y = np.clip(y, -1.0, 1.0)
    code = magnitude_codes(np.abs(y), spec, alpha)
    m = (code + (2 ** (r_bits - 1) - 1)) >> r_bits
    q = np.where(y < 0, -(m + 1), m)
    r = m * 2**r_bits - code
    anchor = (q & (2**a_bits - 1)).astype(np.uint8)
    residual = (r + 2 ** (r_bits - 1)).astype(np.uint8)
    return Codes(meta=(g_min, g_scale, mu_field, sigma_field), anchor=anchor, residual=residual)


def _signed_anchor(anchor: NDArray[np.uint8], spec: CodecSpec) -> NDArray[np.int16]:
    q = anchor.astype(np.int16)
    half = 2 ** (spec.anchor_bits - 1)
    return np.where(q >= half, q - 2 * half, q).astype(np.int16)


def full_codes(
    anchor: NDArray[np.uint8], residual: NDArray[np.uint8], spec: CodecSpec
) -> NDArray[np.int16]:
    """The signed full code ``±I`` (negative for negative values, -0 kept as sign via -(I+1)).

    Returned as ``I`` where the value is non-negative and ``-(I + 1)`` where it is
    negative, so that the mapping is one-to-one.
    """
    q = _signed_anchor(anchor, spec)
    neg = q < 0
    m = np.where(neg, -q - 1, q)
    code = m * 2**spec.residual_bits - (residual.astype(np.int16) - 2 ** (spec.residual_bits - 1))
    out: NDArray[np.int16] = np.where(neg, -code - 1, code).astype(np.int16)
    return out


def dequantize(codes: Codes, spec: CodecSpec, kv: str, part: Part) -> NDArray[np.float32]:
    """Reconstruct [T, C] float32 from the anchor alone or from anchor and residual."""
    alpha = spec.alpha(kv)
    t = codes.anchor.shape[0]
    q = _signed_anchor(codes.anchor, spec)
    neg = q < 0
    m = np.where(neg, -q - 1, q)
    if part == "anchor":
        mag = anchor_levels(spec, alpha)[m]
    else:
        code = m * 2**spec.residual_bits - (
            codes.residual.astype(np.int16) - 2 ** (spec.residual_bits - 1)
        )
        mag = full_levels(spec, alpha)[np.clip(code, 0, spec.top_code)]
    y = np.where(neg, -mag, mag)
    mu, sigma = _chunk_values(codes.meta, spec)
    c = codes.anchor.shape[1]
    xn = (
        _broadcast_chunks(mu, spec, kv, t, c) + (_broadcast_chunks(sigma, spec, kv, t, c) + EPS) * y
    )
    g_min = codes.meta[0].astype(np.float32)
    g_scale = codes.meta[1].astype(np.float32)
    out: NDArray[np.float32] = (
        _expand_rows(g_min, spec.page_tokens, t)
        + (_expand_rows(g_scale, spec.page_tokens, t) + EPS) * xn
    )
    return out
