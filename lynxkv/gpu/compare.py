"""Field-by-field comparison of two encodings of the same KV (the GPU encoder's contract).

Issue 5: the GPU encoder's codes and metadata equal the numpy encoder's except where a
value sits on a rounding boundary: at most 1 in 100,000, and off by one. ``CodeDiff``
counts, over parsed sections:

* metadata fields that differ, and by how much (u8 steps, or float16 ulps);
* codes that differ where every metadata field of their group is equal, and by how much
  (the full code: lynx ``±I``, uniform's 8-bit level; raw: the 16-bit pattern);
* codes left uncompared because a metadata field of their group differs (each counts
  as a mismatch against the bound).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec import lynx
from lynxkv.codec.container import Header
from lynxkv.codec.decoder import ObjectDecoder
from lynxkv.codec.sections import KV, parse_codes
from lynxkv.codec.spec import CodecSpec
from lynxkv.errors import FormatError

__all__ = ["LIMIT", "CodeDiff", "compare_objects", "compare_sections"]

#: The bound of issue 5: at most 1 differing code (or field) in 100,000.
LIMIT = 1e-5


@dataclass(frozen=True)
class CodeDiff:
    codes: int = 0
    codes_differ: int = 0
    code_step: int = 0
    meta: int = 0
    meta_differ: int = 0
    meta_step: int = 0
    under_meta: int = 0

    def __add__(self, other: CodeDiff) -> CodeDiff:
        steps = ("code_step", "meta_step")
        return CodeDiff(
            **{
                f.name: (max if f.name in steps else int.__add__)(
                    getattr(self, f.name), getattr(other, f.name)
                )
                for f in fields(self)
            }
        )

    @property
    def mismatches(self) -> int:
        """Codes that are not the reference's (compared or not)."""
        return self.codes_differ + self.under_meta

    def within(self, limit: float = LIMIT) -> bool:
        """At most ``limit`` of the codes and of the metadata fields differ, each by one."""
        return (
            self.mismatches <= limit * self.codes
            and self.meta_differ <= limit * self.meta
            and self.code_step <= 1
            and self.meta_step <= 1
        )

    def describe(self) -> str:
        return (
            f"codes: {self.mismatches:,} of {self.codes:,} differ (largest step "
            f"{self.code_step}; {self.under_meta:,} under differing metadata); metadata: "
            f"{self.meta_differ:,} of {self.meta:,} fields differ (largest step {self.meta_step})"
        )


def _ordered(x: NDArray[np.generic]) -> NDArray[np.int64]:
    """Integers in the order of the values: u8 as is, float16 by bit pattern (±0 equal)."""
    if x.dtype == np.uint8:
        return x.astype(np.int64)
    bits = x.view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def _to_elements(
    same: NDArray[np.bool_], index: int, spec: CodecSpec, kv: KV, shape: tuple[int, int, int]
) -> NDArray[np.bool_]:
    """A metadata array's equality mask, broadcast to the [T, C] elements it governs."""
    t, _, dim = shape
    if spec.kind == "lynx" and index < 2:  # g_min, g_scale: [P, C]
        return np.repeat(same, spec.page_tokens, axis=0)[:t]
    if spec.kind == "lynx":
        by_token = kv == "v" and spec.v_chunk == "token"
    else:
        by_token = not (kv == "k" and spec.groups == "kivi")
    if by_token:  # [T, H]
        return np.repeat(same, dim, axis=1)
    return np.repeat(same, spec.chunk_tokens, axis=0)[:t]  # [Q, C]


def _full(
    anchor: NDArray[np.uint8], residual: NDArray[np.uint8], spec: CodecSpec
) -> NDArray[np.int64]:
    if spec.kind == "lynx":
        return lynx.full_codes(anchor, residual, spec).astype(np.int64)
    return (anchor.astype(np.int64) << spec.residual_bits) | residual


def compare_sections(
    spec: CodecSpec,
    kv: KV,
    shape: tuple[int, int, int],
    ours: tuple[bytes | memoryview, bytes | memoryview],
    theirs: tuple[bytes | memoryview, bytes | memoryview],
) -> CodeDiff:
    """Compare two encodings (anchor and residual payloads) of one [T, H, D] tensor."""
    if spec.kind == "raw":
        a = np.frombuffer(ours[0], dtype="<f2")
        b = np.frombuffer(theirs[0], dtype="<f2")
        if a.size != b.size:
            raise FormatError(f"raw payloads of {a.size} and {b.size} values")
        step = np.abs(_ordered(a) - _ordered(b))
        return CodeDiff(codes=a.size, codes_differ=int((step > 0).sum()), code_step=int(step.max()))
    mine = parse_codes(spec, kv, shape, ours[0], ours[1])
    ref = parse_codes(spec, kv, shape, theirs[0], theirs[1])
    elements = np.ones(mine.anchor.shape, dtype=bool)
    meta = meta_differ = meta_step = 0
    for index, (x, y) in enumerate(zip(mine.meta, ref.meta, strict=True)):
        step = np.abs(_ordered(x) - _ordered(y))
        meta += step.size
        meta_differ += int((step > 0).sum())
        meta_step = max(meta_step, int(step.max()))
        elements &= _to_elements(step == 0, index, spec, kv, shape)
    code = np.abs(_full(mine.anchor, mine.residual, spec) - _full(ref.anchor, ref.residual, spec))
    compared = code[elements]
    return CodeDiff(
        codes=code.size,
        codes_differ=int((compared > 0).sum()),
        code_step=int(compared.max()) if compared.size else 0,
        meta=meta,
        meta_differ=meta_differ,
        meta_step=meta_step,
        under_meta=int((~elements).sum()),
    )


def _sections(data: bytes) -> tuple[Header, dict[tuple[str, int, str], bytes]]:
    decoder = ObjectDecoder()
    sections = decoder.feed(data)
    if decoder.header is None or not decoder.complete():
        raise FormatError(f"truncated object: {decoder.missing()}")
    return decoder.header, {(s.ref.stream, s.ref.layer, s.ref.kv): s.payload for s in sections}


def compare_objects(ours: bytes, theirs: bytes) -> CodeDiff:
    """Compare two whole objects (verified, decompressed) section by section; they must
    describe the same tensors with the same codec."""
    h1, s1 = _sections(ours)
    h2, s2 = _sections(theirs)
    keys = ("model", "tokens", "layers", "kv_heads", "head_dim", "dtype", "codec")
    for key in keys:
        if getattr(h1, key) != getattr(h2, key):
            raise FormatError(
                f"the objects differ in {key}: {getattr(h1, key)!r}, {getattr(h2, key)!r}"
            )
    total = CodeDiff()
    for layer in range(h1.layers):
        for kv in ("k", "v"):
            pair = [
                (s[("anchor", layer, kv)], s.get(("residual", layer, kv), b"")) for s in (s1, s2)
            ]
            total += compare_sections(h1.codec, kv, h1.shape, pair[0], pair[1])
    return total
