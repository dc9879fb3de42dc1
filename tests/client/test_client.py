"""AsyncClient and Client against a real server: every method, and every typed error."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import lynxkv.client
from lynxkv.client import AsyncClient, Client, LookupResult, ObjectMeta
from lynxkv.errors import (
    BadRequest,
    ChecksumError,
    FormatError,
    InvalidKey,
    NotFound,
    RangeNotSatisfiable,
    TooLarge,
    TransportError,
    Unauthorized,
)
from lynxkv.kvstore.frames import DataFrame, EndFrame, InfoFrame, MissingFrame
from tests.client.conftest import (
    Proxy,
    client_on,
    closed_port_url,
    make_object,
    run,
    server_thread,
)
from tests.kvstore.conftest import anchor_end, assemble

OBJ = make_object(1)
OTHER = make_object(2)


def test_public_api_is_sorted_and_real() -> None:
    names = lynxkv.client.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[:1].isupper(), n))
    assert all(hasattr(lynxkv.client, name) for name in names)


def test_put_get_head_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (_, c):
            first = await c.put("k", OBJ)
            assert (first.key, first.size, first.created) == ("k", len(OBJ), True)
            assert first.anchor_end == anchor_end(OBJ) and first.etag.startswith('"')
            again = await c.put("k", OBJ)
            assert not again.created
            assert await c.head("k") == ObjectMeta("k", len(OBJ), anchor_end(OBJ), again.etag)
            assert await c.get("k") == OBJ
            await c.delete("k")
            with pytest.raises(NotFound):
                await c.head("k")
            with pytest.raises(NotFound):
                await c.get("k")
            with pytest.raises(NotFound):
                await c.delete("k")

    run(main())


def test_get_ranges_and_parts(tmp_path: Path) -> None:
    cut = anchor_end(OBJ)

    async def main() -> None:
        async with client_on(tmp_path) as (_, c):
            await c.put("k", OBJ)
            assert await c.get("k", (10, 1000)) == OBJ[10:1000]
            assert await c.get("k", (len(OBJ) - 5, len(OBJ) + 100)) == OBJ[-5:]  # clamped
            assert await c.get("k", (7, 7)) == b""
            assert await c.get("k", part="anchor") == OBJ[:cut]
            assert await c.get("k", part="residual") == OBJ[cut:]
            assert await c.get("k", part="all") == OBJ
            with pytest.raises(RangeNotSatisfiable) as info:
                await c.get("k", (len(OBJ), len(OBJ) + 1))
            assert info.value.size == len(OBJ)
            with pytest.raises(ValueError):
                await c.get("k", (0, 10), part="anchor")
            with pytest.raises(ValueError):
                await c.get("k", part="header")
            with pytest.raises(ValueError):
                await c.get("k", (10, 5))

    run(main())


def test_get_into_and_iter_bytes(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path, chunk_size=10_000) as (_, c):
            put = await c.put("k", OBJ)
            buffer = bytearray(5000)
            assert await c.get_into("k", buffer, offset=100) == 5000
            assert buffer == OBJ[100:5100]
            tail = memoryview(bytearray(1000))
            assert await c.get_into("k", tail, offset=len(OBJ) - 300) == 300
            assert tail[:300] == OBJ[-300:]
            assert await c.get_into("k", bytearray()) == 0
            with pytest.raises(RangeNotSatisfiable):
                await c.get_into("k", bytearray(10), offset=len(OBJ))
            with pytest.raises(TypeError):
                await c.get_into("k", memoryview(b"read-only"))
            got, ticks = bytearray(), list[int]()
            async for offset, chunk in c.iter_bytes("k", 50, etag=put.etag, progress=ticks.append):
                assert offset == 50 + len(got) and 0 < len(chunk) <= 10_000
                got += chunk
            assert got == OBJ[50:] and sum(ticks) == len(got)

    run(main())


def test_put_sources_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "object.lynx"
    path.write_bytes(OBJ)

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(OTHER), 30_000):
            yield OTHER[at : at + 30_000]

    async def main() -> None:
        async with client_on(tmp_path / "data", chunk_size=64 << 10) as (_, c):
            ticks: list[int] = []
            assert (await c.put("file", path, progress=ticks.append)).size == len(OBJ)
            # the file went out in chunks, not read whole
            assert len(ticks) == -(-len(OBJ) // (64 << 10)) and sum(ticks) == len(OBJ)
            assert (await c.put("iter", chunks())).size == len(OTHER)  # chunked encoding
            assert (await c.put("view", memoryview(bytearray(OBJ)))).size == len(OBJ)
            assert await c.get("file") == OBJ and await c.get("iter") == OTHER
            assert await c.get("view") == OBJ
            with pytest.raises(TypeError):
                await c.put("str", str(path))  # type: ignore[arg-type]

    run(main())


def test_lookup_list_and_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (_, c):
            for key, obj in [("a0", OBJ), ("a1", OTHER), ("b0", OBJ)]:
                await c.put(key, obj)
            assert await c.lookup(["a0", "a1", "zz", "b0"]) == LookupResult(
                2, (True, True, False, True)
            )
            assert [m.key for m in await c.list()] == ["a0", "a1", "b0"]
            listed = await c.list("a", limit=1)
            assert [(m.key, m.size) for m in listed] == [("a0", len(OBJ))]
            assert listed[0].last_access is not None
            frames = [f async for f in c.stream(["a1", "zz", "a0"], parts=["anchor"])]
            assert isinstance(frames[0], InfoFrame) and isinstance(frames[1], MissingFrame)
            assert isinstance(frames[-1], EndFrame)
            assert all(f.part == "anchor" for f in frames if isinstance(f, DataFrame))
            whole = assemble([f async for f in c.stream(["a1", "a0"])])
            assert whole == {0: OTHER, 1: OBJ}

    run(main())


def test_request_errors_are_typed(tmp_path: Path) -> None:
    damaged = bytearray(OBJ)
    damaged[-1] ^= 0xFF  # the last section's checksum no longer matches

    async def main() -> None:
        async with client_on(tmp_path) as (_, c):
            with pytest.raises(InvalidKey):
                await c.get("not/a/key")  # refused before any request
            with pytest.raises(InvalidKey):
                await c.lookup(["ok", "not ok"])  # refused by the server
            with pytest.raises(BadRequest):
                await c.list(limit=0)
            with pytest.raises(ChecksumError):
                await c.put("k", bytes(damaged))
            with pytest.raises(FormatError) as info:
                await c.put("k", b"not an object")
            assert type(info.value) is FormatError
            with pytest.raises(NotFound):
                await c.head("k")  # nothing was stored

    run(main())


def test_too_large(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path, server={"max_object_bytes": 100_000}) as (_, c):
            with pytest.raises(TooLarge):
                await c.put("k", OBJ)

    run(main())


def test_auth(tmp_path: Path) -> None:
    async def main() -> None:
        server = {"auth_token": "s3cret"}
        async with client_on(tmp_path, server=server, token="s3cret") as (srv, c):
            await c.put("k", OBJ)
            for token in ("wrong", None):
                async with AsyncClient(srv.url, token) as stranger:
                    with pytest.raises(Unauthorized):
                        await stranger.get("k")
                    with pytest.raises(Unauthorized):
                        await stranger.head("k")

    run(main())


@pytest.mark.parametrize(
    "url", ["", "localhost:7470", "127.0.0.1", "ftp://host/", "http://", "http://h/?q=1"]
)
def test_bad_url(url: str) -> None:
    with pytest.raises(ValueError):
        AsyncClient(url)
    with pytest.raises(ValueError):
        Client(url)


def test_dead_server() -> None:
    async def main() -> None:
        async with AsyncClient(closed_port_url(), retries=3, backoff=0.01) as c:
            with pytest.raises(TransportError) as info:
                await c.head("k")
            assert "tried 4 times" in str(info.value)
            with pytest.raises(TransportError):
                await c.get("k")
            with pytest.raises(TransportError):
                await c.put("k", OBJ)

    run(main())


def test_no_answer_times_out(tmp_path: Path) -> None:
    async def main() -> None:
        async with client_on(tmp_path) as (srv, _), Proxy(srv.url, hang=True) as proxy:
            async with AsyncClient(proxy.url, timeout=0.2, retries=1, backoff=0.01) as c:
                with pytest.raises(TransportError):
                    await c.head("k")
            assert proxy.connections == 2

    run(main())


def test_closed_client_refuses() -> None:
    async def main() -> None:
        c = AsyncClient("http://127.0.0.1:1")
        await c.close()
        with pytest.raises(RuntimeError):
            await c.head("k")

    run(main())


def test_sync_client(tmp_path: Path) -> None:
    before = threading.active_count()
    with server_thread(tmp_path) as url:
        with Client(url, retries=1, chunk_size=50_000) as c:
            assert c.put("k", OBJ).created
            assert c.head("k").size == len(OBJ)
            assert c.get("k") == OBJ and c.get("k", (5, 9)) == OBJ[5:9]
            buffer = bytearray(100)
            assert c.get_into("k", buffer, offset=1) == 100 and buffer == OBJ[1:101]
            assert b"".join(chunk for _, chunk in c.iter_bytes("k", 10)) == OBJ[10:]
            assert c.lookup(["k", "x"]) == (1, (True, False))
            assert [m.key for m in c.list()] == ["k"]
            assert assemble(list(c.stream(["k"]))) == {0: OBJ}
            early = c.iter_bytes("k")
            next(early)
            early.close()  # an iterator dropped half-way closes its response
            c.delete("k")
            with pytest.raises(NotFound):
                c.get("k")
        with pytest.raises(RuntimeError):
            c.head("k")
        c.close()
    assert threading.active_count() == before
