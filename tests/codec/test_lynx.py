import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from lynxkv.codec import CODECS, CodecSpec, lynx
from lynxkv.codec.codes import EPS, Codes

LYNX = [name for name, spec in CODECS.items() if spec.kind == "lynx"]


def _rows(per_group: NDArray[Any], size: int, t: int) -> NDArray[np.float32]:
    return np.repeat(per_group.astype(np.float32), size, axis=0)[:t]


def _chunk_values(codes: Codes, spec: CodecSpec) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    if spec.chunk_meta == "u8":
        return codes.meta[2].astype(np.float32) / np.float32(255), lynx.sigma_table()[codes.meta[3]]
    return codes.meta[2].astype(np.float32), codes.meta[3].astype(np.float32)


HEADS = 2  # the samples' C channels are 2 heads of C/2


def _chunks_to_elements(per_chunk: NDArray[Any], spec: CodecSpec, kv: str, t: int) -> NDArray[Any]:
    if kv == "v" and spec.v_chunk == "token":  # [T, H] -> [T, H*D]
        return np.repeat(per_chunk, 48 // HEADS if per_chunk.shape[1] == HEADS else 1, axis=1)
    return _rows(per_chunk, spec.chunk_tokens, t)


def _normalised(
    x: NDArray[np.float32], codes: Codes, spec: CodecSpec, kv: str = "k"
) -> NDArray[np.float32]:
    """y in [-1, 1], recomputed from x and the stored metadata."""
    t = x.shape[0]
    xn = (x - _rows(codes.meta[0], spec.page_tokens, t)) / (
        _rows(codes.meta[1], spec.page_tokens, t) + EPS
    )
    mu, sigma = _chunk_values(codes, spec)
    mu, sigma = (_chunks_to_elements(v, spec, kv, t) for v in (mu, sigma))
    y = (xn - mu) / (sigma + EPS)
    return np.clip(y, -1, 1)


def _sample(seed: int, t: int, c: int = 48) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    x = rng.normal(rng.normal(0, 3, c), np.exp(rng.normal(0, 1, c)), size=(t, c))
    return x.astype(np.float32)


@pytest.mark.parametrize("name", LYNX)
@pytest.mark.parametrize("t", [1, 31, 33, 256, 300])
@pytest.mark.parametrize("kv", ["k", "v"])
def test_anchor_and_residual_give_back_the_full_code_exactly(name: str, t: int, kv: str) -> None:
    spec = CODECS[name]
    x = _sample(t, t)
    codes = lynx.quantize(x, spec, kv, HEADS)
    y = _normalised(x, codes, spec, kv)
    alpha = spec.alpha(kv)
    expected = np.clip(
        np.rint(
            np.log1p(np.float32(alpha) * np.abs(y)) / np.float32(np.log1p(alpha)) * spec.top_code
        ),
        0,
        spec.top_code,
    )
    expected = np.where(y < 0, -expected - 1, expected).astype(np.int16)
    np.testing.assert_array_equal(lynx.full_codes(codes.anchor, codes.residual, spec), expected)
    assert codes.anchor.max() < 2**spec.anchor_bits
    assert codes.residual.max() < 2**spec.residual_bits


@pytest.mark.parametrize("name", LYNX)
def test_every_code_splits_and_joins_exactly(name: str) -> None:
    spec = CODECS[name]
    r = spec.residual_bits
    code = np.arange(spec.top_code + 1)
    for negative in (False, True):
        m = (code + 2 ** (r - 1) - 1) >> r
        assert m.max() <= 2 ** (spec.anchor_bits - 1) - 1
        q = -(m + 1) if negative else m
        anchor = (q & (2**spec.anchor_bits - 1)).astype(np.uint8)
        residual = (m * 2**r - code + 2 ** (r - 1)).astype(np.uint8)
        assert residual.max() < 2**r
        expected = -code - 1 if negative else code
        np.testing.assert_array_equal(lynx.full_codes(anchor, residual, spec), expected)


def _max_gap(levels: NDArray[np.float32]) -> float:
    return float(np.diff(levels).max())


@pytest.mark.parametrize("name", LYNX)
def test_reconstruction_errors_are_bounded_by_the_bucket_widths(name: str) -> None:
    spec = CODECS[name]
    x = _sample(7, 300)
    codes = lynx.quantize(x, spec, "k")
    y = _normalised(x, codes, spec)
    t = x.shape[0]
    _, sigma = _chunk_values(codes, spec)
    unit = (_rows(codes.meta[1], spec.page_tokens, t) + EPS) * (
        _rows(sigma, spec.chunk_tokens, t) + EPS
    )
    full = lynx.dequantize(codes, spec, "k", "full")
    anchor = lynx.dequantize(codes, spec, "k", "anchor")
    levels = lynx.full_levels(spec, spec.alpha_k)
    # full: half the widest step between codes; anchor: half the widest bucket
    assert np.all(np.abs(full - x) <= unit * (_max_gap(levels) / 2 + 1e-4) + 1e-5)
    bucket = 2**spec.residual_bits
    widest = max(
        float(
            levels[min(m * bucket + bucket // 2, spec.top_code)]
            - levels[max(m * bucket - bucket // 2 + 1, 0)]
        )
        + _max_gap(levels)
        for m in range(2 ** (spec.anchor_bits - 1))
    )
    assert np.all(np.abs(anchor - x) <= unit * (widest / 2 + 1e-4) + 1e-5)
    assert np.abs(anchor - x).mean() > np.abs(full - x).mean()
    assert np.all(np.abs(y) <= 1)


def test_small_negative_values_keep_their_sign_in_the_anchor() -> None:
    spec = CODECS["lynx-a4"]
    x = np.zeros((32, 1), dtype=np.float32)
    x[:, 0] = np.linspace(-1, 1, 32)
    x[5, 0] = -1e-3
    codes = lynx.quantize(x, spec, "k")
    y = _normalised(x, codes, spec)
    anchor = lynx.dequantize(codes, spec, "k", "anchor")
    mean = np.float32(codes.meta[2][0, 0]) / 255 * (codes.meta[1][0, 0] + EPS) + codes.meta[0][0, 0]
    assert np.array_equal(np.sign(anchor[:, 0] - mean), np.sign(y[:, 0]) + (y[:, 0] == 0))


def test_constant_and_zero_channels_reconstruct_closely() -> None:
    x = np.zeros((300, 4), dtype=np.float32)
    x[:, 1] = 3.5
    x[:, 2] = -1e-3
    for name in LYNX:
        spec = CODECS[name]
        codes = lynx.quantize(x, spec, "k")
        for part in ("anchor", "full"):
            np.testing.assert_allclose(lynx.dequantize(codes, spec, "k", part), x, atol=1e-3)


def test_metadata_shapes_follow_pages_and_chunks() -> None:
    spec = CODECS["lynx-a4"]
    codes = lynx.quantize(_sample(3, 300, c=10), spec, "k")
    assert [m.shape for m in codes.meta] == [(2, 10), (2, 10), (10, 10), (10, 10)]
    assert [m.dtype for m in codes.meta] == [np.float16, np.float16, np.uint8, np.uint8]
    paper = dataclasses.replace(spec, chunk_meta="f16")
    assert [m.dtype for m in lynx.quantize(_sample(3, 300, c=10), paper, "k").meta][2:] == [
        np.float16
    ] * 2


def test_u8_sigma_covers_every_chunk() -> None:
    spec = CODECS["lynx-a4"]
    x = _sample(11, 256)
    codes = lynx.quantize(x, spec, "k")
    y_unclipped = _normalised(x * 1, codes, spec)
    assert np.abs(y_unclipped).max() <= 1.0 + 1e-6


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    t=st.integers(1, 600),
    scale=st.floats(1e-3, 1e2),
    name=st.sampled_from(LYNX),
)
def test_property_round_trip(seed: int, t: int, scale: float, name: str) -> None:
    spec = CODECS[name]
    x = _sample(seed, t, c=8) * np.float32(scale)
    codes = lynx.quantize(x, spec, "k")
    full = lynx.dequantize(codes, spec, "k", "full")
    anchor = lynx.dequantize(codes, spec, "k", "anchor")
    span = x.max(axis=0) - x.min(axis=0) + 1e-6
    ulps = np.abs(x) * 1e-6  # float32 rounding of values far from zero
    assert np.all(np.abs(full - x) <= span * 0.05 + ulps + 1e-6)
    assert np.all(np.abs(anchor - x) <= span * 0.55 + ulps + 1e-6)
    assert lynx.full_codes(codes.anchor, codes.residual, spec).max() <= spec.top_code
