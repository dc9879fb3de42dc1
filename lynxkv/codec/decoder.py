"""Incremental decoding: feed an object's bytes as they arrive, get verified sections.

Bytes may be split anywhere. A section comes out as soon as its last byte has arrived
and its checksum has matched, so a reader of ``Range: bytes=0-(anchor_end-1)`` gets
every layer's anchor without the residual. Bytes can also be fed at an offset (for a
second connection that fetches the residual range), as long as each section's bytes
arrive in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from lynxkv.codec.container import (
    PREAMBLE,
    Bytes,
    Header,
    SectionRef,
    checksum,
    decompress,
    parse_header,
    parse_preamble,
)
from lynxkv.errors import ChecksumError, FormatError

__all__ = ["ObjectDecoder", "Section"]


@dataclass(frozen=True)
class Section:
    """One verified section: its place in the object and its (decompressed) payload."""

    ref: SectionRef
    payload: bytes


class ObjectDecoder:
    """Parses one object incrementally. Not thread-safe; one per object."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._header: Header | None = None
        self._parts: dict[int, bytearray] = {}
        self._filled: list[int] = []
        self._done: list[bool] = []
        self._position = 0

    @property
    def header(self) -> Header | None:
        """The validated header, once its bytes have arrived."""
        return self._header

    @property
    def position(self) -> int:
        """Where the next byte of a sequential feed belongs."""
        return self._position

    def anchor_complete(self) -> bool:
        return self._header is not None and all(
            done
            for ref, done in zip(self._header.sections, self._done, strict=True)
            if ref.stream == "anchor"
        )

    def complete(self) -> bool:
        return self._header is not None and all(self._done)

    def feed(self, data: Bytes, at: int | None = None) -> list[Section]:
        """Take ``data`` that belongs at offset ``at`` (default: :attr:`position`) and
        return the sections it completed, in object order."""
        view = memoryview(data).cast("B")
        offset = self._position if at is None else at
        out: list[Section] = []
        if self._header is None:
            if offset != len(self._head):
                raise ValueError(
                    f"bytes at {offset} fed before the header (have {len(self._head)})"
                )
            view, offset = self._feed_head(view, offset)
        while view.nbytes:
            assert self._header is not None
            index = self._section_at(offset)
            ref = self._header.sections[index]
            if offset != ref.offset + self._filled[index]:
                raise ValueError(
                    f"bytes at {offset} skip part of the {ref.describe()} "
                    f"(next expected byte {ref.offset + self._filled[index]})"
                )
            take = min(view.nbytes, ref.end - offset)
            if self._filled[index] == 0 and take == ref.length:
                stored: Bytes = bytes(view[:take])
            else:
                buf = self._parts.setdefault(index, bytearray())
                buf += view[:take]
                stored = buf
            self._filled[index] += take
            view, offset = view[take:], offset + take
            if self._filled[index] == ref.length:
                self._parts.pop(index, None)
                out.append(self._verify(index, stored))
        self._position = offset
        return out

    def _feed_head(self, view: memoryview, offset: int) -> tuple[memoryview, int]:
        while self._header is None:
            need = PREAMBLE.size
            if len(self._head) >= PREAMBLE.size:
                need += parse_preamble(self._head)
                if len(self._head) == need:
                    header = parse_header(self._head)
                    self._header = header
                    self._filled = [0] * len(header.sections)
                    self._done = [False] * len(header.sections)
                    self._head = bytearray()
                    break
            if not view.nbytes:
                break
            take = min(view.nbytes, need - len(self._head))
            self._head += view[:take]
            view, offset = view[take:], offset + take
        self._position = offset
        return view, offset

    def _section_at(self, offset: int) -> int:
        assert self._header is not None
        if offset >= self._header.total:
            raise FormatError(f"bytes beyond the object's end at {self._header.total}")
        if offset < self._header.header_end:
            raise ValueError(f"bytes at {offset} fall inside the header, already read")
        lo, hi = 0, len(self._header.sections) - 1
        while lo < hi:  # the last section whose offset is <= offset
            mid = (lo + hi + 1) // 2
            if self._header.sections[mid].offset <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _verify(self, index: int, stored: Bytes) -> Section:
        assert self._header is not None
        ref = self._header.sections[index]
        if checksum(stored) != ref.checksum:
            raise ChecksumError(f"checksum mismatch in the {ref.describe()}")
        payload = decompress(ref, stored, self._header.payload_size(ref))
        self._done[index] = True
        return Section(ref=ref, payload=payload)

    def missing(self) -> str:
        """Where an incomplete object stops, for error messages."""
        if self._header is None:
            have = len(self._head)
            if have < PREAMBLE.size:
                return f"the preamble is incomplete ({have} of {PREAMBLE.size} bytes)"
            need = PREAMBLE.size + parse_preamble(self._head)
            return f"the header is incomplete ({have} of {need} bytes)"
        for ref, filled in zip(self._header.sections, self._filled, strict=True):
            if filled < ref.length:
                return f"the {ref.describe()} is incomplete ({filled} of {ref.length} bytes)"
        return "nothing"
