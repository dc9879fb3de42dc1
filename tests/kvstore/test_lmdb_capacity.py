"""The LMDB store's space on a real LMDB in a temp dir: the map size and the eviction plan,
the byte budget, least-recent eviction, a full map, and readers that keep their version
alive while it is replaced, deleted or would be evicted."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from lynxkv.errors import StorageFull, StoreError
from lynxkv.kvstore.lmdb_layout import map_size_for
from lynxkv.kvstore.lmdb_store import LmdbStore, plan_eviction
from tests.kvstore.lmdb_helpers import (
    P,
    body,
    eventually,
    get,
    open_store,
    pieces_of,
    put,
    run,
    stored_pieces,
)

# -- pure helpers ------------------------------------------------------------------------


def test_map_size_formula() -> None:
    gib = 1 << 30
    size = map_size_for(10 * gib, 1 << 20)
    pages = 10 * 1024 * 257  # a 1 MiB piece and its 16-byte header take 257 pages
    assert size == pages * 4096 * 3 // 2 + (64 << 20)
    assert size % (1 << 20) == 0
    assert map_size_for(1, 1 << 20) == 66 << 20  # 64 MiB + 257 pages * 1.5, rounded up


def test_plan_eviction_takes_least_recent_first() -> None:
    lru = [("a", 3), ("b", 5), ("c", 2)]
    assert plan_eviction(lru, 0) == []
    assert plan_eviction(lru, 3) == ["a"]
    assert plan_eviction(lru, 4) == ["a", "b"]
    assert plan_eviction(lru, 10) == ["a", "b", "c"]
    assert plan_eviction(lru, 11) is None


# -- capacity -----------------------------------------------------------------------------


def test_abort_leaves_nothing_and_gives_the_space_back(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            await put(store, "a", body(1, 10 * P))
            up = await store.begin_put("b", None)
            for _ in range(30):  # 30 pieces: several write batches reach LMDB
                await up.write(body(2, P))
            await up.abort()
            await up.abort()  # twice is fine
            with pytest.raises(StoreError):
                await up.write(b"x")
            assert await store.contains(["b"]) == [False]
            await put(store, "c", body(3, 30 * P))  # fits only if b's space came back
            assert (await store.stats()).evictions == 0
        finally:
            await store.close()
        assert stored_pieces(tmp_path) == pieces_of(10 * P, 30 * P)

    run(main())


def test_eviction_follows_least_recent_use(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=10 * P)
        try:
            for key in "abc":
                await put(store, key, body(ord(key), 3 * P))
            await store.info("a")  # LRU order now b, c, a
            await put(store, "d", body(4, 3 * P))
            assert await store.contains(list("abcd")) == [True, False, True, True]
            await get(store, "c", 0, 1)  # a, d, c
            await put(store, "e", body(5, 3 * P))
            assert await store.contains(list("acde")) == [False, True, True, True]
            stats = await store.stats()
            assert (stats.evictions, stats.objects, stats.bytes) == (2, 3, 9 * P)
        finally:
            await store.close()

    run(main())


def test_object_larger_than_the_store_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=10 * P)
        try:
            await put(store, "a", body(1, 4 * P))
            with pytest.raises(StorageFull):
                await put(store, "big", body(2, 10 * P + 1))  # with a size hint: refused upfront
            assert await store.contains(["a", "big"]) == [True, False]
            assert (await store.stats()).evictions == 0
            up = await store.begin_put("big", None)  # without one, refused when it gets there
            with pytest.raises(StorageFull):
                for _ in range(11):
                    await up.write(body(3, P))
            await up.abort()
            assert (await store.stats()).bytes <= 10 * P
            await put(store, "b", body(4, 10 * P))
            assert await get(store, "b", 0, 10 * P) == body(4, 10 * P)
        finally:
            await store.close()

    run(main())


def test_uploads_in_flight_hold_their_room(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=10 * P)
        try:
            up = await store.begin_put("x", 8 * P)
            with pytest.raises(StorageFull):
                await put(store, "y", body(1, 4 * P))
            await up.abort()
            await put(store, "y", body(1, 4 * P))
        finally:
            await store.close()

    run(main())


def test_a_full_map_evicts_and_never_leaks_map_full(tmp_path: Path) -> None:
    async def main() -> None:
        # max_bytes far above what a 512 KiB map holds: LMDB fills first
        store = await open_store(tmp_path, max_bytes=1 << 30, map_size=512 * 1024)
        try:
            for i in range(40):
                await put(store, f"k{i}", body(i, 8 * P))
            stats = await store.stats()
            assert stats.evictions > 0 and stats.objects == 40 - stats.evictions
            last = await get(store, "k39", 0, 8 * P)
            assert last == body(39, 8 * P)
            with pytest.raises(StorageFull):
                await put(store, "huge", body(0, 200 * P))
            await put(store, "after", b"still works")
        finally:
            await store.close()

    run(main())


# -- readers and versions -----------------------------------------------------------------


def test_a_reader_finishes_on_its_version(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=10 * P)
        try:
            await put(store, "k", body(1, 5 * P))
            reader = store.read("k", 0, 5 * P)
            got = [await reader.__anext__()]
            await put(store, "k", body(2, 5 * P))  # replaced while read
            assert await get(store, "k", 0, 5 * P) == body(2, 5 * P)
            assert await store.delete("k")
            got.append(await reader.__anext__())
            # the old version still holds 5 pieces, so 6 do not fit, and nothing is evictable
            with pytest.raises(StorageFull):
                await put(store, "big", body(3, 6 * P))
            got += [piece async for piece in reader]
            assert b"".join(got) == body(1, 5 * P)

            async def fits() -> bool:
                try:
                    await put(store, "big", body(3, 6 * P))
                except StorageFull:
                    return False
                return True

            await eventually(fits)  # freed after the last reader
        finally:
            await store.close()
        assert stored_pieces(tmp_path) == pieces_of(6 * P)

    run(main())


def test_objects_being_read_are_not_evicted(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=10 * P)
        try:
            await put(store, "old", body(1, 4 * P))
            await put(store, "new", body(2, 4 * P))
            reader = store.read("old", 0, 4 * P)
            first = await reader.__anext__()
            await store.info("new")  # "old" is least recent again, but being read
            await put(store, "x", body(3, 4 * P))  # so "new" goes
            assert await store.contains(["old", "new", "x"]) == [True, False, True]
            rest = [piece async for piece in reader]
            assert first + b"".join(rest) == body(1, 4 * P)
        finally:
            await store.close()

    run(main())


def test_concurrent_puts_and_reads(tmp_path: Path) -> None:
    rng = random.Random(5)
    sizes = {f"k{i}": rng.randrange(1, 9 * P) for i in range(24)}

    async def check(store: LmdbStore, key: str, seed: int) -> None:
        size = sizes[key]
        start = rng.randrange(size)
        end = rng.randrange(start, size + 1)
        got = await get(store, key, start, end)
        assert got in (body(seed, size)[start:end], body(seed + 1, size)[start:end])

    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=1 << 22, read_threads=3)
        try:
            await asyncio.gather(*(put(store, k, body(i, sizes[k])) for i, k in enumerate(sizes)))
            work: list[Awaitable[Any]] = []
            for i, key in enumerate(sizes):
                work += [check(store, key, i) for _ in range(3)]
                if i % 3 == 0:  # replace some while they are read
                    work.append(put(store, key, body(i + 1, sizes[key]), chunk=3000))
            await asyncio.gather(*work)
            assert (await store.stats()).bytes == sum(sizes.values())
        finally:
            await store.close()
        assert stored_pieces(tmp_path) == pieces_of(*sizes.values())

    run(main())


def test_a_cancelled_commit_keeps_the_books_straight(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            up = await store.begin_put("k", 5 * P)
            await up.write(body(1, 5 * P))
            commit = asyncio.ensure_future(up.commit(0))
            await asyncio.sleep(0)
            commit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await commit
            await up.abort()  # waits for the commit, which went through
            assert await get(store, "k", 0, 5 * P) == body(1, 5 * P)
            assert (await store.stats()).bytes == 5 * P
        finally:
            await store.close()

    run(main())
