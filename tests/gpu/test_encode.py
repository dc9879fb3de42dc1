"""The GPU encoder against the numpy encoder (the oracle), and its CPU fallback.

Contract (issue 5): codes and metadata equal the numpy encoder's except where a value
sits on a rounding boundary, at most 1 in 100,000 and off by one (``compare_objects``
counts them); objects with no such difference are byte-identical. Tests marked ``gpu``
run on the GPU machine only. Real KV: the ``real_kv`` fixture (the model), or an .npz
of it named by ``LYNXKV_REAL_KV`` where the model cannot load (the GPU machine).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import os
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

from lynxkv.codec import CODECS, ObjectDecoder, decode, get_codec, lynx
from lynxkv.codec import encode as numpy_encode
from lynxkv.codec import encode_chunks as numpy_encode_chunks
from lynxkv.codec.bitpack import pack
from lynxkv.codec.container import assemble_object
from lynxkv.codec.sections import DTYPES, KV, encode_tensor
from lynxkv.errors import CodecError, FormatError, MissingDependency
from lynxkv.gpu import (
    compare_objects,
    decode_anchor,
    encode,
    encode_chunks,
    gpu_available,
    refine_residual,
)
from lynxkv.gpu.compare import CodeDiff, compare_sections
from lynxkv.gpu.encode import gpu_support
from lynxkv.gpu.encode_source import SOURCE
from lynxkv.gpu.encode_tables import (
    ALIGN,
    ESTIMATE_ERROR,
    TABLES,
    certain_margin,
    code_thresholds,
    magnitude_estimate,
    magnitude_estimate_error,
    magnitude_from_thresholds,
    magnitude_scale,
    regions,
    sigma_estimate,
    sigma_thresholds,
)
from tests.codec.kvgen import make_kv

PRESETS = sorted(CODECS)
LYNX = [n for n in PRESETS if CODECS[n].kind == "lynx"]
TORCH = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
#: the module (the package's ``encode`` attribute is the function of the same name)
encode_module = importlib.import_module("lynxkv.gpu.encode")
needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


def _torch(x: Any) -> torch.Tensor:
    """A numpy [T, H, D] array (bf16, f16 or f32) as a CPU tensor of the same dtype."""
    if x.dtype.itemsize == 2 and x.dtype != np.float16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _tensors(kv: list[Any], layout: str, device: str) -> tuple[list[Any], list[Any]]:
    """Per-layer K and V as [T, H, D] or (``hnd``) [1, H, T, D] tensors on ``device``."""

    def one(x: Any) -> torch.Tensor:
        t = _torch(x).to(device)
        return t.permute(1, 0, 2).unsqueeze(0).contiguous() if layout == "hnd" else t

    return [one(k) for k, _ in kv], [one(v) for _, v in kv]


def _assert_contract(ours: bytes, ref: bytes) -> CodeDiff:
    diff = compare_objects(ours, ref)
    assert diff.within(), diff.describe()
    clean = diff.mismatches == 0 and diff.meta_differ == 0
    assert clean == (ours == ref), diff.describe()  # no differing field: the same bytes
    return diff


# -- decision tables and layout (pure numpy): run everywhere --------------------------------


@pytest.mark.parametrize("name", LYNX)
def test_code_thresholds_reproduce_numpy(name: str) -> None:
    spec = CODECS[name]
    rng = np.random.default_rng(len(name))
    for kv in ("k", "v"):
        thr = code_thresholds(spec, kv)[1 : spec.top_code + 1]
        near = np.concatenate([thr, np.nextafter(thr, np.float32(0))])
        a = np.concatenate([rng.random(1 << 20, dtype=np.float32), np.tile(near, 64), [0, 1]])
        a = a.astype(np.float32)
        want = lynx.magnitude_codes(a, spec, spec.alpha(kv))
        np.testing.assert_array_equal(magnitude_from_thresholds(a, spec, kv), want)


def _near(thr: Any) -> Any:
    """Every threshold and the float32 values 1 and 2 steps each side of it."""
    down = np.nextafter(thr, np.float32(0))
    up = np.nextafter(thr, np.float32(np.inf))
    return np.concatenate(
        [thr, down, up, np.nextafter(down, np.float32(0)), np.nextafter(up, np.float32(np.inf))]
    )


@pytest.mark.parametrize("name", LYNX)
def test_code_estimate_is_one_step_below_or_exact(name: str) -> None:
    """The kernel reads one threshold a value: its estimate f, with an error anywhere
    within ESTIMATE_ERROR, is the code or the code - 1."""
    spec = CODECS[name]
    for kv in ("k", "v"):
        assert magnitude_estimate_error(spec, kv) < ESTIMATE_ERROR / 2
        thr = code_thresholds(spec, kv)[1 : spec.top_code + 1]
        a = np.concatenate([np.linspace(0, 1, 1 << 20, dtype=np.float32), _near(thr), [0, 1]])
        a = a.astype(np.float32)
        exact = magnitude_from_thresholds(a, spec, kv).astype(np.int64)
        for error in (-ESTIMATE_ERROR, 0.0, ESTIMATE_ERROR):
            step = exact - magnitude_estimate(a, spec, kv, error)
            assert set(np.unique(step)) <= {0, 1}, (kv, error, np.unique(step))


def _rounded_where_certain(name: str, kv: KV, margin: float) -> tuple[int, int]:
    """Values at and around every threshold and across [0, 1], the kernel's estimate
    anywhere within its error bound: (values whose rounded estimate the kernel keeps,
    how many of those differ from numpy's code)."""
    spec = CODECS[name]
    thr = code_thresholds(spec, kv)[1 : spec.top_code + 1]
    a = np.concatenate([np.linspace(0, 1, 1 << 18, dtype=np.float32), _near(thr), [0, 1]])
    a = a.astype(np.float32)
    want = magnitude_from_thresholds(a, spec, kv).astype(np.int64)
    alpha = float(np.float32(spec.alpha(kv)))
    e = np.log2(1.0 + alpha * a.astype(np.float64)) * float(magnitude_scale(spec, kv))
    bound = magnitude_estimate_error(spec, kv)
    kept = wrong = 0
    for err in (-bound, -bound / 2, 0.0, bound / 2, bound):
        est = e + err
        rounded = np.rint(est)
        certain = np.abs(est - rounded) < 0.5 - margin
        kept += int(certain.sum())
        wrong += int((rounded[certain] != want[certain]).sum())
    return kept, wrong


@pytest.mark.parametrize("name", LYNX)
def test_rounded_estimate_is_the_code_outside_the_margin(name: str) -> None:
    """The kernel takes round(e) without a table read where e is farther than
    certain_margin from a step (code_round): there it is numpy's code, for every error of
    the estimate within its bound; and that is nearly every value."""
    kinds: tuple[KV, ...] = ("k", "v")
    for kv in kinds:
        margin = certain_margin(CODECS[name], kv)
        assert margin < 0.01
        kept, wrong = _rounded_where_certain(name, kv, margin)
        assert wrong == 0 and kept > 0.9 * 5 * (1 << 18), (kv, kept, wrong)


def test_rounded_estimate_margin_is_needed() -> None:
    """Without the margin (rounding kept right up to the half-integers) codes move: the
    test above can fail."""
    assert _rounded_where_certain("lynx-a4", "k", 0.0)[1] > 0


def test_code_estimate_window_is_real() -> None:
    """An estimate off by more than half a step leaves the window: the test above can fail."""
    spec = CODECS["lynx-a4"]
    thr = code_thresholds(spec, "k")[1 : spec.top_code + 1]
    a = _near(thr)
    exact = magnitude_from_thresholds(a, spec, "k").astype(np.int64)
    assert (exact - magnitude_estimate(a, spec, "k", 0.6) < 0).any()
    assert (exact - magnitude_estimate(a, spec, "k", -0.6) > 1).any()


def test_sigma_estimate_is_one_step_below_or_exact() -> None:
    rng = np.random.default_rng(6)
    thr = sigma_thresholds()[1:]
    spread = np.exp(rng.normal(-3, 2, 1 << 20)).astype(np.float32)
    spread = np.concatenate([spread, _near(thr), [0, 1e-30, 1e-6, 1]]).astype(np.float32)
    exact = lynx.sigma_fields(spread).astype(np.int64)
    for error in (-ESTIMATE_ERROR, 0.0, ESTIMATE_ERROR):
        step = exact - sigma_estimate(spread, error)
        assert set(np.unique(step)) <= {0, 1}, (error, np.unique(step))


def test_kernel_constants_are_the_codecs() -> None:
    """The kernel source's copies of the constants it shares with Python."""
    assert f"#define SIGMA_STEPS {lynx.SIGMA_U8_STEPS:.1f}f" in SOURCE
    assert f"#define SIGMA_BIAS {lynx.SIGMA_U8_BIAS:.1f}f" in SOURCE
    assert f"#define TABLES (CODE_TABLE + {TABLES - 128})" in SOURCE


def test_gpu_support_refuses_an_alpha_too_small_for_the_estimate() -> None:
    spec = dataclasses.replace(CODECS["lynx-a4"], alpha_k=1e-6)
    assert "alpha_k" in str(gpu_support(spec, (256, 8, 128), torch.bfloat16))


def test_first_code_step_is_far_above_subnormals_for_any_codec_alpha() -> None:
    """code_bits's sign test assumes thr[1] >= 2^-58 (encode_source); the largest alpha a
    codec accepts (just under 1e6) keeps its first step near 2^-24."""
    spec = dataclasses.replace(CODECS["lynx-a4"], alpha_k=999_999.0, alpha_v=999_999.0)
    assert code_thresholds(spec, "k")[1] >= 2.0**-26
    assert code_thresholds(spec, "v")[1] >= 2.0**-26


def _below(thr: Any) -> Any:
    """The kernel's table entries V (code_bits): pred(T), -1 for T = 0, +inf kept."""
    out = np.nextafter(thr, np.float32(0)).astype(np.float32)
    out[thr == 0] = -1.0
    out[np.isinf(thr)] = np.inf
    return out


def _reached(a: Any, s: Any, v: float, half_ulp: float) -> list[bool]:
    """The kernel's test that fl(|a| / s) reaches pred^-1(v), in exact arithmetic:
    |a| - (v + half_ulp) s is positive (code_bits's two FMAs give its sign)."""
    m = Fraction(v) + Fraction(half_ulp)
    pairs = zip(a.tolist(), s.tolist(), strict=True)
    return [abs(Fraction(x)) - m * Fraction(y) > 0 for x, y in pairs]


def _half_ulp(v: float) -> float:
    """2^(e_v - 24): the kernel's V's exponent bits as a float, times 2^-24."""
    bits = np.array([v], dtype=np.float32).view(np.uint32) & np.uint32(0x7F800000)
    return float(bits.view(np.float32)[0]) * 2.0**-24


def _quotients_around(t: np.float32, rng: np.random.Generator) -> tuple[Any, Any]:
    """Numerators a (both signs) and scales s in [1e-6, 2] whose float32 quotient is t or
    one or two steps either side of it."""
    s = np.concatenate([rng.uniform(1e-6, 2.0, 6), [1.0, 0.5, 2.0 - 2.0**-22, 1e-6]])
    s = s.astype(np.float32)
    q = _near(np.array([t], dtype=np.float32))
    a = (q[:, None].astype(np.float64) * s[None, :].astype(np.float64)).astype(np.float32)
    a = np.concatenate([a, np.nextafter(a, np.float32(0)), np.nextafter(a, np.float32(1))])
    ss = np.broadcast_to(s, a.shape).ravel()
    a = a.ravel() * np.where(rng.random(a.size) < 0.5, -1, 1).astype(np.float32)
    return a, ss


@pytest.mark.parametrize("name", LYNX)
def test_code_test_decides_the_rounded_quotient(name: str) -> None:
    """The kernel decides |y| = fl(|a| / s) >= T from a, s and V = pred(T) (code_bits):
    |a| / s > V + ulp(V) / 2 agrees with numpy's division at and around every threshold,
    for scales from EPS to 2 (a power-of-two T included: its V is in the binade below);
    T = 0 (V = -1) is reached by every value. (T = +inf is kept: -inf s + |a| = -inf.)"""
    spec = CODECS[name]
    rng = np.random.default_rng(len(name) + 7)
    for kv in ("k", "v"):
        thr = code_thresholds(spec, kv)
        v = _below(thr)
        for k in range(1, spec.top_code + 1):
            a, s = _quotients_around(thr[k], rng)
            want = np.abs(a) / s >= thr[k]  # float32 division, correctly rounded
            assert want.any() and not want.all()
            got = _reached(a, s, float(v[k]), _half_ulp(float(v[k])))
            assert got == want.tolist(), (kv, k)
        a, s = _quotients_around(thr[1], rng)
        a, s = np.append(a, 0.0), np.append(s, 1.0)
        assert v[0] == -1 and all(_reached(a, s, -1.0, _half_ulp(-1.0)))
        assert np.isinf(v[spec.top_code + 1 :]).all()
    two = np.float32(0.5)  # a power of two: pred is in the binade below, ulp half as large
    a, s = _quotients_around(two, rng)
    below = float(_below(np.array([two]))[0])
    got = _reached(a, s, below, _half_ulp(below))
    assert got == (np.abs(a) / s >= two).tolist()


def test_code_test_can_fail() -> None:
    """With V's own ulp (not half of it) some decisions move: the test above is real."""
    spec = CODECS["lynx-a4"]
    thr = code_thresholds(spec, "k")
    v = _below(thr)
    rng = np.random.default_rng(3)
    wrong = 0
    for k in range(1, spec.top_code + 1):
        a, s = _quotients_around(thr[k], rng)
        want = (np.abs(a) / s >= thr[k]).tolist()
        wrong += _reached(a, s, float(v[k]), 2 * _half_ulp(float(v[k]))) != want
    assert wrong > 0


def test_sigma_thresholds_reproduce_numpy() -> None:
    rng = np.random.default_rng(5)
    thr = sigma_thresholds()
    near = np.concatenate([thr[1:], np.nextafter(thr[1:], np.float32(0))])
    spread = np.exp(rng.normal(-3, 2, 1 << 20)).astype(np.float32)
    spread = np.concatenate([spread, np.tile(near, 16), [0, 1e-30, 10]]).astype(np.float32)
    got = np.searchsorted(thr[1:], spread, side="right")
    np.testing.assert_array_equal(got, lynx.sigma_fields(spread))


@pytest.mark.parametrize("name", [n for n in PRESETS if CODECS[n].kind != "raw"])
@pytest.mark.parametrize("shape", [(300, 3, 64), (37, 2, 8), (256, 8, 128), (1, 1, 256)])
def test_regions_align_the_code_planes(name: str, shape: tuple[int, int, int]) -> None:
    spec = CODECS[name]
    for kv in ("k", "v"):
        reg = regions(spec, kv, shape)
        assert (reg.anchor + reg.meta) % ALIGN == 0
        assert reg.residual % ALIGN == 0 and reg.stride % ALIGN == 0
        assert reg.anchor + reg.anchor_size <= reg.residual
        assert reg.residual + reg.residual_size <= reg.stride


def test_gpu_support_names_what_it_lacks() -> None:
    shape = (256, 8, 128)
    spec = CODECS["lynx-a4"]
    assert gpu_support(CODECS["raw"], shape, torch.bfloat16) is None
    assert "chunk_tokens" in str(
        gpu_support(dataclasses.replace(spec, chunk_tokens=16), shape, torch.bfloat16)
    )
    assert "page_tokens" in str(
        gpu_support(dataclasses.replace(spec, page_tokens=320), shape, torch.bfloat16)
    )
    assert "head_dim" in str(gpu_support(spec, (256, 8, 96), torch.bfloat16))
    mean_token = dataclasses.replace(spec, center="mean")
    assert "mean" in str(gpu_support(mean_token, shape, torch.bfloat16))


# -- the comparison helper --------------------------------------------------------------


def _doctored(name: str, change: Any) -> tuple[bytes, bytes]:
    """A numpy object, and one whose layer 0 K sections went through ``change(codes)``."""
    spec = CODECS[name]
    kv = make_kv(4, layers=1, tokens=64, heads=2, dim=16)
    ref = numpy_encode(kv, spec)
    x = np.asarray(kv[0][0], np.float32)
    codes = lynx.quantize(x.reshape(64, 32), spec, "k", 2)
    change(codes)
    meta = b"".join(np.ascontiguousarray(m).tobytes() for m in codes.meta)
    anchor = meta + pack(codes.anchor, spec.anchor_bits)
    residual = pack(codes.residual, spec.residual_bits)
    v = encode_tensor(kv[0][1], spec, "v", "bf16")
    payloads: dict[Any, bytes] = {
        ("anchor", 0, "k"): anchor,
        ("residual", 0, "k"): residual,
        ("anchor", 0, "v"): v[0],
        ("residual", 0, "v"): v[1],
    }
    ours = assemble_object(payloads, spec, shape=(64, 2, 16), layers=1, dtype="bf16")
    return ours, ref


def test_compare_counts_nothing_on_equal_objects() -> None:
    obj = numpy_encode(make_kv(1, layers=2, tokens=100), "lynx-a4")
    diff = compare_objects(obj, obj)
    assert diff == CodeDiff(codes=2 * 2 * 100 * 3 * 64, meta=diff.meta)
    assert diff.meta > 0 and diff.within()


def test_compare_counts_a_code_one_step_off() -> None:
    def bump(codes: Any) -> None:  # residual field + 1 = full code - 1 (one boundary)
        row, col = np.argwhere(codes.residual < 15)[0]
        codes.residual[row, col] += 1

    ours, ref = _doctored("lynx-a4", bump)
    diff = compare_objects(ours, ref)
    assert (diff.codes_differ, diff.code_step, diff.meta_differ) == (1, 1, 0)
    assert diff.codes == 4096 and diff.within(limit=1e-3) and not diff.within(limit=1e-4)


def test_compare_rejects_a_code_two_steps_off() -> None:
    def bump(codes: Any) -> None:
        row, col = np.argwhere(codes.residual < 14)[0]
        codes.residual[row, col] += 2

    ours, ref = _doctored("lynx-a4", bump)
    diff = compare_objects(ours, ref)
    assert diff.code_step == 2 and not diff.within(limit=1.0)


def test_compare_sets_aside_codes_under_differing_metadata() -> None:
    def bump(codes: Any) -> None:
        codes.meta[3][0, 0] += 1  # the sigma field of chunk 0, channel 0: 32 codes

    ours, ref = _doctored("lynx-a4", bump)
    diff = compare_objects(ours, ref)
    assert (diff.meta_differ, diff.meta_step, diff.under_meta) == (1, 1, 32)
    assert diff.mismatches >= 32


def test_compare_refuses_different_tensors() -> None:
    a = numpy_encode(make_kv(1, tokens=40), "lynx-a4")
    with pytest.raises(FormatError, match="differ in codec"):
        compare_objects(a, numpy_encode(make_kv(1, tokens=40), "lynx-a2"))
    with pytest.raises(FormatError, match="differ in tokens"):
        compare_objects(a, numpy_encode(make_kv(1, tokens=41), "lynx-a4"))


def test_compare_sections_on_raw_counts_values() -> None:
    spec = CODECS["raw"]
    x = np.arange(8, dtype=np.float16)
    y = x.copy()
    y[3] = np.nextafter(y[3], np.float16(100))
    diff = compare_sections(spec, "k", (8, 1, 1), (x.tobytes(), b""), (y.tobytes(), b""))
    assert (diff.codes, diff.codes_differ, diff.code_step) == (8, 1, 1)


# -- the CPU fallback: the numpy encoder's bytes, from torch tensors ----------------------


@pytest.mark.parametrize("name", [*PRESETS, "lynx-a4+zstd"])
@pytest.mark.parametrize("layout", ["thd", "hnd"])
def test_fallback_is_the_numpy_encoder(name: str, layout: str) -> None:
    kv = make_kv(7, layers=2, tokens=300, heads=2, dim=64)
    k, v = _tensors(kv, layout, "cpu")
    assert encode(k, v, name) == numpy_encode(kv, name)
    assert encode(k, v, CODECS.get(name) or get_codec(name), backend="numpy") == numpy_encode(
        kv, name
    )


@pytest.mark.parametrize("source", ["f16", "f32"])
def test_fallback_chunks_other_sources(source: str) -> None:
    kv = make_kv(8, layers=2, tokens=300, heads=2, dim=16, dtype=source)
    k, v = _tensors(kv, "hnd", "cpu")
    got = encode_chunks(k, v, "lynx-a4", tokens_per_object=128, model="m")
    assert got == numpy_encode_chunks(kv, "lynx-a4", tokens_per_object=128, model="m")
    assert len(got) == 3


def test_fallback_reads_strided_views() -> None:
    kv = make_kv(9, layers=1, tokens=50, heads=2, dim=16)
    cache = torch.zeros((1, 2, 80, 16), dtype=torch.bfloat16)
    cache[0, :, 10:60] = _torch(kv[0][0]).permute(1, 0, 2)
    v = _torch(kv[0][1]).permute(1, 0, 2).unsqueeze(0)
    assert encode([cache[:, :, 10:60]], [v], "uniform-a4") == numpy_encode(kv, "uniform-a4")


def _bf16(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("k", "v", "match"),
    [
        ([], [], "no layers"),
        ([_bf16(4, 2, 8)], [], "1 K tensors but 0 V"),
        ([np.zeros((4, 2, 8), np.float32)], [_bf16(4, 2, 8)], "expected a torch.Tensor"),
        ([torch.zeros((4, 2, 8), dtype=torch.int32)], [_bf16(4, 2, 8)], "int32"),
        ([_bf16(4, 8)], [_bf16(4, 8)], r"\[T, H, D\] or \[1, H, T, D\]"),
        ([_bf16(2, 2, 4, 8)], [_bf16(2, 2, 4, 8)], r"\[T, H, D\] or \[1, H, T, D\]"),
        ([_bf16(4, 2, 8)], [_bf16(5, 2, 8)], "layer 0 V"),
        ([_bf16(4, 2, 8)], [torch.zeros((4, 2, 8), dtype=torch.float16)], "layer 0 V"),
        ([_bf16(0, 2, 8)], [_bf16(0, 2, 8)], "tokens must be"),
    ],
)
def test_bad_input_is_a_codec_error(k: list[Any], v: list[Any], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        encode(k, v, "lynx-a4")


def test_bad_arguments_are_codec_errors() -> None:
    k, v = [_bf16(4, 2, 8)], [_bf16(4, 2, 8)]
    with pytest.raises(CodecError, match="backend"):
        encode(k, v, "lynx-a4", backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="tokens_per_object"):
        encode_chunks(k, v, "lynx-a4", tokens_per_object=0)
    with pytest.raises(CodecError, match="unknown codec"):
        encode(k, v, "lynx-a5")
    bad = _bf16(4, 2, 8)
    bad[1, 1, 1] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        encode([bad], v, "lynx-a4")


def test_cupy_backend_without_cupy_raises_missing_dependency() -> None:
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed here")
    with pytest.raises(MissingDependency):
        encode([_bf16(4, 2, 8)], [_bf16(4, 2, 8)], "lynx-a4", backend="cupy")


# -- the GPU path's host side, with the kernel replaced by the numpy encoder ----------------


def _fake_launch(
    spec: Any, kv: Any, shape: Any, dtype: Any, jobs: Any, strides: Any, st: Any
) -> None:
    """Reads each job's source through its address and strides, writes numpy's payloads
    at its anchor and residual addresses: what the kernel must do, on CPU memory."""
    t, heads, dim = shape
    item = torch.empty((), dtype=dtype).element_size()
    span = ((t - 1) * strides[0] + (heads - 1) * strides[1] + dim) * item
    np_dtype = DTYPES[_DTYPE_NAMES[dtype]]
    for src, anchor, residual in jobs.tolist():
        raw = np.frombuffer(memoryview((ctypes.c_char * span).from_address(src)), dtype=np_dtype)
        bytes_strides = (strides[0] * item, strides[1] * item, item)
        x = np.lib.stride_tricks.as_strided(raw, shape, bytes_strides).copy()
        a, r = encode_tensor(x, spec, kv, _DTYPE_NAMES[dtype])
        ctypes.memmove(anchor, a, len(a))
        ctypes.memmove(residual, r, len(r))


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


@pytest.mark.parametrize("name", ["lynx-a4", "lynx-a4-paper", "uniform-tok-a4", "lynx-a3+zstd"])
def test_gpu_host_side_assembles_the_numpy_objects(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode_module, "_use_gpu", lambda *args: True)
    monkeypatch.setattr(encode_module, "launch_encode", _fake_launch)
    kv = make_kv(71, layers=3, tokens=300, heads=3, dim=16)
    k, v = _tensors(kv, "hnd", "cpu")
    cache = [torch.zeros((1, 3, 350, 16), dtype=torch.bfloat16) for _ in k]
    for c, x in zip(cache, k, strict=True):
        c[:, :, 25:325] = x
    views = [c[:, :, 25:325] for c in cache]  # hnd views: token stride 16, head stride 350*16
    views[1] = k[1][0].permute(1, 0, 2)  # a [T, H, D] contiguous layer among them
    transposed = [x[0].permute(1, 2, 0).contiguous().permute(0, 2, 1) for x in v]  # stride_d 3
    got = encode_chunks(views, transposed, name, tokens_per_object=128, model="m")
    assert got == numpy_encode_chunks(kv, name, tokens_per_object=128, model="m")


# -- the CuPy kernel (GPU machine) -----------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", [*PRESETS, "lynx-a4+zstd"])
@pytest.mark.parametrize("layout", ["thd", "hnd"])
@pytest.mark.parametrize("tokens", [256, 300, 37])
def test_gpu_encode_matches_numpy(name: str, layout: str, tokens: int) -> None:
    kv = make_kv(abs(hash((name, layout, tokens))) % 10_000, layers=2, tokens=tokens, dim=64)
    k, v = _tensors(kv, layout, "cuda")
    ours = encode(k, v, name, backend="cupy", model="m")
    _assert_contract(ours, numpy_encode(kv, name, model="m"))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["lynx-a4", "lynx-a4-paper", "uniform-a4"])
def test_gpu_mismatches_are_rare_on_many_codes(name: str) -> None:
    """About 17M codes of Llama-like shape: the bound is about 170 mismatches."""
    kv = make_kv(21, layers=4, tokens=2048, heads=8, dim=128)
    k, v = _tensors(kv, "hnd", "cuda")
    diff = _assert_contract(encode(k, v, name, backend="cupy"), numpy_encode(kv, name))
    print(f"{name}: {diff.describe()}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("source", ["f16", "f32"])
@pytest.mark.parametrize("name", ["lynx-a4", "uniform-a4", "raw"])
def test_gpu_encode_other_sources(source: str, name: str) -> None:
    kv = make_kv(31, layers=2, tokens=300, heads=2, dim=64, dtype=source)
    k, v = _tensors(kv, "hnd", "cuda")
    _assert_contract(encode(k, v, name, backend="cupy"), numpy_encode(kv, name))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["uniform-a4", "uniform-tok-a4", "lynx-a4", "lynx-a4-paper"])
@pytest.mark.parametrize("source", ["bf16", "f16"])
def test_gpu_tiny_values_equal_numpy(name: str, source: str) -> None:
    """Groups (uniform) and pages (lynx) whose minimum is 0, so the divided x - min is
    x itself and may be tiny (the kernel checks those), beside groups and pages of tiny
    values above a negative minimum (the kernel proves those safe without a check);
    lynx chunks centred at 0 among them. Uniform: byte for byte numpy's objects; lynx:
    the encoder's contract."""
    rng = np.random.default_rng(81)
    lowest = -38.0 if source == "bf16" else -7.5  # smallest magnitudes the type holds
    k = rng.standard_normal((64, 2, 64)).astype(np.float32)
    v = rng.standard_normal((64, 2, 64)).astype(np.float32)
    tiny = 10.0 ** rng.uniform(lowest, -5.0, size=(64, 2, 64))
    tiny[rng.random(tiny.shape) < 0.2] = 0.0
    k[:32, 0, :16] = tiny[:32, 0, :16]  # K groups (32 tokens x channel) with minimum 0
    k[:32, 0, 16:32] = tiny[:32, 0, 16:32]
    k[5, 0, 16:32] = -0.5  # tiny values over a negative minimum
    v[:10, 1] = tiny[:10, 1]  # V groups (a token's head) with minimum 0, for kivi
    v[10:20, 1] = tiny[10:20, 1]
    v[10:20, 1, 7] = -1.0
    if name == "uniform-tok-a4":  # K grouped per token too
        k[40:50, 1] = tiny[40:50, 1]
    if name.startswith("lynx"):  # whole pages (64 tokens here) of a channel: g_min 0
        k[:, 1, :8] = tiny[:, 1, :8]
        v[:, 0, 40:48] = tiny[:, 0, 40:48]
    kv = [(k.astype(DTYPES[source]), v.astype(DTYPES[source]))]
    gk, gv = _tensors(kv, "thd", "cuda")
    ours = encode(gk, gv, name, backend="cupy")
    if name.startswith("uniform"):
        assert ours == numpy_encode(kv, name)
    else:
        _assert_contract(ours, numpy_encode(kv, name))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dim", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("name", ["lynx-a4", "lynx-a4-paper"])
def test_gpu_encode_head_dims(name: str, dim: int) -> None:
    """Every head_dim the kernel takes; the paper's chunk means are added by 1 to 8 lanes
    of a channel group, as many as D allows."""
    kv = make_kv(dim, layers=1, tokens=300, heads=2, dim=dim)
    k, v = _tensors(kv, "thd", "cuda")
    _assert_contract(encode(k, v, name, backend="cupy"), numpy_encode(kv, name))


@pytest.mark.gpu
@needs_gpu
def test_gpu_encode_waits_for_the_producer_of_both_kinds() -> None:
    """K and V are encoded on two streams: both wait for what the current stream is
    still writing (here: K and V filled in behind a kernel that holds the stream)."""
    kv = make_kv(52, layers=2, tokens=300, heads=2, dim=64)
    k, v = _tensors(kv, "thd", "cuda")
    late_k = [torch.zeros_like(x) for x in k]
    late_v = [torch.zeros_like(x) for x in v]
    torch.cuda._sleep(50_000_000)  # about 25 ms on the stream
    for dst, src in zip([*late_k, *late_v], [*k, *v], strict=True):
        dst.copy_(src)
    got = encode(late_k, late_v, "lynx-a4", backend="cupy")
    _assert_contract(got, numpy_encode(kv, "lynx-a4"))


@pytest.mark.gpu
@needs_gpu
def test_gpu_encode_chunks_of_a_strided_cache() -> None:
    kv = make_kv(41, layers=2, tokens=300, heads=2, dim=64)
    k, v = _tensors(kv, "hnd", "cuda")
    cache = [torch.zeros((1, 2, 400, 64), dtype=torch.bfloat16, device="cuda") for _ in k]
    for c, x in zip(cache, k, strict=True):
        c[:, :, 50:350] = x
    views = [c[:, :, 50:350] for c in cache]
    transposed = [x[0].permute(1, 2, 0).contiguous().permute(0, 2, 1) for x in v]  # stride_d != 1
    got = encode_chunks(views, transposed, "lynx-a4", tokens_per_object=128, backend="cupy")
    want = numpy_encode_chunks(kv, "lynx-a4", tokens_per_object=128)
    assert len(got) == len(want) == 3
    for ours, ref in zip(got, want, strict=True):
        _assert_contract(ours, ref)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["lynx-a4", "lynx-a4-paper", "uniform-a4", "raw"])
def test_every_decoder_reads_gpu_objects(name: str) -> None:
    kv = make_kv(51, layers=2, tokens=300, heads=2, dim=64)
    k, v = _tensors(kv, "hnd", "cuda")
    obj = encode(k, v, name, backend="cupy")
    decoder = ObjectDecoder()
    sections = decoder.feed(obj)
    header = decoder.header
    assert header is not None and decoder.complete()
    full, anchor = decode(obj), decode(obj, "anchor")
    for layer in range(2):
        for j in range(2):
            x = np.asarray(kv[layer][j], np.float32)
            err = float(((full.kv[layer][j] - x) ** 2).sum() / (x**2).sum())
            assert err < 1e-3
            assert anchor.kv[layer][j].shape == x.shape
    out = [
        tuple(torch.zeros((1, 2, 300, 64), dtype=torch.bfloat16, device="cuda") for _ in "kv")
        for _ in range(2)
    ]
    anchors = [s for s in sections if s.ref.stream == "anchor"]
    residuals = [s for s in sections if s.ref.stream == "residual"]
    cache = decode_anchor(anchors, out, "hnd", header=header, backend="cupy")
    refine_residual(residuals, out, "hnd", anchors=cache)
    for layer in range(2):
        for j in range(2):
            want = torch.from_numpy(full.kv[layer][j]).to(torch.bfloat16)
            assert torch.equal(out[layer][j][0].permute(1, 0, 2).cpu(), want)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bad_values_are_codec_errors() -> None:
    kv = make_kv(61, layers=1, tokens=64, heads=2, dim=64)
    for value, match in (
        (float("inf"), "NaN or infinite"),
        (float("nan"), "NaN or infinite"),
        (40000.0, "beyond"),
    ):
        for codec in ("lynx-a4", "lynx-a4-paper", "uniform-a4"):
            k, v = _tensors(kv, "thd", "cuda")
            (k if codec == "lynx-a4-paper" else v)[0][10, 1, 3] = value
            with pytest.raises(CodecError, match=match):
                encode(k, v, codec, backend="cupy")
    # the kernels skip a flagged block's fields (lynx): the device is fine afterwards
    k, v = _tensors(kv, "thd", "cuda")
    _assert_contract(encode(k, v, "lynx-a4", backend="cupy"), numpy_encode(kv, "lynx-a4"))
    odd = make_kv(62, layers=1, tokens=64, heads=2, dim=96)
    k, v = _tensors(odd, "thd", "cuda")
    with pytest.raises(CodecError, match="head_dim"):
        encode(k, v, "lynx-a4", backend="cupy")
    assert encode(k, v, "lynx-a4") == numpy_encode(odd, "lynx-a4")  # auto falls back
    with pytest.raises(CodecError, match="CUDA tensors"):
        encode([x.cpu() for x in k], [x.cpu() for x in v], "lynx-a4", backend="cupy")


@pytest.fixture(scope="module")
def real_kv_any(request: pytest.FixtureRequest) -> list[tuple[Any, Any]]:
    path = os.environ.get("LYNXKV_REAL_KV")
    if path:
        with np.load(path) as data:
            n = len(data.files) // 2
            bf16 = DTYPES["bf16"]
            return [(data[f"k{i}"].view(bf16), data[f"v{i}"].view(bf16)) for i in range(n)]
    real: list[tuple[Any, Any]] = request.getfixturevalue("real_kv")
    return real


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["lynx-a4", "lynx-a2", "lynx-a4-paper", "uniform-a4"])
def test_gpu_encode_real_kv(real_kv_any: list[tuple[Any, Any]], name: str) -> None:
    k, v = _tensors(real_kv_any, "hnd", "cuda")
    diff = _assert_contract(encode(k, v, name, backend="cupy"), numpy_encode(real_kv_any, name))
    print(f"real KV {name}: {diff.describe()}")
