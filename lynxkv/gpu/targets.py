"""Where decoded values go: the engine's own tensors, in the ``hnd`` or ``paged`` layout.

* ``hnd``: per layer ``(k, v)``, each [B=1, H, T_cache, D] (a transformers DynamicCache);
  token ``t`` of a section lands at cache position ``token_offset + t``.
* ``paged``: per layer one [2, num_blocks, block_size, H, D] tensor (vLLM; K at index 0,
  V at 1); token ``t`` lands in slot ``slot_mapping[t]`` (int64 [T]), ``-1`` skips it.

Both reduce to one rule the kernels and the torch fallback share: a base tensor per
(layer, K|V), the element offset of each token's row (``row_off``, -1: skip), and the
strides of the head and dim axes. The kernel gets the rows in its cheapest form
(``Rows``): hnd rows as arithmetic, vLLM's slots as an int32 table in 16-byte units
when they fit one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lynxkv.errors import CodecError
from lynxkv.gpu.cuda_source import ROWS_AFFINE, ROWS_TABLE, ROWS_UNITS

__all__ = ["Destination", "Layout", "Rows", "destination"]

Layout = Literal["hnd", "paged"]
_KV_INDEX = {"k": 0, "v": 1}


@dataclass(frozen=True)
class Rows:
    """How the kernel finds token t's row (element offset from a base; -1 skips t).

    ``mode`` is ``cuda_source.ROWS_*``: ``ROWS_AFFINE``: ``row0 + t * step``;
    ``ROWS_UNITS``: ``table[t]`` (int32) times 16 bytes; ``ROWS_TABLE``: ``table[t]``
    (int64 elements). ``aligned``: every row starts on 16 bytes (known from the strides,
    without reading the table back from the device).
    """

    mode: int
    table: torch.Tensor
    row0: int = 0
    step: int = 0
    aligned: bool = True


@dataclass(frozen=True)
class Destination:
    """The resolved destination of one object's sections."""

    layout: Layout
    #: per layer, K and V base tensors: hnd [H, T_cache, D]; paged [num_blocks, block_size, H, D]
    bases: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    #: [T] int64 on the bases' device: element offset of token t's row, -1 to skip
    row_off: torch.Tensor
    #: paged only: [T] int64 slots on the bases' device
    slots: torch.Tensor | None
    token_offset: int
    stride_h: int
    stride_d: int
    #: the rows as the kernel reads them
    rows: Rows

    def base(self, layer: int, kv: str) -> torch.Tensor:
        return self.bases[layer][_KV_INDEX[kv]]

    def write(self, layer: int, kv: str, x: torch.Tensor) -> None:
        """Copy ``x`` [T, H, D] (any float dtype, on the bases' device) into place."""
        base = self.base(layer, kv)
        if self.layout == "hnd":
            t = x.shape[0]
            base[:, self.token_offset : self.token_offset + t, :] = x.permute(1, 0, 2)
            return
        assert self.slots is not None
        keep = self.slots >= 0
        slots = self.slots[keep]
        block = base.shape[1]
        base[slots // block, slots % block] = x[keep].to(base.dtype)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CodecError(message)


def destination(
    out: Sequence[Any],
    layout: Layout,
    *,
    layers: int,
    tokens: int,
    heads: int,
    dim: int,
    token_offset: int = 0,
    slot_mapping: torch.Tensor | None = None,
) -> Destination:
    """Validate ``out`` against an object's shape and resolve it (no data is touched)."""
    _check(len(out) >= layers, f"out has {len(out)} layers, the object {layers}")
    if layout == "hnd":
        bases = tuple(_hnd_pair(out[i], heads, dim) for i in range(layers))
        first = bases[0][0]
        _check(
            token_offset >= 0 and token_offset + tokens <= first.shape[1],
            f"tokens [{token_offset}, {token_offset + tokens}) do not fit a cache of "
            f"{first.shape[1]}",
        )
        rows = torch.arange(tokens, device=first.device, dtype=torch.int64) + token_offset
        row_off = rows * first.stride(1)
        slots = None
        stride_h, stride_d = first.stride(0), first.stride(2)
        step = first.stride(1)
        kernel_rows = Rows(
            ROWS_AFFINE, row_off, token_offset * step, step, step % _per16(first) == 0
        )
    elif layout == "paged":
        _check(slot_mapping is not None, "the paged layout needs a slot_mapping")
        assert slot_mapping is not None
        bases = tuple(_paged_pair(out[i], heads, dim) for i in range(layers))
        first = bases[0][0]
        _check(
            slot_mapping.shape == (tokens,) and slot_mapping.dtype == torch.int64,
            f"slot_mapping must be int64 [{tokens}], got {slot_mapping.dtype} "
            f"{list(slot_mapping.shape)}",
        )
        slots = slot_mapping.to(first.device)
        capacity = first.shape[0] * first.shape[1]
        _check(bool((slots < capacity).all()), f"a slot is beyond the cache's {capacity}")
        block = first.shape[1]
        offsets = (slots // block) * first.stride(0) + (slots % block) * first.stride(1)
        row_off = torch.where(slots >= 0, offsets, torch.full_like(slots, -1))
        stride_h, stride_d = first.stride(2), first.stride(3)
        per16 = _per16(first)
        aligned = first.stride(0) % per16 == 0 and first.stride(1) % per16 == 0
        last = sum((n - 1) * st for n, st in zip(first.shape, first.stride(), strict=True))
        if aligned and last // per16 < 2**31 - 1:
            units = torch.where(slots >= 0, offsets // per16, torch.full_like(slots, -1))
            kernel_rows = Rows(ROWS_UNITS, units.to(torch.int32), aligned=True)
        else:
            kernel_rows = Rows(ROWS_TABLE, row_off, aligned=aligned)
    else:
        raise CodecError(f"layout must be 'hnd' or 'paged', got {layout!r}")
    for pair in bases:
        for base in pair:
            _check(
                base.stride() == first.stride()
                and base.dtype == first.dtype
                and base.device == first.device,
                "every layer's K and V tensor must share one dtype, device and strides",
            )
    _check(
        first.dtype in (torch.bfloat16, torch.float16, torch.float32),
        f"out must be bfloat16, float16 or float32, got {first.dtype}",
    )
    return Destination(layout, bases, row_off, slots, token_offset, stride_h, stride_d, kernel_rows)


def _per16(x: torch.Tensor) -> int:
    """Elements of ``x``'s dtype in 16 bytes."""
    return max(1, 16 // x.element_size())


def _hnd_pair(pair: Any, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(len(pair) == 2, "hnd out holds a (k, v) pair per layer")
    k, v = pair
    for x in (k, v):
        _check(
            x.dim() == 4 and x.shape[0] == 1 and x.shape[1] == heads and x.shape[3] == dim,
            f"hnd tensors are [1, {heads}, T, {dim}], got {list(x.shape)}",
        )
    return k[0], v[0]


def _paged_pair(cache: torch.Tensor, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(
        cache.dim() == 5 and cache.shape[0] == 2 and tuple(cache.shape[3:]) == (heads, dim),
        f"paged tensors are [2, num_blocks, block_size, {heads}, {dim}], got {list(cache.shape)}",
    )
    return cache[0], cache[1]
