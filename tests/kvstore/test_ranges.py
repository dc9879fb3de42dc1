import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxkv.errors import BadRequest, FormatError, RangeNotSatisfiable
from lynxkv.kvstore.ranges import (
    MAX_RANGES,
    ByteRange,
    coalesce,
    content_range,
    format_range,
    if_range_matches,
    parse_content_range,
    parse_range,
    part_range,
    unsatisfied_range,
)

SIZE = 100
R = ByteRange

# (header, expected ranges); None means "ignore the header, send the whole object".
CASES: list[tuple[str, list[ByteRange] | None]] = [
    ("bytes=0-9", [R(0, 10)]),
    ("bytes=0-0", [R(0, 1)]),
    ("bytes=99-99", [R(99, 100)]),
    ("bytes=90-", [R(90, 100)]),
    ("bytes=0-", [R(0, 100)]),
    ("bytes=-10", [R(90, 100)]),
    ("bytes=-100", [R(0, 100)]),
    ("bytes=-1000", [R(0, 100)]),  # suffix longer than the object: all of it (14.1.3)
    ("bytes=50-1000", [R(50, 100)]),  # last-pos clamped (14.1.2)
    ("bytes=50-99999999999999999999999999", [R(50, 100)]),
    ("bytes=-99999999999999999999999999", [R(0, 100)]),
    ("bytes=0007-0009", [R(7, 10)]),
    ("BYTES=0-9", [R(0, 10)]),  # units are case-insensitive (14.1)
    ("Bytes=0-9", [R(0, 10)]),
    ("  bytes=0-9 \t", [R(0, 10)]),
    ("bytes=0-9,20-29", [R(0, 10), R(20, 30)]),
    ("bytes=20-29,0-9", [R(20, 30), R(0, 10)]),  # the client's order is kept
    ("bytes=0-9 , \t20-29", [R(0, 10), R(20, 30)]),
    ("bytes=,0-9,,20-29,", [R(0, 10), R(20, 30)]),  # empty list elements (5.6.1)
    ("bytes=0-9,100-200", [R(0, 10)]),  # an unsatisfiable range is dropped
    ("bytes=200-300,-5", [R(95, 100)]),
    ("bytes=-0,0-0", [R(0, 1)]),
    ("bytes=0-9,5-14", [R(0, 15)]),  # overlap: coalesced
    ("bytes=0-9,10-19", [R(0, 20)]),  # touching: coalesced
    ("bytes=0-9,11-19", [R(0, 10), R(11, 20)]),  # a gap: kept apart
    ("bytes=50-59,0-9,55-64", [R(50, 65), R(0, 10)]),  # merged range in its first place
    ("bytes=0-,0-,0-", [R(0, 100)]),
    ("bytes=-10,90-", [R(90, 100)]),
    ("bytes=90-99,-5", [R(90, 100)]),
    # Invalid: ignored (RFC 9110 14.2).
    ("bytes=9-0", None),  # last-pos < first-pos (14.1.1)
    ("bytes=0-9,9-0", None),
    ("bytes=-", None),
    ("bytes=", None),
    ("bytes=,", None),
    ("bytes", None),
    ("bytes 0-9", None),
    ("bytes = 0-9", None),
    ("bytes=0 - 9", None),
    ("bytes=0-9;", None),
    ("bytes=a-b", None),
    ("bytes=+1-2", None),
    ("bytes=1--2", None),
    ("bytes=0x1-2", None),
    ("bytes=١-٢", None),  # Arabic-Indic digits are not DIGIT
    ("items=0-9", None),  # an unknown unit
    ("bits=0-9", None),
    ("", None),
    ("=0-9", None),
    ("bytes=0-9\n", None),
    ("bytes=" + ",".join(["0-0"] * (MAX_RANGES + 1)), None),  # too many ranges
]


@pytest.mark.parametrize(("header", "expected"), CASES)
def test_range_table(header: str, expected: list[ByteRange] | None) -> None:
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize(
    "header",
    [
        "bytes=100-",
        "bytes=100-200",
        "bytes=-0",
        "bytes=-0,-0",
        "bytes=100-100,101-",
        "bytes=99999999999999999999999999-",
        "bytes=" + ",".join(["200-300"] * MAX_RANGES),
    ],
)
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, SIZE)
    assert info.value.size == SIZE
    assert info.value.status == 416


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=-1", "bytes=0-0"])
def test_an_empty_object_satisfies_nothing(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 0)


def test_the_range_cap_is_inclusive() -> None:
    header = "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(MAX_RANGES))
    assert parse_range(header, 1000) == [R(2 * i, 2 * i + 1) for i in range(MAX_RANGES)]


def test_a_huge_header_is_cheap() -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=" + "9" * 100_000 + "-", SIZE)
    assert parse_range("bytes=0-" + "9" * 100_000, SIZE) == [R(0, 100)]
    assert parse_range("bytes=" + "," * 100_000 + "0-0", SIZE) == [R(0, 1)]


def test_coalesce() -> None:
    assert coalesce([]) == []
    assert coalesce([R(5, 6), R(0, 5), R(20, 30), R(6, 8)]) == [R(0, 8), R(20, 30)]
    assert coalesce([R(20, 30), R(0, 10), R(25, 40)]) == [R(20, 40), R(0, 10)]


# If-Range (RFC 9110 13.1.5)
ETAG = '"3f2a9c"'


@pytest.mark.parametrize(
    ("if_range", "honoured"),
    [
        (None, True),
        ('"3f2a9c"', True),
        (' "3f2a9c" ', True),
        ('W/"3f2a9c"', False),  # weak: never a strong match
        ('"3f2a9d"', False),
        ("3f2a9c", False),
        ('"3F2A9C"', False),  # entity tags compare octet by octet
        ('"3f2a9c", "x"', False),
        ("", False),
        ("Sun, 06 Nov 1994 08:49:37 GMT", False),  # no Last-Modified to match a date
        ("*", False),
    ],
)
def test_if_range(if_range: str | None, honoured: bool) -> None:
    assert if_range_matches(if_range, ETAG) is honoured


def test_if_range_with_a_weak_current_etag_never_matches() -> None:
    assert not if_range_matches('W/"a"', 'W/"a"')


# ?part=
@pytest.mark.parametrize(
    ("part", "expected"),
    [("anchor", R(0, 40)), ("residual", R(40, 100)), ("all", R(0, 100))],
)
def test_part_range(part: str, expected: ByteRange) -> None:
    assert part_range(part, 40, 100) == expected


@pytest.mark.parametrize("part", ["", "Anchor", "both", "anchor,residual", "0-9"])
def test_part_range_bad_name(part: str) -> None:
    with pytest.raises(BadRequest, match="part must be one of anchor, residual, all"):
        part_range(part, 40, 100)


def test_an_empty_part_is_unsatisfiable() -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        part_range("residual", 100, 100)
    assert info.value.size == 100
    with pytest.raises(RangeNotSatisfiable):
        part_range("anchor", 0, 100)
    assert part_range("anchor", 100, 100) == R(0, 100)


# Header formatting
def test_content_range() -> None:
    assert content_range(0, 10, 100) == "bytes 0-9/100"
    assert content_range(99, 100, 100) == "bytes 99-99/100"
    assert unsatisfied_range(100) == "bytes */100"
    assert format_range([R(0, 10), (20, 30)]) == "bytes=0-9,20-29"


@pytest.mark.parametrize(
    ("start", "end", "size"), [(0, 0, 10), (5, 4, 10), (-1, 3, 10), (0, 11, 10)]
)
def test_content_range_rejects_bad_ranges(start: int, end: int, size: int) -> None:
    with pytest.raises(ValueError, match="not a non-empty part"):
        content_range(start, end, size)


@pytest.mark.parametrize("ranges", [[], [(3, 3)], [(-1, 2)]])
def test_format_range_rejects_bad_ranges(ranges: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError, match="range"):
        format_range(ranges)


def test_parse_content_range() -> None:
    assert parse_content_range("bytes 0-9/100") == (R(0, 10), 100)
    assert parse_content_range("bytes 5-5/*") == (R(5, 6), None)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bytes */100",
        "bytes 9-0/100",
        "bytes 0-100/100",
        "bytes 0-9",
        "items 0-9/100",
        "bytes=0-9/100",
    ],
)
def test_parse_content_range_rejects(value: str) -> None:
    with pytest.raises(FormatError, match="Content-Range"):
        parse_content_range(value)


# Properties
_sizes = st.integers(0, 300)
_positions = st.one_of(
    st.integers(0, 400).map(str),
    st.just(""),
    st.just("9" * 30),
    st.integers(0, 50).map(lambda n: "00" + str(n)),
)
_specs = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", _positions, _positions),
    st.sampled_from(["", "-", "x", "1-2-3", " ", "0 -1"]),
)
_separators = st.sampled_from([",", ", ", " ,\t", ",,"])
_units = st.sampled_from(["bytes", "BYTES", "bYtes", "bits", "", "bytes "])
_headers = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda unit, specs, sep: f"{unit}={sep.join(specs)}",
        _units,
        st.lists(_specs, max_size=8),
        _separators,
    ),
)


def _covered(header: str, size: int) -> set[int]:
    """The bytes a well-formed header asks for, computed independently of the parser."""
    covered: set[int] = set()
    for spec in header.partition("=")[2].split(","):
        first, _, last = spec.strip(" \t").partition("-")
        if first:
            end = int(last) + 1 if last else size
            covered |= set(range(int(first), min(end, size)))
        elif last:
            covered |= set(range(max(0, size - int(last)), size))
    return covered


@settings(max_examples=400, deadline=None)
@given(header=_headers, size=_sizes)
def test_any_header_resolves_within_the_object(header: str, size: int) -> None:
    try:
        ranges = parse_range(header, size)
    except RangeNotSatisfiable as exc:
        assert exc.size == size
        assert not _covered(header, size)
        return
    if ranges is None:
        return
    assert ranges
    assert len(ranges) <= MAX_RANGES
    for r in ranges:
        assert 0 <= r.start < r.end <= size
    ordered = sorted(ranges)
    for a, b in itertools.pairwise(ordered):
        assert a.end < b.start  # disjoint and not touching: coalesced
    got = {i for r in ranges for i in range(r.start, r.end)}
    assert got == _covered(header, size)


@st.composite
def _disjoint_ranges(draw: st.DrawFn) -> tuple[list[ByteRange], int]:
    size = draw(st.integers(1, 10_000))
    cuts = sorted(draw(st.sets(st.integers(0, size), min_size=2, max_size=40)))
    ranges = [R(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]
    # Keep a gap between neighbours so none is coalesced.
    ranges = [
        r
        for r, prev in zip(ranges, [None, *ranges], strict=False)
        if prev is None or prev.end < r.start
    ]
    return draw(st.permutations(ranges)), size


@settings(max_examples=200, deadline=None)
@given(case=_disjoint_ranges())
def test_format_then_parse_round_trips(case: tuple[list[ByteRange], int]) -> None:
    ranges, size = case
    if ranges:
        assert parse_range(format_range(ranges), size) == ranges


@settings(max_examples=200, deadline=None)
@given(data=st.data(), size=st.integers(1, 1 << 62))
def test_content_range_round_trips(data: st.DataObject, size: int) -> None:
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start + 1, size))
    assert parse_content_range(content_range(start, end, size)) == (R(start, end), size)


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=40))
def test_parse_content_range_raises_only_format_error(value: str) -> None:
    try:
        r, size = parse_content_range(value)
    except FormatError:
        return
    assert 0 <= r.start < r.end
    assert size is None or r.end <= size
