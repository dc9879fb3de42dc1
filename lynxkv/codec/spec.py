"""Codec parameters as frozen data, and the named presets.

A codec turns one [T, H, D] tensor (one layer's K or V) into two byte streams: the
Anchor (metadata and the most significant bits of every code) and the Residual (the
remaining bits). The parameters travel in every object's header, so an object decodes
without knowing the preset it was made with.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lynxkv.errors import CodecError

__all__ = ["CODECS", "CODE_BITS", "CodecSpec", "get_codec"]

#: Width of the full integer code (sign and magnitude, or an unsigned level).
CODE_BITS = 8

Kind = Literal["lynx", "uniform", "raw"]
ChunkMeta = Literal["u8", "f16"]
Center = Literal["mean", "mid"]
Groups = Literal["kivi", "token"]
VChunk = Literal["channel", "token"]
_KINDS = ("lynx", "uniform", "raw")


@dataclass(frozen=True)
class CodecSpec:
    """One codec configuration.

    ``kind``:
      * ``lynx`` — the paper's hierarchical log quantizer (docs/codec.md): per-page
        min/max normalisation, per-chunk mean/max isolation, log companding to a
        sign + magnitude code of CODE_BITS bits, split into ``anchor_bits`` and the rest.
      * ``uniform`` — asymmetric min-max int8 (K grouped per channel over a chunk of
        tokens, V per token over a head's channels), split high bits / low bits.
      * ``raw`` — the 16-bit values unchanged; everything is Anchor, no Residual.
    """

    name: str
    kind: Kind
    anchor_bits: int = 4
    page_tokens: int = 256
    chunk_tokens: int = 32
    #: log-companding skew for K and for V (near 0: uniform steps; larger: finer near mu)
    alpha_k: float = 8.0
    alpha_v: float = 8.0
    chunk_meta: ChunkMeta = "u8"
    center: Center = "mean"
    #: lynx only: a V chunk is one channel over ``chunk_tokens`` tokens (``channel``, the
    #: paper's) or one token over a head's channels (``token``); K chunks are always
    #: per channel.
    v_chunk: VChunk = "channel"
    #: uniform only: ``kivi`` groups K per channel over a chunk and V per token;
    #: ``token`` groups both per token over a head's channels (plain per-token int4/int8)
    groups: Groups = "kivi"
    zstd_anchor: bool = False
    zstd_residual: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise CodecError(f"unknown codec kind {self.kind!r}; expected one of {_KINDS}")
        if self.kind == "raw":
            if self.anchor_bits != 16:
                raise CodecError("the raw codec stores 16-bit values: anchor_bits must be 16")
        elif not 2 <= self.anchor_bits <= CODE_BITS - 2:
            raise CodecError(f"anchor_bits must be in [2, {CODE_BITS - 2}], got {self.anchor_bits}")
        if self.chunk_tokens < 1 or self.page_tokens < 1:
            raise CodecError("page_tokens and chunk_tokens must be positive")
        if self.page_tokens % self.chunk_tokens:
            raise CodecError(
                f"page_tokens ({self.page_tokens}) must be a multiple of "
                f"chunk_tokens ({self.chunk_tokens})"
            )
        for name, alpha in (("alpha_k", self.alpha_k), ("alpha_v", self.alpha_v)):
            if not 0 < alpha < 1e6:
                raise CodecError(f"{name} must be in (0, 1e6), got {alpha}")
        if self.center not in ("mean", "mid"):
            raise CodecError(f"center must be 'mean' or 'mid', got {self.center!r}")
        if self.v_chunk not in ("channel", "token"):
            raise CodecError(f"v_chunk must be 'channel' or 'token', got {self.v_chunk!r}")
        if self.groups not in ("kivi", "token"):
            raise CodecError(f"groups must be 'kivi' or 'token', got {self.groups!r}")
        if self.chunk_meta not in ("u8", "f16"):
            raise CodecError(f"chunk_meta must be 'u8' or 'f16', got {self.chunk_meta!r}")
        if self.kind == "raw" and self.zstd_residual:
            raise CodecError("the raw codec has no residual stream to compress")

    def alpha(self, kv: str) -> float:
        """The companding skew of K (``"k"``) or V (``"v"``)."""
        return self.alpha_k if kv == "k" else self.alpha_v

    @property
    def residual_bits(self) -> int:
        """Bits per element of the Residual codes (0 for raw)."""
        return 0 if self.kind == "raw" else CODE_BITS - self.anchor_bits

    @property
    def has_residual(self) -> bool:
        return self.residual_bits > 0

    @property
    def top_code(self) -> int:
        """Largest magnitude code M of the lynx quantizer.

        The anchor keeps the sign and ``m = (I + 2**(R-1) - 1) >> R`` in ``anchor_bits``
        two's-complement bits (negative values as ``-(m + 1)``), so m may reach at most
        ``2**(A-1) - 1``; the largest I with that m is the returned value (120 for A=4).
        The paper's M = 127 would give m = 8, which does not fit 4 bits.
        """
        a, r = self.anchor_bits, self.residual_bits
        top: int = (2 ** (a - 1) - 1) * 2**r + 2 ** (r - 1)
        return top

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodecSpec:
        """Build from a header's codec map; unknown keys are an error (a newer codec)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise CodecError(f"unknown codec parameters {sorted(unknown)}")
        types = {
            "name": str,
            "kind": str,
            "anchor_bits": int,
            "page_tokens": int,
            "chunk_tokens": int,
            "alpha_k": (int, float),
            "alpha_v": (int, float),
            "chunk_meta": str,
            "center": str,
            "groups": str,
            "v_chunk": str,
            "zstd_anchor": bool,
            "zstd_residual": bool,
        }
        for key, value in data.items():
            expected = types[key]
            if isinstance(value, bool) and expected is not bool:
                raise CodecError(f"codec parameter {key!r} has type bool")
            if not isinstance(value, expected):  # type: ignore[arg-type]
                raise CodecError(f"codec parameter {key!r} has type {type(value).__name__}")
        return cls(**data)


def _lynx(name: str, anchor_bits: int, **kw: Any) -> CodecSpec:
    # Our defaults, measured on SmolLM2 (docs/codec.md): chunks centred on the middle of
    # their range, near-uniform steps for K, V chunked per token over a head.
    settings: dict[str, Any] = {
        "center": "mid",
        "alpha_k": 0.05,
        "alpha_v": 0.5,
        "v_chunk": "token",
        **kw,
    }
    return CodecSpec(name=name, kind="lynx", anchor_bits=anchor_bits, **settings)


#: The named presets. ``get_codec`` also accepts ``NAME+zstd`` for any of them.
CODECS: dict[str, CodecSpec] = {
    "lynx-a2": _lynx("lynx-a2", 2),
    "lynx-a3": _lynx("lynx-a3", 3),
    "lynx-a4": _lynx("lynx-a4", 4),
    "lynx-a6": _lynx("lynx-a6", 6),
    # The paper's scheme as DESIGN.md summarises it: chunk mean, per-channel V chunks,
    # float16 chunk metadata (1.1 bit/element); alpha is not given there: 1.0 is ours.
    "lynx-a4-paper": _lynx(
        "lynx-a4-paper",
        4,
        center="mean",
        alpha_k=1.0,
        alpha_v=1.0,
        v_chunk="channel",
        chunk_meta="f16",
    ),
    "uniform-a4": CodecSpec(name="uniform-a4", kind="uniform", anchor_bits=4),
    # Plain per-token int4 / int8 (no per-channel K groups): the usual naive baseline.
    "uniform-tok-a4": CodecSpec(
        name="uniform-tok-a4", kind="uniform", anchor_bits=4, groups="token"
    ),
    "raw": CodecSpec(name="raw", kind="raw", anchor_bits=16),
}

_ZSTD_SUFFIX = re.compile(r"^(?P<base>.+?)\+zstd(?:-(?P<which>anchor|residual))?$")


def get_codec(name: str) -> CodecSpec:
    """The preset called ``name``; ``NAME+zstd`` compresses both streams, ``NAME+zstd-anchor``
    or ``NAME+zstd-residual`` only one."""
    if name in CODECS:
        return CODECS[name]
    match = _ZSTD_SUFFIX.match(name)
    if match and match["base"] in CODECS:
        base = CODECS[match["base"]]
        which = match["which"]
        anchor = which in (None, "anchor")
        residual = which in (None, "residual") and base.has_residual
        return dataclasses.replace(base, name=name, zstd_anchor=anchor, zstd_residual=residual)
    known = ", ".join(sorted(CODECS))
    raise CodecError(f"unknown codec {name!r}; known: {known} (each also as NAME+zstd)")
