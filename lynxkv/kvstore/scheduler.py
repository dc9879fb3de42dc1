"""Anchor-first scheduling across every stream a server is sending.

Each ``POST /v1/stream`` response declares the anchor bytes it has still to send; a
residual piece of any stream waits until no stream has anchor bytes pending. So when
many engines load at once, all of their anchors leave before any residual does, and
everyone's time to first token is the anchor's.

A client that reads its anchor slowly would hold every residual back; ``max_wait``
bounds that: after it, a residual piece goes anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

__all__ = ["AnchorFirst", "AnchorTicket"]


class AnchorTicket:
    """One stream's anchor bytes still to send."""

    def __init__(self, owner: AnchorFirst, pending: int) -> None:
        self._owner = owner
        self.pending = pending

    def sent(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.pending)
        self.pending -= nbytes
        self._owner._release(nbytes)


class AnchorFirst:
    """Server-wide gate: residual sends wait while anchor sends are pending."""

    def __init__(self, max_wait: float = 2.0) -> None:
        self.max_wait = max_wait
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return self._pending

    @contextlib.contextmanager
    def anchors(self, nbytes: int) -> Iterator[AnchorTicket]:
        """Declare ``nbytes`` of anchor to send; whatever is unsent is released on exit."""
        self._pending += nbytes
        if self._pending:
            self._idle.clear()
        ticket = AnchorTicket(self, nbytes)
        try:
            yield ticket
        finally:
            ticket.sent(ticket.pending)

    def _release(self, nbytes: int) -> None:
        self._pending -= nbytes
        assert self._pending >= 0
        if not self._pending:
            self._idle.set()

    async def residual_turn(self) -> None:
        """Wait until no anchor is pending anywhere, or ``max_wait`` seconds."""
        if self._idle.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.max_wait)
