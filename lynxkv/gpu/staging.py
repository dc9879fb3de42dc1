"""Host-to-device staging: pinned buffers, copies on a side stream, double buffering.

A batch of section payloads is packed into a pinned host buffer (each payload 256-byte
aligned, so the kernels' vector loads are aligned), then copied with one asynchronous
``cudaMemcpyAsync`` on the *copy stream*. The compute stream waits only on that copy's
event, so while the kernels of batch ``i`` run, batch ``i + 1`` is being packed on the
host and copied. Two pinned buffers alternate; before one is packed again the host
waits for its previous copy (never for a kernel).

Device buffers come from torch's caching allocator on the compute stream. A copy-stream
write into a block the allocator recycled could overtake a compute-stream kernel still
reading its previous tenant, so every staging session starts with the copy stream
waiting for the compute stream's work queued so far (earlier kernels, not this
session's), and ends with the compute stream waiting for the copy stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ALIGN", "Stager", "aligned_offsets"]

#: Alignment of every payload in a staged buffer (bytes).
ALIGN = 256


def aligned_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of consecutive pieces, each ``ALIGN``-aligned, and the total length."""
    offsets, pos = [], 0
    for size in sizes:
        offsets.append(pos)
        pos += -(-size // ALIGN) * ALIGN
    return offsets, max(pos, ALIGN)


class Stager:
    """Double-buffered pinned staging for one CUDA device. Not thread-safe."""

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._host: list[torch.Tensor | None] = [None] * slots
        self._done: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def begin(self) -> None:
        """Order this session's copies after the compute work queued before it."""
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def end(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def _pinned(self, slot: int, size: int) -> torch.Tensor:
        host = self._host[slot]
        if host is None or host.numel() < size:
            host = torch.empty(max(size, 1 << 20), dtype=torch.uint8, pin_memory=True)
            self._host[slot] = host
        return host

    def stage(self, pieces: Sequence[bytes | memoryview]) -> tuple[torch.Tensor, list[int]]:
        """Copy ``pieces`` to a new device buffer; returns it and each piece's offset.

        The compute stream is made to wait for the copy; the host returns as soon as the
        copy is queued.
        """
        offsets, total = aligned_offsets([len(p) for p in pieces])
        slot = self._next
        self._next = (slot + 1) % len(self._host)
        done = self._done[slot]
        if done is not None:
            done.synchronize()  # the last copy out of this pinned buffer has finished
        host = self._pinned(slot, total)
        view = host.numpy()
        for off, piece in zip(offsets, pieces, strict=True):
            view[off : off + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        dev = torch.empty(total, dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(self.copy_stream):
            dev.copy_(host[:total], non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self.copy_stream)
        self._done[slot] = event
        torch.cuda.current_stream(self.device).wait_event(event)
        return dev, offsets
