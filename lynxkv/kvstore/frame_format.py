"""The wire constants and frame types of ``POST /v1/stream`` (format version 1).

The layout, payloads and order are specified in :mod:`lynxkv.kvstore.frames`, which
re-exports everything public here; the encoders live there and the parser in
:mod:`lynxkv.kvstore.frame_parser`. Pure: no I/O.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_DATA",
    "MAX_ETAG",
    "MAX_MESSAGE",
    "NO_KEY",
    "VERSION",
    "DataFrame",
    "EndFrame",
    "ErrorFrame",
    "Frame",
    "InfoFrame",
    "MissingFrame",
    "Part",
]

MAGIC = b"LX"
VERSION = 1
NO_KEY = 0xFFFF_FFFF
#: Largest DATA payload; the server sends objects in pieces well below it.
MAX_DATA = 16 << 20
MAX_ETAG = 256
MAX_CODE = 64
MAX_MESSAGE = 4096

_HEADER = struct.Struct(">2sBBB3sIQI")
HEADER_SIZE = _HEADER.size
_INFO = struct.Struct(">QQ")
_ERROR = struct.Struct(">HB")
_U64 = (1 << 64) - 1


class _Type(IntEnum):
    INFO = 1
    DATA = 2
    MISSING = 3
    ERROR = 4
    END = 5


Part = Literal["anchor", "residual"]
_PARTS: tuple[Part, Part] = ("anchor", "residual")
_BITS: dict[Part, int] = {"anchor": 1, "residual": 2}
_ETAG = re.compile(rb'"[\x21\x23-\x7e]*"')  # RFC 9110 8.8.3 entity-tag, ASCII only
_CODE = re.compile(rb"[a-z0-9_]+")


@dataclass(frozen=True)
class InfoFrame:
    """The object under key number ``key``, and which of its parts will follow."""

    key: int
    size: int
    anchor_end: int
    etag: str
    parts: tuple[Part, ...]

    def bounds(self, part: Part) -> tuple[int, int]:
        """Where ``part`` lies in the object: [start, end)."""
        return (0, self.anchor_end) if part == "anchor" else (self.anchor_end, self.size)


@dataclass(frozen=True)
class DataFrame:
    """Bytes ``[offset, offset + len(payload))`` of the object under key number ``key``."""

    key: int
    part: Part
    offset: int
    payload: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.payload)


@dataclass(frozen=True)
class MissingFrame:
    """No object under key number ``key``."""

    key: int


@dataclass(frozen=True)
class ErrorFrame:
    """A failure on the server: for key number ``key``, or for the stream (``None``)."""

    key: int | None
    status: int
    code: str
    message: str


@dataclass(frozen=True)
class EndFrame:
    """The stream is complete."""


Frame = InfoFrame | DataFrame | MissingFrame | ErrorFrame | EndFrame
