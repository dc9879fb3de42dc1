import numpy as np
import pytest

from lynxkv.codec import CODECS, uniform

SPEC = CODECS["uniform-a4"]


def _x(seed: int, t: int = 70, heads: int = 2, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (t, heads, dim)) * rng.uniform(0.1, 5, (1, heads, dim))).astype(
        np.float32
    )


@pytest.mark.parametrize("kv", ["k", "v"])
def test_anchor_is_int4_and_full_is_int8(kv: str) -> None:
    x = _x(0)
    t, heads, dim = x.shape
    codes = uniform.quantize(x, SPEC, kv)  # type: ignore[arg-type]
    lo = codes.meta[0].astype(np.float32)
    step = codes.meta[1].astype(np.float32) + np.float32(1e-6)
    if kv == "k":  # per channel over 32-token chunks
        lo, step = np.repeat(lo, 32, axis=0)[:t], np.repeat(step, 32, axis=0)[:t]
    else:  # per token over a head's channels
        lo, step = np.repeat(lo, dim, axis=1), np.repeat(step, dim, axis=1)
    u = np.clip(np.rint((x.reshape(t, -1) - lo) / step * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(codes.anchor, u >> 4)
    np.testing.assert_array_equal(codes.anchor * 16 + codes.residual, u)
    full = uniform.dequantize(codes, SPEC, kv, heads, dim, "full")  # type: ignore[arg-type]
    anchor = uniform.dequantize(codes, SPEC, kv, heads, dim, "anchor")  # type: ignore[arg-type]
    flat = x.reshape(t, -1)
    assert np.all(np.abs(full - flat) <= step / 255 * 0.5001 + 1e-6)
    assert np.all(np.abs(anchor - flat) <= step / 255 * 8.0001 + 1e-6)


def test_group_shapes() -> None:
    x = _x(1, t=70, heads=2, dim=16)
    assert [m.shape for m in uniform.quantize(x, SPEC, "k").meta] == [(3, 32)] * 2
    assert [m.shape for m in uniform.quantize(x, SPEC, "v").meta] == [(70, 2)] * 2
