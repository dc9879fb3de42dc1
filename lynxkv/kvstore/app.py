"""The kvstore HTTP API, v1 (docs/http-api.md): ``make_app(config)`` builds it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientPayloadError, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lynxkv.codec.decoder import ObjectDecoder
from lynxkv.errors import (
    BadRequest,
    FormatError,
    LynxError,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    StoreError,
    TooLarge,
    Unauthorized,
)
from lynxkv.kvstore import ranges
from lynxkv.kvstore.config import ServerConfig
from lynxkv.kvstore.metrics import Metrics
from lynxkv.kvstore.ranges import ByteRange
from lynxkv.kvstore.requests import (
    CONFIG,
    IN_FLIGHT,
    MAX_JSON_BYTES,
    METRICS,
    SCHEDULER,
    STORE,
    TOKEN,
    InFlight,
    is_prepared,
    key_list,
    mark_prepared,
    read_json,
    valid_key,
)
from lynxkv.kvstore.scheduler import AnchorFirst
from lynxkv.kvstore.store import ObjectInfo, PutHandle, Store
from lynxkv.kvstore.streaming import stream_handler

__all__ = ["make_app"]

log = logging.getLogger("lynxkv.kvstore")

OCTETS = "application/octet-stream"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _error_body(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(status, "http_error")


@web.middleware
async def _in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    with request.app[IN_FLIGHT].request():
        return await handler(request)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


@web.middleware
async def _errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to its status and JSON body, in one place, and count requests."""
    started = time.perf_counter()
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except LynxError as exc:
        if is_prepared(request):  # mid-body: the client sees a cut response and resumes
            log.warning(
                "%s %s failed after its headers were sent: %s", request.method, request.path, exc
            )
            raise
        headers = {}
        if isinstance(exc, RangeNotSatisfiable):
            headers["Content-Range"] = ranges.unsatisfied_range(exc.size)
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer realm="lynxkv"'
        response = _error_body(exc.status, exc.code, str(exc), headers)
    except web.HTTPException as exc:  # aiohttp's own answers: unknown route, 405, ...
        if exc.status < 400:
            raise
        response = _error_body(exc.status, _http_code(exc.status), exc.reason)
    except (ConnectionError, ClientPayloadError) as exc:
        if not _client_gone(request):
            raise
        # The client hung up mid-request: routine for a cache that engines abandon when
        # they stop early. Count it as nginx's 499 and end quietly; aiohttp logs a
        # handler's exception at ERROR with a traceback, but a cancellation at DEBUG.
        metrics.requests.labels(_route_name(request), request.method, "499").inc()
        log.debug("client went away during %s %s: %s", request.method, request.path, exc)
        raise asyncio.CancelledError from exc
    except Exception:  # the outermost boundary: log it, answer 500, keep serving
        if is_prepared(request) or request.transport is None or request.transport.is_closing():
            raise
        log.exception("unexpected error in %s %s", request.method, request.path)
        response = _error_body(500, "internal", "internal server error (see the server log)")
    route = _route_name(request)
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    metrics.latency.labels(route, request.method).observe(time.perf_counter() - started)
    return response


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.path != "/healthz":
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest takes constant time in the length of the secret
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise Unauthorized("missing or wrong bearer token")
    return await handler(request)


def _object_headers(info: ObjectInfo) -> dict[str, str]:
    return {
        "ETag": info.etag,
        "Accept-Ranges": "bytes",
        "X-Lynx-Anchor-End": str(info.anchor_end),
        "Content-Type": OCTETS,
    }


async def put_object(request: web.Request) -> web.Response:
    key = valid_key(request.match_info["key"])
    config, store, metrics = request.app[CONFIG], request.app[STORE], request.app[METRICS]
    limit = config.max_object_bytes
    length = request.content_length
    if length is not None and length > limit:
        metrics.rejected.labels("too_large").inc()
        raise TooLarge(f"object of {length} bytes is over the limit of {limit}")
    try:
        handle = await store.begin_put(key, length)  # may make room for Content-Length
    except StoreError as exc:
        metrics.rejected.labels(exc.code).inc()
        raise
    # Why the upload failed, for the metric. Until an error says otherwise: the body
    # stopped short because the client went away (the body reader raises a connection error).
    reason: str | None = "interrupted"
    try:
        decoder, received = await _receive(request, handle, limit)
        if not decoder.complete():
            reason = "truncated"
            raise FormatError(f"truncated object: {decoder.missing()}")
        assert decoder.header is not None
        info, created = await handle.commit(decoder.header.anchor_end)
        reason = None
    except FormatError:
        if reason != "truncated":
            reason = "malformed"
        raise
    except (TooLarge, StoreError) as exc:
        reason = exc.code
        raise
    finally:
        if reason is not None:
            await handle.abort()  # before the metric: once it counts, the space is free
            metrics.rejected.labels(reason).inc()
    metrics.bytes_received.inc(received)
    body = {"key": key, "size": info.size, "anchor_end": info.anchor_end, "etag": info.etag}
    return web.json_response(body, status=201 if created else 200, headers={"ETag": info.etag})


async def _receive(
    request: web.Request, handle: PutHandle, limit: int
) -> tuple[ObjectDecoder, int]:
    """Stream the body into ``handle``, validating it as it comes (header, every section
    checksum); the decoder and the byte count."""
    decoder, received = ObjectDecoder(), 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
        if received > limit:
            raise TooLarge(f"object is over the limit of {limit} bytes")
        decoder.feed(chunk)
        await handle.write(chunk)
    return decoder, received


def _requested(request: web.Request, info: ObjectInfo) -> list[ByteRange] | None:
    """The ranges a GET asks for, or None for the whole object (RFC 9110 14.2)."""
    part = request.query.get("part")
    header = request.headers.get("Range")
    if part is not None and header is not None:
        raise BadRequest("use either ?part= or a Range header, not both")
    if part is not None:
        return (
            None
            if part == "all" and info.size
            else [ranges.part_range(part, info.anchor_end, info.size)]
        )
    if header is None or not ranges.if_range_matches(request.headers.get("If-Range"), info.etag):
        return None
    return ranges.parse_range(header, info.size)


async def _first_piece(
    store: Store, key: str, span: ByteRange, etag: str
) -> tuple[bytes, AsyncIterator[bytes]]:
    """Open a read and take its first piece, so that NotFound or a replaced object
    surfaces before any header is sent."""
    pieces = store.read(key, span.start, span.end, etag)
    return await anext(pieces), pieces


async def get_object(request: web.Request) -> web.StreamResponse:
    key = valid_key(request.match_info["key"])
    store = request.app[STORE]
    for attempt in range(3):  # the object may be replaced between info and read
        info = await store.info(key)
        wanted = _requested(request, info)
        spans = wanted or [ByteRange(0, info.size)]
        try:
            first, pieces = await _first_piece(store, key, spans[0], info.etag)
        except PreconditionFailed:
            if attempt == 2:
                raise
            continue
        break
    if wanted is None or len(wanted) == 1:
        return await _send_single(request, info, wanted, first, pieces)
    return await _send_multipart(request, info, wanted, first, pieces)


async def _relay(response: web.StreamResponse, first: bytes, pieces: AsyncIterator[bytes]) -> None:
    """Write the pieces of one read, fetching the next while the current one is written
    (the store reads in its own thread, so the two overlap)."""
    current: bytes | None = first
    ahead: asyncio.Future[bytes | None] | None = None
    try:
        while current is not None:
            ahead = asyncio.ensure_future(anext(pieces, None))
            await response.write(current)
            current = await ahead
    finally:
        if ahead is not None and not ahead.done():
            ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ahead
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()  # releases the store's hold on the version now, not at GC


async def _send_single(
    request: web.Request,
    info: ObjectInfo,
    wanted: list[ByteRange] | None,
    first: bytes,
    pieces: AsyncIterator[bytes],
) -> web.StreamResponse:
    span = wanted[0] if wanted else ByteRange(0, info.size)
    response = web.StreamResponse(status=206 if wanted else 200, headers=_object_headers(info))
    if wanted:
        response.headers["Content-Range"] = ranges.content_range(span.start, span.end, info.size)
    response.content_length = span.length
    await response.prepare(request)
    mark_prepared(request)
    await _relay(response, first, pieces)
    await response.write_eof()
    request.app[METRICS].sent(span.start, span.end, info.anchor_end)
    return response


async def _send_multipart(
    request: web.Request,
    info: ObjectInfo,
    wanted: list[ByteRange],
    first: bytes,
    pieces: AsyncIterator[bytes],
) -> web.StreamResponse:
    """multipart/byteranges (RFC 9110 14.6), with an exact Content-Length."""
    boundary = secrets.token_hex(16)
    heads = [
        (
            f"--{boundary}\r\nContent-Type: {OCTETS}\r\nContent-Range: "
            f"{ranges.content_range(s.start, s.end, info.size)}\r\n\r\n"
        ).encode()
        for s in wanted
    ]
    tail = f"--{boundary}--\r\n".encode()
    headers = _object_headers(info)
    headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    response = web.StreamResponse(status=206, headers=headers)
    response.content_length = sum(
        len(h) + s.length + 2 for h, s in zip(heads, wanted, strict=True)
    ) + len(tail)
    await response.prepare(request)
    mark_prepared(request)
    store, metrics = request.app[STORE], request.app[METRICS]
    for i, (head, span) in enumerate(zip(heads, wanted, strict=True)):
        await response.write(head)
        if i:
            first, pieces = await _first_piece(store, info.key, span, info.etag)
        await _relay(response, first, pieces)
        await response.write(b"\r\n")
        metrics.sent(span.start, span.end, info.anchor_end)
    await response.write(tail)
    await response.write_eof()
    return response


async def head_object(request: web.Request) -> web.StreamResponse:
    info = await request.app[STORE].info(valid_key(request.match_info["key"]))
    # a StreamResponse keeps the Content-Length we set (RFC 9110 9.3.2: as for GET)
    response = web.StreamResponse(status=200, headers=_object_headers(info))
    response.content_length = info.size
    return response


async def delete_object(request: web.Request) -> web.Response:
    key = valid_key(request.match_info["key"])
    if not await request.app[STORE].delete(key):
        raise NotFound(f"no object under key {key!r}")
    return web.Response(status=204)


async def lookup(request: web.Request) -> web.Response:
    keys = key_list(await read_json(request))
    present = await request.app[STORE].contains(keys)
    prefix = next((i for i, p in enumerate(present) if not p), len(present))
    return web.json_response({"prefix": prefix, "present": present})


async def list_objects(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")
    if prefix:
        valid_key(prefix)
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError as exc:
        raise BadRequest("limit must be an integer") from exc
    if not 1 <= limit <= 10000:
        raise BadRequest("limit must be in [1, 10000]")
    objects = await request.app[STORE].list(prefix, limit)
    return web.json_response(
        {
            "objects": [
                {
                    "key": o.key,
                    "size": o.size,
                    "anchor_end": o.anchor_end,
                    "etag": o.etag,
                    "last_access": o.last_access,
                }
                for o in objects
            ]
        }
    )


async def healthz(request: web.Request) -> web.Response:
    stats = await request.app[STORE].stats()
    return web.json_response({"status": "ok", "objects": stats.objects, "bytes": stats.bytes})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    await registry.refresh(request.app[STORE].stats)
    response = web.Response(body=generate_latest(registry.registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def _store_context(
    config: ServerConfig, given: Store | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        from lynxkv.kvstore.backends import open_store

        store = given if given is not None else await open_store(config)
        app[STORE] = store
        log.info("store ready: %s", config.store)
        try:
            yield
        finally:
            await store.close()
            log.info("store closed")

    return context


def make_app(config: ServerConfig, *, store: Store | None = None) -> web.Application:
    """The aiohttp application; the store opens on startup and closes on cleanup.

    ``store`` overrides the one ``config.store`` names (tests, embedding)."""
    app = web.Application(
        middlewares=[_in_flight, _errors_and_metrics, _auth], client_max_size=MAX_JSON_BYTES
    )
    app[CONFIG] = config
    app[IN_FLIGHT] = InFlight()
    app[METRICS] = Metrics()
    app[SCHEDULER] = AnchorFirst()
    app[TOKEN] = config.auth_token or ""
    app.cleanup_ctx.append(_store_context(config, store))
    path = "/v1/kv/{key}"
    app.router.add_put(path, put_object)
    app.router.add_get(path, get_object, allow_head=False)
    app.router.add_head(path, head_object)
    app.router.add_delete(path, delete_object)
    app.router.add_get("/v1/kv", list_objects)
    app.router.add_post("/v1/lookup", lookup)
    app.router.add_post("/v1/stream", stream_handler)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app
