"""An asyncio event loop in a thread of its own: how the blocking ``Client`` and the
engine connector run the async client without blocking (or owning) the caller's thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

__all__ = ["LoopThread"]


class LoopThread:
    """A loop in a daemon thread named ``name``, started by the first :meth:`loop` call
    (a daemon: an owner that is never closed must not keep the process alive).
    :meth:`stop` ends it; a later :meth:`loop` starts a new one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        """The running thread, if any."""
        return self._thread

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started first if need be."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run, args=(loop,), name=self.name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def stop(self, last: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``last()`` on the loop (closing a client's connections, say), then stop the
        loop and join its thread. Does nothing when no loop runs."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            if last is not None:
                asyncio.run_coroutine_threadsafe(_await(last), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()


async def _await(last: Callable[[], Awaitable[None]]) -> None:
    await last()


def _run(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # finish async generators left open (iterators the caller dropped) and join the
        # executor's threads (name lookups, file reads), so that stop() leaves none behind
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
