"""Pure numpy plans for the GPU kernels: lookup tables and payload offsets.

Every kernel reconstructs a value with the same float32 operations, in the same order,
as the numpy codec (``lynx.dequantize``, ``uniform.dequantize``), and reads each
float32 constant the numpy path would compute from a table built here by that numpy
code. So a kernel's float32 result equals the reference bit for bit, and
:func:`emulate` (the kernel's arithmetic written in numpy) proves the tables on a CPU.

The kernels compute, for the field index ``i`` of an element (the anchor field, or
``anchor << R | residual`` for the full code):

* lynx: ``xn = mu + (sigma + EPS) * lev[i]``, ``x = g_min + (g_scale + EPS) * xn``
* uniform: ``x = min + lev[i] * (scale + EPS)``

where ``lev`` is :func:`level_table` (the signed ``y`` of lynx, ``u / 255`` of uniform).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec import lynx, uniform
from lynxkv.codec.bitpack import unpack
from lynxkv.codec.codes import EPS
from lynxkv.codec.sections import KV
from lynxkv.codec.spec import CodecSpec

__all__ = ["TABLE_SIZE", "Plan", "emulate", "level_table", "make_plan", "meta_tables"]

Part = Literal["anchor", "full"]

#: Every table holds 256 float32 (a field index has at most 8 bits).
TABLE_SIZE = 256


def level_table(spec: CodecSpec, kv: KV, part: Part) -> NDArray[np.float32]:
    """The float32 the reference multiplies by, for each field index (zero-padded)."""
    a_bits, r_bits = spec.anchor_bits, spec.residual_bits
    idx = np.arange(2**a_bits if part == "anchor" else 2 ** (a_bits + r_bits))
    q_field = idx if part == "anchor" else idx >> r_bits
    r_field = (idx & (2**r_bits - 1)).astype(np.uint8)
    out = np.zeros(TABLE_SIZE, dtype=np.float32)
    if spec.kind == "lynx":
        q = np.where(q_field >= 2 ** (a_bits - 1), q_field - 2**a_bits, q_field)
        neg = q < 0
        m = np.where(neg, -q - 1, q)
        alpha = spec.alpha(kv)
        if part == "anchor":
            mag = lynx.anchor_levels(spec, alpha)[m]
        else:
            code = m * 2**r_bits - (r_field.astype(np.int16) - 2 ** (r_bits - 1))
            mag = lynx.full_levels(spec, alpha)[np.clip(code, 0, spec.top_code)]
        out[: idx.size] = np.where(neg, -mag, mag)
    else:
        high = q_field.astype(np.float32) * 2**r_bits
        low = np.float32((2**r_bits - 1) / 2) if part == "anchor" else r_field.astype(np.float32)
        out[: idx.size] = (high + low) / np.float32(255)
    return out


def meta_tables() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """float32 of a u8 ``mu`` field (k / 255, as ``lynx`` divides) and of a u8 ``sigma``."""
    mu = np.arange(TABLE_SIZE, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return mu, lynx.sigma_table()


@dataclass(frozen=True)
class Plan:
    """How one section's anchor payload is laid out, as the kernel reads it.

    Offsets are in bytes from the start of the anchor payload. ``page`` says whether
    there is a page stage (lynx); ``by_token`` whether the chunk metadata is [T, H]
    (else [Q, C]); ``u8`` whether chunk metadata fields are u8 (else f16).
    """

    page: bool
    by_token: bool
    u8: bool
    off_scale: int
    off_mu: int
    off_sigma: int
    off_codes: int


@functools.lru_cache(maxsize=256)
def make_plan(spec: CodecSpec, kv: KV, t: int, heads: int, dim: int) -> Plan:
    """The kernel's view of a lynx or uniform anchor payload of a [T, H, D] tensor
    (cached: it is asked for at every launch)."""
    if spec.kind == "lynx":
        layout = lynx.meta_layout(spec, kv, t, heads, dim)
    elif spec.kind == "uniform":
        layout = uniform.meta_layout(spec, kv, t, heads, dim)
    else:
        raise ValueError("the raw codec has no quantized payload to plan")
    starts = [0]
    for _, dt, shape in layout:
        starts.append(starts[-1] + dt.itemsize * shape[0] * shape[1])
    chunk_dtype, chunk_shape = layout[-1][1], layout[-1][2]
    if spec.kind == "lynx":  # g_min, g_scale, mu, sigma
        return Plan(
            page=True,
            by_token=chunk_shape == (t, heads),
            u8=chunk_dtype == np.dtype(np.uint8),
            off_scale=starts[1],
            off_mu=starts[2],
            off_sigma=starts[3],
            off_codes=starts[4],
        )
    # uniform: min, scale; they play mu and sigma, with no page stage
    return Plan(
        page=False,
        by_token=chunk_shape == (t, heads),
        u8=False,
        off_scale=0,
        off_mu=0,
        off_sigma=starts[1],
        off_codes=starts[2],
    )


def _rows(
    meta: NDArray[np.float32], plan: Plan, spec: CodecSpec, t: int, dim: int
) -> NDArray[np.float32]:
    """Chunk metadata [Q, C] or [T, H] to every element [T, C]."""
    if plan.by_token:
        return np.repeat(meta, dim, axis=1)
    return np.repeat(meta, spec.chunk_tokens, axis=0)[:t]


def emulate(
    spec: CodecSpec,
    kv: KV,
    shape: tuple[int, int, int],
    anchor: bytes,
    residual: bytes | None = None,
) -> NDArray[np.float32]:
    """The kernel's arithmetic in numpy: [T, H, D] float32 (for tests on a CPU)."""
    t, heads, dim = shape
    c = heads * dim
    plan = make_plan(spec, kv, t, heads, dim)
    raw = np.frombuffer(anchor, dtype=np.uint8)
    n = t * c
    idx = unpack(raw[plan.off_codes :].tobytes(), n, spec.anchor_bits).astype(np.int64)
    if residual is not None:
        idx = idx << spec.residual_bits | unpack(residual, n, spec.residual_bits)
    lev = level_table(spec, kv, "anchor" if residual is None else "full")[idx].reshape(t, c)
    chunk_rows = t if plan.by_token else -(-t // spec.chunk_tokens)
    chunk_cols = heads if plan.by_token else c
    count = chunk_rows * chunk_cols

    def chunk_field(off: int) -> NDArray[np.float32]:
        if plan.u8:
            field = raw[off : off + count]
            table = meta_tables()[0] if off == plan.off_mu else meta_tables()[1]
            return table[field].reshape(chunk_rows, chunk_cols)
        f16 = np.frombuffer(raw[off : off + 2 * count].tobytes(), dtype="<f2")
        return f16.astype(np.float32).reshape(chunk_rows, chunk_cols)

    mu = _rows(chunk_field(plan.off_mu), plan, spec, t, dim)
    sigma = _rows(chunk_field(plan.off_sigma), plan, spec, t, dim)
    if not plan.page:
        out: NDArray[np.float32] = mu + lev * (sigma + EPS)
        return out.reshape(shape)
    pages = -(-t // spec.page_tokens)
    page = np.frombuffer(raw[: plan.off_mu].tobytes(), dtype="<f2").astype(np.float32)
    g_min = np.repeat(page[: pages * c].reshape(pages, c), spec.page_tokens, axis=0)[:t]
    g_scale = np.repeat(page[pages * c :].reshape(pages, c), spec.page_tokens, axis=0)[:t]
    xn = mu + (sigma + EPS) * lev
    full: NDArray[np.float32] = g_min + (g_scale + EPS) * xn
    return full.reshape(shape)
