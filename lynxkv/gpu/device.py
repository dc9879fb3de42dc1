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
from lynxkv.gpu.cuda_source import MIN_BLOCKS, SOURCE, TOKENS_PER_THREAD, kernel_name
from lynxkv.gpu.tables import TABLE_SIZE, Part, Plan, level_table, meta_tables

__all__ = ["THREADS", "cupy", "launch_dequant", "supported"]

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
def _kernel(name: str, tokens_per_thread: int, min_blocks: int) -> Any:
    cp = cupy()
    options = ("-std=c++17", f"-DTPT={tokens_per_thread}", f"-DMIN_BLOCKS={min_blocks}")
    module = cp.RawModule(code=SOURCE, options=options, name_expressions=[name])
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


def _stream(handle: int) -> Any:
    """torch's stream as a CuPy stream (``ExternalStream`` is deprecated in CuPy 14)."""
    cp = cupy()
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(handle))
    return cp.cuda.ExternalStream(handle)


def supported(
    dim: int, out: torch.Tensor, row_off: torch.Tensor, stride_h: int, stride_d: int
) -> bool:
    """Whether the vector kernel can write this destination (else the torch fallback).

    A thread stores 8 consecutive channels as 16-byte vectors: D must be a multiple of
    8, the dim axis contiguous, and every row start 16-byte aligned.
    """
    per16 = 16 // out.element_size()
    rows_ok = bool(((row_off < 0) | (row_off % per16 == 0)).all())
    return (
        out.is_cuda
        and dim % 8 == 0
        and stride_d == 1
        and stride_h % per16 == 0
        and out.data_ptr() % 16 == 0
        and rows_ok
    )


def launch_dequant(
    spec: CodecSpec,
    kv: KV,
    plan: Plan,
    shape: tuple[int, int, int],
    jobs: torch.Tensor,
    row_off: torch.Tensor,
    out_dtype: torch.dtype,
    stride_h: int,
    full: bool,
    tokens_per_thread: int = TOKENS_PER_THREAD,
    min_blocks: int = MIN_BLOCKS,
) -> None:
    """One launch over ``jobs`` (int64 [n, 3] on the device: anchor, residual, dst
    addresses), all of one K|V kind of one object, on torch's current stream."""
    cp = cupy()
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
    )
    kernel = _kernel(name, tokens_per_thread, min_blocks)
    tables = _tables(spec, kv, part, jobs.device.index or 0)
    items = -(-t // tokens_per_thread) * (heads * dim // 8)
    blocks = -(-items // THREADS)
    stream = _stream(torch.cuda.current_stream(jobs.device).cuda_stream)
    fixed: Sequence[Any] = (
        cp.from_dlpack(row_off),
        cp.from_dlpack(tables),
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
    )
    with stream:
        for start in range(0, n, MAX_GRID_Y):  # one grid row per job
            part_jobs = jobs[start : start + MAX_GRID_Y]
            rows = part_jobs.shape[0]
            kernel((blocks, rows), (THREADS,), (cp.from_dlpack(part_jobs), *fixed))
