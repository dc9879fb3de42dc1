"""Link emulation: a token bucket that paces received bytes to a set bit rate.

The Lynx paper measured its transfers over an emulated link, a rate limit applied in the
client, and lynxkv's benchmarks do the same: :class:`TokenBucket` makes a fast local
connection behave like a slower network of ``rate_bps`` bits per second. It is applied on
the receive side, after each body chunk is read and before it is handed on, so a chunk
becomes visible when its last byte would have arrived over the slower link. One bucket is
shared by every connection of a client, so concurrent transfers divide the rate between
them, as flows on one link do. TCP flow control then slows the sender as well, because
the client stops reading while it waits.

It is not a network emulator: there is no added latency, loss or reordering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]

#: Default burst: this much time's worth of bytes at the bucket's rate ...
BURST_SECONDS = 0.01
#: ... but at least this many bytes, so that a slow bucket still passes a TCP segment.
MIN_BURST = 4096


class TokenBucket:
    """Paces byte counts to ``rate_bps`` bits per second, with a burst of ``burst`` bytes.

    Implemented as GCRA (the virtual-scheduling form of a token bucket): each
    :meth:`acquire` reserves the next slot on a virtual link at once, in call order, and
    then sleeps until its bytes would have been delivered. Reservations never wait on a
    lock, so concurrent waiters are served first-come first-served and none can starve.
    A request larger than the burst is allowed; it simply waits longer.
    """

    def __init__(
        self,
        rate_bps: float,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_bps > 0 or rate_bps == float("inf"):
            raise ValueError(f"rate_bps must be a positive finite number; got {rate_bps!r}")
        if burst is not None and burst < 1:
            raise ValueError(f"burst must be at least 1 byte; got {burst!r}")
        self._rate = rate_bps / 8  # bytes per second
        self._burst = (
            burst if burst is not None else max(MIN_BURST, int(self._rate * BURST_SECONDS))
        )
        self._clock = clock
        # When the virtual link has delivered everything reserved so far.
        self._free_at = clock()

    @property
    def rate_bps(self) -> float:
        return self._rate * 8

    @property
    def burst(self) -> int:
        return self._burst

    def reserve(self, nbytes: int) -> float:
        """Reserve ``nbytes`` on the link; return how long to wait (seconds) before using them.

        The pure half of :meth:`acquire`, for callers that pace themselves."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0; got {nbytes}")
        now = self._clock()
        start = max(self._free_at, now)  # an idle link starts now: credit does not pile up
        self._free_at = start + nbytes / self._rate
        # The burst lets bytes through up to that much time before their due time.
        return max(0.0, self._free_at - self._burst / self._rate - now)

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more bytes may pass."""
        delay = self.reserve(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)
