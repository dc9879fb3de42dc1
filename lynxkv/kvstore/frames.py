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
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal, NamedTuple

from lynxkv.errors import FormatError

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


class _Rule(NamedTuple):
    """What a frame type's header may hold."""

    lengths: tuple[int, int]  # payload bounds; DATA's top is the parser's max_data
    parts: tuple[int, ...]
    key: bool | None  # names a key: always, never, or optionally (None)


_RULES = {
    _Type.INFO: _Rule((_INFO.size + 2, _INFO.size + MAX_ETAG), (0, 1, 2, 3), True),
    _Type.DATA: _Rule((1, MAX_DATA), (1, 2), True),
    _Type.MISSING: _Rule((0, 0), (0,), True),
    _Type.ERROR: _Rule((_ERROR.size + 1, _ERROR.size + MAX_CODE + MAX_MESSAGE), (0,), None),
    _Type.END: _Rule((0, 0), (0,), False),
}
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


# Parsing.


class _Header(NamedTuple):
    kind: _Type
    parts: int
    key: int
    offset: int
    length: int


@dataclass
class _KeyState:
    info: InfoFrame | None = None
    #: After MISSING or ERROR: no more frames for this key.
    closed: bool = False
    #: Where the next DATA of each announced part must start.
    next: dict[Part, int] = field(default_factory=dict)


class FrameParser:
    """Parses a frame stream fed in pieces split anywhere, and checks its order.

    ``key_count`` (the number of keys the request asked for), when given, bounds key
    indexes and lets END check that every key was answered. Malformed or out-of-order
    input raises :class:`FormatError`; the parser is then unusable (every later call
    raises the same error). Not thread-safe.
    """

    def __init__(self, key_count: int | None = None, *, max_data: int = MAX_DATA) -> None:
        self._key_count = key_count
        self._max_data = max_data
        self._buffer = bytearray()
        self._pending: _Header | None = None
        self._position = 0  # stream offset of the buffer's first byte, for messages
        self._keys: dict[int, _KeyState] = {}
        self._seen_data = False
        self._seen_residual = False
        self._finished = False
        self._failed_stream = False
        self._error: FormatError | None = None

    @property
    def finished(self) -> bool:
        """Whether the last frame (END, or an ERROR for the whole stream) has arrived."""
        return self._finished

    @property
    def complete(self) -> bool:
        """Whether the stream ended with END (as opposed to a stream-wide ERROR)."""
        return self._finished and not self._failed_stream

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take the next bytes of the stream; return the frames they completed."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except FormatError as exc:
            self._error = exc
            raise

    def close(self) -> None:
        """Call at the end of the body: raises :class:`FormatError` if the stream was cut
        (no END, or a frame left unfinished)."""
        if self._error is not None:
            raise self._error
        if not self._finished:
            held = len(self._buffer) + (HEADER_SIZE if self._pending else 0)
            self._error = FormatError(
                f"frame stream cut at byte {self._position + len(self._buffer)}"
                f" before END ({held} bytes of an unfinished frame)"
            )
            raise self._error

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._finished and memoryview(data).nbytes:
            raise FormatError(f"bytes after the last frame, at byte {self._position}")
        self._buffer += data
        frames: list[Frame] = []
        at = 0
        while not self._finished:
            if self._pending is None:
                if len(self._buffer) - at < HEADER_SIZE:
                    break
                self._pending = self._read_header(at)
                at += HEADER_SIZE
            length = self._pending.length
            if len(self._buffer) - at < length:
                break
            with memoryview(self._buffer) as view:
                payload = bytes(view[at : at + length])
            frames.append(self._accept(self._pending, payload, self._position + at))
            self._pending = None
            at += length
        if self._finished and at < len(self._buffer):
            raise FormatError(f"bytes after the last frame, at byte {self._position + at}")
        del self._buffer[:at]
        self._position += at
        return frames

    def _read_header(self, at: int) -> _Header:
        where = self._position + at
        magic, version, kind, parts, reserved, key, offset, length = _HEADER.unpack_from(
            self._buffer, at
        )
        if magic != MAGIC:
            raise FormatError(f"bad frame magic {magic!r} at byte {where}")
        if version != VERSION:
            raise FormatError(f"frame version {version} at byte {where}; this reads {VERSION}")
        if kind not in _Type.__members__.values():
            raise FormatError(f"unknown frame type {kind} at byte {where}")
        if reserved != b"\0\0\0":
            raise FormatError(f"reserved frame bytes not zero at byte {where}")
        header = _Header(_Type(kind), parts, key, offset, length)
        self._check_fields(header, where)
        self._check_order(header, where)
        return header

    def _check_fields(self, h: _Header, where: int) -> None:
        name, rule = h.kind.name, _RULES[h.kind]
        low, high = (1, self._max_data) if h.kind == _Type.DATA else rule.lengths
        if not low <= h.length <= high:
            raise FormatError(
                f"{name} frame at byte {where}: length {h.length} not in {low}..{high}"
            )
        if h.parts not in rule.parts:
            raise FormatError(f"{name} frame at byte {where}: bad parts field {h.parts}")
        if h.kind != _Type.DATA and h.offset:
            raise FormatError(f"{name} frame at byte {where}: offset must be 0")
        if (rule.key is False and h.key != NO_KEY) or (rule.key and h.key == NO_KEY):
            raise FormatError(f"{name} frame at byte {where}: bad key index {h.key}")
        if h.key != NO_KEY and self._key_count is not None and h.key >= self._key_count:
            raise FormatError(
                f"{name} frame at byte {where}: key index {h.key} but {self._key_count} keys"
            )

    def _check_order(self, h: _Header, where: int) -> None:
        name = h.kind.name
        state = self._keys.get(h.key)
        if h.kind in (_Type.INFO, _Type.MISSING):
            if state is not None:
                raise FormatError(f"{name} frame at byte {where}: key {h.key} already answered")
            if self._seen_data:
                raise FormatError(f"{name} frame at byte {where} after DATA frames")
        elif h.kind == _Type.ERROR and state is not None and state.closed:
            raise FormatError(f"ERROR frame at byte {where}: key {h.key} already closed")
        elif h.kind == _Type.DATA:
            self._check_data(h, state, where)
        elif h.kind == _Type.END:
            self._check_end(where)

    def _check_data(self, h: _Header, state: _KeyState | None, where: int) -> None:
        part = _PARTS[h.parts - 1]
        if state is None or state.info is None or state.closed:
            raise FormatError(
                f"DATA frame at byte {where} for key {h.key}, which has no INFO or was closed"
            )
        if part not in state.info.parts:
            raise FormatError(f"DATA frame at byte {where}: {part} not announced for key {h.key}")
        if part == "anchor" and self._seen_residual:
            raise FormatError(f"anchor DATA frame at byte {where} after residual DATA")
        expected = state.next[part]
        end = state.info.bounds(part)[1]
        if h.offset != expected or h.offset + h.length > end:
            raise FormatError(
                f"DATA frame at byte {where}: key {h.key} {part} bytes"
                f" [{h.offset}, {h.offset + h.length}); expected them from {expected} to {end}"
            )

    def _check_end(self, where: int) -> None:
        if self._key_count is not None:
            unanswered = [k for k in range(self._key_count) if k not in self._keys]
            if unanswered:
                raise FormatError(f"END at byte {where}: keys {unanswered[:8]} not answered")
        for key, state in sorted(self._keys.items()):
            if state.info is None or state.closed:
                continue
            for part in state.info.parts:
                got, end = state.next[part], state.info.bounds(part)[1]
                if got != end:
                    raise FormatError(
                        f"END at byte {where}: key {key} {part} sent up to {got} of {end}"
                    )

    def _accept(self, h: _Header, payload: bytes, where: int) -> Frame:
        """Decode a checked frame and record its effect on the stream's state."""
        if h.kind == _Type.INFO:
            info = _decode_info(h, payload, where)
            start = {part: info.bounds(part)[0] for part in _PARTS}
            self._keys[h.key] = _KeyState(info=info, next=start)
            return info
        if h.kind == _Type.DATA:
            data = DataFrame(h.key, _PARTS[h.parts - 1], h.offset, payload)
            self._keys[h.key].next[data.part] = data.end
            self._seen_data = True
            self._seen_residual |= data.part == "residual"
            return data
        if h.kind == _Type.MISSING:
            self._keys[h.key] = _KeyState(closed=True)
            return MissingFrame(h.key)
        if h.kind == _Type.ERROR:
            error = _decode_error(h, payload, where)
            if error.key is None:
                self._finished = self._failed_stream = True
            else:
                self._keys.setdefault(h.key, _KeyState()).closed = True
            return error
        self._finished = True
        return EndFrame()


def _decode_info(h: _Header, payload: bytes, where: int) -> InfoFrame:
    size, anchor_end = _INFO.unpack_from(payload)
    etag = payload[_INFO.size :]
    if anchor_end > size:
        raise FormatError(f"INFO frame at byte {where}: anchor_end {anchor_end} > size {size}")
    if not _ETAG.fullmatch(etag):
        raise FormatError(f"INFO frame at byte {where}: bad ETag {etag[:40]!r}")
    parts = tuple(part for part in _PARTS if h.parts & _BITS[part])
    return InfoFrame(h.key, size, anchor_end, etag.decode("ascii"), parts)


def _decode_error(h: _Header, payload: bytes, where: int) -> ErrorFrame:
    status, code_length = _ERROR.unpack_from(payload)
    code = payload[_ERROR.size : _ERROR.size + code_length]
    text = payload[_ERROR.size + code_length :]
    if not 400 <= status <= 599:
        raise FormatError(f"ERROR frame at byte {where}: status {status} is not 4xx or 5xx")
    if len(code) != code_length or not _CODE.fullmatch(code):
        raise FormatError(f"ERROR frame at byte {where}: bad code {code[:40]!r}")
    if len(text) > MAX_MESSAGE:
        raise FormatError(f"ERROR frame at byte {where}: message over {MAX_MESSAGE} bytes")
    try:
        message = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"ERROR frame at byte {where}: message is not UTF-8") from exc
    key = None if h.key == NO_KEY else h.key
    return ErrorFrame(key, status, code.decode("ascii"), message)
