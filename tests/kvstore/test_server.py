"""The HTTP API on a real server (port 0), on each store (a real LMDB, a real Redis Cluster):
routes, errors, auth, keys, JSON, oversized bodies, a table of range cases, list, lookup,
metrics and healthz."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lynxkv.codec import decode
from lynxkv.errors import FormatError
from lynxkv.kvstore.requests import MAX_JSON_BYTES
from tests.codec.objects import rebuild
from tests.kvstore.conftest import (
    BAD_JSON_BODIES,
    Backend,
    Serve,
    Server,
    anchor_end,
    assemble,
    expect_error,
    hooked_server,
    make_object,
    raw_request,
    read_multipart,
    run,
    stream,
)

OBJ = make_object(0)
OTHER = make_object(1)


def codec_error(data: bytes) -> FormatError:
    """What the codec says of a malformed object (the server must say the same)."""
    with pytest.raises(FormatError) as info:
        decode(data)
    return info.value


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def object_headers_ok(headers: Any, etag: str, obj: bytes) -> None:
    assert headers["ETag"] == etag
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["X-Lynx-Anchor-End"] == str(anchor_end(obj))


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


# -- ranges ------------------------------------------------------------------------------------

N = len(OBJ)
A = anchor_end(OBJ)


@dataclass(frozen=True)
class RangeCase:
    """A GET and what it must answer: ``spans`` are the half-open byte ranges of a 206 (one:
    single part; several: multipart/byteranges); none with 200 means the whole object."""

    id: str
    range: str | None = None
    if_range: Callable[[str], str] | None = None
    part: str | None = None
    status: int = 206
    spans: tuple[tuple[int, int], ...] = ()
    code: str | None = None  # the error code of a 4xx


MANY = tuple((i * 100, i * 100 + 10) for i in range(100))
RANGE_CASES = [
    RangeCase("first-bytes", "bytes=0-99", spans=((0, 100),)),
    RangeCase("middle", "bytes=1000-1999", spans=((1000, 2000),)),
    RangeCase("open-ended", f"bytes={N - 5000}-", spans=((N - 5000, N),)),
    RangeCase("suffix", "bytes=-500", spans=((N - 500, N),)),
    RangeCase("last-byte", "bytes=-1", spans=((N - 1, N),)),
    RangeCase("first-byte", "bytes=0-0", spans=((0, 1),)),
    RangeCase("whole-as-range", "bytes=0-", spans=((0, N),)),
    RangeCase("last-pos-past-end", f"bytes={N - 10}-{N + 10}", spans=((N - 10, N),)),
    RangeCase("suffix-longer-than-object", f"bytes=-{N + 1}", spans=((0, N),)),
    RangeCase("anchor-as-range", f"bytes=0-{A - 1}", spans=((0, A),)),
    RangeCase("unit-case-insensitive", "BYTES=0-9", spans=((0, 10),)),
    RangeCase("two-ranges", "bytes=0-9,100-199", spans=((0, 10), (100, 200))),
    RangeCase("client-order-kept", "bytes=100-199,0-9", spans=((100, 200), (0, 10))),
    RangeCase(
        "three-with-suffix",
        f"bytes=0-0,{A}-{A + 9},-5",
        spans=((0, 1), (A, A + 10), (N - 5, N)),
    ),
    RangeCase("whitespace", "bytes=0-9 , 20-29", spans=((0, 10), (20, 30))),
    RangeCase("hundred-ranges", "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in MANY), spans=MANY),
    RangeCase("overlap-coalesced", "bytes=0-99,50-149", spans=((0, 150),)),
    RangeCase("adjacent-coalesced", "bytes=0-9,10-19", spans=((0, 20),)),
    RangeCase("unsatisfiable-dropped", f"bytes=0-9,{N}-", spans=((0, 10),)),
    RangeCase("start-past-end", f"bytes={N}-", status=416, code="range_not_satisfiable"),
    RangeCase("all-past-end", f"bytes={N}-,{N + 9}-", status=416, code="range_not_satisfiable"),
    RangeCase("zero-suffix", "bytes=-0", status=416, code="range_not_satisfiable"),
    RangeCase("reversed-ignored", "bytes=10-5", status=200),
    RangeCase("other-unit-ignored", "items=0-9", status=200),
    RangeCase("garbage-ignored", "bytes=abc", status=200),
    RangeCase("over-100-ranges-ignored", "bytes=" + ",".join(["0-0"] * 101), status=200),
    RangeCase("if-range-current", "bytes=0-9", if_range=lambda e: e, spans=((0, 10),)),
    RangeCase("if-range-stale", "bytes=0-9", if_range=lambda e: '"0000"', status=200),
    RangeCase("if-range-weak", "bytes=0-9", if_range=lambda e: "W/" + e, status=200),
    RangeCase(
        "if-range-date",
        "bytes=0-9",
        if_range=lambda e: "Wed, 21 Oct 2015 07:28:00 GMT",
        status=200,
    ),
    RangeCase("part-anchor", part="anchor", spans=((0, A),)),
    RangeCase("part-residual", part="residual", spans=((A, N),)),
    RangeCase("part-all", part="all", status=200),
    RangeCase("part-unknown", part="keys", status=400, code="bad_request"),
    RangeCase("part-and-range", "bytes=0-9", part="anchor", status=400, code="bad_request"),
]


@pytest.mark.parametrize("case", RANGE_CASES, ids=lambda c: c.id)
def test_range(serve: Serve, case: RangeCase) -> None:
    async def check(srv: Server) -> None:
        etag = (await srv.put("k", OBJ))["etag"]
        headers = {}
        if case.range is not None:
            headers["Range"] = case.range
        if case.if_range is not None:
            headers["If-Range"] = case.if_range(etag)
        params = {"part": case.part} if case.part is not None else {}
        async with srv.session.get("/v1/kv/k", headers=headers, params=params) as resp:
            if case.code is not None:
                await expect_error(resp, case.status, case.code)
                if case.status == 416:
                    assert resp.headers["Content-Range"] == f"bytes */{N}"
                return
            assert resp.status == case.status
            object_headers_ok(resp.headers, etag, OBJ)
            if case.status == 200:
                assert "Content-Range" not in resp.headers
                assert await resp.read() == OBJ
            elif len(case.spans) == 1:
                (
                    start,
                    end,
                ) = case.spans[0]
                assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{N}"
                assert resp.headers["Content-Type"] == "application/octet-stream"
                assert resp.headers["Content-Length"] == str(end - start)
                assert await resp.read() == OBJ[start:end]
            else:
                assert resp.content_type == "multipart/byteranges"
                assert "Content-Range" not in resp.headers
                expected = [(f"bytes {s}-{e - 1}/{N}", OBJ[s:e]) for s, e in case.spans]
                assert await read_multipart(resp) == expected

    serve(check)


def test_parts_of_an_object_without_residual(serve: Serve) -> None:
    raw = make_object(4, layers=1, tokens=64, codec="raw")
    assert anchor_end(raw) == len(raw)

    async def check(srv: Server) -> None:
        await srv.put("raw", raw)
        async with srv.session.get("/v1/kv/raw", params={"part": "residual"}) as resp:
            await expect_error(resp, 416, "range_not_satisfiable")
            assert resp.headers["Content-Range"] == f"bytes */{len(raw)}"
        async with srv.session.get("/v1/kv/raw", params={"part": "anchor"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 0-{len(raw) - 1}/{len(raw)}"
            assert await resp.read() == raw

    serve(check)


def test_objects_stored_in_many_pieces(tmp_path: Path, backend: Backend) -> None:
    """A store of 4 KiB pieces: whole GETs, ranges across piece boundaries, multipart and
    streams are stitched from many reads."""
    piece = 4096

    async def main() -> None:
        async with hooked_server(tmp_path / "data", backend=backend, piece_size=piece) as (
            srv,
            _,
        ):
            await srv.put("k", OBJ)
            assert await srv.get("k") == OBJ
            spans = [(piece - 1, 3 * piece + 1), (N - piece - 7, N)]
            for start, end in spans:
                headers = {"Range": f"bytes={start}-{end - 1}"}
                async with srv.session.get("/v1/kv/k", headers=headers) as resp:
                    assert resp.status == 206
                    assert await resp.read() == OBJ[start:end]
            several = {"Range": "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in spans)}
            async with srv.session.get("/v1/kv/k", headers=several) as resp:
                assert [body for _, body in await read_multipart(resp)] == [
                    OBJ[a:b] for a, b in spans
                ]
            assert assemble(await stream(srv.session, ["k"])) == {0: OBJ}

    run(main())


def test_get_retries_when_the_object_is_replaced_under_it(tmp_path: Path, backend: Backend) -> None:
    """The object is replaced between the GET's index lookup and its first read: the GET
    starts over and sends the new version whole, never a mix."""

    async def main() -> None:
        async with hooked_server(tmp_path / "data", backend=backend) as (srv, store):
            await srv.put("k", OBJ)
            store.gates["k"] = gate = asyncio.Event()
            get = asyncio.create_task(srv.get("k"))
            await store.event(store.held, "k").wait()
            etag = (await srv.put("k", OTHER))["etag"]
            gate.set()
            assert await get == OTHER
            async with srv.session.head("/v1/kv/k") as resp:
                assert resp.headers["ETag"] == etag

    run(main())


def test_multipart_body_matches_its_content_length(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        await srv.put("k", OBJ)
        async with srv.session.get("/v1/kv/k", headers={"Range": "bytes=0-9,-10"}) as resp:
            body = await resp.read()
            assert int(resp.headers["Content-Length"]) == len(body)
            boundary = resp.headers["Content-Type"].partition("boundary=")[2]
        assert body.startswith(f"--{boundary}\r\n".encode())
        assert body.endswith(f"\r\n--{boundary}--\r\n".encode())

    serve(check)


# -- list, lookup, JSON bodies ------------------------------------------------------------------


def test_list(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        small = make_object(3, layers=1, tokens=64)
        etags = {key: (await srv.put(key, small))["etag"] for key in ("b-1", "a-2", "a-1", "c")}
        async with srv.session.get("/v1/kv") as resp:
            assert resp.status == 200
            objects = (await resp.json())["objects"]
        assert [o["key"] for o in objects] == ["a-1", "a-2", "b-1", "c"]
        for o in objects:
            assert set(o) == {"key", "size", "anchor_end", "etag", "last_access"}
            assert (o["size"], o["anchor_end"]) == (len(small), anchor_end(small))
            assert o["etag"] == etags[o["key"]]
            assert isinstance(o["last_access"], float)
        for params, keys in [
            ({"prefix": "a-"}, ["a-1", "a-2"]),
            ({"prefix": "b"}, ["b-1"]),
            ({"prefix": "z"}, []),
            ({"limit": "2"}, ["a-1", "a-2"]),
            ({"prefix": "a", "limit": "1"}, ["a-1"]),
            ({"limit": "10000"}, ["a-1", "a-2", "b-1", "c"]),
        ]:
            async with srv.session.get("/v1/kv", params=params) as resp:
                assert [o["key"] for o in (await resp.json())["objects"]] == keys, params

    serve(check)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": "0"}, "bad_request"),
        ({"limit": "10001"}, "bad_request"),
        ({"limit": "-1"}, "bad_request"),
        ({"limit": "ten"}, "bad_request"),
        ({"limit": "1.5"}, "bad_request"),
        ({"prefix": "a b"}, "invalid_key"),
        ({"prefix": "x" * 201}, "invalid_key"),
    ],
)
def test_list_bad_parameters(serve: Serve, params: dict[str, str], code: str) -> None:
    async def check(srv: Server) -> None:
        async with srv.session.get("/v1/kv", params=params) as resp:
            await expect_error(resp, 400, code)

    serve(check)


def test_lookup(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        small = make_object(3, layers=1, tokens=64)
        for key in ("c0", "c1", "c3"):
            await srv.put(key, small)
        for keys, answer in [
            (["c0", "c1", "c2", "c3"], {"prefix": 2, "present": [True, True, False, True]}),
            (["c0", "c1", "c3"], {"prefix": 3, "present": [True, True, True]}),
            (["c2", "c0"], {"prefix": 0, "present": [False, True]}),
            (["c0", "c0"], {"prefix": 2, "present": [True, True]}),
            ([], {"prefix": 0, "present": []}),
        ]:
            async with srv.session.post("/v1/lookup", json={"keys": keys}) as resp:
                assert resp.status == 200
                assert await resp.json() == answer, keys

    serve(check)


@pytest.mark.parametrize(
    ("body", "code"), [c[1:] for c in BAD_JSON_BODIES], ids=[c[0] for c in BAD_JSON_BODIES]
)
def test_lookup_bad_body(serve: Serve, body: bytes, code: str) -> None:
    async def check(srv: Server) -> None:
        headers = {"Content-Type": "application/json"}
        async with srv.session.post("/v1/lookup", data=body, headers=headers) as resp:
            await expect_error(resp, 400, code)

    serve(check)


def test_json_body_over_the_limit_is_413_before_it_is_read(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        for path in ("/v1/lookup", "/v1/stream"):
            head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            head += f"\r\nContent-Length: {MAX_JSON_BYTES + 1}"
            resp = await raw_request(srv.url, head, b'{"keys": []')  # the rest never comes
            assert resp.status == 413
            assert resp.error()[0] == "too_large"

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
