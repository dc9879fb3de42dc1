"""The asynchronous client: :class:`AsyncClient`, one aiohttp session per client.

Reads resume. When a connection breaks in the middle of a body, the client asks for the
rest with ``Range: bytes=N-`` and ``If-Range: <etag>``, where ``N`` is the first byte it
has not handed out and ``<etag>`` the version the first response came from. A server that
answers the resume with ``200`` instead of ``206`` has a different version, and the read
fails with :class:`~lynxkv.errors.PreconditionFailed` rather than splice two versions.
Connection failures and 502/503/504 answers are retried with exponential backoff
(:mod:`lynxkv.client.retry`); error responses become the typed errors of
:mod:`lynxkv.errors`. The client never checks objects' section checksums itself: the
server validated every object on PUT, and readers that decode (the progressive fetch)
verify each section through the codec's ``ObjectDecoder``.

The result types and the checked reading of answers live in :mod:`lynxkv.client.results`
(re-exported here), the PUT body in :mod:`lynxkv.client.upload`.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import aiohttp
from yarl import URL

from lynxkv.client.ratelimit import TokenBucket
from lynxkv.client.results import (
    LookupResult,
    ObjectMeta,
    PutResult,
    json_field,
    object_meta,
    read_json,
    response_header,
    response_header_int,
)
from lynxkv.client.retry import (
    FAILURES,
    Attempts,
    Resume,
    RetryPolicy,
    Truncated,
    read_error,
    transport_error,
)
from lynxkv.client.upload import Source, Upload
from lynxkv.errors import FormatError, InvalidKey, NotFound, TransportError
from lynxkv.kvstore.frames import Frame, FrameParser

if TYPE_CHECKING:
    from lynxkv.client.fetch import FetchHandle

__all__ = ["AsyncClient", "LookupResult", "ObjectMeta", "Progress", "PutResult"]

#: Largest piece a rate-limited read hands on at once.
PACE_BYTES = 64 << 10

T = TypeVar("T")

#: Called with the number of bytes just transferred (an increment, as ``tqdm.update``
#: takes it); across retries and resumes the increments add up to the bytes delivered.
Progress = Callable[[int], None]

_SCHEMES = ("http", "https")
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class AsyncClient:
    """A client of one lynxkv server; an async context manager over one aiohttp session.

    ``url`` is the server's base URL (``http://host:7470``); ``token`` its bearer token.
    ``timeout`` bounds connecting and each wait for bytes (not a whole transfer). Transient
    failures are retried ``retries`` times after the first try, waiting about ``backoff``
    seconds, doubling each time. ``rate_limit_bps`` paces every response body this client
    receives, all connections together, to that many bits per second: an emulation of a
    slower network for benchmarks (:mod:`lynxkv.client.ratelimit`). ``chunk_size`` is the
    most bytes read or sent at a time.

    The session opens on first use (or ``async with``); :meth:`close` ends it.
    """

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
        self._base = _base_url(url)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive; got {timeout!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive; got {chunk_size!r}")
        self._token = token
        self._timeout = timeout
        self._policy = RetryPolicy(retries, backoff)
        self._limiter = TokenBucket(rate_limit_bps) if rate_limit_bps is not None else None
        self._chunk_size = chunk_size
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    # -- life cycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return str(self._base)

    @property
    def rate_limiter(self) -> TokenBucket | None:
        """The receive-side rate limit shared by this client's connections, if any."""
        return self._limiter

    async def __aenter__(self) -> Self:
        self._session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session and its connections; the client cannot be used afterwards."""
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            if self._closed:
                raise RuntimeError("this AsyncClient is closed")
            headers = {"Accept-Encoding": "identity"}  # byte offsets must be the object's
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token}"
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self._timeout, sock_read=self._timeout
            )
            self._http = aiohttp.ClientSession(headers=headers, timeout=timeout)
        return self._http

    # -- objects --------------------------------------------------------------------------

    async def put(self, key: str, data: Source, *, progress: Progress | None = None) -> PutResult:
        """Store ``data`` under ``key``: bytes, a file path (streamed, never read whole) or
        an async iterator of bytes. Bytes and files are re-sent when the upload is retried;
        an iterator can be sent once, so its upload is not retried."""
        body = Upload(data, self._chunk_size, progress)
        headers = {"Content-Type": "application/octet-stream"}
        if body.length is not None:
            headers["Content-Length"] = str(body.length)

        async def read(resp: aiohttp.ClientResponse) -> PutResult:
            doc = await read_json(resp)
            return PutResult(
                key=json_field(doc, "key", str),
                size=json_field(doc, "size", int),
                anchor_end=json_field(doc, "anchor_end", int),
                etag=json_field(doc, "etag", str),
                created=resp.status == 201,
            )

        attempts = self._attempts(f"PUT {key}", enabled=body.replayable)
        return await self._call(
            "PUT", self._key_url(key), read, attempts, headers=headers, body=body.open
        )

    async def get(
        self, key: str, range: tuple[int, int] | None = None, *, part: str | None = None
    ) -> bytes:
        """The object's bytes, or bytes ``[start, end)`` of it (clamped to its end, as HTTP
        does), or one part of it (``"anchor"``, ``"residual"`` or ``"all"``)."""
        if range is not None and part is not None:
            raise ValueError("give range or part, not both")
        start, end = range if range is not None else (0, None)
        span = Resume.new(key, start, end, part=part)
        return b"".join([chunk async for _, chunk in self._read(span, None)])

    async def get_into(self, key: str, buffer: bytearray | memoryview, *, offset: int = 0) -> int:
        """Fill ``buffer`` with the object's bytes from ``offset`` on; return how many were
        written (fewer than ``len(buffer)`` when the object ends first)."""
        with memoryview(buffer) as raw, raw.cast("B") as view:
            if view.readonly:
                raise TypeError("buffer must be writable")
            span = Resume.new(key, offset, offset + view.nbytes)
            written = 0
            async for at, chunk in self._read(span, None):
                view[at - offset : at - offset + len(chunk)] = chunk
                written += len(chunk)
            return written

    def iter_bytes(
        self,
        key: str,
        start: int = 0,
        end: int | None = None,
        *,
        etag: str | None = None,
        progress: Progress | None = None,
    ) -> AsyncIterator[tuple[int, bytes]]:
        """``(offset, chunk)`` pairs of bytes ``[start, end)`` (to the object's end when
        ``end`` is None or beyond it), resuming after broken connections. With ``etag``,
        the bytes must come from that version (:class:`PreconditionFailed` otherwise)."""
        return self._read(Resume.new(key, start, end, etag=etag), progress)

    async def head(self, key: str) -> ObjectMeta:
        async def read(resp: aiohttp.ClientResponse) -> ObjectMeta:
            return ObjectMeta(
                key=key,
                size=response_header_int(resp, "Content-Length"),
                anchor_end=response_header_int(resp, "X-Lynx-Anchor-End"),
                etag=response_header(resp, "ETag"),
            )

        return await self._call("HEAD", self._key_url(key), read, self._attempts(f"HEAD {key}"))

    async def delete(self, key: str) -> None:
        """Delete the object; :class:`~lynxkv.errors.NotFound` if there is none."""

        async def read(resp: aiohttp.ClientResponse) -> None:
            await resp.read()

        attempts = self._attempts(f"DELETE {key}")
        try:
            await self._call("DELETE", self._key_url(key), read, attempts)
        except NotFound:
            # A retry after a lost answer finds the key gone: the earlier try deleted it.
            # (aiohttp also repeats an idempotent request once, unseen, when a kept-alive
            # connection drops; a 404 from that repeat cannot be told apart and is raised.)
            if not attempts.uncertain:
                raise

    async def lookup(self, keys: Sequence[str]) -> LookupResult:
        """How many leading ``keys`` are stored (for chained chunk keys: the cached prefix)."""

        async def read(resp: aiohttp.ClientResponse) -> LookupResult:
            doc = await read_json(resp)
            present = json_field(doc, "present", builtins.list)
            if len(present) != len(keys) or not all(isinstance(p, bool) for p in present):
                raise FormatError(f"lookup answer has a bad 'present' list: {present[:8]!r}")
            return LookupResult(json_field(doc, "prefix", int), tuple(present))

        url = self._url("/v1/lookup")
        body = {"keys": builtins.list(keys)}
        return await self._call("POST", url, read, self._attempts("POST /v1/lookup"), json=body)

    async def stream(
        self, keys: Sequence[str], parts: Sequence[str] = ("anchor", "residual")
    ) -> AsyncIterator[Frame]:
        """The frames of one ``POST /v1/stream`` (docs/http-api.md), checked by
        :class:`FrameParser`. Connecting is retried; a body that breaks off raises
        :class:`TransportError` (the frames so far were good: fetch the rest with Range)."""
        body = {"keys": builtins.list(keys), "parts": builtins.list(parts)}
        attempts = self._attempts("POST /v1/stream")
        resp = await self._open("POST", self._url("/v1/stream"), attempts, json=body)
        parser = FrameParser(key_count=len(keys))
        async with resp:
            try:
                async for received in resp.content.iter_chunked(self._chunk_size):
                    async for chunk in self._paced(received):
                        for frame in parser.feed(chunk):
                            yield frame
            except FAILURES as exc:
                raise transport_error("POST /v1/stream", exc) from exc
        try:
            parser.close()
        except FormatError as exc:
            raise TransportError(f"POST /v1/stream: the body broke off: {exc}") from exc

    async def fetch(
        self,
        keys: Sequence[str],
        *,
        transport: Literal["stream", "ranges"] = "stream",
        decode: bool = True,
        connections: int = 8,
    ) -> FetchHandle:
        """Load ``keys`` progressively, anchors first: :func:`lynxkv.client.fetch.fetch`."""
        from lynxkv.client.fetch import fetch

        return await fetch(self, keys, transport=transport, decode=decode, connections=connections)

    async def list(self, prefix: str = "", limit: int = 1000) -> builtins.list[ObjectMeta]:
        """Stored objects whose keys start with ``prefix``, sorted by key, at most ``limit``."""

        async def read(resp: aiohttp.ClientResponse) -> builtins.list[ObjectMeta]:
            objects = json_field(await read_json(resp), "objects", builtins.list)
            return [object_meta(o) for o in objects]

        params = {"limit": str(limit), **({"prefix": prefix} if prefix else {})}
        url = self._url("/v1/kv")
        return await self._call("GET", url, read, self._attempts("GET /v1/kv"), params=params)

    # -- resumable reads ------------------------------------------------------------------

    async def _read(
        self, span: Resume, progress: Progress | None
    ) -> AsyncIterator[tuple[int, bytes]]:
        attempts = self._attempts(f"GET {span.key}")
        while not span.done:
            reached = span.position
            try:
                async for at, chunk in self._read_once(span):
                    if progress is not None:
                        progress(len(chunk))
                    yield at, chunk
            except FAILURES as exc:
                if span.position > reached:
                    attempts.progressed()
                await attempts.failed(exc)

    async def _read_once(self, span: Resume) -> AsyncIterator[tuple[int, bytes]]:
        """One GET for the rest of ``span``, advancing it by what it yields."""
        headers, params = span.request()
        resp = await self._send("GET", self._key_url(span.key), headers=headers, params=params)
        async with resp:
            span.accept(resp.status, resp.headers)
            async for received in resp.content.iter_chunked(self._chunk_size):
                assert span.end is not None
                async for chunk in self._paced(received[: span.end - span.position]):
                    at, span.position = span.position, span.position + len(chunk)
                    yield at, chunk
        if not span.done:
            raise Truncated(f"the body of {span.key} ended at byte {span.position} of {span.end}")

    async def _paced(self, chunk: bytes) -> AsyncIterator[bytes]:
        """``chunk``, handed on as the emulated link would deliver it: with a rate limit, in
        pieces of at most PACE_BYTES, each after its share of link time (a whole 1 MiB read
        released at once would make a slow link look bursty to progressive readers)."""
        if self._limiter is None:
            yield chunk
            return
        for at in range(0, len(chunk), PACE_BYTES):
            piece = chunk[at : at + PACE_BYTES]
            await self._limiter.acquire(len(piece))
            yield piece

    # -- requests -------------------------------------------------------------------------

    def _attempts(self, what: str, enabled: bool = True) -> Attempts:
        return Attempts(self._policy, what, enabled)

    def _url(self, path: str) -> URL:
        return URL(str(self._base).rstrip("/") + path, encoded=True)

    def _key_url(self, key: str) -> URL:
        if not key or len(key) > 200 or not _KEY_CHARS.issuperset(key):
            raise InvalidKey(f"key {key[:64]!r} must match [A-Za-z0-9._-]{{1,200}}")
        # "." and ".." would be dot-segments that URL normalisation removes (RFC 3986 5.2.4)
        return self._url("/v1/kv/" + (key if key.strip(".") else key.replace(".", "%2E")))

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        body: Callable[[], AsyncIterator[bytes]] | None = None,
        **kw: Any,
    ) -> aiohttp.ClientResponse:
        """One request; an error status is raised as its typed error. The caller closes the
        response it gets. ``body`` makes the request body afresh for each attempt."""
        data = body() if body is not None else None
        resp = await self._session().request(method, url, data=data, **kw)
        if resp.status >= 400:
            async with resp:
                raise await read_error(resp)
        return resp

    async def _open(
        self, method: str, url: URL, attempts: Attempts, **kw: Any
    ) -> aiohttp.ClientResponse:
        """:meth:`_send`, retried until a response that is not an error arrives."""
        while True:
            try:
                return await self._send(method, url, **kw)
            except FAILURES as exc:
                await attempts.failed(exc)

    async def _call(
        self,
        method: str,
        url: URL,
        read: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        attempts: Attempts,
        **kw: Any,
    ) -> T:
        """:meth:`_send` and ``read`` of its response, retried together."""
        while True:
            try:
                async with await self._send(method, url, **kw) as resp:
                    return await read(resp)
            except FAILURES as exc:
                await attempts.failed(exc)


# -- pure helpers -----------------------------------------------------------------------------


def _base_url(url: str) -> URL:
    try:
        base = URL(url)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a URL: {url!r}") from exc
    if base.scheme not in _SCHEMES:
        raise ValueError(f"URL {url!r} must start with http:// or https://")
    if not base.host:
        raise ValueError(f"URL {url!r} names no host")
    if base.query_string or base.fragment or base.user is not None:
        raise ValueError(f"URL {url!r} must not carry a query, fragment or user info")
    return base
