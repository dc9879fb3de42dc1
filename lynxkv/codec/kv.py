"""Whole-cache entry points: encode a KV cache into objects, decode objects back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec.container import Header, build_object
from lynxkv.codec.decoder import ObjectDecoder, Section
from lynxkv.codec.sections import decode_tensor
from lynxkv.codec.spec import CodecSpec, get_codec
from lynxkv.errors import CodecError, FormatError

__all__ = ["DecodedObject", "LayerAssembler", "decode", "encode", "encode_chunks"]

Part = Literal["anchor", "full"]
LayerKV = tuple[NDArray[np.float32], NDArray[np.float32]]


@dataclass(frozen=True)
class DecodedObject:
    header: Header
    #: per layer (K, V), each [T, H, D] float32
    kv: list[LayerKV]


def _spec(codec: CodecSpec | str) -> CodecSpec:
    return get_codec(codec) if isinstance(codec, str) else codec


def encode(
    kv: Sequence[tuple[NDArray[Any], NDArray[Any]]], codec: CodecSpec | str, *, model: str = ""
) -> bytes:
    """One object from per-layer (K, V) tensors, each [T, H, D] in bf16, fp16 or fp32."""
    return build_object(kv, _spec(codec), model=model)


def encode_chunks(
    kv: Sequence[tuple[NDArray[Any], NDArray[Any]]],
    codec: CodecSpec | str,
    *,
    tokens_per_object: int = 256,
    model: str = "",
) -> list[bytes]:
    """Cut the cache into objects of ``tokens_per_object`` tokens (the last may be short)."""
    if tokens_per_object < 1:
        raise CodecError(f"tokens_per_object must be positive, got {tokens_per_object}")
    if not kv:
        raise CodecError("no layers to encode")
    spec = _spec(codec)
    total = kv[0][0].shape[0]
    return [
        build_object(
            [(k[s : s + tokens_per_object], v[s : s + tokens_per_object]) for k, v in kv],
            spec,
            model=model,
        )
        for s in range(0, total, tokens_per_object)
    ]


class LayerAssembler:
    """Turns verified sections into per-layer tensors as they arrive.

    ``add`` returns ``(layer, kv, part, tensor)`` for each tensor the section completes:
    an anchor section gives its tensor decoded from the anchor alone; a residual section
    gives the full decode (the anchor payload is kept until then).
    """

    def __init__(self, header: Header) -> None:
        self.header = header
        self._anchors: dict[tuple[int, str], bytes] = {}

    def add(
        self, section: Section, *, decode_anchor: bool = True
    ) -> list[tuple[int, str, Part, NDArray[np.float32]]]:
        ref, h = section.ref, self.header
        if ref.stream == "anchor":
            self._anchors[ref.layer, ref.kv] = section.payload
            if not decode_anchor:
                return []
            tensor = decode_tensor(h.codec, ref.kv, h.shape, h.dtype, section.payload)
            part: Part = "full" if not h.codec.has_residual else "anchor"
            return [(ref.layer, ref.kv, part, tensor)]
        anchor = self._anchors.pop((ref.layer, ref.kv), None)
        if anchor is None:
            raise FormatError(f"the {ref.describe()} arrived before its anchor section")
        tensor = decode_tensor(h.codec, ref.kv, h.shape, h.dtype, anchor, section.payload)
        return [(ref.layer, ref.kv, "full", tensor)]


def decode(data: bytes | memoryview | Iterable[bytes], part: Part = "full") -> DecodedObject:
    """Decode an object (its bytes, or an iterable of byte pieces).

    With ``part="anchor"``, the bytes up to ``anchor_end`` are enough and each tensor is
    read back from its anchor alone; with ``"full"`` the whole object is needed.
    """
    if part not in ("anchor", "full"):
        raise ValueError(f"part must be 'anchor' or 'full', got {part!r}")
    decoder = ObjectDecoder()
    sections: list[Section] = []
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    for piece in pieces:
        sections += decoder.feed(piece)
    ready = decoder.anchor_complete() if part == "anchor" else decoder.complete()
    if not ready:
        raise FormatError(f"truncated object: {decoder.missing()}")
    header = decoder.header
    assert header is not None
    assembler = LayerAssembler(header)
    tensors: dict[tuple[int, str], NDArray[np.float32]] = {}
    want_full = part == "full" and header.codec.has_residual
    for section in sections:
        if section.ref.stream == "residual" and not want_full:
            continue
        for layer, kv, _, tensor in assembler.add(section, decode_anchor=not want_full):
            tensors[layer, kv] = tensor
    return DecodedObject(header, [(tensors[i, "k"], tensors[i, "v"]) for i in range(header.layers)])
