"""The HTTP API on a real server (port 0), on each store (a real LMDB, a real Redis Cluster):
routes, errors, auth, keys, oversized bodies, metrics and healthz. Ranges, list, lookup and
their JSON bodies: test_server_reads.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from lynxkv.codec import decode
from lynxkv.errors import FormatError
from tests.codec.objects import rebuild
from tests.kvstore.conftest import (
    Backend,
    Serve,
    Server,
    anchor_end,
    expect_error,
    make_object,
    raw_request,
)
from tests.kvstore.server_helpers import OBJ, OTHER, A, N, object_headers_ok


def codec_error(data: bytes) -> FormatError:
    """What the codec says of a malformed object (the server must say the same)."""
    with pytest.raises(FormatError) as info:
        decode(data)
    return info.value


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# -- PUT, GET, HEAD, DELETE --------------------------------------------------------------------


def test_put_creates_then_replaces(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        async with srv.session.put("/v1/kv/chunk-0", data=OBJ) as resp:
            assert resp.status == 201
            first = await resp.json()
            assert resp.headers["ETag"] == first["etag"]
        assert first == {
            "key": "chunk-0",
            "size": len(OBJ),
            "anchor_end": anchor_end(OBJ),
            "etag": first["etag"],
        }
        assert first["etag"].startswith('"') and first["etag"].endswith('"')
        async with srv.session.put("/v1/kv/chunk-0", data=OTHER) as resp:
            assert resp.status == 200
            second = await resp.json()
        assert second["etag"] != first["etag"]
        async with srv.session.get("/v1/kv/chunk-0") as resp:
            assert resp.status == 200
            assert await resp.read() == OTHER
            object_headers_ok(resp.headers, second["etag"], OTHER)
            assert resp.headers["Content-Type"] == "application/octet-stream"
            assert resp.headers["Content-Length"] == str(len(OTHER))

    serve(check)


def test_put_streams_a_chunked_body(serve: Serve) -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(OBJ), 10_000):
            yield OBJ[i : i + 10_000]

    async def check(srv: Server) -> None:
        async with srv.session.put("/v1/kv/k", data=body()) as resp:
            assert resp.status == 201, await resp.text()
        assert await srv.get("k") == OBJ

    serve(check)


def test_head_get_delete(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        etag = (await srv.put("k", OBJ))["etag"]
        async with srv.session.head("/v1/kv/k") as resp:
            assert resp.status == 200
            object_headers_ok(resp.headers, etag, OBJ)
            assert resp.headers["Content-Length"] == str(len(OBJ))
            assert await resp.read() == b""
        async with srv.session.delete("/v1/kv/k") as resp:
            assert resp.status == 204
            assert await resp.read() == b""
        async with srv.session.delete("/v1/kv/k") as resp:
            await expect_error(resp, 404, "not_found")
        async with srv.session.get("/v1/kv/k") as resp:
            await expect_error(resp, 404, "not_found")
        async with srv.session.head("/v1/kv/k") as resp:
            assert resp.status == 404

    serve(check)


MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda o: b"not a lynxkv object" * 4,
    "empty": lambda o: b"",
    "truncated-header": lambda o: o[:30],
    "truncated-body": lambda o: o[: len(o) // 2],
    "anchor-byte-flipped": lambda o: flip(o, anchor_end(o) - 10),
    "residual-byte-flipped": lambda o: flip(o, len(o) - 10),
    "header-byte-flipped": lambda o: flip(o, 30),
    "trailing-byte": lambda o: o + b"\0",
    "unknown-version": lambda o: rebuild(o, lambda h: None, version=2),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_object_is_refused_with_the_codec_message(serve: Serve, case: str) -> None:
    bad = MALFORMED[case](OBJ)
    expected = codec_error(bad)

    async def check(srv: Server) -> None:
        etag = (await srv.put("k", OTHER))["etag"]
        async with srv.session.put("/v1/kv/k", data=bad) as resp:
            message = await expect_error(resp, 400, expected.code)
        assert message == str(expected)
        async with srv.session.put("/v1/kv/new", data=bad) as resp:
            await expect_error(resp, 400, expected.code)
        # atomic: the old version stays, the new key never appears
        async with srv.session.get("/v1/kv/k") as resp:
            assert resp.headers["ETag"] == etag
            assert await resp.read() == OTHER
        assert await srv.status("GET", "/v1/kv/new") == 404
        assert (await srv.store.stats()).bytes == len(OTHER)
        reason = "truncated" if str(expected).startswith("truncated") else "malformed"
        assert (await srv.metrics())["lynxkv_rejected_uploads_total", (("reason", reason),)] == 2

    serve(check)


def test_oversized_put_is_413(serve: Serve) -> None:
    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(OBJ), 50_000):
            yield OBJ[i : i + 50_000]

    async def check(srv: Server) -> None:
        async with srv.session.put("/v1/kv/k", data=OBJ) as resp:  # Content-Length
            message = await expect_error(resp, 413, "too_large")
        assert str(len(OBJ)) in message
        async with srv.session.put("/v1/kv/k", data=chunked()) as resp:  # no length
            await expect_error(resp, 413, "too_large")
        # refused from Content-Length alone, before the body is read
        head = f"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: {10 * len(OBJ)}"
        raw = await raw_request(srv.url, head, OBJ[:100])
        assert (raw.status, raw.error()[0]) == (413, "too_large")
        assert await srv.status("GET", "/v1/kv/k") == 404
        small = make_object(2, layers=1, tokens=64)
        assert (await srv.put("small", small))["size"] == len(small)
        metrics = await srv.metrics()
        assert metrics["lynxkv_rejected_uploads_total", (("reason", "too_large"),)] == 3
        assert metrics["lynxkv_stored_bytes", ()] == len(small)

    serve(check, max_object_bytes=len(OBJ) - 1)


# -- keys, routes, auth ----------------------------------------------------------------------


BAD_KEYS = ["a b", "x" * 201, "café", "a:b", "a+b", "a%b", "a*", "~k"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: f"{k[:8]!r}")
def test_bad_key_is_400(serve: Serve, key: str) -> None:
    async def check(srv: Server) -> None:
        path = "/v1/kv/" + key.replace("%", "%25")
        for method in ("PUT", "GET", "DELETE"):
            data = OBJ if method == "PUT" else None
            async with srv.session.request(method, path, data=data) as resp:
                await expect_error(resp, 400, "invalid_key")
        async with srv.session.head(path) as resp:
            assert resp.status == 400
        assert (await srv.store.stats()).objects == 0

    serve(check)


def test_keys_at_the_limits_are_accepted(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        for key in ("x" * 200, "A-Z_a.z-0.9", "k"):
            assert (await srv.put(key, OBJ))["key"] == key
            assert await srv.get(key) == OBJ

    serve(check)


def test_unknown_route_and_method(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        async with srv.session.get("/v2/kv/k") as resp:
            await expect_error(resp, 404, "not_found")
        async with srv.session.get("/v1/kv/a/b") as resp:  # a key has no slash
            await expect_error(resp, 404, "not_found")
        async with srv.session.post("/v1/kv/k", data=OBJ) as resp:
            await expect_error(resp, 405, "method_not_allowed")
        async with srv.session.get("/v1/lookup") as resp:
            await expect_error(resp, 405, "method_not_allowed")

    serve(check)


TOKEN = "s3cret-T0ken_value"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    status: int  # with the right token, on an empty store
    body: dict[str, Any] = field(default_factory=dict)


ROUTES = [
    Route("PUT", "/v1/kv/k", 201),
    Route("GET", "/v1/kv/k", 404),
    Route("HEAD", "/v1/kv/k", 404),
    Route("DELETE", "/v1/kv/k", 404),
    Route("GET", "/v1/kv", 200),
    Route("POST", "/v1/lookup", 200, {"json": {"keys": ["k"]}}),
    Route("POST", "/v1/stream", 200, {"json": {"keys": ["k"]}}),
    Route("GET", "/metrics", 200),
]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_auth_guards_every_route(serve: Serve, route: Route) -> None:
    body = {"data": OBJ} if route.method == "PUT" else route.body
    refused = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]

    async def check(srv: Server) -> None:
        for headers in refused:
            async with srv.session.request(
                route.method, route.path, headers=headers, **body
            ) as resp:
                assert resp.headers["WWW-Authenticate"] == 'Bearer realm="lynxkv"'
                if route.method == "HEAD":
                    assert resp.status == 401
                else:
                    await expect_error(resp, 401, "unauthorized")
        assert (await srv.store.stats()).objects == 0
        good = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
        async with srv.session.request(route.method, route.path, headers=good, **body) as resp:
            await resp.read()
            assert resp.status == route.status

    serve(check, auth_token=TOKEN)


def test_healthz_needs_no_token(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        async with srv.session.get("/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "objects": 0, "bytes": 0}

    serve(check, auth_token=TOKEN)


def test_auth_off_needs_no_header(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        await srv.put("k", OBJ)
        async with srv.session.get("/metrics") as resp:
            assert resp.status == 200

    serve(check)


# -- operations --------------------------------------------------------------------------------


def test_healthz(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        await srv.put("a", OBJ)
        await srv.put("b", OTHER)
        async with srv.session.get("/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "objects": 2, "bytes": 2 * N}

    serve(check)


def test_metrics_count_what_happened(serve: Serve, backend: Backend) -> None:
    async def check(srv: Server) -> None:
        await srv.put("a", OBJ)
        await srv.put("a", OBJ)
        await srv.put("b", OTHER)
        async with srv.session.put("/v1/kv/c", data=OBJ[:100]) as resp:
            assert resp.status == 400
        async with srv.session.put("/v1/kv/c", data=flip(OBJ, N - 1)) as resp:
            assert resp.status == 400
        async with srv.session.get("/v1/kv/a", params={"part": "anchor"}) as resp:
            assert resp.status == 206
        async with srv.session.get("/v1/kv/a", headers={"Range": f"bytes={A - 10}-{A + 9}"}):
            pass
        async with srv.session.get("/v1/kv/missing") as resp:
            assert resp.status == 404
        async with srv.session.get("/metrics") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
        m = await srv.metrics()
        req = "lynxkv_requests_total"
        kv = ("route", "/v1/kv/{key}")
        assert m[req, (("method", "PUT"), kv, ("status", "201"))] == 2
        assert m[req, (("method", "PUT"), kv, ("status", "200"))] == 1
        assert m[req, (("method", "PUT"), kv, ("status", "400"))] == 2
        assert m[req, (("method", "GET"), kv, ("status", "206"))] == 2
        assert m[req, (("method", "GET"), kv, ("status", "404"))] == 1
        assert m[req, (("method", "GET"), ("route", "/metrics"), ("status", "200"))] == 1
        assert m["lynxkv_request_seconds_count", (("method", "PUT"), kv)] == 5
        assert m["lynxkv_sent_bytes_total", (("part", "anchor"),)] == A + 10
        assert m["lynxkv_sent_bytes_total", (("part", "residual"),)] == 10
        assert m["lynxkv_received_bytes_total", ()] == 2 * N + len(OTHER)
        assert m["lynxkv_rejected_uploads_total", (("reason", "truncated"),)] == 1
        assert m["lynxkv_rejected_uploads_total", (("reason", "malformed"),)] == 1
        assert m["lynxkv_objects", ()] == 2
        assert m["lynxkv_stored_bytes", ()] == N + len(OTHER)
        assert m["lynxkv_max_bytes", ()] == backend.max_bytes(srv.config)
        assert m["lynxkv_evictions", ()] == 0
        assert m["lynxkv_store_missing_pieces_total", ()] == 0
        assert m["lynxkv_active_streams", ()] == 0

    serve(check)
