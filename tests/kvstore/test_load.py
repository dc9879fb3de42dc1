"""Load and capacity: 100 concurrent clients mixing PUT, GET, ranges and streams, every byte
checked; eviction under a small ``max_bytes`` through the HTTP API."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from lynxkv.kvstore.frames import MissingFrame
from tests.kvstore.conftest import (
    Server,
    anchor_end,
    assemble,
    expect_error,
    hooked_server,
    live_server,
    make_object,
    read_multipart,
    run,
    stream,
)

CLIENTS = 100
ROUNDS = 2 * 6  # each operation twice
#: What the clients read: small objects (one DATA frame per part) and large ones (several).
SHARED = {
    **{f"s{i}": make_object(40 + i, layers=1, tokens=128) for i in range(6)},
    **{f"l{i}": make_object(50 + i, layers=4, tokens=512) for i in range(2)},
}
#: What the clients write.
SMALL = [make_object(60 + i, layers=1, tokens=64) for i in range(4)]


@dataclass
class Client:
    """One client: its own session, its own random choices, the objects it has written."""

    number: int
    session: aiohttp.ClientSession
    rng: random.Random
    mine: dict[str, bytes] = field(default_factory=dict)
    requests: int = 0

    def shared(self) -> tuple[str, bytes]:
        key = self.rng.choice(sorted(SHARED))
        return key, SHARED[key]

    async def put(self) -> None:
        key, obj = f"c{self.number}-{len(self.mine)}", self.rng.choice(SMALL)
        async with self.session.put(f"/v1/kv/{key}", data=obj) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["size"] == len(obj)
        self.mine[key] = obj
        self.requests += 1

    async def get(self) -> None:
        key, obj = self.rng.choice(sorted(self.mine.items())) if self.mine else self.shared()
        async with self.session.get(f"/v1/kv/{key}") as resp:
            assert resp.status == 200
            assert await resp.read() == obj
        self.requests += 1

    async def range(self) -> None:
        key, obj = self.shared()
        start = self.rng.randrange(len(obj))
        end = self.rng.randrange(start, len(obj)) + 1
        headers = {"Range": f"bytes={start}-{end - 1}"}
        async with self.session.get(f"/v1/kv/{key}", headers=headers) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(obj)}"
            assert await resp.read() == obj[start:end]
        self.requests += 1

    async def ranges(self) -> None:
        key, obj = self.shared()
        a, b, c, d = sorted(self.rng.sample(range(len(obj)), 4))
        headers = {"Range": f"bytes={c + 1}-{d},{a}-{b - 1}"}  # apart, out of order
        async with self.session.get(f"/v1/kv/{key}", headers=headers) as resp:
            assert resp.status == 206
            parts = await read_multipart(resp)
        size = len(obj)
        assert parts == [
            (f"bytes {c + 1}-{d}/{size}", obj[c + 1 : d + 1]),
            (f"bytes {a}-{b - 1}/{size}", obj[a:b]),
        ]
        self.requests += 1

    async def anchor(self) -> None:
        key, obj = self.shared()
        async with self.session.get(f"/v1/kv/{key}", params={"part": "anchor"}) as resp:
            assert resp.status == 206
            assert await resp.read() == obj[: anchor_end(obj)]
        self.requests += 1

    async def stream(self) -> None:
        keys = self.rng.sample(sorted(SHARED), 3) + sorted(self.mine)[:1] + ["absent"]
        frames = await stream(self.session, keys)
        objects = {**SHARED, **self.mine}
        assert assemble(frames) == {i: objects[k] for i, k in enumerate(keys[:-1])}
        assert MissingFrame(len(keys) - 1) in frames
        self.requests += 1


OPS: list[Callable[[Client], Awaitable[None]]] = [
    Client.put,
    Client.get,
    Client.range,
    Client.stream,
    Client.ranges,
    Client.anchor,
]


def test_hundred_concurrent_clients(tmp_path: Path) -> None:
    async def client(srv: Server, number: int) -> int:
        async with aiohttp.ClientSession(srv.url) as session:
            me = Client(number, session, random.Random(number))
            for r in range(ROUNDS):
                await OPS[(number + r) % len(OPS)](me)
            for key, obj in me.mine.items():  # still there, intact
                assert await srv.get(key) == obj
            return me.requests + len(me.mine)

    async def main() -> None:
        async with live_server(tmp_path / "data") as srv:
            for key, obj in SHARED.items():
                await srv.put(key, obj)
            made = await asyncio.gather(*(client(srv, n) for n in range(CLIENTS)))
            metrics = await srv.metrics()
        counts = {
            labels: value
            for (name, labels), value in metrics.items()
            if name == "lynxkv_requests_total"
        }
        statuses = {dict(labels)["status"] for labels in counts}
        assert statuses <= {"200", "201", "206"}, counts
        assert sum(counts.values()) == len(SHARED) + sum(made)  # every request was counted
        assert metrics["lynxkv_active_streams", ()] == 0
        assert metrics["lynxkv_objects", ()] == len(SHARED) + 2 * CLIENTS  # two PUTs each

    run(main())


# -- eviction ----------------------------------------------------------------------------------

OBJS = [make_object(70 + i) for i in range(6)]  # equal sizes
SIZE = len(OBJS[0])


def test_eviction_takes_the_least_recently_used(tmp_path: Path) -> None:
    async def main() -> None:
        async with live_server(tmp_path / "data", max_bytes=3 * SIZE + SIZE // 2) as srv:
            for i, key in enumerate("abc"):
                await srv.put(key, OBJS[i])
            assert await srv.get("a") == OBJS[0]  # a read is a use: b is now the oldest
            await srv.put("d", OBJS[3])
            async with srv.session.post("/v1/lookup", json={"keys": ["a", "b", "c", "d"]}) as r:
                assert (await r.json())["present"] == [True, False, True, True]
            async with srv.session.head("/v1/kv/c") as resp:  # so is a HEAD: a is oldest
                assert resp.status == 200
            await srv.put("e", OBJS[4])
            for key in ("a", "b"):
                async with srv.session.get(f"/v1/kv/{key}") as resp:
                    await expect_error(resp, 404, "not_found")
            for key, obj in (("c", OBJS[2]), ("d", OBJS[3]), ("e", OBJS[4])):
                assert await srv.get(key) == obj
            metrics = await srv.metrics()
            assert metrics["lynxkv_evictions", ()] == 2
            assert metrics["lynxkv_objects", ()] == 3
            assert metrics["lynxkv_stored_bytes", ()] == 3 * SIZE

    run(main())


def test_507_when_an_object_cannot_fit_and_nothing_is_lost(tmp_path: Path) -> None:
    """Two uploads in progress hold their room (of 2.5 objects); a third PUT has nothing it
    may evict: 507. The two then finish intact, and a later PUT evicts the oldest."""
    release = asyncio.Event()

    async def held_body(obj: bytes) -> AsyncIterator[bytes]:
        yield obj[: SIZE // 2]
        await release.wait()
        yield obj[SIZE // 2 :]

    async def main() -> None:
        async with hooked_server(tmp_path / "data", max_bytes=2 * SIZE + SIZE // 2) as (
            srv,
            store,
        ):

            async def held_put(key: str, obj: bytes) -> int:
                headers = {"Content-Length": str(SIZE)}  # the room is taken at the start
                async with srv.session.put(
                    f"/v1/kv/{key}", data=held_body(obj), headers=headers
                ) as resp:
                    return resp.status

            uploads = [
                asyncio.create_task(held_put(k, o)) for k, o in (("x", OBJS[0]), ("y", OBJS[1]))
            ]
            await store.event(store.began, "x").wait()
            await store.event(store.began, "y").wait()
            async with srv.session.put("/v1/kv/z", data=OBJS[2]) as resp:
                await expect_error(resp, 507, "storage_full")
            release.set()
            assert await asyncio.gather(*uploads) == [201, 201]
            assert await srv.get("x") == OBJS[0]
            assert await srv.get("y") == OBJS[1]
            assert await srv.status("GET", "/v1/kv/z") == 404
            await srv.put("z", OBJS[2])  # now x, the least recently used, makes room
            assert await srv.status("GET", "/v1/kv/x") == 404
            assert await srv.get("y") == OBJS[1]
            assert await srv.get("z") == OBJS[2]
            metrics = await srv.metrics()
            assert metrics["lynxkv_evictions", ()] == 1
            assert metrics["lynxkv_rejected_uploads_total", (("reason", "storage_full"),)] == 1

    run(main())
