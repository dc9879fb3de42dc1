"""The CuPy side: compiling and launching the kernels of ``cuda_source`` on torch memory.

cupy is imported here only, lazily. Kernels run on torch's current stream (wrapped as
a CuPy external stream), and torch tensors reach them through DLPack, without copies.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lynxkv.codec.sections import KV
from lynxkv.codec.spec import CodecSpec
from lynxkv.errors import MissingDependency
from lynxkv.gpu.cuda_source import (
    MIN_BLOCKS,
    SOURCE,
    TOKENS_PER_THREAD,
    kernel_name,
)
from lynxkv.gpu.tables import TABLE_SIZE, Part, Plan, level_table, meta_tables
from lynxkv.gpu.targets import Rows

__all__ = ["THREADS", "cupy", "launch_dequant", "ptr", "supported"]

#: Threads per block of the dequantizing kernel.
THREADS = 256
#: Jobs per launch (the grid's y dimension).
MAX_GRID_Y = 65535
_OUT = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}


def cupy() -> Any:
    """The cupy module, or MissingDependency naming the install command."""
    try:
        import cupy as cp  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise MissingDependency("cupy", "gpu") from exc
    return cp


@functools.cache
def _kernel(
    name: str, tokens_per_thread: int, min_blocks: int, defines: tuple[str, ...], source: str
) -> Any:
    cp = cupy()
    options = (
        "-std=c++17",
        f"-DTPT={tokens_per_thread}",
        f"-DMIN_BLOCKS={min_blocks}",
        *(f"-D{d}" for d in defines),
    )
    module = cp.RawModule(code=source, options=options, name_expressions=[name])
    return module.get_function(name)


@functools.cache
def _tables(spec: CodecSpec, kv: KV, part: Part, device: int) -> torch.Tensor:
    """[3 * 256] float32 on the device: level, u8 mu, u8 sigma tables."""
    mu, sigma = meta_tables()
    host = np.concatenate([level_table(spec, kv, part), mu, sigma]).astype(np.float32)
    assert host.size == 3 * TABLE_SIZE
    return torch.from_numpy(host).to(torch.device("cuda", device))


class _StreamHandle:
    """A raw CUDA stream handle, offered through the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@functools.lru_cache(maxsize=64)
def _stream(handle: int) -> Any:
    """torch's stream as a CuPy stream (``ExternalStream`` is deprecated in CuPy 14)."""
    cp = cupy()
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(handle))
    return cp.cuda.ExternalStream(handle)


def ptr(x: torch.Tensor) -> np.uint64:
    """A device tensor as a kernel's pointer argument: its address by value (wrapping it
    as a CuPy array costs tens of microseconds a launch). The caller keeps ``x`` alive
    until the launch is queued; the stream orders its reuse."""
    return np.uint64(x.data_ptr())


def supported(dim: int, out: torch.Tensor, rows: Rows, stride_h: int, stride_d: int) -> bool:
    """Whether the vector kernel can write this destination (else the torch fallback).

    A thread stores 8 consecutive channels as 16-byte vectors: D must be a multiple of
    8, the dim axis contiguous, and every row start 16-byte aligned. Decided on the host
    (no device round trip).
    """
    per16 = 16 // out.element_size()
    return (
        out.is_cuda
        and dim % 8 == 0
        and stride_d == 1
        and stride_h % per16 == 0
        and out.data_ptr() % 16 == 0
        and rows.aligned
        and rows.row0 % per16 == 0  # 0 unless the rows are computed
    )


def launch_dequant(
    spec: CodecSpec,
    kv: KV,
    plan: Plan,
    shape: tuple[int, int, int],
    jobs: torch.Tensor,
    rows: Rows,
    out_dtype: torch.dtype,
    stride_h: int,
    full: bool,
    tokens_per_thread: int = TOKENS_PER_THREAD,
    min_blocks: int = MIN_BLOCKS,
    defines: tuple[str, ...] = (),
    source: str = SOURCE,
) -> None:
    """One launch over ``jobs`` (int64 [n, 3] on the device: anchor, residual, dst
    addresses), all of one K|V kind of one object, on torch's current stream.

    ``rows`` says where each token's row starts (``targets.Rows``).
    ``tokens_per_thread``, ``min_blocks``, ``defines`` (``NAME=VALUE`` macros of
    ``cuda_source``) and ``source`` select compiled variants for bench/gpu_variants.py.
    """
    cupy()  # MissingDependency, naming the install command, without CuPy
    t, heads, dim = shape
    n = jobs.shape[0]
    if n == 0:
        return
    part: Part = "full" if full else "anchor"
    name = kernel_name(
        _OUT[out_dtype],
        spec.anchor_bits,
        spec.residual_bits,
        full,
        plan.page,
        plan.by_token,
        plan.u8,
        rows.mode,
    )
    kernel = _kernel(name, tokens_per_thread, min_blocks, defines, source)
    tables = _tables(spec, kv, part, jobs.device.index or 0)
    items = -(-t // tokens_per_thread) * (heads * dim // 8)
    blocks = -(-items // THREADS)
    stream = _stream(torch.cuda.current_stream(jobs.device).cuda_stream)
    fixed: Sequence[Any] = (
        ptr(rows.table),
        ptr(tables),
        np.int32(t),
        np.int32(heads),
        np.int32(dim),
        np.int32(spec.chunk_tokens),
        np.int32(spec.page_tokens),
        np.int64(plan.off_scale),
        np.int64(plan.off_mu),
        np.int64(plan.off_sigma),
        np.int64(plan.off_codes),
        np.int64(stride_h),
        np.int32(items),
        np.int64(rows.row0),
        np.int64(rows.step),
    )
    with stream:
        for start in range(0, n, MAX_GRID_Y):  # one grid row per job
            part_jobs = jobs[start : start + MAX_GRID_Y]
            kernel((blocks, part_jobs.shape[0]), (THREADS,), (ptr(part_jobs), *fixed))
