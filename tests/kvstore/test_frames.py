import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxkv.codec import ObjectDecoder, encode, parse_header
from lynxkv.errors import FormatError
from lynxkv.kvstore.frames import (
    HEADER_SIZE,
    MAX_DATA,
    MAX_MESSAGE,
    NO_KEY,
    DataFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    FrameParser,
    InfoFrame,
    MissingFrame,
    Part,
    data_header,
    encode_data,
    encode_end,
    encode_error,
    encode_frame,
    encode_info,
    encode_missing,
)

from ..codec.kvgen import make_kv

ETAG = '"e7a1"'


def _stream(
    objects: list[bytes | None],
    anchor_ends: list[int],
    piece: int,
    parts: tuple[Part, ...] = ("anchor", "residual"),
) -> list[Frame]:
    """The frames a server sends for ``objects`` (None: missing), in pieces of ``piece``."""
    frames: list[Frame] = []
    for key, (obj, anchor_end) in enumerate(zip(objects, anchor_ends, strict=True)):
        if obj is None:
            frames.append(MissingFrame(key))
        else:
            frames.append(InfoFrame(key, len(obj), anchor_end, f'"{key}"', parts))
    for part in parts:
        for key, (obj, anchor_end) in enumerate(zip(objects, anchor_ends, strict=True)):
            if obj is None:
                continue
            start, end = (0, anchor_end) if part == "anchor" else (anchor_end, len(obj))
            for at in range(start, end, piece):
                frames.append(DataFrame(key, part, at, obj[at : min(at + piece, end)]))
    frames.append(EndFrame())
    return frames


def _raw(
    kind: int,
    payload: bytes = b"",
    *,
    key: int = 0,
    parts: int = 0,
    offset: int = 0,
    magic: bytes = b"LX",
    version: int = 1,
    reserved: bytes = b"\0\0\0",
    length: int | None = None,
) -> bytes:
    """A frame built field by field, so that any field can be wrong."""
    size = len(payload) if length is None else length
    header = struct.pack(">2sBBB3sIQI", magic, version, kind, parts, reserved, key, offset, size)
    return header + payload


def _parse(data: bytes, key_count: int | None = None) -> list[Frame]:
    parser = FrameParser(key_count)
    frames = parser.feed(data)
    parser.close()
    return frames


# The layout, byte by byte.
def test_header_layout() -> None:
    assert HEADER_SIZE == 24
    assert encode_missing(3) == b"LX\x01\x03\x00\x00\x00\x00" + bytes(3) + b"\x03" + bytes(12)
    assert encode_end() == b"LX\x01\x05\x00\x00\x00\x00\xff\xff\xff\xff" + bytes(12)
    frame = encode_data(2, "residual", 0x0102030405, b"abc")
    assert frame[:4] == b"LX\x01\x02"
    assert frame[4] == 2  # the residual bit
    assert frame[8:12] == (2).to_bytes(4, "big")
    assert frame[12:20] == (0x0102030405).to_bytes(8, "big")
    assert frame[20:24] == (3).to_bytes(4, "big")
    assert frame[24:] == b"abc"
    assert data_header(2, "residual", 0x0102030405, 3) + b"abc" == frame


def test_info_and_error_payloads() -> None:
    frame = encode_info(1, 1000, 600, ETAG, ("anchor",))
    assert frame[3] == 1 and frame[4] == 1
    assert frame[24:] == (1000).to_bytes(8, "big") + (600).to_bytes(8, "big") + ETAG.encode()
    frame = encode_error(None, 503, "store_unavailable", "lmdb: busy")
    assert frame[3] == 4 and frame[8:12] == b"\xff\xff\xff\xff"
    assert frame[24:] == b"\x01\xf7\x11store_unavailablelmdb: busy"


def test_every_frame_type_round_trips() -> None:
    frames: list[Frame] = [
        InfoFrame(0, 10, 4, ETAG, ("anchor", "residual")),
        InfoFrame(1, 10, 4, '""', ()),
        MissingFrame(2),
        ErrorFrame(3, 503, "store_unavailable", "read failed: ünïcode"),
        DataFrame(0, "anchor", 0, b"0123"),
        DataFrame(0, "residual", 4, b"456789"),
        EndFrame(),
    ]
    assert _parse(b"".join(map(encode_frame, frames)), key_count=4) == frames


# Any split.
OBJECTS = [encode(make_kv(seed, layers=2, tokens=40, heads=2, dim=8), "lynx-a4") for seed in (1, 2)]
ANCHOR_ENDS = [parse_header(obj).anchor_end for obj in OBJECTS]


@settings(max_examples=80, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 1 << 20), max_size=20),
    piece=st.integers(1, 5000),
    missing=st.booleans(),
)
def test_any_split_gives_the_same_frames(cuts: list[int], piece: int, missing: bool) -> None:
    objects: list[bytes | None] = [OBJECTS[0], None, OBJECTS[1]] if missing else list(OBJECTS)
    anchor_ends = [ANCHOR_ENDS[0], 0, ANCHOR_ENDS[1]] if missing else ANCHOR_ENDS
    frames = _stream(objects, anchor_ends, piece)
    data = b"".join(map(encode_frame, frames))
    points = sorted({c % (len(data) + 1) for c in cuts})
    parser, got = FrameParser(len(objects)), []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        got += parser.feed(data[start:end])
    parser.close()
    assert got == frames
    assert parser.finished and parser.complete


def test_data_frames_feed_the_object_decoder() -> None:
    frames = _parse(b"".join(map(encode_frame, _stream(list(OBJECTS), ANCHOR_ENDS, 300))))
    decoders = [ObjectDecoder() for _ in OBJECTS]
    for frame in frames:
        if isinstance(frame, DataFrame):
            if frame.part == "residual":
                assert all(d.anchor_complete() for d in decoders)  # anchors all came first
            decoders[frame.key].feed(frame.payload, at=frame.offset)
    assert all(d.complete() for d in decoders)


def test_one_byte_at_a_time() -> None:
    data = b"".join(map(encode_frame, _stream([OBJECTS[0]], ANCHOR_ENDS[:1], 700)))
    parser, got = FrameParser(1), []
    for i in range(len(data)):
        got += parser.feed(data[i : i + 1])
    parser.close()
    assert got == _stream([OBJECTS[0]], ANCHOR_ENDS[:1], 700)


def test_parts_subset_and_empty_parts() -> None:
    frames = _stream([b"abcdef"], [6], 4, parts=("anchor", "residual"))  # empty residual
    assert _parse(b"".join(map(encode_frame, frames))) == frames
    frames = _stream([b"abcdef"], [2], 4, parts=("residual",))
    assert _parse(b"".join(map(encode_frame, frames))) == frames


# Cut streams.
def test_a_cut_stream_is_told_from_a_complete_one() -> None:
    data = b"".join(map(encode_frame, _stream(list(OBJECTS), ANCHOR_ENDS, 999)))
    for cut in [0, 1, HEADER_SIZE, HEADER_SIZE + 3, len(data) // 2, len(data) - 1]:
        parser = FrameParser(2)
        parser.feed(data[:cut])
        assert not parser.finished
        with pytest.raises(FormatError, match="cut at byte"):
            parser.close()


def test_key_error_lets_the_stream_go_on() -> None:
    frames: list[Frame] = [
        InfoFrame(0, 10, 4, ETAG, ("anchor", "residual")),
        InfoFrame(1, 10, 4, ETAG, ("anchor", "residual")),
        DataFrame(0, "anchor", 0, b"01"),
        ErrorFrame(0, 412, "precondition_failed", "replaced mid-stream"),
        DataFrame(1, "anchor", 0, b"0123"),
        DataFrame(1, "residual", 4, b"456789"),
        EndFrame(),
    ]
    parser = FrameParser(2)
    assert parser.feed(b"".join(map(encode_frame, frames))) == frames
    parser.close()
    assert parser.complete


def test_error_before_info_answers_a_key() -> None:
    frames: list[Frame] = [ErrorFrame(0, 503, "store_unavailable", ""), EndFrame()]
    assert _parse(b"".join(map(encode_frame, frames)), key_count=1) == frames


def test_a_stream_error_is_the_last_frame() -> None:
    frames: list[Frame] = [
        InfoFrame(0, 10, 4, ETAG, ("anchor",)),
        ErrorFrame(None, 503, "store_unavailable", "lmdb closed"),
    ]
    parser = FrameParser(1)
    assert parser.feed(b"".join(map(encode_frame, frames))) == frames
    parser.close()
    assert parser.finished and not parser.complete
    with pytest.raises(FormatError, match="after the last frame"):
        parser.feed(encode_end())


def test_bytes_after_end() -> None:
    with pytest.raises(FormatError, match="after the last frame"):
        FrameParser().feed(encode_end() + b"x")
    parser = FrameParser()
    parser.feed(encode_end())
    assert parser.feed(b"") == []
    with pytest.raises(FormatError, match="after the last frame"):
        parser.feed(b"x")


def test_a_failed_parser_stays_failed() -> None:
    parser = FrameParser()
    with pytest.raises(FormatError, match="magic") as first:
        parser.feed(b"XX" + bytes(22))
    with pytest.raises(FormatError) as again:
        parser.feed(encode_end())
    assert again.value is first.value
    with pytest.raises(FormatError) as at_close:
        parser.close()
    assert at_close.value is first.value


# Malformed frames: every check, with the exact error type.
INFO = encode_info(0, 10, 4, ETAG)
ANCHOR = encode_data(0, "anchor", 0, b"0123")
BAD: list[tuple[str, bytes, str]] = [
    ("magic", _raw(5, key=NO_KEY, magic=b"LY"), "bad frame magic"),
    ("version", _raw(5, key=NO_KEY, version=2), "frame version 2"),
    ("type 0", _raw(0, key=NO_KEY), "unknown frame type 0"),
    ("type 6", _raw(6, key=NO_KEY), "unknown frame type 6"),
    ("reserved", _raw(5, key=NO_KEY, reserved=b"\0\0\1"), "reserved"),
    ("END with a key", _raw(5, key=0), "bad key index"),
    ("END with a payload", _raw(5, b"x", key=NO_KEY), "length 1 not in 0..0"),
    ("END with parts", _raw(5, key=NO_KEY, parts=1), "bad parts field"),
    ("END with an offset", _raw(5, key=NO_KEY, offset=1), "offset must be 0"),
    ("MISSING without a key", _raw(3, key=NO_KEY), "bad key index"),
    ("MISSING with a payload", _raw(3, b"x"), "length 1 not in 0..0"),
    ("key beyond key_count", encode_missing(2), "key index 2 but 2 keys"),
    ("INFO too short", _raw(1, bytes(17)), "length 17"),
    ("INFO too long", _raw(1, bytes(16) + b'"' + b"a" * 300 + b'"'), "length 318"),
    ("INFO parts", _raw(1, bytes(16) + b'""', parts=4), "bad parts field 4"),
    ("INFO anchor_end", _raw(1, struct.pack(">QQ", 4, 5) + b'""'), "anchor_end 5 > size 4"),
    ("INFO weak ETag", _raw(1, struct.pack(">QQ", 4, 1) + b'W/"a"'), "bad ETag"),
    ("INFO unquoted ETag", _raw(1, struct.pack(">QQ", 4, 1) + b"abc"), "bad ETag"),
    ("INFO ETag quote", _raw(1, struct.pack(">QQ", 4, 1) + b'"a"b"'), "bad ETag"),
    ("INFO ETag byte", _raw(1, struct.pack(">QQ", 4, 1) + b'"\xff"'), "bad ETag"),
    ("INFO twice", INFO + INFO, "key 0 already answered"),
    ("MISSING after INFO", INFO + encode_missing(0), "key 0 already answered"),
    ("DATA without INFO", ANCHOR, "has no INFO"),
    ("DATA after MISSING", encode_missing(0) + ANCHOR, "has no INFO"),
    ("DATA empty", INFO + _raw(2, key=0, parts=1), "length 0 not in 1.."),
    ("DATA parts 0", INFO + _raw(2, b"x", parts=0), "bad parts field 0"),
    ("DATA parts 3", INFO + _raw(2, b"x", parts=3), "bad parts field 3"),
    ("DATA gap", INFO + encode_data(0, "anchor", 1, b"x"), r"expected them from 0 to 4"),
    ("DATA repeat", INFO + ANCHOR + ANCHOR, r"\[0, 4\); expected them from 4 to 4"),
    ("DATA overrun", INFO + encode_data(0, "anchor", 0, b"01234"), "expected them from 0 to 4"),
    ("DATA past size", INFO + ANCHOR + encode_data(0, "residual", 4, bytes(7)), "from 4 to 10"),
    (
        "DATA of an unannounced part",
        encode_info(0, 10, 4, ETAG, ("residual",)) + ANCHOR,
        "anchor not announced",
    ),
    (
        "anchor after residual",
        encode_info(0, 10, 4, ETAG)
        + encode_info(1, 10, 4, ETAG)
        + ANCHOR
        + encode_data(0, "residual", 4, b"4")
        + encode_data(1, "anchor", 0, b"0"),
        "after residual DATA",
    ),
    ("INFO after DATA", INFO + ANCHOR + encode_info(1, 4, 4, ETAG), "after DATA frames"),
    ("MISSING after DATA", INFO + ANCHOR + encode_missing(1), "after DATA frames"),
    ("DATA after key ERROR", INFO + encode_error(0, 500, "x", "") + ANCHOR, "was closed"),
    ("ERROR twice", encode_error(0, 500, "x", "") + encode_error(0, 500, "x", ""), "closed"),
    ("ERROR after MISSING", encode_missing(0) + encode_error(0, 500, "x", ""), "closed"),
    ("ERROR status", _raw(4, b"\x00\xc8\x01x", key=NO_KEY), "status 200"),
    ("ERROR short", _raw(4, b"\x01\xf4\x00", key=NO_KEY), "length 3 not in 4.."),
    ("ERROR empty code", _raw(4, b"\x01\xf4\x00x", key=NO_KEY), "bad code"),
    ("ERROR code length", _raw(4, b"\x01\xf4\x09ab", key=NO_KEY), "bad code"),
    ("ERROR code chars", _raw(4, b"\x01\xf4\x02A-", key=NO_KEY), "bad code"),
    ("ERROR message", _raw(4, b"\x01\xf4\x01x\xff", key=NO_KEY), "not UTF-8"),
    ("ERROR parts", _raw(4, b"\x01\xf4\x01x", key=NO_KEY, parts=1), "bad parts field"),
    (
        "END, part unfinished",
        INFO + encode_missing(1) + ANCHOR + encode_end(),
        "key 0 residual sent up to 4 of 10",
    ),
    (
        "END, nothing sent",
        INFO + encode_missing(1) + encode_end(),
        "key 0 anchor sent up to 0 of 4",
    ),
    ("END, key unanswered", encode_missing(0) + encode_end(), r"keys \[1\] not answered"),
]


@pytest.mark.parametrize(
    ("data", "message"), [(d, m) for _, d, m in BAD], ids=[n for n, _, _ in BAD]
)
def test_malformed(data: bytes, message: str) -> None:
    parser = FrameParser(2)
    with pytest.raises(FormatError, match=message):
        parser.feed(data)


def test_malformed_headers_fail_before_their_payload() -> None:
    with pytest.raises(FormatError, match="length"):
        FrameParser().feed(_raw(2, key=0, parts=1, length=MAX_DATA + 1))
    with pytest.raises(FormatError, match=r"length 101 not in 1\.\.100"):
        FrameParser(max_data=100).feed(INFO + _raw(2, key=0, parts=1, length=101))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cut=st.integers(0, 200))
def test_garbage_raises_only_format_error(data: bytes, cut: int) -> None:
    parser = FrameParser()
    try:
        parser.feed(data[:cut])
        parser.feed(data[cut:])
        parser.close()
    except FormatError:
        pass


VALID_FRAMES = _stream([OBJECTS[0], None], [ANCHOR_ENDS[0], 0], 2000)
VALID = b"".join(map(encode_frame, VALID_FRAMES))


def _undetectable(frames: list[Frame]) -> set[int]:
    """Stream offsets whose bytes no frame check covers: DATA payloads and ETag text."""
    out: set[int] = set()
    at = 0
    for frame in frames:
        size = len(encode_frame(frame))
        if isinstance(frame, DataFrame):
            out |= set(range(at + HEADER_SIZE, at + size))
        if isinstance(frame, InfoFrame):
            out |= set(range(at + HEADER_SIZE + 17, at + size - 1))
        at += size
    return out


UNDETECTABLE = _undetectable(VALID_FRAMES)


@settings(max_examples=300, deadline=None)
@given(at=st.integers(0, len(VALID) - 1), byte=st.integers(0, 255), cut=st.integers(0, len(VALID)))
def test_damaged_streams_raise_only_format_error(at: int, byte: int, cut: int) -> None:
    data = bytearray(VALID)
    data[at] = byte
    parser = FrameParser(2)
    try:
        parser.feed(data[:cut])
        parser.feed(data[cut:])
        parser.close()
    except FormatError:
        return
    # A change that parses is in a payload, where the object's checksums catch it.
    assert at in UNDETECTABLE or data == VALID


# Encoder arguments.
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_info(0, 10, 11, ETAG), "inconsistent"),
        (lambda: encode_info(0, 10, 4, "abc"), "strong quoted ETag"),
        (lambda: encode_info(0, 10, 4, 'W/"abc"'), "strong quoted ETag"),
        (lambda: encode_info(0, 10, 4, '"é"'), "strong quoted ETag"),
        (lambda: encode_info(0, 10, 4, '"' + "a" * 300 + '"'), "strong quoted ETag"),
        (lambda: encode_info(NO_KEY, 10, 4, ETAG), "key index"),
        (lambda: encode_info(-1, 10, 4, ETAG), "key index"),
        (lambda: encode_data(0, "anchor", 0, b""), "DATA payload of 0 bytes"),
        (lambda: data_header(0, "anchor", 0, MAX_DATA + 1), "DATA payload"),
        (lambda: data_header(0, "anchor", -1, 1), "offset -1"),
        (lambda: encode_error(0, 200, "x", ""), "status 200"),
        (lambda: encode_error(0, 500, "Bad-Code", ""), "error code"),
        (lambda: encode_error(0, 500, "", ""), "error code"),
        (lambda: encode_error(0, 500, "é", ""), "error code"),
    ],
)
def test_encoders_reject_bad_arguments(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


def test_long_error_messages_are_cut_at_a_character() -> None:
    frame = encode_error(None, 500, "internal", "é" * MAX_MESSAGE)
    (error,) = _parse(frame)
    assert isinstance(error, ErrorFrame)
    assert error.message == "é" * (MAX_MESSAGE // 2)
