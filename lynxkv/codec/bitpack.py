"""Packing of small unsigned integers into bytes.

``n`` values of ``bits`` bits form one little-endian bit stream: value ``i`` occupies
bits ``[bits*i, bits*(i+1))``, counting bit 0 as the least significant bit of byte 0.
The stream takes ``ceil(n*bits/8)`` bytes; unused high bits of the last byte are zero.
So for 4 bits, byte ``j`` holds value ``2j`` in its low nibble and ``2j+1`` in its high
nibble. (Internally, 8 values at a time make one 64-bit word of which ``bits`` bytes
are used.)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["pack", "packed_size", "unpack"]


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` values of ``bits`` bits."""
    return -(-n * bits // 8)


def pack(values: NDArray[np.uint8], bits: int) -> bytes:
    """Pack a flat array of values, each < 2**bits, into bytes."""
    assert 1 <= bits <= 8
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    n = flat.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:n] = flat
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(padded.reshape(groups, 8) << shifts, axis=1)
    # Keep the low `bits` bytes of every little-endian 64-bit group word.
    as_bytes = words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    packed: bytes = as_bytes.tobytes()
    return packed[: packed_size(n, bits)]


def unpack(data: bytes | memoryview, n: int, bits: int) -> NDArray[np.uint8]:
    """Inverse of :func:`pack`: the first ``n`` values of ``bits`` bits in ``data``."""
    assert 1 <= bits <= 8
    need = packed_size(n, bits)
    if len(data) != need:
        raise ValueError(f"packed data is {len(data)} bytes, expected {need}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    groups = -(-n // 8)
    stream = np.zeros(groups * bits, dtype=np.uint8)
    stream[:need] = raw
    words8 = np.zeros((groups, 8), dtype=np.uint8)
    words8[:, :bits] = stream.reshape(groups, bits)
    words = words8.view("<u8").reshape(groups, 1).astype(np.uint64)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    mask = np.uint64((1 << bits) - 1)
    out = ((words >> shifts) & mask).astype(np.uint8).reshape(-1)
    return out[:n]
