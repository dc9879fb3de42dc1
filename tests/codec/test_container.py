import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from lynxkv.codec import CODECS, decode, encode, encode_chunks, get_codec, parse_header
from lynxkv.codec.container import PREAMBLE, checksum
from lynxkv.errors import ChecksumError, CodecError, FormatError

from .kvgen import make_kv
from .objects import rebuild, split


@pytest.fixture(scope="module")
def obj() -> bytes:
    return encode(make_kv(0, layers=2, tokens=70), "lynx-a4", model="test-model")


@pytest.mark.parametrize("name", [*CODECS, "lynx-a4+zstd", "uniform-a4+zstd", "raw+zstd"])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_round_trip_every_codec_and_dtype(name: str, dtype: str) -> None:
    kv = make_kv(1, layers=2, tokens=45, heads=2, dim=16, dtype=dtype)
    data = encode(kv, name, model="m")
    header = parse_header(data)
    assert (header.tokens, header.layers, header.kv_heads, header.head_dim) == (45, 2, 2, 16)
    assert (header.dtype, header.model, header.codec) == (dtype, "m", get_codec(name))
    assert header.total == len(data)
    full = decode(data)
    anchor = decode(data[: header.anchor_end], "anchor")
    np.testing.assert_array_equal(anchor.kv[1][0], decode(data, "anchor").kv[1][0])
    for (k, v), (fk, fv), (ak, av) in zip(kv, full.kv, anchor.kv, strict=True):
        for x, f, a in ((k, fk, ak), (v, fv, av)):
            x32 = np.asarray(x, np.float32)
            err_full = float(np.abs(f - x32).mean())
            err_anchor = float(np.abs(a - x32).mean())
            if name.startswith("raw"):
                if dtype != "f32":
                    np.testing.assert_array_equal(f, x32)  # bit-exact in the source type
                assert err_anchor == err_full
            else:
                assert err_full < err_anchor < float(np.abs(x32).mean())  # better than zeros


def test_sections_are_anchor_first_and_contiguous(obj: bytes) -> None:
    header = parse_header(obj)
    kinds = [(s.stream, s.layer, s.kv) for s in header.sections]
    assert kinds == [
        (s, layer, kv) for s in ("anchor", "residual") for layer in (0, 1) for kv in "kv"
    ]
    ends = [header.header_end] + [s.end for s in header.sections]
    assert [s.offset for s in header.sections] == ends[:-1]
    assert header.anchor_end == header.sections[3].end
    assert header.to_json()["streams"]["all"]["bytes"] == len(obj)


def test_raw_has_no_residual() -> None:
    header = parse_header(encode(make_kv(2, tokens=10), "raw"))
    assert {s.stream for s in header.sections} == {"anchor"}
    assert header.anchor_end == header.total


def test_lynx_a4_bits_per_element_on_full_pages() -> None:
    data = encode(make_kv(3, layers=1, tokens=256), "lynx-a4")
    streams = parse_header(data).to_json()["streams"]
    # 4 code bits + page meta (2 x 16 / 256); chunk meta (2 x 8 bits) per 32 tokens of a
    # K channel, per 64 channels of a V token: K 4.625, V 4.375
    assert streams["anchor"]["bits_per_element"] == pytest.approx(4.5)
    assert streams["residual"]["bits_per_element"] == 4.0


def test_zstd_sections_are_flagged_and_plain_where_it_does_not_pay() -> None:
    kv = make_kv(4, tokens=64)
    kv[0] = (np.zeros_like(kv[0][0]), kv[0][1])  # compresses to almost nothing
    header = parse_header(encode(kv, "lynx-a4+zstd"))
    flags = {(s.stream, s.layer, s.kv): s.zstd for s in header.sections}
    assert flags["anchor", 0, "k"] is True
    assert flags["residual", 1, "v"] is False  # near-random bits: stored plain


def test_chunks_cover_the_tokens_and_the_last_may_be_short() -> None:
    kv = make_kv(5, layers=1, tokens=600)
    objects = encode_chunks(kv, "lynx-a4", tokens_per_object=256)
    assert [parse_header(o).tokens for o in objects] == [256, 256, 88]
    joined = np.concatenate([decode(o).kv[0][0] for o in objects])
    whole = decode(encode(kv, "lynx-a4")).kv[0][0]
    np.testing.assert_array_equal(joined, whole)  # page-aligned cuts change nothing
    with pytest.raises(CodecError, match="tokens_per_object"):
        encode_chunks(kv, "lynx-a4", tokens_per_object=0)


# --- bad input to the encoder --------------------------------------------------------


def _bad_kv(kind: str) -> Any:
    kv = make_kv(6, layers=2, tokens=8, dtype="f32")
    if kind == "nan":
        kv[1][0][3, 0, 0] = np.nan
    elif kind == "inf":
        kv[0][1][0, 1, 2] = np.inf
    elif kind == "huge":
        kv[0][0][0, 0, 0] = 1e6
    elif kind == "shape":
        kv[1] = (kv[1][0][:4], kv[1][1])
    elif kind == "dtype":
        kv = [(k.astype(np.int32), v.astype(np.int32)) for k, v in kv]
    elif kind == "ndim":
        kv = [(k[0], v[0]) for k, v in kv]
    elif kind == "empty":
        kv = []
    elif kind == "zero-tokens":
        kv = [(k[:0], v[:0]) for k, v in kv]
    return kv


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "NaN"),
        ("inf", "infinite"),
        ("huge", "float16 group metadata"),
        ("shape", "every tensor must be"),
        ("dtype", "unsupported dtype"),
        ("ndim", r"\[T, H, D\]"),
        ("empty", "no layers"),
        ("zero-tokens", r"tokens must be in \[1"),
    ],
)
def test_encoder_rejects_bad_input(kind: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        encode(_bad_kv(kind), "lynx-a4")


# --- malformed objects -----------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def _set(key: str, value: Any) -> Any:
    return lambda h: h.__setitem__(key, value)


def _section(index: int, field: int, value: Any) -> Any:
    def mutate(h: dict[str, Any]) -> None:
        h["sections"][index][field] = value

    return mutate


def _malformed(obj: bytes, case: str) -> bytes:
    header = parse_header(obj)
    first = header.sections[0]
    cases = {
        "empty": lambda: b"",
        "bad magic": lambda: b"NOTLYNX" + obj[7:],
        "unknown version": lambda: obj[:6] + struct.pack("<H", 9) + obj[8:],
        "truncated preamble": lambda: obj[:11],
        "truncated header": lambda: obj[: header.header_end - 3],
        "header too long": lambda: obj[:8] + struct.pack("<I", 1 << 30) + obj[12:],
        "header damaged": lambda: _flip(obj, PREAMBLE.size + 5),
        "header checksum damaged": lambda: _flip(obj, 15),
        "not msgpack": lambda: rebuild_raw(obj, b"\xc1\xc1\xc1"),
        "not a map": lambda: rebuild_raw(obj, msgpack.packb([1, 2, 3])),
        "missing field": lambda: rebuild(obj, lambda h: h.pop("tokens")),
        "wrong type": lambda: rebuild(obj, _set("layers", "2")),
        "bool as int": lambda: rebuild(obj, _set("kv_heads", True)),
        "dims out of range": lambda: rebuild(obj, _set("head_dim", 0)),
        "unknown dtype": lambda: rebuild(obj, _set("dtype", "f64")),
        "unknown codec kind": lambda: rebuild(obj, lambda h: h["codec"].__setitem__("kind", "zip")),
        "shapes disagree": lambda: rebuild(obj, _set("tokens", 71)),
        "layers disagree": lambda: rebuild(obj, _set("layers", 3)),
        "table points outside": lambda: rebuild(obj, _section(7, 3, 10**9)),
        "offset gap": lambda: rebuild(obj, _section(1, 3, first.end + 1)),
        "negative length": lambda: rebuild(obj, _section(2, 4, -5)),
        "stream order": lambda: rebuild(obj, _section(0, 0, "residual")),
        "bad checksum field": lambda: rebuild(obj, _section(0, 5, -1)),
        "bad entry": lambda: rebuild(obj, _section(0, 6, "yes")),
        "anchor_end wrong": lambda: rebuild(obj, _set("anchor_end", header.anchor_end + 1)),
        "total wrong": lambda: rebuild(obj, _set("total", header.total - 1)),
        "truncated section": lambda: obj[: header.total - 10],
        "trailing bytes": lambda: obj + b"\x00",
    }
    return cases[case]()


def rebuild_raw(obj: bytes, blob: bytes) -> bytes:
    return PREAMBLE.pack(b"LYNXKV", 1, len(blob), checksum(blob)) + blob + split(obj)[1]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "truncated object: the preamble is incomplete \\(0 of 20"),
        ("bad magic", "bad magic"),
        ("unknown version", "unknown format version 9"),
        ("truncated preamble", "the preamble is incomplete \\(11 of 20"),
        ("truncated header", "the header is incomplete"),
        ("header too long", "exceeds the limit"),
        ("header damaged", "header checksum mismatch"),
        ("header checksum damaged", "header checksum mismatch"),
        ("not msgpack", "not valid msgpack"),
        ("not a map", "not a map"),
        ("missing field", "'tokens' is missing"),
        ("wrong type", "'layers' is missing or not a int"),
        ("bool as int", "'kv_heads' is missing"),
        ("dims out of range", "'head_dim' = 0 is outside"),
        ("unknown dtype", "unknown source dtype"),
        ("unknown codec kind", "bad codec in header"),
        ("shapes disagree", "expected"),
        ("layers disagree", "section table has 8 entries, expected 12"),
        ("table points outside", r"layer 1 V starts at 100000000\d, expected"),
        ("offset gap", "starts at"),
        ("negative length", "has length -5"),
        ("stream order", "malformed"),
        ("bad checksum field", "invalid checksum"),
        ("bad entry", "malformed"),
        ("anchor_end wrong", "anchor_end is"),
        ("total wrong", "total is"),
        ("truncated section", "truncated object: the residual section of layer 1 V is incomplete"),
        ("trailing bytes", "beyond the object's end"),
    ],
)
def test_malformed_objects_raise_format_error(obj: bytes, case: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        decode(_malformed(obj, case))


@pytest.mark.parametrize("where", ["anchor", "residual"])
def test_a_damaged_section_byte_is_found(obj: bytes, where: str) -> None:
    header = parse_header(obj)
    ref = next(s for s in header.sections if s.stream == where)
    with pytest.raises(
        ChecksumError, match=f"checksum mismatch in the {where} section of layer 0 K"
    ):
        decode(_flip(obj, ref.offset + ref.length // 2))


def test_invalid_zstd_with_a_valid_checksum_is_a_format_error() -> None:
    data = encode(make_kv(7, layers=1, tokens=64), "raw+zstd")
    header = parse_header(data)
    ref = header.sections[0]
    assert ref.zstd
    garbage = b"\x28\xb5\x2f\xfd" + b"\xff" * (ref.length - 4)
    body = data[: ref.offset] + garbage + data[ref.end :]
    fixed = rebuild(body, _section(0, 5, checksum(garbage)))
    with pytest.raises(FormatError, match="zstd data is invalid"):
        decode(fixed)


def test_anchor_decode_needs_only_the_anchor(obj: bytes) -> None:
    header = parse_header(obj)
    decode(obj[: header.anchor_end], "anchor")
    with pytest.raises(FormatError, match="anchor section of layer 1 V is incomplete"):
        decode(obj[: header.anchor_end - 1], "anchor")
    with pytest.raises(FormatError, match="residual section of layer 0 K is incomplete"):
        decode(obj[: header.anchor_end], "full")
    with pytest.raises(ValueError, match="part must be"):
        decode(obj, "half")  # type: ignore[arg-type]
