"""What survives: a restart, a PUT cut mid-body, SIGTERM (drain, clean close) and SIGKILL
of a ``lynxkv serve`` process in the middle of concurrent PUTs."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.kvstore.conftest import (
    Server,
    ServerProcess,
    anchor_end,
    eventually,
    expect_error,
    live_server,
    make_object,
    raw_request,
    run,
)

OBJS = [make_object(30 + i) for i in range(4)]  # equal sizes
SIZE = len(OBJS[0])
LIMITS = ("--max-bytes", "64MiB", "--max-object-bytes", "16MiB")


async def list_keys(srv: Server) -> list[str]:
    async with srv.session.get("/v1/kv", params={"limit": "10000"}) as resp:
        assert resp.status == 200
        return [o["key"] for o in (await resp.json())["objects"]]


def test_objects_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def main() -> None:
        async with live_server(data) as srv:
            etags = {
                key: (await srv.put(key, obj))["etag"]
                for key, obj in zip("abc", OBJS[:3], strict=True)
            }
            etags["b"] = (await srv.put("b", OBJS[3]))["etag"]  # replaced
            assert await srv.status("DELETE", "/v1/kv/c") == 204
        async with live_server(data) as srv:
            for key, obj in (("a", OBJS[0]), ("b", OBJS[3])):
                async with srv.session.get(f"/v1/kv/{key}") as resp:
                    assert resp.status == 200
                    assert resp.headers["ETag"] == etags[key]
                    assert resp.headers["X-Lynx-Anchor-End"] == str(anchor_end(obj))
                    assert await resp.read() == obj
            async with srv.session.get("/v1/kv/c") as resp:
                await expect_error(resp, 404, "not_found")
            assert await list_keys(srv) == ["a", "b"]
            async with srv.session.get("/healthz") as resp:
                assert await resp.json() == {"status": "ok", "objects": 2, "bytes": 2 * SIZE}

    run(main())


def _request_head(key: str, framing: str) -> str:
    size = f"Content-Length: {SIZE}" if framing == "length" else "Transfer-Encoding: chunked"
    return f"PUT /v1/kv/{key} HTTP/1.1\r\nHost: t\r\n{size}"


def _partial_body(cut: int, framing: str) -> bytes:
    part = OBJS[1][:cut]
    return part if framing == "length" else f"{len(part):x}\r\n".encode() + part + b"\r\n"


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("cut", ["header", "anchor", "last-byte"])
def test_put_cut_mid_body_leaves_nothing(
    tmp_path: Path, cut: str, framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two uploads hang up part-way, one of a new key and one replacing a key: neither shows,
    the old version stays, and their space comes back (three objects then fit without
    evicting anything in a store of 3.25 objects)."""
    at = {"header": 10, "anchor": anchor_end(OBJS[1]) // 2, "last-byte": SIZE - 1}[cut]

    async def main() -> None:
        async with live_server(tmp_path / "data", max_bytes=3 * SIZE + SIZE // 4) as srv:
            etag = (await srv.put("old", OBJS[0]))["etag"]
            for key in ("new", "old"):
                head = _request_head(key, framing)
                await raw_request(srv.url, head, _partial_body(at, framing), answer=False)

            async def aborted() -> bool:
                reason = (("reason", "interrupted"),)
                return (await srv.metrics()).get(("lynxkv_rejected_uploads_total", reason)) == 2

            await eventually(aborted, "both uploads to be aborted")
            hung_up = (("method", "PUT"), ("route", "/v1/kv/{key}"), ("status", "499"))
            assert (await srv.metrics())["lynxkv_requests_total", hung_up] == 2
            assert await srv.status("GET", "/v1/kv/new") == 404
            async with srv.session.get("/v1/kv/old") as resp:
                assert resp.headers["ETag"] == etag
                assert await resp.read() == OBJS[0]
            assert await list_keys(srv) == ["old"]
            metrics = await srv.metrics()
            assert metrics["lynxkv_stored_bytes", ()] == SIZE
            assert metrics["lynxkv_objects", ()] == 1
            await srv.put("x", OBJS[2])
            await srv.put("y", OBJS[3])
            assert (await srv.metrics())["lynxkv_evictions", ()] == 0
            for key, obj in (("old", OBJS[0]), ("x", OBJS[2]), ("y", OBJS[3])):
                assert await srv.get(key) == obj

    with caplog.at_level(logging.ERROR):
        run(main())
    # a client hanging up is routine: no ERROR record, no traceback in the log
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def refused(url: str, timeout: float = 10.0) -> None:
    """Wait until the server no longer accepts connections."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except ConnectionRefusedError:
            return
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.01)
    raise AssertionError(f"{url} still accepts connections after {timeout} s")


def test_sigterm_drains_in_flight_requests_and_closes_the_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    auth = {"Authorization": "Bearer t0ken"}
    with ServerProcess(data, *LIMITS, "--auth-token-file", str(token)) as server:
        sent_half, go_on = asyncio.Event(), asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield OBJS[1][: SIZE // 2]
            sent_half.set()
            await go_on.wait()
            yield OBJS[1][SIZE // 2 :]

        async def main() -> None:
            async with aiohttp.ClientSession(server.url, headers=auth) as session:
                async with session.get("/v1/kv", headers={"Authorization": "Bearer no"}) as r:
                    await expect_error(r, 401, "unauthorized")
                async with session.put("/v1/kv/before", data=OBJS[0]) as r:
                    assert r.status == 201

                async def upload() -> int:
                    # 100-continue: the body starts once the server is handling the request
                    headers = {"Content-Length": str(SIZE)}
                    async with session.put(
                        "/v1/kv/inflight", data=body(), headers=headers, expect100=True
                    ) as r:
                        return r.status

                task = asyncio.create_task(upload())
                await sent_half.wait()
                server.signal(signal.SIGTERM)
                await refused(server.url)  # stopped accepting: the drain has begun
                await asyncio.sleep(0.3)  # a slow client, still mid-body well into the drain
                go_on.set()
                assert await task == 201

        run(main())
        assert server.wait() == 0, server.log()
    log = server.log()
    assert "stopping: draining requests in flight" in log
    assert "store closed" in log

    async def reopened() -> None:
        async with live_server(data) as srv:
            assert await srv.get("before") == OBJS[0]
            assert await srv.get("inflight") == OBJS[1]

    run(reopened())


def test_sigkill_during_concurrent_puts_loses_no_acknowledged_object(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked: dict[str, bytes] = {}
    tried: dict[str, bytes] = {}
    with ServerProcess(data, *LIMITS) as server:

        async def main() -> None:
            enough = asyncio.Event()
            async with aiohttp.ClientSession(server.url) as session:

                async def writer(w: int) -> None:
                    for j in itertools.count():
                        key, obj = f"w{w}-{j}", OBJS[(w + j) % len(OBJS)]
                        tried[key] = obj
                        try:
                            async with session.put(f"/v1/kv/{key}", data=obj) as resp:
                                assert resp.status == 201, await resp.text()
                        except aiohttp.ClientError:  # the server is gone
                            return
                        acked[key] = obj
                        if len(acked) >= 40:
                            enough.set()

                writers = [asyncio.create_task(writer(w)) for w in range(8)]
                await enough.wait()
                server.signal(signal.SIGKILL)  # while the other writers are mid-PUT
                await asyncio.gather(*writers)

        run(main())
        assert server.wait() == -signal.SIGKILL
    assert len(tried) > len(acked) >= 40

    async def reopened() -> None:
        async with live_server(data) as srv:
            for key, obj in acked.items():
                assert await srv.get(key) == obj, key
            listed = await list_keys(srv)
            assert set(acked) <= set(listed) <= set(tried)
            for key in set(listed) - set(acked):  # committed, unacknowledged: whole or nothing
                assert await srv.get(key) == tried[key], key
            assert (await srv.store.stats()).bytes == SIZE * len(listed)

    run(reopened())
