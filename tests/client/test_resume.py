"""Nothing lost, nothing wrong: reads resume after a cut with Range + If-Range, a replaced
object is never spliced, transient failures are retried, and the rest fail typed. The
faults come from ``Proxy``, a real TCP proxy between the client and a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lynxkv.client import AsyncClient
from lynxkv.client.retry import Resume, RetryPolicy, error_for
from lynxkv.errors import (
    BadRequest,
    ChecksumError,
    FormatError,
    InvalidKey,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    RequestError,
    ServerError,
    StorageFull,
    TooLarge,
    TransportError,
    Unauthorized,
)
from tests.client.conftest import FAST, Proxy, client_on, http_answer, make_object, run

OBJ = make_object(1)  # about 250 kB
OTHER = make_object(2)
UNAVAILABLE = http_answer(503, "Service Unavailable", "store_unavailable")


async def through(proxy: Proxy, **options: Any) -> AsyncClient:
    return AsyncClient(proxy.url, **{**FAST, **options})


def test_resume_after_one_cut(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            etag = (await direct.put("k", OBJ)).etag
            async with Proxy(srv.url, cut_after=50_000) as proxy, await through(proxy) as c:
                assert await c.get("k") == OBJ
            assert proxy.connections == 2
            [(first, if_range)] = proxy.ranges()
            assert 0 < first < 50_000 and if_range == etag

    run(main())


def test_resume_after_a_stall(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            await direct.put("k", OBJ)
            stall = asyncio.Event().wait  # the proxy stops forwarding, and never goes on
            proxy = Proxy(srv.url, cut_after=50_000, before_cut=stall)
            async with proxy, await through(proxy, timeout=0.3) as c:
                assert await c.get("k") == OBJ
            assert len(proxy.ranges()) == 1

    run(main())


def test_resume_when_every_connection_is_cut(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            etag = (await direct.put("k", OBJ)).etag
            proxy = Proxy(srv.url, cut_after=40_000, cut_count=None)
            # more cuts than retries: each resume makes progress, so none counts as failed
            async with proxy, await through(proxy, retries=2) as c:
                ticks: list[int] = []
                got = [item async for item in c.iter_bytes("k", 1000, progress=ticks.append)]
            assert b"".join(chunk for _, chunk in got) == OBJ[1000:]
            assert sum(ticks) == len(OBJ) - 1000
            resumes = proxy.ranges()
            assert len(resumes) >= 5 and resumes[0] == (1000, None)  # no ETag known yet
            starts = [start for start, _ in resumes]
            assert starts == sorted(starts) and all(tag == etag for _, tag in resumes[1:])

    run(main())


def test_resume_of_get_into_and_part(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            end = (await direct.put("k", OBJ)).anchor_end
            proxy = Proxy(srv.url, cut_after=30_000, cut_count=None)
            async with proxy, await through(proxy) as c:
                buffer = bytearray(len(OBJ))
                assert await c.get_into("k", buffer) == len(OBJ) and buffer == OBJ
                assert await c.get("k", part="residual") == OBJ[end:]

    run(main())


def test_a_replaced_object_is_never_spliced(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            await direct.put("k", OBJ)

            async def replace() -> None:
                await direct.put("k", OTHER)

            proxy = Proxy(srv.url, cut_after=50_000, before_cut=replace)
            async with proxy, await through(proxy) as c:
                with pytest.raises(PreconditionFailed, match="not splicing"):
                    await c.get("k")
                assert await c.get("k") == OTHER  # a fresh read gets the new version

    run(main())


def test_iter_bytes_of_another_version(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (_, c):
            old = (await c.put("k", OBJ)).etag
            await c.put("k", OTHER)
            with pytest.raises(PreconditionFailed):
                async for _ in c.iter_bytes("k", etag=old):
                    pass

    run(main())


def test_a_cut_without_retries_is_a_transport_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            await direct.put("k", OBJ)
            proxy = Proxy(srv.url, cut_after=50_000)
            async with proxy, await through(proxy, retries=0) as c:
                got = bytearray()
                with pytest.raises(TransportError):
                    async for _, chunk in c.iter_bytes("k"):
                        got += chunk
                assert OBJ.startswith(got)  # what was handed out was right

    run(main())


def test_503_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            await direct.put("k", OBJ)
            proxy = Proxy(srv.url, canned=UNAVAILABLE, canned_count=2)
            async with proxy, await through(proxy) as c:
                assert await c.get("k") == OBJ
                assert proxy.connections == 3
            proxy = Proxy(srv.url, canned=UNAVAILABLE)
            async with proxy, await through(proxy) as c:
                assert (await c.put("k2", OTHER)).size == len(OTHER)  # bytes are sent again
                assert proxy.connections == 2
            assert await direct.get("k2") == OTHER

    run(main())


def test_503_that_persists_is_a_server_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, _):
            proxy = Proxy(srv.url, canned=UNAVAILABLE, canned_count=99)
            async with proxy, await through(proxy, retries=2) as c:
                with pytest.raises(ServerError) as info:
                    await c.head("k")
                assert info.value.status == 503
                assert proxy.connections == 3

    run(main())


def test_a_dropped_connection_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            await direct.put("k", OBJ)
            # a POST: aiohttp does not retry it by itself, so the retries are the client's
            proxy = Proxy(srv.url, canned=b"", canned_count=2)
            async with proxy, await through(proxy) as c:
                assert await c.lookup(["k"]) == (1, (True,))
                assert proxy.connections == 3
                assert (await c.head("k")).size == len(OBJ)

    run(main())


def test_a_one_shot_upload_is_not_retried(tmp_path: Path) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield OBJ

    async def main() -> None:
        async with client_on(tmp_path) as (srv, _):
            async with Proxy(srv.url, canned=UNAVAILABLE) as proxy, await through(proxy) as c:
                with pytest.raises(ServerError):
                    await c.put("k", body())
                assert proxy.connections == 1
            async with Proxy(srv.url, canned=b"") as proxy, await through(proxy) as c:
                with pytest.raises(TransportError):
                    await c.put("k", body())
                assert proxy.connections == 1

    run(main())


def test_delete_whose_answer_was_lost(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            await direct.put("k", OBJ)
            # The DELETE reaches the server; its answer does not reach the client. Two cuts:
            # aiohttp itself retries an idempotent request once on a dropped connection.
            proxy = Proxy(srv.url, cut_after=0, cut_count=2)
            async with proxy, await through(proxy) as c:
                await c.delete("k")
                assert proxy.connections == 3
            with pytest.raises(NotFound):
                await direct.head("k")

    run(main())


def test_a_cut_stream_is_a_transport_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, direct):
            await direct.put("k", OBJ)
            async with Proxy(srv.url, cut_after=60_000) as proxy, await through(proxy) as c:
                frames = []
                with pytest.raises(TransportError):
                    async for frame in c.stream(["k"]):
                        frames.append(frame)
                assert frames  # the frames before the cut were handed out

    run(main())


# -- the pure parts ---------------------------------------------------------------------------


def test_resume_requests() -> None:
    assert Resume.new("k").request() == ({}, {})
    assert Resume.new("k", part="anchor").request() == ({}, {"part": "anchor"})
    assert Resume.new("k", 5, 10).request() == ({"Range": "bytes=5-9"}, {})
    headers, _ = Resume("k", 7, None, '"e"').request()
    assert headers == {"Range": "bytes=7-", "If-Range": '"e"'}
    with pytest.raises(ValueError):
        Resume.new("k", -1)


def test_resume_checks_answers() -> None:
    tag = {"ETag": '"e"'}
    span = Resume.new("k", 5, 50)
    span.accept(206, {**tag, "Content-Range": "bytes 5-19/20"})  # clamped at the end
    assert (span.end, span.etag) == (20, '"e"')
    with pytest.raises(FormatError):
        Resume.new("k", 5, 50).accept(206, {**tag, "Content-Range": "bytes 6-19/20"})
    with pytest.raises(FormatError):
        Resume.new("k", 5).accept(206, {**tag, "Content-Range": "bytes 5-9/20"})
    with pytest.raises(FormatError):
        Resume.new("k", 5).accept(200, {**tag, "Content-Length": "20"})  # Range ignored
    with pytest.raises(FormatError):
        Resume.new("k").accept(200, {"Content-Length": "20"})  # no ETag
    with pytest.raises(PreconditionFailed):
        Resume("k", 5, 20, '"e"').accept(200, {"ETag": '"f"', "Content-Length": "20"})
    with pytest.raises(PreconditionFailed):
        Resume("k", 5, 20, '"e"').accept(206, {"ETag": '"f"', "Content-Range": "bytes 5-19/20"})
    whole = Resume.new("k", part="residual")
    whole.accept(206, {**tag, "Content-Range": "bytes 12-19/20"})
    assert (whole.position, whole.end, whole.part) == (12, 20, None)


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (400, "bad_request", BadRequest),
        (400, "invalid_key", InvalidKey),
        (400, "bad_object", FormatError),
        (400, "checksum_mismatch", ChecksumError),
        (400, None, BadRequest),
        (401, "unauthorized", Unauthorized),
        (404, "not_found", NotFound),
        (405, "method_not_allowed", RequestError),
        (412, "precondition_failed", PreconditionFailed),
        (413, "too_large", TooLarge),
        (507, "storage_full", StorageFull),
        (500, "internal", ServerError),
        (503, None, ServerError),
    ],
)
def test_error_for(status: int, code: str | None, error: type[Exception]) -> None:
    assert type(error_for(status, code, "message")) is error


def test_error_for_416_and_5xx() -> None:
    unsatisfiable = error_for(416, "range_not_satisfiable", "m", 123)
    assert isinstance(unsatisfiable, RangeNotSatisfiable) and unsatisfiable.size == 123
    server = error_for(502, None, "m")
    assert isinstance(server, ServerError) and server.status == 502


def test_backoff_grows_with_jitter() -> None:
    policy = RetryPolicy(retries=5, backoff=0.1, max_backoff=1.0)
    assert [policy.delay(n, lambda: 1.0) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert [policy.delay(n, lambda: 0.0) for n in (1, 2, 3)] == [0.05, 0.1, 0.2]
    assert policy.delay(20, lambda: 1.0) == 1.0
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)
