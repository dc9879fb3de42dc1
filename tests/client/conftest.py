"""What the client tests share: a real server (``live_server`` from the server tests: aiohttp
on 127.0.0.1 port 0, LMDB in a temp dir) with a client on it, a TCP proxy that misbehaves
on purpose (cuts a response after N bytes, answers 503, hangs), and a server on a thread
for the blocking client.

pytest-asyncio is not used: a test hands a coroutine to ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lynxkv.client import AsyncClient
from tests.kvstore.conftest import Server, live_server, make_object, run

__all__ = [
    "Proxy",
    "Server",
    "client_on",
    "closed_port_url",
    "make_object",
    "run",
    "server_thread",
]

#: Fast retries: the tests that exercise them should not wait for production backoffs.
FAST: dict[str, Any] = {"retries": 3, "backoff": 0.01}


@contextlib.asynccontextmanager
async def client_on(
    data_dir: Path, *, server: dict[str, Any] | None = None, **client: Any
) -> AsyncIterator[tuple[Server, AsyncClient]]:
    """A live server (``server`` passes to ``live_server``) and an ``AsyncClient`` on it
    (``client`` passes to the client; fast retries by default)."""
    async with (
        live_server(data_dir, **(server or {})) as srv,
        AsyncClient(srv.url, **{**FAST, **client}) as c,
    ):
        yield srv, c


def closed_port_url() -> str:
    """The URL of a port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def http_answer(status: int, reason: str, code: str) -> bytes:
    """A complete JSON error response that closes its connection."""
    body = f'{{"error": "{code}", "message": "injected by the test proxy"}}'.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Proxy:
    """A TCP proxy to ``upstream`` (a server URL) for connection-level faults.

    Connection number ``i`` (from 0) is, in this order of precedence: answered with
    ``canned`` (without forwarding; ``b""`` closes at once) when ``i < canned_count``; cut
    after ``cut_after`` response bytes when ``i < cut_count`` (``None``: every connection),
    with ``before_cut`` awaited first; forwarded untouched otherwise. ``hang`` makes every
    connection read the request and never answer. ``requests[i]`` is everything the client
    sent on connection ``i``."""

    upstream: str
    cut_after: int | None = None
    cut_count: int | None = 1
    before_cut: Callable[[], Awaitable[object]] | None = None
    canned: bytes | None = None
    canned_count: int = 1
    hang: bool = False
    requests: list[bytearray] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def connections(self) -> int:
        return len(self.requests)

    def ranges(self) -> list[tuple[int, str | None]]:
        """(first byte, If-Range) of each ``Range: bytes=N-...`` request seen, in order."""
        text = b"".join(self.requests).decode("latin-1")
        heads = re.findall(r"GET [^\r]*\r\n(?:[^\r]+\r\n)*", text)
        out = []
        for head in heads:
            first = re.search(r"^Range: bytes=(\d+)-", head, re.MULTILINE)
            if_range = re.search(r"^If-Range: (.*)$", head, re.MULTILINE)
            if first:
                out.append((int(first[1]), if_range[1].strip() if if_range else None))
        return out

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.requests)
        seen = bytearray()
        self.requests.append(seen)
        self._writers.append(writer)
        try:
            if self.hang or (self.canned is not None and index < self.canned_count):
                await _read_request(reader, seen)
                if self.hang:
                    await asyncio.Event().wait()
                assert self.canned is not None
                answer = self.canned
                if seen.startswith(b"HEAD ") and answer:  # an answer to HEAD has no body
                    answer = answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                writer.write(answer)
                await writer.drain()
                return
            cut = self.cut_count is None or index < self.cut_count
            await self._forward(reader, writer, seen, self.cut_after if cut else None)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away first: nothing to forward any more
        finally:
            writer.transport.abort()

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        seen: bytearray,
        cut_after: int | None,
    ) -> None:
        host, port = self.upstream.removeprefix("http://").rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers.append(up_writer)
        try:
            tasks = [
                asyncio.ensure_future(_pump(reader, up_writer, seen, None, None)),
                asyncio.ensure_future(
                    _pump(up_reader, writer, bytearray(), cut_after, self.before_cut)
                ),
            ]
            # either side ending (EOF or the cut) ends the connection
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            up_writer.transport.abort()


async def _pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    seen: bytearray,
    limit: int | None,
    before_cut: Callable[[], Awaitable[object]] | None,
) -> None:
    """Copy ``src`` to ``dst`` (recording it in ``seen``) until EOF, or until ``limit``
    bytes have passed: then await ``before_cut`` and stop."""
    passed = 0
    while data := await src.read(1 << 16):
        if limit is not None and passed + len(data) >= limit:
            dst.write(data[: limit - passed])
            await dst.drain()
            if before_cut is not None:
                await before_cut()
            return
        seen += data
        passed += len(data)
        dst.write(data)
        await dst.drain()


async def _read_request(reader: asyncio.StreamReader, seen: bytearray) -> None:
    """Read one request with its body (Content-Length or chunked), so that an answer sent
    before the body is read cannot break the client's upload."""
    head = await reader.readuntil(b"\r\n\r\n")
    seen += head
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    if length:
        seen += await reader.readexactly(int(length[1]))
    elif re.search(rb"\r\ntransfer-encoding: *chunked", head, re.IGNORECASE):
        while size := int(await reader.readuntil(b"\r\n"), 16):
            seen += await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")  # the end of the (empty) trailer section


@contextlib.contextmanager
def server_thread(data_dir: Path, **config: Any) -> Iterator[str]:
    """``live_server`` on its own event loop in a thread, for the blocking client; yields
    its URL and stops it on exit."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with live_server(data_dir, **config) as srv:
            state.update(url=srv.url, stop=stop, loop=asyncio.get_running_loop())
            ready.set()
            await stop.wait()

    def main() -> None:
        try:
            asyncio.run(serve())
        finally:
            ready.set()

    thread = threading.Thread(target=main, name="test-server")
    thread.start()
    ready.wait(30)
    try:
        assert "url" in state, "the server did not start"
        yield str(state["url"])
    finally:
        if "loop" in state:
            state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


@dataclass
class DamagingProxy:
    """Relays connections to ``target``, replacing each key of ``damage`` in the server's
    bytes with its value (same length): flipped bits in transit, on every transfer (a
    retry fetches the same damage). Cuts and canned answers come from :class:`Proxy`."""

    target: str
    damage: dict[bytes, bytes]
    url: str = ""
    replaced: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self.target.removeprefix("http://").rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers += [writer, up_writer]
        pumps = [
            asyncio.create_task(_relay(reader, up_writer)),
            asyncio.create_task(self._damage(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for w in (writer, up_writer):
                w.transport.abort()

    async def _damage(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        held = b""
        while data := await src.read(1 << 16):
            data = held + data
            for needle, replacement in self.damage.items():
                self.replaced += data.count(needle)
                data = data.replace(needle, replacement)
            # hold back a tail that may be the start of a needle split across reads
            keep = max(_started(data, needle) for needle in self.damage)
            data, held = data[: len(data) - keep], data[len(data) - keep :]
            dst.write(data)
            await dst.drain()
        dst.write(held)
        await dst.drain()

    async def __aenter__(self) -> DamagingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


async def _relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(1 << 16):
        dst.write(data)
        await dst.drain()


def _started(data: bytes, needle: bytes) -> int:
    """The length of the longest tail of ``data`` that is a proper prefix of ``needle``."""
    for n in range(min(len(needle) - 1, len(data)), 0, -1):
        if data.endswith(needle[:n]):
            return n
    return 0
