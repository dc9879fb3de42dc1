"""The payload of one section: one layer's K or V, Anchor or Residual stream.

Anchor payload: the codec's metadata arrays, each little-endian and C-ordered, in the
order of ``meta_layout``, then the anchor fields bit-packed (``bitpack``) in [T, H, D]
order. Residual payload: the residual fields bit-packed in the same order. For ``raw``
the anchor payload is the values as 16-bit floats and there is no residual.
"""

from __future__ import annotations

from typing import Literal

import ml_dtypes
import numpy as np
from numpy.typing import NDArray

from lynxkv.codec import lynx, uniform
from lynxkv.codec.bitpack import pack, packed_size, unpack
from lynxkv.codec.codes import Codes
from lynxkv.codec.spec import CodecSpec
from lynxkv.errors import CodecError, FormatError

__all__ = [
    "DTYPES",
    "KV",
    "Part",
    "Stream",
    "decode_tensor",
    "encode_tensor",
    "payload_size",
    "raw_dtype",
]

KV = Literal["k", "v"]
Stream = Literal["anchor", "residual"]
Part = Literal["anchor", "full"]

#: Source dtypes by their header name.
DTYPES: dict[str, np.dtype[np.generic]] = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype("<f2"),
    "f32": np.dtype("<f4"),
}

MetaLayout = list[tuple[str, np.dtype[np.generic], tuple[int, int]]]


def raw_dtype(source: str) -> np.dtype[np.generic]:
    """The 16-bit type the raw codec stores a source dtype in (f32 is kept as bf16)."""
    return DTYPES["f16"] if source == "f16" else DTYPES["bf16"]


def _meta_layout(spec: CodecSpec, kv: KV, t: int, heads: int, dim: int) -> MetaLayout:
    if spec.kind == "lynx":
        return lynx.meta_layout(spec, kv, t, heads, dim)
    if spec.kind == "uniform":
        return uniform.meta_layout(spec, kv, t, heads, dim)
    return []


def payload_size(spec: CodecSpec, stream: Stream, kv: KV, t: int, heads: int, dim: int) -> int:
    """Bytes of a section's payload before any compression."""
    n = t * heads * dim
    if spec.kind == "raw":
        return 2 * n if stream == "anchor" else 0
    if stream == "residual":
        return packed_size(n, spec.residual_bits)
    meta = sum(
        dt.itemsize * shape[0] * shape[1] for _, dt, shape in _meta_layout(spec, kv, t, heads, dim)
    )
    return meta + packed_size(n, spec.anchor_bits)


#: Largest |x| a quantizing codec takes: group minimum and range must fit float16.
MAX_ABS = 30000.0


def _check_input(x: NDArray[np.generic], spec: CodecSpec) -> NDArray[np.float32]:
    if x.ndim != 3 or min(x.shape) < 1:
        raise CodecError(f"expected a [T, H, D] tensor with T, H, D >= 1, got shape {x.shape}")
    x32 = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        raise CodecError("the tensor holds NaN or infinite values")
    if spec.kind != "raw" and np.abs(x32).max() > MAX_ABS:
        raise CodecError(f"values beyond +-{MAX_ABS:g} cannot be encoded (float16 group metadata)")
    return x32


def encode_tensor(
    x: NDArray[np.generic], spec: CodecSpec, kv: KV, source: str
) -> tuple[bytes, bytes]:
    """Anchor and residual payloads of one [T, H, D] tensor (residual ``b""`` for raw)."""
    x32 = _check_input(x, spec)
    t, heads, dim = x32.shape
    if spec.kind == "raw":
        return x32.astype(raw_dtype(source)).tobytes(), b""
    if spec.kind == "lynx":
        codes = lynx.quantize(x32.reshape(t, heads * dim), spec, kv, heads)
    else:
        codes = uniform.quantize(x32, spec, kv)
    meta = b"".join(np.ascontiguousarray(m).tobytes() for m in codes.meta)
    return meta + pack(codes.anchor, spec.anchor_bits), pack(codes.residual, spec.residual_bits)


def parse_codes(
    spec: CodecSpec,
    kv: KV,
    shape: tuple[int, int, int],
    anchor: bytes | memoryview,
    residual: bytes | memoryview | None,
) -> Codes:
    """Split payloads back into metadata arrays and [T, H*D] code planes."""
    t, heads, dim = shape
    n, c = t * heads * dim, heads * dim
    for stream, data in (("anchor", anchor), ("residual", residual)):
        if data is not None and len(data) != payload_size(spec, stream, kv, t, heads, dim):  # type: ignore[arg-type]
            raise FormatError(
                f"{stream} payload of {kv.upper()} is {len(data)} bytes, expected "
                f"{payload_size(spec, stream, kv, t, heads, dim)}"  # type: ignore[arg-type]
            )
    view = memoryview(anchor)
    meta: list[NDArray[np.generic]] = []
    pos = 0
    for _, dt, mshape in _meta_layout(spec, kv, t, heads, dim):
        size = dt.itemsize * mshape[0] * mshape[1]
        meta.append(np.frombuffer(view[pos : pos + size], dtype=dt).reshape(mshape))
        pos += size
    anchor_codes = unpack(view[pos:], n, spec.anchor_bits).reshape(t, c)
    if residual is None:
        residual_codes = np.zeros((0, c), dtype=np.uint8)
    else:
        residual_codes = unpack(residual, n, spec.residual_bits).reshape(t, c)
    return Codes(meta=tuple(meta), anchor=anchor_codes, residual=residual_codes)


def decode_tensor(
    spec: CodecSpec,
    kv: KV,
    shape: tuple[int, int, int],
    source: str,
    anchor: bytes | memoryview,
    residual: bytes | memoryview | None = None,
) -> NDArray[np.float32]:
    """[T, H, D] float32 from the anchor payload alone, or with the residual payload."""
    t, heads, dim = shape
    if spec.kind == "raw":
        if len(anchor) != (expected := 2 * t * heads * dim):
            raise FormatError(f"raw payload of {kv.upper()} is {len(anchor)} bytes, not {expected}")
        values = np.frombuffer(anchor, dtype=raw_dtype(source))
        return values.astype(np.float32).reshape(shape)
    codes = parse_codes(spec, kv, shape, anchor, residual)
    part: Part = "anchor" if residual is None else "full"
    if spec.kind == "lynx":
        flat = lynx.dequantize(codes, spec, kv, part)
    else:
        flat = uniform.dequantize(codes, spec, kv, heads, dim, part)
    return flat.reshape(shape)
