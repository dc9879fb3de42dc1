"""Mutated and truncated objects: the parser raises FormatError and nothing else."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynxkv.codec import decode, encode, parse_header
from lynxkv.errors import FormatError

from .kvgen import make_kv

NAMES = ["lynx-a4", "lynx-a2+zstd", "lynx-a6", "uniform-a4+zstd", "raw", "lynx-a4-paper"]
OBJECTS = {name: encode(make_kv(11, layers=2, tokens=33, heads=2, dim=8), name) for name in NAMES}


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(NAMES))
    data = bytearray(OBJECTS[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        else:
            data[at : at + 8] = draw(st.binary(min_size=8, max_size=8))
    return name, bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutations(), part=st.sampled_from(["anchor", "full"]), piece=st.integers(1, 4096))
def test_only_format_error_escapes(case: tuple[str, bytes], part: str, piece: int) -> None:
    name, data = case
    original = OBJECTS[name]
    try:
        decoded = decode([data[i : i + piece] for i in range(0, len(data), piece)], part)  # type: ignore[arg-type]
    except FormatError:
        return
    # Decoding succeeded: then the bytes it needed must be the original's.
    end = parse_header(original).anchor_end if part == "anchor" else len(original)
    assert data[:end] == original[:end]
    assert decoded.header == parse_header(original)


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_is_detected(name: str) -> None:
    data = OBJECTS[name]
    anchor_end = parse_header(data).anchor_end
    for cut in range(0, len(data), max(1, len(data) // 300)):
        with pytest.raises(FormatError, match="truncated object"):
            decode(data[:cut])
        if cut < anchor_end:
            with pytest.raises(FormatError, match="truncated object"):
                decode(data[:cut], "anchor")


@pytest.mark.parametrize("name", NAMES)
def test_every_single_byte_flip_is_detected(name: str) -> None:
    data = OBJECTS[name]
    for at in range(0, len(data), max(1, len(data) // 500)):
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        with pytest.raises(FormatError):
            decode(bytes(damaged))
