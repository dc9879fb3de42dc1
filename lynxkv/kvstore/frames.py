"""The frame format of ``POST /v1/stream``: encoders and an incremental parser.

Version 1
---------

The response body is a sequence of frames. A frame is a 24-byte header followed by
``length`` payload bytes. Integers are unsigned and big-endian.

Frame header::

    offset  size  field
    0       2     magic     b"LX" (0x4C 0x58)
    2       1     version   1
    3       1     type      1 INFO, 2 DATA, 3 MISSING, 4 ERROR, 5 END
    4       1     parts     bit 0 (1): anchor, bit 1 (2): residual.
                            DATA: exactly one bit, the part its bytes belong to.
                            INFO: the parts whose bytes will follow for this key (0-3).
                            Other types: 0.
    5       3     reserved  0
    8       4     key       index of the key in the request's "keys" list;
                            0xFFFFFFFF (no key) in END, and in an ERROR about the
                            whole stream
    12      8     offset    DATA: offset of the payload's first byte in the object;
                            0 in other types
    20      4     length    payload length in bytes
    24      length payload

Payloads::

    INFO     (18..272 bytes)  size u64 | anchor_end u64 | etag: the strong ETag as the
                              ETag header sends it, quoted, ASCII, 2..256 bytes
    DATA     (1..16 MiB)      the object's bytes [offset, offset + length)
    MISSING  (0 bytes)        no object under this key (404); the stream goes on
    ERROR    (4..4163 bytes)  status u16 (400..599) | code length u8 (1..64) |
                              code: ASCII [a-z0-9_], as in the JSON error bodies |
                              message: UTF-8, at most 4096 bytes
    END      (0 bytes)        the stream is complete

Order (the server sends it; :class:`FrameParser` checks it):

1. First one frame per requested key: INFO if the key is present, MISSING if not, or
   ERROR if looking it up failed. The server sends them in request order; no INFO or
   MISSING follows a DATA frame.
2. Then DATA: the anchor bytes of every key, keys in request order, then the residual
   bytes of every key. No anchor DATA follows a residual DATA. The bytes of one key's
   part come in order and without gaps: the anchor from 0 to ``anchor_end``, the
   residual from ``anchor_end`` to ``size``. An empty part has no DATA frame. Every
   byte belongs to the object version whose ETag the INFO gave.
3. ERROR with a key: that key's bytes stop there (its object was evicted or replaced,
   or reading it failed); the stream goes on. ERROR without a key: the server gives
   up; it is the last frame.
4. END is the last frame of a complete stream: every part an INFO announced has been
   sent in full, except for keys that got an ERROR.

A body that ends without END or a keyless ERROR was cut; the client keeps the bytes it
has (a DATA frame's offset is where ``ObjectDecoder.feed(data, at=offset)`` takes them)
and may fetch the rest with ``GET`` and ``Range``.

The encoders are here; the constants and frame types are in
:mod:`lynxkv.kvstore.frame_format` and the parser in :mod:`lynxkv.kvstore.frame_parser`.
This module re-exports both: import the format from here.
"""

from __future__ import annotations

from collections.abc import Iterable

from lynxkv.kvstore.frame_format import (
    _BITS,
    _CODE,
    _ERROR,
    _ETAG,
    _HEADER,
    _INFO,
    _PARTS,
    _U64,
    HEADER_SIZE,
    MAGIC,
    MAX_CODE,
    MAX_DATA,
    MAX_ETAG,
    MAX_MESSAGE,
    NO_KEY,
    VERSION,
    DataFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InfoFrame,
    MissingFrame,
    Part,
    _Type,
)
from lynxkv.kvstore.frame_parser import FrameParser

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
    "FrameParser",
    "InfoFrame",
    "MissingFrame",
    "Part",
    "data_header",
    "encode_data",
    "encode_end",
    "encode_error",
    "encode_frame",
    "encode_info",
    "encode_missing",
]


# Encoding. Arguments come from the server's own code: a bad one is a ValueError.


def _header(kind: _Type, key: int | None, length: int, parts: int = 0, offset: int = 0) -> bytes:
    if key is not None and not 0 <= key < NO_KEY:
        raise ValueError(f"key index {key} out of range")
    if not 0 <= offset <= _U64:
        raise ValueError(f"offset {offset} out of range")
    index = NO_KEY if key is None else key
    return _HEADER.pack(MAGIC, VERSION, kind, parts, b"\0\0\0", index, offset, length)


def encode_info(
    key: int, size: int, anchor_end: int, etag: str, parts: Iterable[Part] = _PARTS
) -> bytes:
    """INFO: the object's size, anchor end and ETag, and the parts that will follow."""
    if not 0 <= anchor_end <= size <= _U64:
        raise ValueError(f"anchor_end {anchor_end} and size {size} are inconsistent")
    raw = etag.encode("ascii", "replace")
    if not etag.isascii() or len(raw) > MAX_ETAG or not _ETAG.fullmatch(raw):
        raise ValueError(f"{etag!r} is not a strong quoted ETag of at most {MAX_ETAG} bytes")
    bits = 0
    for part in parts:
        bits |= _BITS[part]
    payload = _INFO.pack(size, anchor_end) + raw
    return _header(_Type.INFO, key, len(payload), bits) + payload


def data_header(key: int, part: Part, offset: int, length: int) -> bytes:
    """The header of a DATA frame whose ``length`` payload bytes the caller writes next
    (so large payloads need not be copied)."""
    if not 0 < length <= MAX_DATA:
        raise ValueError(f"DATA payload of {length} bytes: must be 1..{MAX_DATA}")
    return _header(_Type.DATA, key, length, _BITS[part], offset)


def encode_data(
    key: int, part: Part, offset: int, payload: bytes | bytearray | memoryview
) -> bytes:
    """A whole DATA frame: bytes ``[offset, offset + len(payload))`` of the object."""
    view = memoryview(payload).cast("B")
    return data_header(key, part, offset, view.nbytes) + view


def encode_missing(key: int) -> bytes:
    return _header(_Type.MISSING, key, 0)


def encode_error(key: int | None, status: int, code: str, message: str) -> bytes:
    """ERROR for one key, or for the whole stream when ``key`` is None. A message longer
    than :data:`MAX_MESSAGE` bytes is cut (at a character boundary)."""
    if not 400 <= status <= 599:
        raise ValueError(f"error status {status} is not 4xx or 5xx")
    raw_code = code.encode("ascii", "replace")
    if not code.isascii() or len(raw_code) > MAX_CODE or not _CODE.fullmatch(raw_code):
        raise ValueError(f"error code {code!r} is not [a-z0-9_]{{1,{MAX_CODE}}}")
    text = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    text = text.decode("utf-8", "ignore").encode("utf-8")
    payload = _ERROR.pack(status, len(raw_code)) + raw_code + text
    return _header(_Type.ERROR, key, len(payload)) + payload


def encode_end() -> bytes:
    return _header(_Type.END, None, 0)


def encode_frame(frame: Frame) -> bytes:
    """Any frame, as the ``encode_*`` function of its type writes it."""
    if isinstance(frame, InfoFrame):
        return encode_info(frame.key, frame.size, frame.anchor_end, frame.etag, frame.parts)
    if isinstance(frame, DataFrame):
        return encode_data(frame.key, frame.part, frame.offset, frame.payload)
    if isinstance(frame, MissingFrame):
        return encode_missing(frame.key)
    if isinstance(frame, ErrorFrame):
        return encode_error(frame.key, frame.status, frame.code, frame.message)
    return encode_end()
