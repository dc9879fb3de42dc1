import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxkv.codec import LayerAssembler, ObjectDecoder, decode, encode, parse_header
from lynxkv.codec.decoder import Section
from lynxkv.errors import ChecksumError

from .kvgen import make_kv

OBJECTS = {
    name: encode(make_kv(9, layers=3, tokens=40, heads=2, dim=8), name)
    for name in ("lynx-a4", "lynx-a3+zstd", "uniform-a4", "raw")
}


def _payloads(sections: list[Section]) -> list[tuple[str, int, str, bytes]]:
    return [(s.ref.stream, s.ref.layer, s.ref.kv, s.payload) for s in sections]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(OBJECTS)), cuts=st.lists(st.integers(0, 1 << 20), max_size=12))
def test_any_split_gives_the_same_sections(name: str, cuts: list[int]) -> None:
    data = OBJECTS[name]
    points = sorted({c % (len(data) + 1) for c in cuts})
    whole = ObjectDecoder().feed(data)
    decoder, got = ObjectDecoder(), []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        got += decoder.feed(data[start:end])
    assert _payloads(got) == _payloads(whole)
    assert decoder.complete() and decoder.position == len(data)


def test_each_section_comes_out_with_its_last_byte() -> None:
    data = OBJECTS["lynx-a4"]
    header = parse_header(data)
    decoder = ObjectDecoder()
    for i in range(len(data)):
        out = decoder.feed(data[i : i + 1])
        ends = [s.end for s in header.sections]
        if i + 1 in ends:
            assert [s.ref.end for s in out] == [i + 1]
        else:
            assert out == []
        if i + 1 == header.anchor_end:
            assert decoder.anchor_complete() and not decoder.complete()
    assert decoder.complete()


def test_residual_fed_at_its_offset_on_a_second_connection() -> None:
    data = OBJECTS["uniform-a4"]
    header = parse_header(data)
    decoder = ObjectDecoder()
    anchors = decoder.feed(data[: header.anchor_end])
    assert {s.ref.stream for s in anchors} == {"anchor"} and len(anchors) == 6
    residuals = []
    for at in range(header.anchor_end, header.total, 1000):
        residuals += decoder.feed(data[at : min(at + 1000, header.total)], at=at)
    assert len(residuals) == 6 and decoder.complete()


def test_out_of_order_bytes_are_refused() -> None:
    data = OBJECTS["lynx-a4"]
    header = parse_header(data)
    decoder = ObjectDecoder()
    with pytest.raises(ValueError, match="before the header"):
        decoder.feed(data[100:200], at=100)
    decoder.feed(data[: header.header_end + 5])
    with pytest.raises(ValueError, match="skip part of the anchor section of layer 0 K"):
        decoder.feed(
            data[header.header_end + 10 : header.header_end + 20], at=header.header_end + 10
        )
    with pytest.raises(ValueError, match="inside the header"):
        decoder.feed(b"x", at=3)


def test_checksum_failure_names_the_section() -> None:
    data = bytearray(OBJECTS["lynx-a4"])
    header = parse_header(bytes(data))
    ref = header.sections[4]
    data[ref.offset] ^= 1
    decoder = ObjectDecoder()
    decoder.feed(bytes(data[: ref.offset]))
    with pytest.raises(ChecksumError, match="anchor section of layer 2 K"):
        decoder.feed(bytes(data[ref.offset :]))


def test_assembler_matches_whole_object_decode() -> None:
    data = OBJECTS["lynx-a4"]
    decoder = ObjectDecoder()
    sections = decoder.feed(data)
    assert decoder.header is not None
    assembler = LayerAssembler(decoder.header)
    got = {}
    for section in sections:
        for layer, kv, part, tensor in assembler.add(section):
            got[layer, kv, part] = tensor
    full, anchor = decode(data), decode(data, "anchor")
    for layer in range(3):
        for j, kv in enumerate("kv"):
            np.testing.assert_array_equal(got[layer, kv, "full"], full.kv[layer][j])
            np.testing.assert_array_equal(got[layer, kv, "anchor"], anchor.kv[layer][j])
