"""``RedisClusterStore`` on a real Redis Cluster (``tests/redis_cluster.py``): pieces and
ranges, atomic replace, reads that outlive a replace, aborts and expiry, lost pieces, out of
memory and eviction, access times, listing across masters. Several servers, refused
clusters and a failover are in test_redis_cluster.py; the HTTP conformance tests run on
this store as well (the ``backend`` fixture of test_server.py and test_stream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from lynxkv.errors import NotFound, PreconditionFailed, StoreError
from lynxkv.kvstore.frames import EndFrame, ErrorFrame
from tests.kvstore.conftest import (
    Backend,
    assemble,
    eventually,
    expect_error,
    live_server,
    make_object,
    raw_request,
    run,
    stream,
)
from tests.kvstore.redis_helpers import (
    OBJ,
    OTHER,
    PIECE,
    blob,
    data_keys,
    on_master,
    opened,
    put,
    read_all,
)
from tests.redis_cluster import LocalCluster

pytestmark = pytest.mark.redis


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
