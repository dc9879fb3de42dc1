"""The object container: preamble, msgpack header, Anchor sections, Residual sections.

``docs/format.md`` specifies it byte by byte. This module builds objects and parses and
validates their headers; ``decoder`` reads the sections incrementally.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash
from numpy.typing import NDArray

from lynxkv.codec.sections import DTYPES, KV, Stream, encode_tensor, payload_size
from lynxkv.codec.spec import CodecSpec
from lynxkv.errors import CodecError, FormatError, MissingDependency

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "PREAMBLE",
    "Bytes",
    "Header",
    "SectionRef",
    "assemble_object",
    "build_object",
    "check_dims",
    "checksum",
    "parse_header",
    "parse_preamble",
]

#: Anything that holds bytes.
Bytes = bytes | bytearray | memoryview

MAGIC = b"LYNXKV"
FORMAT_VERSION = 1
#: magic, format version (u16), header length (u32), header checksum (u64), little-endian.
PREAMBLE = struct.Struct("<6sHIQ")
MAX_HEADER_BYTES = 16 << 20
_LIMITS = {"tokens": 1 << 24, "layers": 1 << 12, "kv_heads": 1 << 12, "head_dim": 1 << 12}


def checksum(data: Bytes) -> int:
    """xxh3_64 of a section's stored bytes (and of the header)."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class SectionRef:
    """Where one section lies in the object and how to check and read it."""

    stream: Stream
    layer: int
    kv: KV
    offset: int
    length: int
    checksum: int
    zstd: bool

    @property
    def end(self) -> int:
        return self.offset + self.length

    def describe(self) -> str:
        return f"{self.stream} section of layer {self.layer} {self.kv.upper()}"


@dataclass(frozen=True)
class Header:
    """The decoded, validated header of an object."""

    model: str
    tokens: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    codec: CodecSpec
    sections: tuple[SectionRef, ...]
    anchor_end: int
    total: int
    header_end: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """[T, H, D] of every K and V tensor."""
        return (self.tokens, self.kv_heads, self.head_dim)

    def payload_size(self, ref: SectionRef) -> int:
        return payload_size(self.codec, ref.stream, ref.kv, *self.shape)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description (``lynxkv inspect``)."""
        elements = 2 * self.layers * self.tokens * self.kv_heads * self.head_dim
        anchor_bytes = sum(s.length for s in self.sections if s.stream == "anchor")
        residual_bytes = sum(s.length for s in self.sections if s.stream == "residual")
        return {
            "format": FORMAT_VERSION,
            "model": self.model,
            "tokens": self.tokens,
            "layers": self.layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "codec": self.codec.to_dict(),
            "header_end": self.header_end,
            "anchor_end": self.anchor_end,
            "total": self.total,
            "streams": {
                "anchor": {"bytes": anchor_bytes, "bits_per_element": 8 * anchor_bytes / elements},
                "residual": {
                    "bytes": residual_bytes,
                    "bits_per_element": 8 * residual_bytes / elements,
                },
                "all": {"bytes": self.total, "bits_per_element": 8 * self.total / elements},
            },
            "sections": [
                {
                    "stream": s.stream,
                    "layer": s.layer,
                    "kv": s.kv,
                    "offset": s.offset,
                    "length": s.length,
                    "checksum": f"{s.checksum:016x}",
                    "zstd": s.zstd,
                }
                for s in self.sections
            ],
        }


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise MissingDependency("zstandard", "server") from exc
    return zstandard


def _compress(payload: Bytes, enabled: bool) -> tuple[Bytes, bool]:
    """zstd-compress a payload when enabled, keeping it plain where that is not smaller."""
    if not enabled:
        return payload, False
    packed: bytes = _zstd().ZstdCompressor(level=3).compress(payload)
    return (packed, True) if len(packed) < len(payload) else (payload, False)


def source_dtype(array: NDArray[Any]) -> str:
    for name, dt in DTYPES.items():
        if array.dtype == dt:
            return name
    raise CodecError(f"unsupported dtype {array.dtype}; expected bfloat16, float16 or float32")


def _named(k: NDArray[Any], v: NDArray[Any]) -> tuple[tuple[KV, NDArray[Any]], ...]:
    return (("k", k), ("v", v))


def _section_order(layers: int, with_residual: bool) -> list[tuple[Stream, int, KV]]:
    streams: list[Stream] = ["anchor", "residual"] if with_residual else ["anchor"]
    return [(s, layer, kv) for s in streams for layer in range(layers) for kv in ("k", "v")]


def check_dims(shape: tuple[int, ...], layers: int) -> None:
    """CodecError unless ``shape`` is a [T, H, D] and every size is within the format's limits."""
    if len(shape) != 3:
        raise CodecError(f"expected [T, H, D] tensors, got shape {shape}")
    for (name, limit), size in zip(
        _LIMITS.items(), (shape[0], layers, shape[1], shape[2]), strict=True
    ):
        if not 1 <= size <= limit:
            raise CodecError(f"{name} must be in [1, {limit}], got {size}")


def build_object(
    kv: Sequence[tuple[NDArray[Any], NDArray[Any]]], codec: CodecSpec, *, model: str = ""
) -> bytes:
    """Encode one object from per-layer (K, V) tensors, each [T, H, D] bf16, fp16 or fp32."""
    if not kv:
        raise CodecError("no layers to encode")
    shape = kv[0][0].shape
    dtype = source_dtype(kv[0][0])
    for i, (k, v) in enumerate(kv):
        for name, t in (("K", k), ("V", v)):
            if t.shape != shape or t.dtype != kv[0][0].dtype:
                raise CodecError(
                    f"layer {i} {name} is {t.dtype}{list(t.shape)}; every tensor must be "
                    f"{kv[0][0].dtype}{list(shape)}"
                )
    check_dims(shape, len(kv))
    payloads: dict[tuple[Stream, int, KV], Bytes] = {}
    for layer, (k, v) in enumerate(kv):
        for name, tensor in _named(k, v):
            anchor, residual = encode_tensor(tensor, codec, name, dtype)
            payloads["anchor", layer, name] = anchor
            payloads["residual", layer, name] = residual
    return assemble_object(payloads, codec, shape=shape, layers=len(kv), dtype=dtype, model=model)


def assemble_object(
    payloads: Mapping[tuple[Stream, int, KV], Bytes],
    codec: CodecSpec,
    *,
    shape: tuple[int, int, int],
    layers: int,
    dtype: str,
    model: str = "",
) -> bytes:
    """The object of ready section payloads, keyed ``(stream, layer, kv)`` (uncompressed;
    zstd is applied here as the codec says). Callers validate ``shape`` (``check_dims``)
    and the payload sizes; the GPU encoder uses this to share the container code."""
    order = _section_order(layers, codec.has_residual)
    stored: dict[tuple[Stream, int, KV], tuple[Bytes, bool]] = {}
    for stream, layer, name in order:
        enabled = codec.zstd_anchor if stream == "anchor" else codec.zstd_residual
        stored[stream, layer, name] = _compress(payloads[stream, layer, name], enabled)
    base = {
        "model": model,
        "tokens": shape[0],
        "layers": layers,
        "kv_heads": shape[1],
        "head_dim": shape[2],
        "dtype": dtype,
        "codec": codec.to_dict(),
    }
    header_len = 0
    for _ in range(8):  # offsets depend on the header's length: iterate to the fixed point
        offset = PREAMBLE.size + header_len
        table, anchor_end = [], offset
        for stream, layer, name in order:
            data, zstd = stored[stream, layer, name]
            table.append([stream, layer, name, offset, len(data), checksum(data), zstd])
            offset += len(data)
            if stream == "anchor":
                anchor_end = offset
        header = msgpack.packb(
            {**base, "sections": table, "anchor_end": anchor_end, "total": offset}
        )
        if len(header) == header_len:
            break
        header_len = len(header)
    else:  # pragma: no cover - msgpack integer sizes only grow, so this converges in a few steps
        raise AssertionError("header length did not converge")
    parts: list[Bytes] = [
        PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), checksum(header)),
        header,
    ]
    parts.extend(stored[key][0] for key in order)
    return b"".join(parts)


def parse_preamble(data: Bytes) -> int:
    """Validate the preamble; return the header length."""
    if len(data) < PREAMBLE.size:
        raise FormatError(f"truncated preamble: {len(data)} of {PREAMBLE.size} bytes")
    magic, version, header_len, _ = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"bad magic {bytes(magic)!r}: not a lynxkv object")
    if version != FORMAT_VERSION:
        raise FormatError(f"unknown format version {version}; this reader knows {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES}")
    return int(header_len)


def _field(raw: dict[Any, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"header field {key!r} is missing or not a {kind.__name__}")
    return value


def parse_header(data: Bytes) -> Header:
    """Validate preamble and header (``data`` holds at least both); return the header."""
    header_len = parse_preamble(data)
    end = PREAMBLE.size + header_len
    if len(data) < end:
        raise FormatError(f"truncated header: {len(data)} of {end} bytes")
    blob = bytes(data[PREAMBLE.size : end])
    if checksum(blob) != PREAMBLE.unpack_from(data)[3]:
        raise FormatError("header checksum mismatch: the header is damaged")
    try:
        raw = msgpack.unpackb(blob, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise FormatError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise FormatError("header is not a map")
    dims = {key: _field(raw, key, int) for key in _LIMITS}
    for key, limit in _LIMITS.items():
        if not 1 <= dims[key] <= limit:
            raise FormatError(f"header field {key!r} = {dims[key]} is outside [1, {limit}]")
    dtype = _field(raw, "dtype", str)
    if dtype not in DTYPES:
        raise FormatError(f"unknown source dtype {dtype!r}")
    try:
        codec = CodecSpec.from_dict(_field(raw, "codec", dict))
    except (CodecError, TypeError) as exc:
        raise FormatError(f"bad codec in header: {exc}") from exc
    header = Header(
        model=_field(raw, "model", str),
        tokens=dims["tokens"],
        layers=dims["layers"],
        kv_heads=dims["kv_heads"],
        head_dim=dims["head_dim"],
        dtype=dtype,
        codec=codec,
        sections=(),
        anchor_end=_field(raw, "anchor_end", int),
        total=_field(raw, "total", int),
        header_end=end,
    )
    sections = _parse_sections(_field(raw, "sections", list), header)
    return Header(**{**header.__dict__, "sections": sections})


def _parse_sections(table: list[Any], header: Header) -> tuple[SectionRef, ...]:
    order = _section_order(header.layers, header.codec.has_residual)
    if len(table) != len(order):
        raise FormatError(f"section table has {len(table)} entries, expected {len(order)}")
    refs: list[SectionRef] = []
    offset, anchor_end = header.header_end, header.header_end
    for entry, (stream, layer, kv) in zip(table, order, strict=True):
        if (
            not isinstance(entry, list)
            or len(entry) != 7
            or entry[:3] != [stream, layer, kv]
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[3:6])
            or not isinstance(entry[6], bool)
        ):
            raise FormatError(
                f"section table entry for the {stream} section of layer {layer} "
                f"{kv.upper()} is malformed: {entry!r:.120}"
            )
        ref = SectionRef(stream, layer, kv, entry[3], entry[4], entry[5], entry[6])
        expected = header.payload_size(ref)
        if ref.offset != offset:
            raise FormatError(f"{ref.describe()} starts at {ref.offset}, expected {offset}")
        if ref.zstd and not 0 < ref.length < expected:
            raise FormatError(
                f"{ref.describe()} is zstd with length {ref.length}, not in (0, {expected})"
            )
        if not ref.zstd and ref.length != expected:
            raise FormatError(
                f"{ref.describe()} has length {ref.length}, expected {expected} "
                f"for {header.codec.name} on {list(header.shape)}"
            )
        if not 0 <= ref.checksum < 1 << 64:
            raise FormatError(f"{ref.describe()} has an invalid checksum")
        offset = ref.end
        if stream == "anchor":
            anchor_end = offset
        refs.append(ref)
    if header.anchor_end != anchor_end:
        raise FormatError(f"anchor_end is {header.anchor_end}, the sections say {anchor_end}")
    if header.total != offset:
        raise FormatError(f"total is {header.total}, the sections say {offset}")
    return tuple(refs)


def decompress(ref: SectionRef, stored: Bytes, expected: int) -> bytes:
    """The payload of a verified section, decompressed where it is zstd."""
    if not ref.zstd:
        return bytes(stored)
    zstd = _zstd()
    try:
        payload: bytes = zstd.ZstdDecompressor().decompress(stored, max_output_size=expected)
    except zstd.ZstdError as exc:
        raise FormatError(f"{ref.describe()}: zstd data is invalid: {exc}") from exc
    if len(payload) != expected:
        raise FormatError(
            f"{ref.describe()} decompresses to {len(payload)} bytes, expected {expected}"
        )
    return payload
