"""``RedisClusterStore`` on a real Redis Cluster (``tests/redis_cluster.py``): pieces and
ranges, atomic replace, reads that outlive a replace, aborts and expiry, lost pieces, out of
memory and eviction, access times, listing across masters, several servers on one cluster,
and a master killed mid-traffic. The HTTP conformance tests run on it as well (the
``backend`` fixture of test_server.py and test_stream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lynxkv.errors import MissingDependency, NotFound, PreconditionFailed, StoreError
from lynxkv.kvstore.backends import open_store
from lynxkv.kvstore.config import ServerConfig, parse_redis_cluster_url
from lynxkv.kvstore.frames import EndFrame, ErrorFrame
from lynxkv.kvstore.redis_layout import RedisOptions
from lynxkv.kvstore.redis_store import RedisClusterStore
from lynxkv.kvstore.store import ObjectInfo
from tests.kvstore.conftest import (
    REPO,
    Backend,
    ServerProcess,
    assemble,
    eventually,
    expect_error,
    live_server,
    make_object,
    raw_request,
    redis_backend,
    run,
    stream,
)
from tests.redis_cluster import LocalCluster, free_ports, require_tools

pytestmark = pytest.mark.redis

PIECE = 4096
OBJ = make_object(0)  # 248 KiB: 61 pieces of 4 KiB, the anchor ends in piece 32
OTHER = make_object(1)


@pytest.fixture
def ns(redis_cluster: LocalCluster) -> Backend:
    """A namespace of the test's own on the session's cluster."""
    return redis_backend(redis_cluster)


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Starts clusters of the test's own (for tests that break them); stops them after."""
    require_tools()
    started: list[LocalCluster] = []

    def start(**kw: Any) -> LocalCluster:
        started.append(LocalCluster(tmp_path / f"cluster-{len(started)}", **kw))
        return started[-1].start()

    yield start
    for cluster in started:
        cluster.stop()


@contextlib.asynccontextmanager
async def opened(backend: Backend, **options: Any) -> AsyncIterator[RedisClusterStore]:
    """The backend's store with 4 KiB pieces and ``options``."""
    url = parse_redis_cluster_url(backend.setting)
    opts = replace(url.options, piece_size=PIECE, **options)
    store = await RedisClusterStore.open(url.nodes, opts)
    try:
        yield store
    finally:
        await store.close()


async def put(
    store: RedisClusterStore, key: str, data: bytes, anchor_end: int = 0, chunk: int = 1000
) -> tuple[ObjectInfo, bool]:
    up = await store.begin_put(key, len(data))
    for at in range(0, len(data), chunk):
        await up.write(data[at : at + chunk])
    return await up.commit(anchor_end)


async def read_all(
    store: RedisClusterStore,
    key: str,
    start: int = 0,
    end: int | None = None,
    etag: str | None = None,
) -> bytes:
    if end is None:
        end = (await store.info(key)).size
    return b"".join([piece async for piece in store.read(key, start, end, etag)])


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def data_keys(cluster: LocalCluster, backend: Backend, key: str) -> list[str]:
    return cluster.keys(f"{backend.prefix}:{{{key}}}:d:*")


def on_master(cluster: LocalCluster, name: str, *args: Any) -> Any:
    """A command on the master that holds key ``name``."""
    return cluster.command(cluster.master_of(name), *args)


# -- pieces and ranges -------------------------------------------------------------------------


def test_objects_round_trip_across_piece_boundaries(
    ns: Backend, redis_cluster: LocalCluster
) -> None:
    sizes = [1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 7]

    async def main() -> None:
        async with opened(ns) as store:
            for i, size in enumerate(sizes):
                key, data = f"k{i}", blob(i, size)
                info, created = await put(store, key, data, anchor_end=size // 2, chunk=777)
                assert created and (info.size, info.anchor_end) == (size, size // 2)
                assert replace(await store.info(key), last_access=0) == replace(info, last_access=0)
                assert await read_all(store, key) == data
                spans = [(0, 1), (size - 1, size), (PIECE - 1, PIECE + 1), (size // 3, size)]
                for start, end in spans:
                    if end <= size:
                        assert await read_all(store, key, start, end) == data[start:end]
                lengths = [len(p) async for p in store.read(key, 0, size)]
                assert lengths == [min(PIECE, size - at) for at in range(0, size, PIECE)]
                # one data hash per version, a field per piece, persisted at commit
                [name] = data_keys(redis_cluster, ns, key)
                assert on_master(redis_cluster, name, "HLEN", name) == len(lengths)
                assert on_master(redis_cluster, name, "PTTL", name) == -1
            assert await read_all(store, "k0", 1, 1) == b""
            with pytest.raises(ValueError, match=r"range \[0, 2\) is outside \[0, 1\)"):
                await read_all(store, "k0", 0, 2)
            with pytest.raises(ValueError, match="outside"):
                await read_all(store, "k1", 2, 1)
            with pytest.raises(NotFound, match="no object under key 'nope'"):
                await read_all(store, "nope", 0, 0)
            with pytest.raises(PreconditionFailed, match='not "other"'):
                await read_all(store, "k0", 0, 1, etag='"other"')

    run(main())


def test_an_empty_object_has_no_pieces_but_exists(ns: Backend) -> None:
    async def main() -> None:
        async with opened(ns) as store:
            info, created = await put(store, "empty", b"")
            assert created and (info.size, info.anchor_end) == (0, 0)
            assert await read_all(store, "empty") == b""
            assert await store.contains(["empty"]) == [True]
            stats = await store.stats()  # its sweep must not take it for evicted
            assert (stats.objects, stats.bytes, stats.missing_pieces) == (1, 0, 0)
            assert [o.key for o in await store.list()] == ["empty"]

    run(main())


def test_a_range_read_fetches_only_the_pieces_it_overlaps(ns: Backend) -> None:
    data = blob(1, 10 * PIECE)
    cases = [
        ((0, 1), 1),
        ((3 * PIECE + 5, 4 * PIECE), 1),
        ((PIECE - 1, PIECE + 1), 2),
        ((2 * PIECE, 5 * PIECE), 3),
        ((0, 10 * PIECE), 10),
        ((5, 5), 0),
    ]

    async def main() -> None:
        async with opened(ns) as store:
            await put(store, "k", data)
            for (start, end), pieces in cases:
                before = (await store.stats()).pieces_read
                assert await read_all(store, "k", start, end) == data[start:end]
                assert (await store.stats()).pieces_read - before == pieces, (start, end)

    run(main())


# -- versions ----------------------------------------------------------------------------------


def test_a_reader_never_sees_a_mix_of_versions(ns: Backend, redis_cluster: LocalCluster) -> None:
    """Three writers replace one key with three versions of different sizes while four
    readers read it whole: every read is one version, byte for byte."""
    versions = [blob(2, 5 * PIECE + 3), blob(3, 2 * PIECE + 100), blob(4, 7 * PIECE)]

    async def main() -> None:
        async with opened(ns) as store:
            await put(store, "k", versions[0])
            done = asyncio.Event()
            seen: Counter[int] = Counter()

            async def writer(w: int) -> None:
                for i in range(12):
                    await put(store, "k", versions[(w + i) % 3], chunk=PIECE // 2 + 1)

            async def reader() -> None:
                while not done.is_set():
                    info = await store.info("k")
                    try:
                        got = await read_all(store, "k", 0, info.size, info.etag)
                    except PreconditionFailed:  # replaced between info and read
                        continue
                    assert got in versions
                    seen[versions.index(got)] += 1

            readers = [asyncio.create_task(reader()) for _ in range(4)]
            await asyncio.gather(*(writer(w) for w in range(3)))
            done.set()
            await asyncio.gather(*readers)
            assert sum(seen.values()) >= 10 and len(seen) >= 2, seen
            # the replaced versions expire after the grace period; the current one stays
            current = (await store.info("k")).etag.strip('"')
            names = data_keys(redis_cluster, ns, "k")
            assert any(name.endswith(current) for name in names)
            for name in names:
                ttl = on_master(redis_cluster, name, "PTTL", name)
                assert ttl == -1 if name.endswith(current) else 0 < ttl <= 60_000, (name, ttl)

    run(main())


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_a_read_in_flight_finishes_on_its_version(ns: Backend, change: str) -> None:
    old, new = blob(5, 4 * PIECE), blob(6, 4 * PIECE)

    async def main() -> None:
        async with opened(ns) as store:
            await put(store, "k", old)
            pieces = store.read("k", 0, len(old))
            first = await anext(pieces)
            if change == "replace":
                await put(store, "k", new)
            else:
                assert await store.delete("k")
            assert first + b"".join([p async for p in pieces]) == old

    run(main())


@pytest.mark.parametrize(
    ("change", "error"), [("replace", PreconditionFailed), ("delete", NotFound)]
)
def test_without_a_grace_period_a_read_in_flight_fails_rather_than_mix(
    ns: Backend, redis_cluster: LocalCluster, change: str, error: type[Exception]
) -> None:
    old, new = blob(7, 4 * PIECE), blob(8, 4 * PIECE)

    async def main() -> None:
        async with opened(ns, retire_grace_s=0) as store:
            info, _ = await put(store, "k", old)
            pieces = store.read("k", 0, len(old))
            assert await anext(pieces) == old[:PIECE]
            if change == "replace":
                await put(store, "k", new)
            else:
                assert await store.delete("k")
            assert not any(info.etag.strip('"') in n for n in data_keys(redis_cluster, ns, "k"))
            with pytest.raises(error, match="while being read"):
                await anext(pieces)
            assert (await store.stats()).missing_pieces == 0  # retired, not lost

    run(main())


# -- uploads -----------------------------------------------------------------------------------


def test_an_aborted_upload_leaves_no_keys(ns: Backend, redis_cluster: LocalCluster) -> None:
    async def main() -> None:
        async with opened(ns, upload_ttl_s=30) as store:
            up = await store.begin_put("k", None)
            await up.write(blob(9, 3 * PIECE + 10))
            [name] = redis_cluster.keys(f"{ns.prefix}:*")  # the pieces; no manifest yet
            assert ":d:" in name
            assert 0 < on_master(redis_cluster, name, "PTTL", name) <= 30_000
            assert await store.contains(["k"]) == [False]
            with pytest.raises(NotFound):
                await store.info("k")
            await up.abort()
            await up.abort()
            assert redis_cluster.keys(f"{ns.prefix}:*") == []
            with pytest.raises(StoreError, match="the upload of 'k' is aborted"):
                await up.write(b"x")
            with pytest.raises(StoreError, match="aborted"):
                await up.commit(0)
            # a bad anchor_end is refused and the upload may still be aborted
            up = await store.begin_put("k", None)
            await up.write(b"x" * (PIECE + 1))
            with pytest.raises(ValueError, match=r"anchor_end 4098 is outside \[0, 4097\]"):
                await up.commit(PIECE + 2)
            await up.abort()
            assert redis_cluster.keys(f"{ns.prefix}:*") == []
            with pytest.raises(ValueError, match="size_hint"):
                await store.begin_put("k", -1)
            # an upload still open when the store closes is aborted
            up = await store.begin_put("j", None)
            await up.write(b"y" * 2 * PIECE)
            assert redis_cluster.keys(f"{ns.prefix}:*") != []
        assert redis_cluster.keys(f"{ns.prefix}:*") == []

    run(main())


def test_an_upload_left_behind_expires(ns: Backend, redis_cluster: LocalCluster) -> None:
    """A server that dies mid-upload never aborts it: its pieces expire on their own, and a
    commit that comes too late finds them gone."""

    async def main() -> None:
        async with opened(ns, upload_ttl_s=1) as store:
            up = await store.begin_put("k", None)
            await up.write(blob(10, 2 * PIECE))

            async def expired() -> bool:
                return redis_cluster.keys(f"{ns.prefix}:*") == []

            await eventually(expired, "the upload's pieces to expire", timeout=10)
            with pytest.raises(StoreError, match="the pieces of 'k' are gone before its commit"):
                await up.commit(0)
            await up.abort()
            assert await store.contains(["k"]) == [False]
            assert redis_cluster.keys(f"{ns.prefix}:*") == []

    run(main())


# -- lost pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["piece-lost", "version-evicted", "piece-truncated"])
def test_a_missing_piece_is_a_404_counted_and_cleaned_up(
    tmp_path: Path, ns: Backend, redis_cluster: LocalCluster, damage: str
) -> None:
    backend = ns.with_options("piece_size=4KiB")

    async def main() -> None:
        async with live_server(tmp_path / "data", backend=backend.setting) as srv:
            await srv.put("k", OBJ)
            [name] = data_keys(redis_cluster, ns, "k")
            if damage == "piece-lost":
                on_master(redis_cluster, name, "HDEL", name, "0")
            elif damage == "version-evicted":
                on_master(redis_cluster, name, "DEL", name)
            else:
                on_master(redis_cluster, name, "HSET", name, "0", "short")
            async with srv.session.post("/v1/lookup", json={"keys": ["k"]}) as resp:
                present = (await resp.json())["present"]
            assert present == [damage != "version-evicted"]  # lookups see a whole version go
            async with srv.session.get("/v1/kv/k", params={"part": "anchor"}) as resp:
                message = await expect_error(resp, 404, "not_found")
            assert message == "'k' lost piece 0 (evicted or lost in a failover); removed it"
            assert (await srv.metrics())["lynxkv_store_missing_pieces_total", ()] == 1
            assert redis_cluster.keys(f"{ns.prefix}:*") == []
            assert await srv.status("HEAD", "/v1/kv/k") == 404
            await srv.put("k", OBJ)
            assert await srv.get("k") == OBJ

    run(main())


def test_a_piece_lost_mid_body_cuts_the_response(
    tmp_path: Path, ns: Backend, redis_cluster: LocalCluster
) -> None:
    """Headers are out when the missing piece is found: the response is cut short, never
    filled with other bytes; in a stream, the key gets an ERROR frame and the rest goes on."""
    backend = ns.with_options("piece_size=4KiB")

    def lose(key: str, piece: int) -> None:
        [name] = data_keys(redis_cluster, ns, key)
        on_master(redis_cluster, name, "HDEL", name, str(piece))

    async def main() -> None:
        async with live_server(tmp_path / "data", backend=backend.setting) as srv:
            await srv.put("k", OBJ)
            lose("k", 40)  # in the residual
            async with srv.session.get("/v1/kv/k") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            assert await srv.status("HEAD", "/v1/kv/k") == 404
            await srv.put("k", OBJ)
            await srv.put("other", OTHER)
            lose("k", 3)  # in the anchor
            frames = await stream(srv.session, ["k", "other"])
            errors = [f for f in frames if isinstance(f, ErrorFrame)]
            assert [(e.key, e.status, e.code) for e in errors] == [(0, 404, "not_found")]
            assert assemble(frames)[1] == OTHER
            assert frames[-1] == EndFrame()
            assert (await srv.metrics())["lynxkv_store_missing_pieces_total", ()] == 2

    run(main())


# -- capacity ----------------------------------------------------------------------------------


def test_out_of_memory_is_507_and_leaves_nothing(
    tmp_path: Path, ns: Backend, redis_cluster: LocalCluster
) -> None:
    """A master with ``noeviction`` and no room refuses the pieces: 507, and the upload is
    unlinked even though Redis is still out of memory."""
    big = make_object(12, layers=16, tokens=512)  # 3.2 MiB
    port = redis_cluster.master_of(f"{ns.prefix}:{{big}}:m")

    async def main() -> None:
        async with live_server(tmp_path / "data", backend=ns.setting) as srv:
            used = int(redis_cluster.info(port, "memory")["used_memory"])
            room = str(used + (512 << 10))
            saved = redis_cluster.config(port, maxmemory_policy="noeviction", maxmemory=room)
            try:
                async with srv.session.put("/v1/kv/big", data=io.BytesIO(big)) as resp:
                    message = await expect_error(resp, 507, "storage_full")
                assert "out of memory" in message
                assert redis_cluster.keys(f"{ns.prefix}:*") == []
            finally:
                redis_cluster.config(port, **saved)
            metrics = await srv.metrics()
            assert metrics["lynxkv_rejected_uploads_total", (("reason", "storage_full"),)] == 1
            await srv.put("big", big)
            assert await srv.get("big") == big

    run(main())


def test_an_object_larger_than_a_master_is_refused_before_its_body(
    tmp_path: Path, ns: Backend, redis_cluster: LocalCluster
) -> None:
    async def main() -> None:
        async with live_server(
            tmp_path / "data", backend=ns.setting, max_bytes=1 << 30, max_object_bytes=512 << 20
        ) as srv:
            head = f"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: {300 << 20}"
            raw = await raw_request(srv.url, head, OBJ[:100])
            assert raw.status == 507
            assert raw.error() == (
                "storage_full",
                f"{300 << 20} bytes do not fit in a master's maxmemory of {256 << 20}",
            )
            assert redis_cluster.keys(f"{ns.prefix}:*") == []

    run(main())


def test_lru_eviction_makes_misses_never_wrong_bytes(
    new_cluster: Callable[..., LocalCluster],
) -> None:
    """Past maxmemory, allkeys-lru evicts whole versions and manifests: an evicted object is
    a miss (whichever of its keys went first), the others read back whole."""
    cluster = new_cluster(replicas=0)
    backend = Backend("redis-cluster", cluster, "replicas=0")
    port = cluster.masters()[0]
    names = (f"e{i}" for i in range(1000))
    keys = [k for k in names if cluster.master_of(f"{backend.prefix}:{{{k}}}:m") == port][:16]
    objects = {key: blob(100 + i, 256 << 10) for i, key in enumerate(keys)}

    async def main() -> None:
        async with opened(backend) as store:
            used = int(cluster.info(port, "memory")["used_memory"])
            cluster.config(port, maxmemory=str(used + (2 << 20)))
            for key, data in objects.items():
                with contextlib.suppress(StoreError):  # its own pieces may be evicted first
                    await put(store, key, data)
            present = await store.contains(keys)
            assert 0 < sum(present) < len(keys), present
            stats = await store.stats()  # removes the manifests whose data went
            assert stats.evictions > 0 and stats.objects == sum(present)
            for (key, data), there in zip(objects.items(), present, strict=True):
                if there:
                    assert await read_all(store, key) == data
                else:
                    with pytest.raises(NotFound):
                        await store.info(key)
            kept = [key for key, there in zip(keys, present, strict=True) if there]
            manifests = cluster.keys(f"{backend.prefix}:*:m")
            assert manifests == sorted(f"{backend.prefix}:{{{key}}}:m" for key in kept)

    run(main())


# -- access times, listing, statistics ---------------------------------------------------------


def test_access_times_reach_redis_but_never_revive_a_deleted_key(
    ns: Backend, redis_cluster: LocalCluster
) -> None:
    name = f"{ns.prefix}:{{k}}:m"

    def stored_time() -> float:
        return float(on_master(redis_cluster, name, "HGET", name, "t"))

    async def main() -> None:
        async with opened(ns, access_flush_s=0.05) as a, opened(ns) as b:
            info, _ = await put(a, "k", blob(11, 100))
            assert stored_time() == pytest.approx(info.last_access, abs=1e-3)
            await asyncio.sleep(0.01)
            later = await a.info("k")
            assert later.last_access > info.last_access

            async def flushed() -> bool:
                return stored_time() == pytest.approx(later.last_access, abs=1e-3)

            await eventually(flushed, "the access time to reach Redis")
            assert [o.last_access for o in await b.list()] == [pytest.approx(later.last_access)]
            await a.info("k")  # an access to record, when b deletes the key
            assert await b.delete("k")
            await asyncio.sleep(0.3)
            assert on_master(redis_cluster, name, "EXISTS", name) == 0

    run(main())


def test_list_stats_and_contains_span_every_master(
    ns: Backend, redis_cluster: LocalCluster
) -> None:
    keys = [f"k{i:02d}" for i in range(40)]

    async def main() -> None:
        async with opened(ns) as store, opened(ns, stats_cache_s=60) as cached:
            assert (await cached.stats()).objects == 0
            for i, key in enumerate(keys):
                await put(store, key, blob(i, i + 1), anchor_end=i)
            owners = {redis_cluster.master_of(f"{ns.prefix}:{{{k}}}:m") for k in keys}
            assert len(owners) == 3
            listed = await store.list()
            assert [o.key for o in listed] == keys
            assert [(o.size, o.anchor_end) for o in listed] == [(i + 1, i) for i in range(40)]
            assert [o.key for o in await store.list("k1")] == keys[10:20]
            assert [o.key for o in await store.list(limit=5)] == keys[:5]
            assert await store.list("zz") == [] and await store.list(limit=0) == []
            with pytest.raises(ValueError, match="limit must be >= 0"):
                await store.list(limit=-1)
            stats = await store.stats()
            assert (stats.objects, stats.bytes) == (40, sum(range(1, 41)))
            assert (await cached.stats()).objects == 0  # reused for stats_cache_s
            assert await store.contains([*keys, "nope"]) == [True] * 40 + [False]
            assert await store.contains([]) == []
            assert await store.delete("k00") and not await store.delete("k00")
            assert (await store.stats()).objects == 39

    run(main())


def test_a_closed_store_refuses_calls(ns: Backend) -> None:
    async def main() -> None:
        async with opened(ns) as store:
            await put(store, "k", b"x")
        await store.close()  # again: idempotent
        for call in (store.info("k"), store.stats(), store.contains(["k"]), store.delete("k")):
            with pytest.raises(StoreError, match="the store is closed"):
                await call
        with pytest.raises(StoreError, match="closed"):
            await read_all(store, "k", 0, 1)

    run(main())


# -- several servers, other clusters -----------------------------------------------------------


def test_several_servers_share_one_cluster(tmp_path: Path, ns: Backend) -> None:
    """An in-process server and a ``lynxkv serve`` process on one namespace: either serves
    what the other stored, lookups and streams included."""

    async def main(other_url: str) -> None:
        async with (
            live_server(tmp_path / "a", backend=ns.setting) as a,
            aiohttp.ClientSession(other_url) as b,
        ):
            etag = (await a.put("k0", OBJ))["etag"]
            await a.put("k1", OTHER)
            async with b.get("/v1/kv/k0") as resp:
                assert (await resp.read(), resp.headers["ETag"]) == (OBJ, etag)
            async with b.post("/v1/lookup", json={"keys": ["k0", "k1", "k2"]}) as resp:
                assert await resp.json() == {"prefix": 2, "present": [True, True, False]}
            assert assemble(await stream(b, ["k0", "k1"])) == {0: OBJ, 1: OTHER}
            async with b.get("/v1/kv") as resp:
                assert [o["key"] for o in (await resp.json())["objects"]] == ["k0", "k1"]
            async with b.put("/v1/kv/k0", data=io.BytesIO(OTHER)) as resp:
                new_etag = (await resp.json())["etag"]
            async with a.session.get("/v1/kv/k0") as resp:
                assert (await resp.read(), resp.headers["ETag"]) == (OTHER, new_etag)
            assert await a.status("DELETE", "/v1/kv/k1") == 204
            async with b.get("/v1/kv/k1") as resp:
                await expect_error(resp, 404, "not_found")
            for session in (a.session, b):
                async with session.get("/healthz") as resp:
                    assert (await resp.json())["objects"] == 1

    with ServerProcess(tmp_path / "b", "--store", ns.setting) as other:
        run(main(other.url))
        other.signal(signal.SIGTERM)
        assert other.wait() == 0, other.log()


def test_serve_refuses_a_cluster_it_cannot_reach(tmp_path: Path) -> None:
    [port] = free_ports(1)
    cmd = [sys.executable, "-m", "lynxkv.cli", "serve", "--port", "0"]
    cmd += ["--data-dir", str(tmp_path), "--store", f"redis-cluster://127.0.0.1:{port}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.startswith(
        f"lynxkv: error: cannot use the Redis Cluster at 127.0.0.1:{port}: "
    ), done.stderr


def test_a_cluster_without_replicas(new_cluster: Callable[..., LocalCluster]) -> None:
    """replicas=1 (the default) refuses a cluster that has none, at open; replicas=0 skips
    the wait."""
    cluster = new_cluster(replicas=0)
    nodes = parse_redis_cluster_url(cluster.url).nodes

    async def main() -> None:
        with pytest.raises(StoreError, match=r"has no replicas.*set \?replicas=0"):
            await RedisClusterStore.open(nodes)
        store = await RedisClusterStore.open(nodes, RedisOptions(replicas=0, piece_size=PIECE))
        try:
            await put(store, "k", blob(12, 3 * PIECE))
            assert await read_all(store, "k") == blob(12, 3 * PIECE)
        finally:
            await store.close()

    run(main())


def test_an_unreachable_or_unclustered_redis_is_a_store_error(tmp_path: Path) -> None:
    require_tools()
    closed, plain = free_ports(2)
    server = subprocess.Popen(
        ["redis-server", "--port", str(plain), "--bind", "127.0.0.1", "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )

    async def main() -> None:
        options = RedisOptions(timeout_s=2)
        with pytest.raises(StoreError, match=f"cannot use the Redis Cluster at 127.0.0.1:{closed}"):
            await RedisClusterStore.open([("127.0.0.1", closed)], options)

        async def refuses() -> bool:
            try:
                await RedisClusterStore.open([("127.0.0.1", plain)], options)
            except StoreError as exc:
                return "luster" in str(exc) and "Connection refused" not in str(exc)
            raise AssertionError("a plain redis-server was taken for a cluster")

        await eventually(refuses, "redis-server to answer")

    try:
        run(main())
    finally:
        server.kill()
        server.wait()


def test_without_redis_py_the_store_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    config = ServerConfig(store="redis-cluster://127.0.0.1:7000")
    with pytest.raises(
        MissingDependency, match=r"redis is not installed: pip install 'lynxkv\[server\]'"
    ):
        asyncio.run(open_store(config))


# -- failover ----------------------------------------------------------------------------------


def test_acknowledged_puts_survive_a_master_failover(
    tmp_path: Path, new_cluster: Callable[..., LocalCluster]
) -> None:
    """PUTs and GETs run while a master is SIGKILLed. After its replica takes over, every
    PUT that was acknowledged (WAIT 1) reads back whole; a PUT that failed meanwhile failed
    with a 503 and left the key absent or whole. With no replica left behind the new master,
    a PUT there is refused (stored, unconfirmed); once the old master rejoins as a replica,
    PUTs are acknowledged again."""
    cluster = new_cluster()
    objects = [make_object(30 + i) for i in range(4)]
    backend = f"{cluster.url}?piece_size=64KiB&wait_ms=500&timeout_s=2"

    def master_of(key: str) -> int:
        return cluster.master_of(f"lynxkv:{{{key}}}:m")

    async def main() -> None:
        async with live_server(tmp_path / "data", backend=backend) as srv:
            acked: dict[str, bytes] = {}
            failed: dict[str, bytes] = {}
            done = asyncio.Event()

            async def writer(w: int) -> None:
                for i in range(10**6):
                    if done.is_set():
                        return
                    key, obj = f"w{w}-{i}", objects[i % len(objects)]
                    async with srv.session.put(f"/v1/kv/{key}", data=obj) as resp:
                        if resp.status in (200, 201):
                            acked[key] = obj
                            continue
                        body = await resp.json()
                        assert (resp.status, body["error"]) == (503, "store_unavailable"), body
                    failed[key] = obj
                    await asyncio.sleep(0.05)

            async def reader() -> None:
                while not done.is_set():
                    await asyncio.sleep(0.01)
                    if not acked:
                        continue
                    key = random.choice(list(acked))
                    with contextlib.suppress(aiohttp.ClientPayloadError):  # cut: its master died
                        async with srv.session.get(f"/v1/kv/{key}") as resp:
                            body = await resp.read()
                            assert resp.status in (200, 503), resp.status
                            assert resp.status == 503 or body == acked[key]

            tasks = [asyncio.create_task(writer(w)) for w in range(4)]
            tasks += [asyncio.create_task(reader()) for _ in range(2)]
            await asyncio.sleep(1.0)
            victim = cluster.masters()[0]
            before_kill = set(acked)
            await asyncio.to_thread(cluster.kill, victim)
            promoted = await asyncio.to_thread(cluster.wait_failover, victim)
            await asyncio.sleep(1.0)
            after_failover = len(acked)
            await asyncio.sleep(1.0)
            done.set()
            await asyncio.gather(*tasks)

            assert len(acked) > after_failover, "no PUT was acknowledged after the failover"
            moved = [key for key in before_kill if master_of(key) == promoted]
            assert moved, "the killed master held no acknowledged object"
            for key, obj in acked.items():
                assert await srv.get(key) == obj, key
            for key, obj in failed.items():
                async with srv.session.get(f"/v1/kv/{key}") as resp:
                    body = await resp.read()
                    assert resp.status == 404 or (resp.status, body) == (200, obj), key

            # the new master has no replica: stored and readable, but the PUT says 503
            key = next(k for k in (f"alone-{i}" for i in range(1000)) if master_of(k) == promoted)
            async with srv.session.put(f"/v1/kv/{key}", data=objects[0]) as resp:
                message = await expect_error(resp, 503, "store_unavailable")
            assert "on 0 of 1 replicas after 500 ms" in message
            assert await srv.get(key) == objects[0]
            await asyncio.to_thread(cluster.restart, victim)
            await asyncio.to_thread(cluster.wait_healthy)
            assert (await srv.put(key, objects[1]))["size"] == len(objects[1])

    async def bounded() -> None:
        async with asyncio.timeout(120):
            await main()

    asyncio.run(bounded())
