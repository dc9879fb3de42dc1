"""``encode``: an engine's per-layer K and V tensors to lynxkv objects, quantized on the GPU.

Who calls: the engine connector when it saves a prefix, once per batch of chunks. Input,
per layer, one K and one V tensor, all of one shape, dtype and device:

* ``[T, H, D]`` (the codec's own order), or
* ``[1, H, T, D]`` (transformers' ``hnd``: a DynamicCache layer), read in place;

bf16, fp16 or fp32. ``encode_chunks`` cuts the tokens into objects of
``tokens_per_object`` (the last may be short); ``encode`` makes one object of all of them.
The bytes are the container the numpy codec writes (``lynxkv.codec.container``
assembles both), so every decoder reads them.

The GPU path (CuPy, ``encode_source``) quantizes every section of the batch with one
kernel launch per K|V kind and object length, then copies all payloads to pinned host
memory at once; the host only builds headers, checksums and (for ``+zstd``) compresses.
Codes and metadata equal the numpy encoder's except where a value sits on a rounding
boundary of numpy's own float32 log (``lynxkv.gpu.compare`` counts them). It serves
every preset: lynx (both chunkings; the paper's mean centre per channel only) and
uniform when ``chunk_tokens`` is 32, lynx ``page_tokens`` a multiple of 32 up to 256 and
``D`` in {8, 16, 32, 64, 128, 256}; raw is a device-side copy. Elsewhere — CPU tensors,
no CuPy or GPU, or another codec configuration — ``backend="auto"`` runs the numpy
encoder on a host copy, with identical bytes; ``backend="cupy"`` raises instead.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from lynxkv.codec.container import Bytes, assemble_object, check_dims
from lynxkv.codec.kv import encode_chunks as numpy_encode_chunks
from lynxkv.codec.sections import DTYPES, KV, MAX_ABS, Stream, raw_dtype
from lynxkv.codec.spec import CodecSpec, get_codec
from lynxkv.errors import CodecError
from lynxkv.gpu.api import Backend, gpu_available
from lynxkv.gpu.encode_source import SOURCE, kernel_name
from lynxkv.gpu.encode_tables import (
    ESTIMATE_ERROR,
    TABLES,
    Regions,
    certain_margin,
    encode_tables,
    magnitude_estimate_error,
    magnitude_scale,
    regions,
)
from lynxkv.gpu.tables import make_plan

__all__ = ["encode", "encode_chunks", "gpu_support", "launch_encode", "side_stream"]

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
_CUDA_TYPES = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}
_HEAD_DIMS = (8, 16, 32, 64, 128, 256)
#: Jobs per launch (the grid's z dimension).
MAX_GRID_Z = 65535
#: Largest encode_tables.certain_margin at which the kernel rounds its code estimate
#: before reading the table (FAST): a value falls within the margin of a step with
#: probability about 2 * margin, so a lane redoes about 16 * margin of its tokens (8 values each);
#: on the H200 lynx-a4's V (margin 1.8e-4) and lynx-a4-paper's K and V (1.1e-4) gained
#: with it, lynx-a4's K (1.4e-3) lost (bench/gpu_variants.py; docs/benchmarks.md).
FAST_MARGIN = 5e-4
#: Tokens per block of the uniform kernel (its groups need no page).
UNIFORM_BLOCK = 256
_Payloads = dict[tuple[Stream, int, KV], Bytes]


@dataclass(frozen=True)
class _Input:
    """Validated input: per layer (K, V) as [T, H, D] views."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    shape: tuple[int, int, int]
    dtype: torch.dtype

    @property
    def source(self) -> str:
        return _DTYPES[self.dtype]


def _as_thd(x: Any, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"{where} is a {type(x).__name__}, expected a torch.Tensor")
    if x.dtype not in _DTYPES:
        raise CodecError(f"{where} is {x.dtype}; expected bfloat16, float16 or float32")
    if x.dim() == 3:
        return x
    if x.dim() == 4 and x.shape[0] == 1:
        return x[0].permute(1, 0, 2)  # [1, H, T, D] -> [T, H, D], a view
    raise CodecError(f"{where} has shape {list(x.shape)}; expected [T, H, D] or [1, H, T, D]")


def _inputs(k: Sequence[Any], v: Sequence[Any]) -> _Input:
    if len(k) != len(v):
        raise CodecError(f"{len(k)} K tensors but {len(v)} V tensors")
    if not k:
        raise CodecError("no layers to encode")
    layers = [
        (_as_thd(a, f"layer {i} K"), _as_thd(b, f"layer {i} V"))
        for i, (a, b) in enumerate(zip(k, v, strict=True))
    ]
    first = layers[0][0]
    for i, pair in enumerate(layers):
        for name, x in zip("KV", pair, strict=True):
            if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
                raise CodecError(
                    f"layer {i} {name} is {x.dtype}{list(x.shape)} on {x.device}; every "
                    f"tensor must be {first.dtype}{list(first.shape)} on {first.device} "
                    "(as [T, H, D])"
                )
    shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))
    check_dims(shape, len(layers))
    return _Input(layers, shape, first.dtype)


def gpu_support(spec: CodecSpec, shape: tuple[int, int, int], dtype: torch.dtype) -> str | None:
    """Why the GPU kernel cannot encode this configuration, or None when it can."""
    if spec.kind == "raw":
        return None
    dim = shape[2]
    if spec.chunk_tokens != 32:
        return f"the GPU encoder needs chunk_tokens == 32, not {spec.chunk_tokens}"
    if spec.kind == "lynx" and (spec.page_tokens % 32 or spec.page_tokens > 256):
        return (
            f"the GPU encoder needs page_tokens a multiple of 32 up to 256, not {spec.page_tokens}"
        )
    if -(-shape[0] // _block_tokens(spec)) > MAX_GRID_Z:
        return f"the GPU encoder takes at most {MAX_GRID_Z} pages per object"
    if dim not in _HEAD_DIMS:
        return f"the GPU encoder needs head_dim in {_HEAD_DIMS}, not {dim}"
    if spec.kind == "lynx" and spec.center == "mean" and spec.v_chunk == "token":
        return "the GPU encoder does not centre per-token chunks on their mean"
    if spec.kind == "lynx":
        for kv in ("k", "v"):
            # half the window: the rest is numpy's own float32 rounding
            if not magnitude_estimate_error(spec, kv) < ESTIMATE_ERROR / 2:
                return (
                    f"the GPU encoder's code estimate is too coarse for alpha_{kv} = "
                    f"{spec.alpha(kv):g} (too small)"
                )
    if _shared_bytes(spec, dim, dtype) > _shared_limit():
        return f"a {dim}-channel {dtype} tile does not fit the GPU's shared memory"
    return None


def _shared_limit() -> int:
    from lynxkv.gpu.device import cupy

    return int(cupy().cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])


def _block_tokens(spec: CodecSpec) -> int:
    return spec.page_tokens if spec.kind == "lynx" else UNIFORM_BLOCK


def _shared_bytes(spec: CodecSpec, dim: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of one block: tables, page statistics (lynx), the tile."""
    tokens = _block_tokens(spec)
    stats = 2 * (tokens // 32) * dim if spec.kind == "lynx" else 0
    return (TABLES + stats) * 4 + tokens * dim * dtype.itemsize


def encode(
    k: Sequence[Any],
    v: Sequence[Any],
    codec: CodecSpec | str,
    *,
    model: str = "",
    backend: Backend = "auto",
) -> bytes:
    """One object of per-layer K and V tensors ([T, H, D] or [1, H, T, D] each)."""
    inp = _inputs(k, v)
    return _encode(inp, _spec(codec), inp.shape[0], model, backend)[0]


def encode_chunks(
    k: Sequence[Any],
    v: Sequence[Any],
    codec: CodecSpec | str,
    *,
    tokens_per_object: int = 256,
    model: str = "",
    backend: Backend = "auto",
) -> list[bytes]:
    """Objects of ``tokens_per_object`` tokens each (the last may be short)."""
    if tokens_per_object < 1:
        raise CodecError(f"tokens_per_object must be positive, got {tokens_per_object}")
    return _encode(_inputs(k, v), _spec(codec), tokens_per_object, model, backend)


def _spec(codec: CodecSpec | str) -> CodecSpec:
    return get_codec(codec) if isinstance(codec, str) else codec


def _encode(inp: _Input, spec: CodecSpec, n: int, model: str, backend: Backend) -> list[bytes]:
    if not _use_gpu(backend, inp, spec):
        kv = [(_host(a), _host(b)) for a, b in inp.layers]
        return numpy_encode_chunks(kv, spec, tokens_per_object=n, model=model)
    t, heads, dim = inp.shape
    spans = [(s, min(n, t - s)) for s in range(0, t, n)]
    raw = spec.kind == "raw"
    payloads = _raw_payloads(inp, spans) if raw else _gpu_payloads(inp, spec, spans)
    return [
        assemble_object(
            p,
            spec,
            shape=(length, heads, dim),
            layers=len(inp.layers),
            dtype=inp.source,
            model=model,
        )
        for p, (_, length) in zip(payloads, spans, strict=True)
    ]


def _use_gpu(backend: Backend, inp: _Input, spec: CodecSpec) -> bool:
    if backend == "numpy":
        return False
    if backend not in ("auto", "cupy"):
        raise CodecError(f"backend must be 'auto', 'cupy' or 'numpy', got {backend!r}")
    on_cuda = inp.layers[0][0].is_cuda
    if backend == "auto" and not (on_cuda and gpu_available()):
        return False
    from lynxkv.gpu.device import cupy

    cupy()  # MissingDependency when the GPU path was asked for explicitly
    if not on_cuda:
        raise CodecError("backend='cupy' needs CUDA tensors")
    reason = gpu_support(spec, inp.shape, inp.dtype)
    if reason is not None and backend == "cupy":
        raise CodecError(reason)
    return reason is None


def _host(x: torch.Tensor) -> NDArray[Any]:
    """A [T, H, D] tensor as a numpy array of the codec's dtype."""
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(DTYPES["bf16"])
    return x.numpy()


def _raw_payloads(inp: _Input, spans: list[tuple[int, int]]) -> list[_Payloads]:
    """The raw codec: values in [T, H, D] order as 16-bit floats, copied on the device."""
    dtype = torch.float16 if raw_dtype(inp.source) == DTYPES["f16"] else torch.bfloat16
    pieces: list[torch.Tensor] = []
    for pair in inp.layers:
        for x in pair:
            if not bool(torch.isfinite(x).all()):
                raise CodecError("the tensor holds NaN or infinite values")
            pieces.extend(
                x[s : s + n].to(dtype).contiguous().view(torch.uint8).flatten() for s, n in spans
            )
    host = _to_host(torch.cat(pieces))
    view, pos = host, 0
    out: list[_Payloads] = [{} for _ in spans]
    for layer in range(len(inp.layers)):
        for kv in ("k", "v"):
            for i, (_, n) in enumerate(spans):
                size = 2 * n * inp.shape[1] * inp.shape[2]
                out[i]["anchor", layer, kv] = view[pos : pos + size]
                out[i]["residual", layer, kv] = b""
                pos += size
    return out


def _to_host(buf: torch.Tensor) -> memoryview:
    """The bytes of a device buffer, through pinned memory."""
    host = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    host.copy_(buf)
    return memoryview(host.numpy().data)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T, H, D] itself where the kernel's 16-byte loads can read it, else a copy."""
    size = x.element_size()
    ok = (
        x.stride(2) == 1
        and x.data_ptr() % 16 == 0
        and (x.stride(0) * size) % 16 == 0
        and (x.stride(1) * size) % 16 == 0
    )
    return x if ok else x.contiguous()


def _gpu_payloads(inp: _Input, spec: CodecSpec, spans: list[tuple[int, int]]) -> list[_Payloads]:
    _, heads, dim = inp.shape
    layers = [(_aligned(a), _aligned(b)) for a, b in inp.layers]
    # one device buffer: per K|V kind, per object, per layer, a Regions slice
    plans: list[tuple[KV, int, int, Regions, int]] = []  # kv, span index, layer, regions, base
    total = 0
    for kv in ("k", "v"):
        for i, (_, n) in enumerate(spans):
            reg = regions(spec, kv, (n, heads, dim))
            for layer in range(len(layers)):
                plans.append((kv, i, layer, reg, total))
                total += reg.stride
    dev = layers[0][0].device
    buf = torch.empty(max(total, 16), dtype=torch.uint8, device=dev)
    status = torch.zeros(1, dtype=torch.int32, device=dev)
    # one launch per K|V kind, object length and source strides (views and copies mix);
    # V's on a second stream beside K's (both read what the current stream has written,
    # and the current stream waits for both)
    groups: dict[tuple[KV, int, int, int], list[tuple[int, int, int]]] = {}
    for kv, i, layer, reg, base in plans:
        x = layers[layer][0 if kv == "k" else 1]
        start, n = spans[i]
        src = x.data_ptr() + start * x.stride(0) * x.element_size()
        address = buf.data_ptr() + base
        key = (kv, n, x.stride(0), x.stride(1))
        groups.setdefault(key, []).append((src, address + reg.anchor, address + reg.residual))
    side = side_stream(dev) if dev.type == "cuda" else None  # (tests run this on CPU memory)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(dev))
    for (kv, n, stride_t, stride_h), rows in groups.items():
        on_side = side is not None and kv == "v"
        with torch.cuda.stream(side) if on_side else contextlib.nullcontext():
            jobs = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
            launch_encode(spec, kv, (n, heads, dim), inp.dtype, jobs, (stride_t, stride_h), status)
    if side is not None:
        torch.cuda.current_stream(dev).wait_stream(side)
    flags = int(status.item())  # waits for the kernels
    if flags & 1:
        raise CodecError("the tensor holds NaN or infinite values")
    if flags & 2:
        raise CodecError(f"values beyond +-{MAX_ABS:g} cannot be encoded (float16 group metadata)")
    view = _to_host(buf)
    out: list[_Payloads] = [{} for _ in spans]
    for kv, i, layer, reg, base in plans:
        a, r = base + reg.anchor, base + reg.residual
        out[i]["anchor", layer, kv] = view[a : a + reg.anchor_size]
        out[i]["residual", layer, kv] = view[r : r + reg.residual_size]
    return out


@functools.cache
def _kernel(name: str, defines: tuple[str, ...] = (), source: str = SOURCE) -> Any:
    from lynxkv.gpu.device import cupy

    options = ("-std=c++17", *(f"-D{d}" for d in defines))
    module = cupy().RawModule(code=source, options=options, name_expressions=[name])
    return module.get_function(name)


@functools.cache
def _tables(spec: CodecSpec, kv: KV, device: int) -> torch.Tensor:
    host = encode_tables(spec, kv)
    assert host.size == TABLES
    return torch.from_numpy(host).to(torch.device("cuda", device))


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream V's encoding runs on, beside K's on the current one: the two kernels
    share the GPU (K's bound by shared memory, V's by instructions) and each one's last
    wave fills in with the other's blocks (H200: lynx-a4 0.588 -> 0.606 of copy
    bandwidth, bench/gpu_variants.py ``STREAMS=2``). One per device, made on first use."""
    return _side_stream(torch.device(device).index or 0)


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)  # type: ignore[no-untyped-call]


def launch_encode(
    spec: CodecSpec,
    kv: KV,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    jobs: torch.Tensor,
    strides: tuple[int, int],
    status: torch.Tensor,
    *,
    defines: tuple[str, ...] = (),
    source: str = SOURCE,
    name_of: Callable[..., str] = kernel_name,
) -> None:
    """One launch per ``MAX_GRID_Z`` rows of ``jobs`` (int64 [n, 3] on the device: source
    element (0, 0, 0), anchor payload and residual payload addresses; code planes
    ``encode_tables.ALIGN``-aligned) of one K|V kind and [T, H, D] ``shape``; ``strides``
    are the sources' token and head strides in elements. ORs input problems into
    ``status`` (int32: 1 NaN or inf, 2 too large). On torch's current stream.
    ``defines`` (``NAME=VALUE`` macros) and ``source`` compile another form of the kernel
    (bench/gpu_variants.py), ``name_of`` names its instantiations (an earlier kernel's
    ``kernel_name``)."""
    from lynxkv.gpu.device import _stream, cupy, ptr

    cupy()  # MissingDependency, naming the install command, without CuPy
    t, heads, dim = shape
    lynx = spec.kind == "lynx"
    by_token = (
        (kv == "v" and spec.v_chunk == "token")
        if lynx
        else not (kv == "k" and spec.groups == "kivi")
    )
    args = (
        _CUDA_TYPES[dtype],
        dim,
        lynx,
        spec.anchor_bits,
        by_token,
        lynx and spec.chunk_meta == "u8",
        lynx and spec.center == "mean",
    )
    # codes without the table read where the margin leaves few values to redo
    margin = certain_margin(spec, kv) if lynx else 0.5
    fast = margin < FAST_MARGIN
    name = name_of(*args, fast=fast) if fast else name_of(*args)
    kernel = _kernel(name, defines, source)
    smem = _shared_bytes(spec, dim, dtype)
    if kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    plan = make_plan(spec, kv, t, heads, dim)
    block = _block_tokens(spec)
    fixed = (
        ptr(_tables(spec, kv, jobs.device.index or 0)),
        ptr(status),
        np.int32(t),
        np.int32(heads),
        np.int32(block),
        np.int64(strides[0]),
        np.int64(strides[1]),
        np.int64(plan.off_scale),
        np.int64(plan.off_mu),
        np.int64(plan.off_sigma),
        np.int64(plan.off_codes),
        np.float32(spec.alpha(kv)),
        magnitude_scale(spec, kv) if lynx else np.float32(0),
        np.float32(0.5 - margin),
    )
    stream = _stream(torch.cuda.current_stream(jobs.device).cuda_stream)
    with stream:
        for start in range(0, jobs.shape[0], MAX_GRID_Z):
            part = jobs[start : start + MAX_GRID_Z]
            grid = (heads, -(-t // block), part.shape[0])
            kernel(grid, (block,), (ptr(part), *fixed), shared_mem=smem)
