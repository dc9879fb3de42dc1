"""The codec on the real model's KV cache (SmolLM2-135M-Instruct, CPU)."""

from typing import Any

import numpy as np
import pytest

from lynxkv.codec import CODECS, decode, encode, lynx, parse_header
from lynxkv.codec.sections import parse_codes
from lynxkv.errors import FormatError

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def objects(real_kv: list[tuple[Any, Any]]) -> dict[str, bytes]:
    return {name: encode(real_kv[:6], name) for name in [*CODECS, "lynx-a4+zstd"]}


@pytest.mark.parametrize("name", [n for n, s in CODECS.items() if s.kind == "lynx"])
def test_anchor_plus_residual_is_the_full_code_on_real_kv(
    objects: dict[str, bytes], real_kv: list[tuple[Any, Any]], name: str
) -> None:
    spec = CODECS[name]
    data = objects[name]
    header = parse_header(data)
    for ref_a, ref_r in zip(header.sections[:12], header.sections[12:], strict=True):
        anchor = data[ref_a.offset : ref_a.end]
        residual = data[ref_r.offset : ref_r.end]
        codes = parse_codes(spec, ref_a.kv, header.shape, anchor, residual)
        x = np.asarray(real_kv[ref_a.layer][0 if ref_a.kv == "k" else 1], np.float32)
        again = lynx.quantize(x.reshape(x.shape[0], -1), spec, ref_a.kv, header.kv_heads)
        np.testing.assert_array_equal(codes.anchor, again.anchor)
        np.testing.assert_array_equal(
            lynx.full_codes(codes.anchor, codes.residual, spec),
            lynx.full_codes(again.anchor, again.residual, spec),
        )


@pytest.mark.parametrize("name", [*CODECS])
def test_decoded_real_kv_is_close(
    objects: dict[str, bytes], real_kv: list[tuple[Any, Any]], name: str
) -> None:
    full, anchor = decode(objects[name]), decode(objects[name], "anchor")
    for layer in range(6):
        for j in range(2):
            x = np.asarray(real_kv[layer][j], np.float32)
            scale = float((x**2).sum())
            err_full = float(((full.kv[layer][j] - x) ** 2).sum()) / scale
            err_anchor = float(((anchor.kv[layer][j] - x) ** 2).sum()) / scale
            if name == "raw":
                assert err_full == err_anchor == 0.0  # bf16 in, bf16 stored
            else:
                assert err_full < 1e-3 and err_full < err_anchor < 0.5


def test_damaged_real_objects_raise_format_error(objects: dict[str, bytes]) -> None:
    rng = np.random.default_rng(0)
    for name in ("lynx-a4", "lynx-a4+zstd", "uniform-a4"):
        data = objects[name]
        for at in rng.integers(0, len(data), size=40):
            damaged = bytearray(data)
            damaged[at] ^= 1 << int(rng.integers(0, 8))
            with pytest.raises(FormatError):
                decode(bytes(damaged))
        for cut in rng.integers(0, len(data), size=20):
            with pytest.raises(FormatError, match="truncated object"):
                decode(data[:cut])
