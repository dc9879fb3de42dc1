"""The HTTP API's reads on a real server (port 0), on each store (a real LMDB, a real Redis
Cluster): a table of range cases, parts, objects in many pieces, a GET racing a replace,
list, lookup and their JSON bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lynxkv.kvstore.requests import MAX_JSON_BYTES
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
from tests.kvstore.server_helpers import OBJ, OTHER, A, N, object_headers_ok

# -- ranges ------------------------------------------------------------------------------------


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
