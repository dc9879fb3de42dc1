"""HTTP byte ranges (RFC 9110 section 14) as pure functions of header values and sizes.

The server decides 200, 206 or 416 from what these return; no I/O happens here.

- :func:`parse_range` resolves a ``Range`` value against an object of ``size`` bytes.
  It returns ``None`` when the header must be ignored (the server sends 200 with the
  whole object), a list of resolved half-open ranges for a 206, or raises
  :class:`~lynxkv.errors.RangeNotSatisfiable` for a 416.
- :func:`if_range_matches` evaluates ``If-Range`` (RFC 9110 13.1.5).
- :func:`part_range` resolves the ``?part=anchor|residual|all`` shortcut.
- :func:`content_range`, :func:`unsatisfied_range`, :func:`format_range` and
  :func:`parse_content_range` format and read the other headers.

Choices where RFC 9110 leaves room:

- A header with more than :data:`MAX_RANGES` range-specs is ignored (200), as 14.2
  allows for "a set of many small ranges"; it is a broken client or an attack.
- Ranges that overlap or touch are always coalesced (15.3.7.2 allows it whatever their
  order), so a response never carries a byte twice and never exceeds the object. A
  coalesced range takes the place of its earliest member; the other ranges keep the
  client's order, as 15.3.7.2 asks. Ranges separated by a gap are never merged: the
  client gets exactly the bytes it asked for.
- A zero-length object satisfies no range (416 ``bytes */0``); lynxkv objects are never
  empty.
- Positions with more digits than any object size behave as "beyond the end": a
  first-pos is unsatisfiable, a last-pos or suffix-length covers the rest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from lynxkv.errors import BadRequest, FormatError, RangeNotSatisfiable

__all__ = [
    "MAX_RANGES",
    "PARTS",
    "ByteRange",
    "coalesce",
    "content_range",
    "format_range",
    "if_range_matches",
    "parse_content_range",
    "parse_range",
    "part_range",
    "unsatisfied_range",
]

#: Most range-specs honoured in one Range header; more and the header is ignored.
MAX_RANGES = 100

#: Values of the ``?part=`` query parameter.
PARTS = ("anchor", "residual", "all")

# Larger than any object: positions at or beyond it saturate (and int() of a 5000-digit
# string would raise in Python >= 3.11).
_HUGE = 1 << 63
_OWS = " \t"  # RFC 9110 5.6.3
_SPEC = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)  # int-range / suffix-range, 14.1.1
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)", re.ASCII)


class ByteRange(NamedTuple):
    """A resolved range: bytes ``start`` up to, not including, ``end``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


# A parsed range-spec: (first, last) of an int-range (last None when open), or
# (None, suffix-length) of a suffix-range.
_Spec = tuple[int | None, int | None]


def parse_range(header: str, size: int) -> list[ByteRange] | None:
    """Resolve a ``Range`` header value for an object of ``size`` bytes.

    Returns ``None`` when the header is to be ignored (RFC 9110 14.2: invalid syntax, a
    unit other than ``bytes``, too many ranges); otherwise the satisfiable ranges,
    coalesced (see the module docstring), never empty. Raises
    :class:`RangeNotSatisfiable` when the range set is valid but none of it overlaps the
    object (RFC 9110 14.1.1, 15.5.17).
    """
    assert 0 <= size < _HUGE, size
    specs = _parse_specs(header)
    if specs is None:
        return None
    ranges = [r for spec in specs if (r := _resolve(spec, size)) is not None]
    if not ranges:
        shown = header if len(header) <= 80 else header[:77] + "..."
        raise RangeNotSatisfiable(f"range {shown!r} does not overlap the {size} bytes", size)
    return coalesce(ranges)


def _parse_specs(header: str) -> list[_Spec] | None:
    unit, equals, range_set = header.strip(_OWS).partition("=")
    # Range units are case-insensitive tokens (RFC 9110 14.1).
    if not equals or not unit.isascii() or unit.lower() != "bytes":
        return None
    # 1#range-spec with OWS around commas; empty elements are ignored (RFC 9110 5.6.1).
    elements = [e.strip(_OWS) for e in range_set.split(",")]
    elements = [e for e in elements if e]
    if not elements or len(elements) > MAX_RANGES:
        return None
    specs = []
    for element in elements:
        spec = _parse_spec(element)
        if spec is None:
            return None
        specs.append(spec)
    return specs


def _parse_spec(element: str) -> _Spec | None:
    match = _SPEC.fullmatch(element)
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        # suffix-range = "-" suffix-length; "-" alone is invalid.
        return (None, _saturating_int(last)) if last else None
    if last and _less(last, first):
        return None  # an int-range with last-pos < first-pos is invalid (14.1.1)
    return _saturating_int(first), _saturating_int(last) if last else None


def _less(a: str, b: str) -> bool:
    """``int(a) < int(b)`` for digit strings of any length."""
    a, b = a.lstrip("0"), b.lstrip("0")
    return (len(a), a) < (len(b), b)


def _saturating_int(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return min(int(digits), _HUGE) if len(digits) <= 19 else _HUGE


def _resolve(spec: _Spec, size: int) -> ByteRange | None:
    first, last = spec
    if first is None:
        assert last is not None
        # A suffix-length of 0 is unsatisfiable; a longer one than the object means the
        # whole object (14.1.3).
        return ByteRange(max(0, size - last), size) if last and size else None
    if first >= size:
        return None  # unsatisfiable: first-pos at or beyond the end (14.1.1)
    # A last-pos at or beyond the end is clamped to the last byte (14.1.2).
    return ByteRange(first, size if last is None else min(last + 1, size))


def coalesce(ranges: Sequence[ByteRange]) -> list[ByteRange]:
    """Merge ranges that overlap or touch into one; keep the client's order otherwise.

    Each merged range takes the place of its earliest member (RFC 9110 15.3.7.2).
    """
    by_start = sorted(range(len(ranges)), key=lambda i: ranges[i])
    merged: list[tuple[int, int, int]] = []  # (first index, start, end)
    for i in by_start:
        start, end = ranges[i]
        if merged and start <= merged[-1][2]:
            first, merged_start, merged_end = merged[-1]
            merged[-1] = (min(first, i), merged_start, max(merged_end, end))
        else:
            merged.append((i, start, end))
    merged.sort()
    return [ByteRange(start, end) for _, start, end in merged]


def if_range_matches(if_range: str | None, etag: str) -> bool:
    """Whether a Range header may be honoured given ``If-Range`` (RFC 9110 13.1.5).

    ``etag`` is the object's current strong ETag, quoted. Only an exact strong match
    honours the Range; a weak ETag (which a client must not send) and any HTTP-date do
    not, because lynxkv objects carry no Last-Modified to compare a date with. When the
    result is False the server ignores Range and sends 200 with the whole object.
    Call it only when the request has a Range header (13.1.5: If-Range alone is ignored).
    """
    if if_range is None:
        return True
    return not etag.startswith("W/") and if_range.strip(_OWS) == etag


def part_range(part: str, anchor_end: int, size: int) -> ByteRange:
    """The range of ``?part=``: ``anchor`` is [0, anchor_end), ``residual`` is
    [anchor_end, size), ``all`` is [0, size).

    Raises :class:`BadRequest` for another part name and :class:`RangeNotSatisfiable`
    when the part is empty (an object without a residual), since 206 cannot carry an
    empty range.
    """
    assert 0 <= anchor_end <= size, (anchor_end, size)
    bounds = {"anchor": (0, anchor_end), "residual": (anchor_end, size), "all": (0, size)}
    if part not in bounds:
        raise BadRequest(f"part must be one of {', '.join(PARTS)}; got {part!r}")
    start, end = bounds[part]
    if start == end:
        raise RangeNotSatisfiable(f"the {part} part of this object is empty", size)
    return ByteRange(start, end)


def content_range(start: int, end: int, size: int) -> str:
    """``Content-Range`` of a 206 part for bytes [start, end): ``bytes 0-9/100`` (14.4)."""
    if not 0 <= start < end <= size:
        raise ValueError(f"range [{start}, {end}) is not a non-empty part of {size} bytes")
    return f"bytes {start}-{end - 1}/{size}"


def unsatisfied_range(size: int) -> str:
    """``Content-Range`` of a 416: ``bytes */100`` (RFC 9110 14.4, 15.5.17)."""
    return f"bytes */{size}"


def format_range(ranges: Iterable[ByteRange | tuple[int, int]]) -> str:
    """A ``Range`` header value asking for half-open ranges: ``bytes=0-9,20-29``."""
    specs = []
    for start, end in ranges:
        if not 0 <= start < end:
            raise ValueError(f"range [{start}, {end}) is empty or negative")
        specs.append(f"{start}-{end - 1}")
    if not specs:
        raise ValueError("no ranges to format")
    return "bytes=" + ",".join(specs)


def parse_content_range(value: str) -> tuple[ByteRange, int | None]:
    """Read a 206 ``Content-Range`` (``bytes 0-9/100``): the range and the complete
    length (``None`` for ``*``). Raises :class:`FormatError` when it is malformed."""
    match = _CONTENT_RANGE.fullmatch(value.strip(_OWS))
    if match is None:
        raise FormatError(f"malformed Content-Range {value[:80]!r}")
    first, last, complete = match.groups()
    start, end = _saturating_int(first), _saturating_int(last) + 1
    size = None if complete == "*" else _saturating_int(complete)
    # A byte-range-resp with last < first or beyond the complete length is invalid (14.4).
    if end <= start or (size is not None and end > size):
        raise FormatError(f"invalid Content-Range {value[:80]!r}")
    return ByteRange(start, end), size
