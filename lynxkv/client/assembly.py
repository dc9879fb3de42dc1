"""Per-key state of a progressive fetch: verified bytes in, decoded layers out.

One :class:`KeyState` per requested key holds its ``ObjectDecoder`` (every section is
checked against its checksum as its last byte lands), the layers decoded so far, the
byte counters and the key's error. ``fetch.py`` drives it from the transports.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec.decoder import ObjectDecoder, Section
from lynxkv.codec.kv import LayerAssembler, LayerKV
from lynxkv.errors import FormatError, LynxError

__all__ = [
    "FetchStats",
    "KeyState",
    "KeyStats",
    "LayerEvent",
    "Layers",
    "Stage",
    "Stream",
    "Tensor",
]

#: A byte stream of an object: ``[0, anchor_end)`` or ``[anchor_end, size)``.
Stream = Literal["anchor", "residual"]
#: A decoded precision: from the anchor alone, or anchor + residual.
Stage = Literal["anchor", "full"]
#: Per layer (K, V), each [T, H, D] float32.
Layers = list[LayerKV]
Tensor = NDArray[np.float32]


@dataclass(frozen=True)
class LayerEvent:
    """A tensor decoded: key number ``key_index``'s layer ``layer`` K or V (``kv``), at
    ``part`` precision, at time ``t`` (``time.perf_counter``). A codec without residual
    gives only ``"full"`` events."""

    key_index: int
    layer: int
    kv: str
    part: Stage
    tensor: Tensor  # [T, H, D] float32
    t: float


@dataclass
class KeyStats:
    """One key's transfer. Bytes count each object byte once, however often a resume
    asked for it; times are ``time.perf_counter`` values, None until it happened."""

    anchor_bytes: int = 0
    residual_bytes: int = 0
    first_byte: float | None = None
    #: Every anchor tensor decoded (with ``decode=False``: every anchor section verified).
    anchor_complete: float | None = None
    residual_complete: float | None = None


@dataclass
class FetchStats:
    """The whole fetch. ``anchor_complete`` and ``residual_complete`` are set once every
    key reached that stage or failed."""

    start: float
    keys: list[KeyStats]
    first_byte: float | None = None
    anchor_complete: float | None = None
    residual_complete: float | None = None
    #: Keys whose bytes were (partly) fetched by ranged GETs after the stream stopped.
    resumed: int = 0

    @property
    def anchor_bytes(self) -> int:
        return sum(k.anchor_bytes for k in self.keys)

    @property
    def residual_bytes(self) -> int:
        return sum(k.residual_bytes for k in self.keys)


class KeyState:
    """One key's state: its size and ETag, its bytes, its decoder, tensors and outcome."""

    def __init__(self, index: int, name: str, decode: bool) -> None:
        self.index, self.name, self.decode = index, name, decode
        self.stats = KeyStats()
        self.size = self.anchor_end = 0
        self.etag: str | None = None
        self.known = asyncio.Event()  # size and ETag known, or the key failed
        self.next: dict[Stream, int] = {"anchor": 0, "residual": 0}
        self.raw = bytearray()
        self.decoder = ObjectDecoder()
        self.assembler: LayerAssembler | None = None
        # residual bytes that came before the header; residual sections before their anchor
        self.early: list[tuple[int, bytes]] = []
        self.held: dict[tuple[int, str], Section] = {}
        self.anchored: set[tuple[int, str]] = set()
        #: with ``decode=False``: every verified section, in arrival order
        self.verified: list[Section] = []
        self.tensors: dict[Stage, dict[tuple[int, str], Tensor]] = {"anchor": {}, "full": {}}
        #: why a stage will never be reached; a failed anchor fails the full stage too
        self.errors: dict[Stage, Exception] = {}
        self.lock = asyncio.Lock()  # one assembly at a time: the two connections share it
        self.reached: set[Stage] = set()

    def set_meta(self, size: int, anchor_end: int, etag: str) -> None:
        self.size, self.anchor_end, self.etag = size, anchor_end, etag
        self.next = {"anchor": 0, "residual": anchor_end}
        self.raw = bytearray(size)
        self.known.set()

    def done(self, stage: Stage) -> bool:
        header = self.decoder.header
        if header is None:
            return False
        if not self.decode:
            return self.decoder.anchor_complete() if stage == "anchor" else self.decoder.complete()
        return len(self.tensors[stage]) == 2 * header.layers

    @property
    def error(self) -> Exception | None:
        """Why the key did not complete (None while it may still, and once it has)."""
        return self.errors.get("full")

    @property
    def settled(self) -> bool:
        return "full" in self.errors or self.done("full")

    def over(self, stage: Stage) -> bool:
        """Whether ``stage`` has been reached or never will be."""
        return stage in self.errors or self.done(stage)

    def take(self, part: Stream, offset: int, data: bytes) -> list[Section]:
        """Accept bytes ``[offset, offset + len(data))`` of ``part``; return the sections
        they completed, each verified against its checksum."""
        skip = self.next[part] - offset  # a resumed response may repeat bytes we have
        if skip < 0:
            raise FormatError(
                f"{part} bytes of {self.name!r} from {offset}; expected {self.next[part]}"
            )
        view = memoryview(data)[skip:]
        if not view.nbytes:
            return []
        start, end = offset + skip, offset + len(data)
        if end > (self.anchor_end if part == "anchor" else self.size):
            raise FormatError(f"{part} bytes of {self.name!r} beyond the part's end, at {end}")
        self.raw[start:end] = view
        self.next[part] = end
        self._count(part, view.nbytes)
        if self.decoder.header is None and part == "residual":
            self.early.append((start, bytes(view)))  # the decoder needs the header first
            return []
        sections = self.decoder.feed(view, at=start)
        if self.assembler is None and self.decoder.header is not None:
            sections += self._header_arrived()
        return sections

    def _count(self, part: Stream, n: int) -> None:
        if part == "anchor":
            self.stats.anchor_bytes += n
        else:
            self.stats.residual_bytes += n
        if self.stats.first_byte is None:
            self.stats.first_byte = time.perf_counter()

    def _header_arrived(self) -> list[Section]:
        header = self.decoder.header
        assert header is not None
        if (header.total, header.anchor_end) != (self.size, self.anchor_end):
            raise FormatError(
                f"{self.name!r}: the header says {header.total} bytes, anchor end"
                f" {header.anchor_end}; the server said {self.size}, {self.anchor_end}"
            )
        self.assembler = LayerAssembler(header)
        sections: list[Section] = []
        try:
            for at, piece in self.early:
                sections += self.decoder.feed(piece, at=at)
        except (LynxError, ValueError) as exc:  # the residual failed, not the anchor
            self.fail(exc, "full")
            sections = [s for s in sections if s.ref.stream == "anchor"]
        self.early.clear()
        return sections

    def assemble(self, sections: list[Section]) -> list[tuple[int, str, Stage, Tensor]]:
        """Decode sections into tensors (runs in a worker thread, under ``lock``). A
        residual section whose anchor has not been decoded yet waits for it."""
        assert self.assembler is not None
        out: list[tuple[int, str, Stage, Tensor]] = []
        for section in sections:
            where = (section.ref.layer, section.ref.kv)
            if section.ref.stream == "residual" and where not in self.anchored:
                self.held[where] = section
                continue
            out += self.assembler.add(section)
            if section.ref.stream == "anchor":
                self.anchored.add(where)
                if (held := self.held.pop(where, None)) is not None:
                    out += self.assembler.add(held)
        return out

    def record(self, tensors: list[tuple[int, str, Stage, Tensor]]) -> None:
        assert self.decoder.header is not None
        lone = not self.decoder.header.codec.has_residual  # its anchor is the full decode
        for layer, kv, stage, tensor in tensors:
            self.tensors[stage][layer, kv] = tensor
            if lone:
                self.tensors["anchor"][layer, kv] = tensor

    def layers(self, stage: Stage) -> Layers:
        t = self.tensors[stage]
        return [(t[i, "k"], t[i, "v"]) for i in range(len(t) // 2)]

    def fail(self, exc: Exception, stage: Stage = "anchor") -> bool:
        """Record that ``stage`` (and every later one) will not be reached, unless it was;
        return whether anything changed."""
        changed = False
        for s in ("anchor", "full") if stage == "anchor" else ("full",):
            if not self.over(s):
                self.errors[s] = exc
                changed = True
        if "anchor" in self.errors:
            self.known.set()  # wakes a residual side waiting for the size and ETag
        return changed
