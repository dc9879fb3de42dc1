import dataclasses

import pytest

from lynxkv.codec import CODECS, CodecSpec, get_codec
from lynxkv.errors import CodecError


def test_presets_are_named_after_their_keys() -> None:
    for name, spec in CODECS.items():
        assert spec.name == name


@pytest.mark.parametrize(("anchor_bits", "top"), [(2, 96), (3, 112), (4, 120), (5, 124), (6, 126)])
def test_top_code_is_the_largest_whose_anchor_fits(anchor_bits: int, top: int) -> None:
    spec = CodecSpec(name="t", kind="lynx", anchor_bits=anchor_bits)
    r = spec.residual_bits
    assert spec.top_code == top
    assert (top + 2 ** (r - 1) - 1) >> r == 2 ** (anchor_bits - 1) - 1
    assert (top + 1 + 2 ** (r - 1) - 1) >> r == 2 ** (anchor_bits - 1)


def test_the_papers_top_code_would_overflow_a_nibble() -> None:
    assert (127 + 7) >> 4 == 8  # needs 5 bits once the sign is folded in


def test_zstd_variants() -> None:
    both = get_codec("lynx-a4+zstd")
    assert (both.zstd_anchor, both.zstd_residual, both.name) == (True, True, "lynx-a4+zstd")
    anchor = get_codec("uniform-a4+zstd-anchor")
    assert (anchor.zstd_anchor, anchor.zstd_residual) == (True, False)
    raw = get_codec("raw+zstd")
    assert (raw.zstd_anchor, raw.zstd_residual) == (True, False)


@pytest.mark.parametrize("name", ["lynx-a5", "", "lynx-a4+gzip", "+zstd", "raw+zstd+zstd"])
def test_unknown_codec(name: str) -> None:
    with pytest.raises(CodecError, match="unknown codec"):
        get_codec(name)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "fancy"}, "unknown codec kind"),
        ({"anchor_bits": 1}, "anchor_bits"),
        ({"anchor_bits": 7}, "anchor_bits"),
        ({"page_tokens": 100}, "multiple of"),
        ({"chunk_tokens": 0}, "positive"),
        ({"alpha_k": 0.0}, "alpha_k"),
        ({"alpha_v": float("nan")}, "alpha_v"),
        ({"center": "median"}, "center"),
        ({"v_chunk": "head"}, "v_chunk"),
        ({"groups": "tensor"}, "groups"),
        ({"chunk_meta": "u4"}, "chunk_meta"),
    ],
)
def test_invalid_parameters(changes: dict[str, object], message: str) -> None:
    with pytest.raises(CodecError, match=message):
        dataclasses.replace(CODECS["lynx-a4"], **changes)  # type: ignore[arg-type]


def test_raw_must_be_16_bits_without_residual_compression() -> None:
    with pytest.raises(CodecError, match="16"):
        CodecSpec(name="r", kind="raw", anchor_bits=4)
    with pytest.raises(CodecError, match="no residual"):
        CodecSpec(name="r", kind="raw", anchor_bits=16, zstd_residual=True)


def test_dict_round_trip_and_strictness() -> None:
    for spec in CODECS.values():
        assert CodecSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(CodecError, match="unknown codec parameters"):
        CodecSpec.from_dict({**CODECS["raw"].to_dict(), "future": 1})
    with pytest.raises(CodecError, match="type"):
        CodecSpec.from_dict({**CODECS["lynx-a4"].to_dict(), "anchor_bits": "4"})
    with pytest.raises(CodecError, match="bool"):
        CodecSpec.from_dict({**CODECS["lynx-a4"].to_dict(), "anchor_bits": True})
