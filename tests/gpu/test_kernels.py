"""The GPU decode path against the numpy codec (the oracle), and its CPU fallback.

Every comparison is exact: the kernels compute each value with the reference's float32
operations (``lynxkv.gpu.tables``), and bf16 / fp16 outputs round the same float32 the
same way as torch's ``.to``. Tests marked ``gpu`` run on the GPU machine only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from lynxkv.codec import CODECS, ObjectDecoder, Section, encode
from lynxkv.codec.container import Header
from lynxkv.codec.sections import decode_tensor, encode_tensor
from lynxkv.errors import CodecError, FormatError, MissingDependency
from lynxkv.gpu import Backend, Layout, decode_anchor, gpu_available, refine_residual
from lynxkv.gpu.cuda_source import ROWS_AFFINE, ROWS_TABLE, ROWS_UNITS
from lynxkv.gpu.tables import emulate
from lynxkv.gpu.targets import Rows, destination
from tests.codec.kvgen import make_kv

PRESETS = sorted(CODECS)
QUANTIZED = [name for name in PRESETS if CODECS[name].kind != "raw"]
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


def _object(
    codec: str, seed: int, tokens: int, source: str = "bf16", heads: int = 2, dim: int = 64
) -> tuple[Header, list[Section]]:
    kv = make_kv(seed, layers=2, tokens=tokens, heads=heads, dim=dim, dtype=source)
    decoder = ObjectDecoder()
    sections = decoder.feed(encode(kv, codec))
    assert decoder.header is not None and decoder.complete()
    return decoder.header, sections


def _reference(header: Header, sections: list[Section], part: str) -> dict[tuple[int, str], Any]:
    """(layer, kv) -> [T, H, D] float32 from the numpy codec."""
    anchors = {(s.ref.layer, s.ref.kv): s.payload for s in sections if s.ref.stream == "anchor"}
    residuals = {(s.ref.layer, s.ref.kv): s.payload for s in sections if s.ref.stream == "residual"}
    return {
        key: decode_tensor(
            header.codec,
            key[1],  # type: ignore[arg-type,unused-ignore]
            header.shape,
            header.dtype,
            payload,
            residuals.get(key) if part == "full" else None,
        )
        for key, payload in anchors.items()
    }


class Target:
    """Destination tensors of one layout, poisoned with NaN, and how to read them back."""

    def __init__(self, layout: str, header: Header, dtype: torch.dtype, device: str) -> None:
        t, heads, dim = header.shape
        self.layout = layout
        self.kwargs: dict[str, Any] = {}
        gen = torch.Generator().manual_seed(t)
        if layout == "hnd":
            self.offset = 40
            self.out: list[Any] = [
                tuple(
                    torch.full((1, heads, t + 100, dim), float("nan"), dtype=dtype, device=device)
                    for _ in range(2)
                )
                for _ in range(header.layers)
            ]
            self.kwargs["token_offset"] = self.offset
        else:
            block, blocks = 16, -(-t // 16) + 5
            slots = torch.randperm(block * blocks, generator=gen)[:t].to(torch.int64)
            slots[torch.rand(t, generator=gen) < 0.1] = -1  # padding tokens
            self.slots = slots
            self.out = [
                torch.full((2, blocks, block, heads, dim), float("nan"), dtype=dtype, device=device)
                for _ in range(header.layers)
            ]
            self.kwargs["slot_mapping"] = slots.to(device)

    def read(self, layer: int, kv: str) -> torch.Tensor:
        """[T, H, D] where the section went; skipped rows (slot -1) read as NaN."""
        i = 0 if kv == "k" else 1
        if self.layout == "hnd":
            base = self.out[layer][i][0]
            t = base.shape[1] - 100
            got: torch.Tensor = base[:, self.offset : self.offset + t].permute(1, 0, 2).cpu()
            return got
        base = self.out[layer][i].cpu()
        block = base.shape[1]
        keep = self.slots >= 0
        got = torch.full((self.slots.shape[0], *base.shape[2:]), float("nan"), dtype=base.dtype)
        got[keep] = base[self.slots[keep] // block, self.slots[keep] % block]
        return got

    def written(self) -> int:
        """How many elements are not NaN any more."""
        return sum(int((~torch.isnan(x)).sum()) for pair in self.out for x in pair)


def _expected(target: Target, ref: Any, dtype: torch.dtype) -> torch.Tensor:
    x = torch.from_numpy(ref).to(dtype)
    if target.layout == "paged":
        x[target.slots < 0] = float("nan")
    return x


def _check(target: Target, refs: dict[tuple[int, str], Any], dtype: torch.dtype) -> None:
    expected_count = 0
    for (layer, kv), ref in refs.items():
        want = _expected(target, ref, dtype)
        got = target.read(layer, kv)
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)), (layer, kv)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (layer, kv)
        expected_count += int((~torch.isnan(want)).sum())
    assert target.written() == expected_count  # nothing outside the section was touched


def _roundtrip(
    codec: str,
    layout: Layout,
    out: str,
    tokens: int,
    backend: Backend,
    device: str,
    heads: int = 2,
    dim: int = 64,
) -> None:
    seed = abs(hash((codec, layout, out, tokens))) % 10_000  # fresh data per case
    header, sections = _object(codec, seed, tokens, heads=heads, dim=dim)
    dtype = DTYPES[out]
    target = Target(layout, header, dtype, device)
    anchors = [s for s in sections if s.ref.stream == "anchor"]
    residuals = [s for s in sections if s.ref.stream == "residual"]
    cache = decode_anchor(
        anchors,
        target.out,
        layout,
        header=header,
        backend=backend,
        **target.kwargs,
    )
    assert cache.gpu == (backend == "cupy")
    part = "full" if not header.codec.has_residual else "anchor"
    _check(target, _reference(header, sections, part), dtype)
    refine_residual(residuals, target.out, layout, anchors=cache, **target.kwargs)
    _check(target, _reference(header, sections, "full"), dtype)


# -- the kernel arithmetic, emulated in numpy: runs everywhere ---------------------------


@pytest.mark.parametrize("codec", QUANTIZED)
@pytest.mark.parametrize("tokens", [256, 300, 7])
def test_tables_reproduce_the_reference_bit_for_bit(codec: str, tokens: int) -> None:
    spec = CODECS[codec]
    for kv, x in zip("kv", make_kv(tokens, layers=1, tokens=tokens)[0], strict=True):
        anchor, residual = encode_tensor(x, spec, kv, "bf16")  # type: ignore[arg-type]
        for res in (None, residual):
            ref = decode_tensor(spec, kv, x.shape, "bf16", anchor, res)  # type: ignore[arg-type]
            got = emulate(spec, kv, x.shape, anchor, res)  # type: ignore[arg-type]
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


# -- the CPU fallback ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["lynx-a4", "lynx-a4-paper", "uniform-a4", "raw"])
@pytest.mark.parametrize("layout", ["hnd", "paged"])
@pytest.mark.parametrize("out", ["bf16", "f32"])
def test_numpy_fallback_matches_the_codec(codec: str, layout: Layout, out: str) -> None:
    _roundtrip(codec, layout, out, 300, "numpy", "cpu")


def test_auto_on_cpu_tensors_uses_numpy() -> None:
    header, sections = _object("lynx-a4", 1, 64)
    target = Target("hnd", header, torch.bfloat16, "cpu")
    anchors = [s for s in sections if s.ref.stream == "anchor"]
    cache = decode_anchor(anchors, target.out, "hnd", header=header, token_offset=40)
    assert not cache.gpu


def test_cupy_backend_without_cupy_raises_missing_dependency() -> None:
    pytest.importorskip("numpy")
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed here")
    header, sections = _object("lynx-a4", 2, 32)
    target = Target("hnd", header, torch.bfloat16, "cpu")
    with pytest.raises(MissingDependency):
        decode_anchor(sections[:1], target.out, "hnd", header=header, backend="cupy")


def test_bad_arguments_are_codec_errors() -> None:
    header, sections = _object("lynx-a4", 3, 32)
    target = Target("hnd", header, torch.bfloat16, "cpu")
    with pytest.raises(CodecError):
        decode_anchor(sections, target.out, "nhd", header=header)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode_anchor(sections[:1], target.out, "hnd", header=header, token_offset=200)
    with pytest.raises(CodecError):
        decode_anchor(sections[:1], target.out, "paged", header=header)
    residual = [s for s in sections if s.ref.stream == "residual"]
    with pytest.raises(CodecError):
        decode_anchor(residual, target.out, "hnd", header=header)
    cache = decode_anchor([], target.out, "hnd", header=header)
    with pytest.raises(FormatError):
        refine_residual(residual, target.out, "hnd", anchors=cache)


def test_rows_reach_the_kernel_in_their_cheapest_form() -> None:
    """hnd rows as arithmetic, vLLM slots as int32 16-byte units, both decided from the
    strides without reading the table back; a cache whose rows cannot all be 16-byte
    aligned keeps the int64 table and is not for the kernel."""
    hnd = [tuple(torch.zeros(1, 4, 90, 64, dtype=torch.bfloat16) for _ in "kv")]
    dest = destination(hnd, "hnd", layers=1, tokens=20, heads=4, dim=64, token_offset=7)
    assert (dest.rows.mode, dest.rows.row0, dest.rows.step) == (ROWS_AFFINE, 7 * 64, 64)
    assert dest.rows.aligned
    assert torch.equal(dest.row_off, dest.rows.row0 + torch.arange(20) * dest.rows.step)
    slots = torch.tensor([5, -1, 0, 47, 16], dtype=torch.int64)
    for dtype, per16 in ((torch.bfloat16, 8), (torch.float32, 4)):
        paged = [torch.zeros(2, 3, 16, 4, 64, dtype=dtype)]
        dest = destination(paged, "paged", layers=1, tokens=5, heads=4, dim=64, slot_mapping=slots)
        assert dest.rows.mode == ROWS_UNITS and dest.rows.table.dtype == torch.int32
        want = torch.where(slots >= 0, dest.row_off // per16, -1)
        assert torch.equal(dest.rows.table.to(torch.int64), want)
        assert bool((dest.row_off[slots >= 0] % per16 == 0).all())
    odd = torch.zeros(2, 3, 16, 4, 65, dtype=torch.bfloat16)[..., :64]  # rows 260 apart
    dest = destination([odd], "paged", layers=1, tokens=5, heads=4, dim=64, slot_mapping=slots)
    assert dest.rows.mode == ROWS_TABLE and not dest.rows.aligned
    assert torch.equal(dest.rows.table, dest.row_off)


# -- the CuPy kernels (GPU machine) ----------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("codec", PRESETS)
@pytest.mark.parametrize("layout", ["hnd", "paged"])
@pytest.mark.parametrize("out", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("tokens", [256, 300, 37])
def test_kernels_match_the_codec(codec: str, layout: Layout, out: str, tokens: int) -> None:
    _roundtrip(codec, layout, out, tokens, "cupy", "cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("codec", ["lynx-a2", "lynx-a6", "lynx-a3"])
@pytest.mark.parametrize("layout", ["hnd", "paged"])
def test_kernels_with_an_odd_number_of_8_groups_a_token(codec: str, layout: Layout) -> None:
    """3 heads of 24 channels: 9 groups of 8 a token, so 6-bit fields (lynx-a2's residual,
    lynx-a6's anchor) sit 2 mod 4 bytes apart from one token to the next and are read
    byte by byte, as are 3-bit fields always."""
    _roundtrip(codec, layout, "bf16", 37, "cupy", "cuda", heads=3, dim=24)
    _roundtrip(codec, layout, "f16", 256, "cupy", "cuda", heads=3, dim=24)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("codec", ["lynx-a2", "lynx-a6"])
@pytest.mark.parametrize("layout", ["hnd", "paged"])
def test_kernels_with_whole_warps_of_8_groups(codec: str, layout: Layout) -> None:
    """4 heads of 64 channels: 32 groups of 8 a token, so a warp's 6-bit residual fields
    (lynx-a2) are staged in shared memory, except in the last, short token group."""
    _roundtrip(codec, layout, "bf16", 300, "cupy", "cuda", heads=4, dim=64)
    _roundtrip(codec, layout, "f32", 256, "cupy", "cuda", heads=4, dim=64)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("source", ["f16", "f32"])
def test_kernels_other_sources(source: str) -> None:
    for codec in ("lynx-a4", "raw"):
        header, sections = _object(codec, 11, 256, source)
        target = Target("hnd", header, torch.float16, "cuda")
        anchors = [s for s in sections if s.ref.stream == "anchor"]
        decode_anchor(anchors, target.out, "hnd", header=header, backend="cupy", token_offset=40)
        part = "full" if not header.codec.has_residual else "anchor"
        _check(target, _reference(header, sections, part), torch.float16)


@pytest.mark.gpu
@needs_gpu
def test_refine_equals_one_shot_after_small_batches() -> None:
    """Batches of one section each (many staging rounds through both pinned buffers)."""
    header, sections = _object("lynx-a4", 5, 256)
    a = Target("paged", header, torch.bfloat16, "cuda")
    anchors = [s for s in sections if s.ref.stream == "anchor"]
    residuals = [s for s in sections if s.ref.stream == "residual"]
    cache = decode_anchor(
        anchors, a.out, "paged", header=header, backend="cupy", batch_bytes=1, **a.kwargs
    )
    refine_residual(residuals, a.out, "paged", anchors=cache, batch_bytes=1, **a.kwargs)
    _check(a, _reference(header, sections, "full"), torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["hnd", "paged"])
def test_int64_row_table_writes_the_same_rows(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int64 row table (slots beyond int32 units, or rows the strides cannot prove
    aligned) through the same kernels: every row lands where the cheaper forms put it."""
    import lynxkv.gpu.api as api

    def table_rows(*args: Any, **kwargs: Any) -> Any:
        dest = destination(*args, **kwargs)
        return dataclasses.replace(dest, rows=Rows(ROWS_TABLE, dest.row_off))

    monkeypatch.setattr(api, "destination", table_rows)
    _roundtrip("lynx-a4", layout, "bf16", 300, "cupy", "cuda")
    _roundtrip("uniform-a4", layout, "f16", 37, "cupy", "cuda")


@pytest.mark.gpu
@needs_gpu
def test_unsupported_head_dim_falls_back_under_auto() -> None:
    spec = dataclasses.replace(CODECS["lynx-a4"], name="x")
    kv = make_kv(9, layers=1, tokens=64, heads=2, dim=12)
    decoder = ObjectDecoder()
    sections = decoder.feed(encode(kv, spec))
    header = decoder.header
    assert header is not None
    target = Target("hnd", header, torch.bfloat16, "cuda")
    anchors = [s for s in sections if s.ref.stream == "anchor"]
    cache = decode_anchor(anchors, target.out, "hnd", header=header, token_offset=40)
    assert not cache.gpu
    with pytest.raises(CodecError):
        decode_anchor(anchors, target.out, "hnd", header=header, backend="cupy")
