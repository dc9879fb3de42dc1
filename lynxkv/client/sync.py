"""The synchronous client: :class:`Client`, a thin wrapper over :class:`AsyncClient`.

Each ``Client`` runs its own event loop in a background thread, started on first use, and
hands every call to it; the calling thread blocks until the answer is there. The async
client does the work, so retries, resumes, typed errors and the rate limit are the same.
Callbacks (``progress``) run in that background thread.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Generator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from lynxkv.client.aio import AsyncClient, LookupResult, ObjectMeta, Progress, PutResult
from lynxkv.client.loopthread import LoopThread
from lynxkv.client.ratelimit import TokenBucket
from lynxkv.kvstore.frames import Frame

__all__ = ["Client"]

T = TypeVar("T")


class _End:
    """Marks the end of an async iterator handed across threads (StopAsyncIteration cannot
    travel through a future)."""


_END = _End()


class Client:
    """A blocking client of one lynxkv server, with :class:`AsyncClient`'s options and
    methods. Usable as a context manager; :meth:`close` stops its thread. Safe to call from
    several threads (the calls share one connection pool), but not from a ``progress``
    callback, which runs on the client's own thread."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        rate_limit_bps: float | None = None,
        chunk_size: int = 1 << 20,
    ) -> None:
        self._client = AsyncClient(
            url,
            token,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            rate_limit_bps=rate_limit_bps,
            chunk_size=chunk_size,
        )
        self._lock = threading.Lock()
        self._runner = LoopThread("lynxkv-client")
        self._closed = False

    @property
    def url(self) -> str:
        return self._client.url

    @property
    def rate_limiter(self) -> TokenBucket | None:
        return self._client.rate_limiter

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the thread. Calling it again does nothing."""
        with self._lock:
            self._closed = True
        self._runner.stop(self._client.close)

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("this Client is closed")
            return self._runner.loop()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._runner.thread:
            coro.close()
            raise RuntimeError("a Client cannot be called from its own callbacks")
        try:
            loop = self._start()
        except RuntimeError:
            coro.close()  # never awaited: close it so Python does not warn
            raise
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        finally:
            future.cancel()  # the caller was interrupted (KeyboardInterrupt): stop the work too

    def _iterate(self, items: AsyncIterator[T]) -> Generator[T, None, None]:
        """A blocking iterator over an async iterator that runs on the client's loop."""
        try:
            while not isinstance(item := self._run(_next(items)), _End):
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None and not self._closed:
                self._run(aclose())

    # -- the API of AsyncClient -------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview | os.PathLike[str],
        *,
        progress: Progress | None = None,
    ) -> PutResult:
        return self._run(self._client.put(key, data, progress=progress))

    def get(
        self, key: str, range: tuple[int, int] | None = None, *, part: str | None = None
    ) -> bytes:
        return self._run(self._client.get(key, range, part=part))

    def get_into(self, key: str, buffer: bytearray | memoryview, *, offset: int = 0) -> int:
        return self._run(self._client.get_into(key, buffer, offset=offset))

    def iter_bytes(
        self,
        key: str,
        start: int = 0,
        end: int | None = None,
        *,
        etag: str | None = None,
        progress: Progress | None = None,
    ) -> Generator[tuple[int, bytes], None, None]:
        """A blocking iterator of ``(offset, chunk)``; see :meth:`AsyncClient.iter_bytes`.
        ``close()`` it when dropping it early, to end its response at once."""
        return self._iterate(self._client.iter_bytes(key, start, end, etag=etag, progress=progress))

    def head(self, key: str) -> ObjectMeta:
        return self._run(self._client.head(key))

    def delete(self, key: str) -> None:
        self._run(self._client.delete(key))

    def lookup(self, keys: Sequence[str]) -> LookupResult:
        return self._run(self._client.lookup(keys))

    def stream(
        self, keys: Sequence[str], parts: Sequence[str] = ("anchor", "residual")
    ) -> Generator[Frame, None, None]:
        """A blocking iterator of frames; see :meth:`AsyncClient.stream`."""
        return self._iterate(self._client.stream(keys, parts))

    def list(self, prefix: str = "", limit: int = 1000) -> builtins.list[ObjectMeta]:
        return self._run(self._client.list(prefix, limit))


async def _next(items: AsyncIterator[T]) -> T | _End:
    return await anext(items, _END)
