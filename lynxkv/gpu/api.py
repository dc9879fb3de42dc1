"""``decode_anchor`` and ``refine_residual``: verified sections to engine tensors.

Who calls: the engine connector, once per object, with the object's anchor sections as
they arrive (``decode_anchor``), then with its residual sections (``refine_residual``).
Both write straight into the caller's tensors (``targets`` gives the layouts) and
return once the work is queued on torch's current stream (GPU) or done (CPU).

The GPU path (CuPy) stages payloads through pinned buffers (``staging``) and launches one
kernel per batch of sections and K|V kind. The numpy path (no cupy, no GPU, tensors on
the CPU, or a head dim the vector kernel does not take) decodes with
``lynxkv.codec.sections.decode_tensor`` and copies with torch. Both compute every value
with the same float32 operations as the reference, so the paths agree bit for bit, and
a refined value equals the one-shot full decode of anchor and residual.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lynxkv.codec.container import Header
from lynxkv.codec.decoder import Section
from lynxkv.codec.sections import decode_tensor, raw_dtype
from lynxkv.errors import CodecError, FormatError
from lynxkv.gpu.tables import make_plan
from lynxkv.gpu.targets import Destination, Layout, destination

__all__ = ["AnchorCache", "Backend", "decode_anchor", "gpu_available", "refine_residual"]

Backend = Literal["auto", "cupy", "numpy"]
#: Payload bytes staged per batch: large enough to fill the GPU, small enough to overlap.
BATCH_BYTES = 16 << 20


@dataclass(eq=False)
class AnchorCache:
    """The anchor payloads of one object, kept for ``refine_residual``.

    On the GPU path they stay in device memory (``device`` holds their addresses and
    ``buffers`` the tensors that own them); on the numpy path, the host bytes.
    """

    header: Header
    gpu: bool
    host: dict[tuple[int, str], bytes] = field(default_factory=dict)
    device: dict[tuple[int, str], int] = field(default_factory=dict)
    buffers: list[torch.Tensor] = field(default_factory=list)


def gpu_available() -> bool:
    """Whether CuPy imports and torch sees a CUDA device."""
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _resolve(
    out: Sequence[Any], layout: Layout, header: Header, token_offset: int, slots: Any
) -> Destination:
    t, heads, dim = header.shape
    return destination(
        out,
        layout,
        layers=header.layers,
        tokens=t,
        heads=heads,
        dim=dim,
        token_offset=token_offset,
        slot_mapping=slots,
    )


def _use_gpu(backend: Backend, dest: Destination, header: Header) -> bool:
    if backend == "numpy":
        return False
    if backend not in ("auto", "cupy"):
        raise CodecError(f"backend must be 'auto', 'cupy' or 'numpy', got {backend!r}")
    base = dest.base(0, "k")
    if backend == "auto" and not (base.is_cuda and gpu_available()):
        return False
    from lynxkv.gpu import device

    device.cupy()  # MissingDependency when the GPU path was asked for explicitly
    ok = device.supported(header.head_dim, base, dest.rows, dest.stride_h, dest.stride_d)
    if not ok and backend == "cupy":
        raise CodecError(
            "the GPU kernels need CUDA tensors, head_dim % 8 == 0, a contiguous dim axis "
            "and 16-byte aligned rows"
        )
    return ok


def _batches(sections: Iterable[Section], limit: int) -> Iterator[list[Section]]:
    batch: list[Section] = []
    size = 0
    for section in sections:
        batch.append(section)
        size += len(section.payload)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_stream(section: Section, stream: str) -> None:
    if section.ref.stream != stream:
        raise CodecError(f"expected {stream} sections, got the {section.ref.describe()}")


def decode_anchor(
    sections: Iterable[Section],
    out: Sequence[Any],
    layout: Layout,
    *,
    header: Header,
    token_offset: int = 0,
    slot_mapping: torch.Tensor | None = None,
    backend: Backend = "auto",
    batch_bytes: int = BATCH_BYTES,
) -> AnchorCache:
    """Dequantize anchor sections of the object ``header`` describes into ``out``.

    ``out``: ``hnd``: per layer ``(k, v)`` [1, H, T_cache, D]; ``paged``: per layer
    [2, num_blocks, block_size, H, D]; bf16, fp16 or float32. Returns the anchors that
    ``refine_residual`` needs. ``backend="cupy"`` raises MissingDependency without CuPy.
    """
    dest = _resolve(out, layout, header, token_offset, slot_mapping)
    cache = AnchorCache(header, _use_gpu(backend, dest, header))
    if not cache.gpu:
        for section in sections:
            _check_stream(section, "anchor")
            ref = section.ref
            cache.host[ref.layer, ref.kv] = section.payload
            _write_numpy(dest, header, section, None)
        return cache
    stager = _stager(dest.row_off.device)
    stager.begin()
    for batch in _batches(sections, batch_bytes):
        for section in batch:
            _check_stream(section, "anchor")
        buf, offsets = stager.stage([s.payload for s in batch])
        cache.buffers.append(buf)
        for section, off in zip(batch, offsets, strict=True):
            cache.device[section.ref.layer, section.ref.kv] = buf.data_ptr() + off
        if header.codec.kind == "raw":
            _write_raw(dest, header, batch, buf, offsets)
        else:
            _launch(dest, header, [(s, cache.device[s.ref.layer, s.ref.kv], 0) for s in batch])
    stager.end()
    return cache


def refine_residual(
    sections: Iterable[Section],
    out: Sequence[Any],
    layout: Layout,
    *,
    anchors: AnchorCache,
    token_offset: int = 0,
    slot_mapping: torch.Tensor | None = None,
    batch_bytes: int = BATCH_BYTES,
) -> None:
    """Overwrite the anchor values in ``out`` with the full decode of each residual
    section (bit-identical to decoding anchor and residual in one shot). ``out`` and
    the layout arguments must be those given to ``decode_anchor``."""
    header = anchors.header
    dest = _resolve(out, layout, header, token_offset, slot_mapping)
    if not anchors.gpu:
        for section in sections:
            _check_stream(section, "residual")
            anchor = anchors.host.get((section.ref.layer, section.ref.kv))
            if anchor is None:
                raise FormatError(f"the {section.ref.describe()} arrived before its anchor")
            _write_numpy(dest, header, section, anchor)
        return
    stager = _stager(dest.row_off.device)
    stager.begin()
    keep: list[torch.Tensor] = []
    for batch in _batches(sections, batch_bytes):
        jobs: list[tuple[Section, int, int]] = []
        for section in batch:
            _check_stream(section, "residual")
            if (section.ref.layer, section.ref.kv) not in anchors.device:
                raise FormatError(f"the {section.ref.describe()} arrived before its anchor")
        buf, offsets = stager.stage([s.payload for s in batch])
        keep.append(buf)
        for section, off in zip(batch, offsets, strict=True):
            address = anchors.device[section.ref.layer, section.ref.kv]
            jobs.append((section, address, buf.data_ptr() + off))
        _launch(dest, header, jobs)
    stager.end()


def _write_numpy(dest: Destination, header: Header, section: Section, anchor: bytes | None) -> None:
    ref = section.ref
    if anchor is None:
        x = decode_tensor(header.codec, ref.kv, header.shape, header.dtype, section.payload)
    else:
        x = decode_tensor(header.codec, ref.kv, header.shape, header.dtype, anchor, section.payload)
    base = dest.base(ref.layer, ref.kv)
    dest.write(ref.layer, ref.kv, torch.from_numpy(x).to(base.device))


def _write_raw(
    dest: Destination, header: Header, batch: list[Section], buf: torch.Tensor, offsets: list[int]
) -> None:
    dtype = torch.float16 if raw_dtype(header.dtype) == np.dtype("<f2") else torch.bfloat16
    n = 2 * int(np.prod(header.shape))
    for section, off in zip(batch, offsets, strict=True):
        x = buf[off : off + n].view(dtype).view(header.shape)
        dest.write(section.ref.layer, section.ref.kv, x)


def _launch(dest: Destination, header: Header, jobs: list[tuple[Section, int, int]]) -> None:
    """One kernel per K|V kind over ``jobs`` (section, anchor address, residual address)."""
    from lynxkv.gpu import device

    spec = header.codec
    t, heads, dim = header.shape
    for kv in ("k", "v"):
        rows = [
            (anchor, residual, dest.base(s.ref.layer, kv).data_ptr())
            for s, anchor, residual in jobs
            if s.ref.kv == kv
        ]
        if not rows:
            continue
        full = rows[0][1] != 0
        table = torch.tensor(rows, dtype=torch.int64).to(dest.row_off.device, non_blocking=True)
        device.launch_dequant(
            spec,
            kv,
            make_plan(spec, kv, t, heads, dim),
            header.shape,
            table,
            dest.rows,
            dest.base(0, kv).dtype,
            dest.stride_h,
            full,
        )


@functools.cache
def _stager(dev: torch.device) -> Any:
    from lynxkv.gpu.staging import Stager

    return Stager(dev)
