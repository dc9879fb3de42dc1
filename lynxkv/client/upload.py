"""The body of a PUT: :class:`Upload` streams bytes, a file or an async iterable.

It knows the body's length (None when unknown: the request is sent chunked), whether the
body can be sent again on a retry, and reports progress so that a retried upload counts
each byte once. :meth:`AsyncClient.put <lynxkv.client.aio.AsyncClient.put>` builds one
per call and hands :meth:`Upload.open` to its request loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable

__all__ = ["Source", "Upload"]

#: What :meth:`AsyncClient.put <lynxkv.client.aio.AsyncClient.put>` can send.
Source = bytes | bytearray | memoryview | os.PathLike[str] | AsyncIterable[bytes]


class Upload:
    """A PUT body: its length (None when unknown: sent chunked), whether it can be sent
    again, and :meth:`open`, which streams its bytes afresh for each attempt.
    ``progress`` is a :data:`lynxkv.client.aio.Progress` callback."""

    def __init__(
        self, data: Source, chunk_size: int, progress: Callable[[int], None] | None
    ) -> None:
        self._chunk_size = chunk_size
        self._progress = progress
        self._reported = 0  # bytes reported to ``progress``, the most any attempt sent
        self._bytes: memoryview | None = None
        self._path: str | None = None
        self._iterable: AsyncIterable[bytes] | None = None
        self.length: int | None = None
        if isinstance(data, bytes | bytearray | memoryview):
            self._bytes = memoryview(data).cast("B")
            self.length = self._bytes.nbytes
        elif isinstance(data, str):
            raise TypeError("put takes bytes or a path, not str: pass pathlib.Path(...) for a file")
        elif isinstance(data, os.PathLike):
            self._path = os.fspath(data)
            self.length = os.stat(self._path).st_size
        elif isinstance(data, AsyncIterable):
            self._iterable = data
        else:
            raise TypeError(f"put takes bytes, a path or an async iterable; got {type(data)}")

    @property
    def replayable(self) -> bool:
        return self._iterable is None

    def open(self) -> AsyncIterator[bytes]:
        return self._counted(self._chunks())

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self._bytes is not None:
            for at in range(0, self._bytes.nbytes, self._chunk_size):
                yield bytes(self._bytes[at : at + self._chunk_size])
        elif self._path is not None:
            # the file is read in a thread, one chunk at a time: never whole, never blocking
            with await asyncio.to_thread(open, self._path, "rb") as file:
                while chunk := await asyncio.to_thread(file.read, self._chunk_size):
                    yield chunk
        else:
            assert self._iterable is not None
            async for chunk in self._iterable:
                yield chunk

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in chunks:
            yield chunk
            sent += len(chunk)
            if self._progress is not None and sent > self._reported:
                # a retried upload reports only the bytes beyond what an earlier try sent
                self._progress(sent - self._reported)
                self._reported = sent
