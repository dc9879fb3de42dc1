"""The incremental parser of ``POST /v1/stream`` frames, which also checks their order.

:class:`FrameParser` takes the body in pieces split anywhere and returns the finished
frames; malformed or out-of-order input raises :class:`~lynxkv.errors.FormatError`. The
format and the order it checks are specified in :mod:`lynxkv.kvstore.frames`, which
re-exports the parser. Pure: the client's loop drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from lynxkv.errors import FormatError
from lynxkv.kvstore.frame_format import (
    _BITS,
    _CODE,
    _ERROR,
    _ETAG,
    _HEADER,
    _INFO,
    _PARTS,
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

__all__ = ["FrameParser"]


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
