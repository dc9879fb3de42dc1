"""The LMDB store on a real LMDB in a temp dir: options, objects, ranges and persistence (its
space and eviction: test_lmdb_capacity.py); the crash tests SIGKILL a real writer process.

Run as ``python -m tests.kvstore.test_lmdb_store child-... ARGS`` this module is that writer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lynxkv
from lynxkv.errors import NotFound, PreconditionFailed, StoreError
from lynxkv.kvstore.store import Store, StoreStats, piece_spans
from tests.kvstore.lmdb_helpers import (
    MAX,
    P,
    body,
    get,
    open_store,
    options,
    pieces_of,
    put,
    run,
    stored_pieces,
)

# -- pure helpers ------------------------------------------------------------------------


@given(st.data())
def test_piece_spans_cover_the_range_exactly(data: st.DataObject) -> None:
    size = data.draw(st.integers(0, 50))
    piece = data.draw(st.integers(1, 12))
    start = data.draw(st.integers(0, size))
    end = data.draw(st.integers(start, size))
    blob = bytes(range(size))
    spans = list(piece_spans(start, end, piece))
    assert all(0 <= lo < hi <= piece for _, lo, hi in spans)
    assert b"".join(blob[n * piece + lo : n * piece + hi] for n, lo, hi in spans) == blob[start:end]


@pytest.mark.parametrize(
    "bad",
    [
        {"piece_size": 0},
        {"piece_size": P, "write_batch": P - 1},
        {"read_threads": 0},
        {"map_size": 4096 * 63},
        {"access_flush_s": -1},
    ],
)
def test_bad_options(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        options(**bad)


# -- objects ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, P - 1, P, P + 1, 3 * P, 4 * P, 4 * P + 17, 9 * P + 5])
@pytest.mark.parametrize("chunk", [1000, 64 * 1024])
def test_round_trip_across_piece_boundaries(tmp_path: Path, size: int, chunk: int) -> None:
    async def main() -> None:
        store: Store = await open_store(tmp_path)
        try:
            data = body(size, size)
            info, created = await put(store, "obj", data, chunk=chunk, hint=chunk == 1000)
            assert created and (info.size, info.anchor_end) == (size, size // 3)
            assert info.etag.startswith('"') and len(info.etag) == 34
            again = await store.info("obj")
            assert (again.key, again.size, again.etag) == ("obj", size, info.etag)
            pieces = [piece async for piece in store.read("obj", 0, size)]
            assert b"".join(pieces) == data
            assert len(pieces) == -(-size // P) and all(len(p) <= P for p in pieces)
            assert (await store.stats()).bytes == size
        finally:
            await store.close()
        assert stored_pieces(tmp_path) == pieces_of(size)

    run(main())


def test_range_reads(tmp_path: Path) -> None:
    size = 3 * P + 10
    data = body(7, size)
    ranges = [
        (0, 0),
        (0, 1),
        (P - 1, P + 1),
        (P, 2 * P),
        (5, size),
        (size, size),
        (2 * P + 3, 2 * P + 4),
    ]

    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            await put(store, "obj", data)
            for start, end in ranges:
                assert await get(store, "obj", start, end) == data[start:end], (start, end)
            for start, end in [(-1, 5), (5, 4), (0, size + 1)]:
                with pytest.raises(ValueError):
                    await get(store, "obj", start, end)
        finally:
            await store.close()

    run(main())


def test_replace_delete_contains_not_found(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            first, created = await put(store, "k", body(1, 2 * P))
            assert created
            second, created = await put(store, "k", body(2, P + 3))
            assert not created and second.etag != first.etag
            assert await get(store, "k", 0, P + 3) == body(2, P + 3)
            assert await store.stats() == StoreStats(1, P + 3, MAX, 0)
            assert await store.contains(["k", "nope"]) == [True, False]
            assert await store.delete("k") is True
            assert await store.delete("k") is False
            assert await store.contains(["k"]) == [False]
            with pytest.raises(NotFound):
                await store.info("k")
            with pytest.raises(KeyError):  # NotFound is a KeyError too
                await get(store, "k", 0, 1)
            assert (await store.stats()).bytes == 0
        finally:
            await store.close()
        assert stored_pieces(tmp_path) == 0  # both versions freed

    run(main())


def test_list_by_prefix(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            for key in ["b.1", "a.2", "ab", "a.1", "a.3"]:
                await put(store, key, key.encode())
            assert [i.key for i in await store.list("a.")] == ["a.1", "a.2", "a.3"]
            assert [i.key for i in await store.list("a.", limit=2)] == ["a.1", "a.2"]
            assert [i.key for i in await store.list()] == ["a.1", "a.2", "a.3", "ab", "b.1"]
            assert await store.list("z") == [] and await store.list(limit=0) == []
            assert (await store.list("ab"))[0].size == 2
        finally:
            await store.close()

    run(main())


def test_etag_precondition(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            info, _ = await put(store, "k", b"hello")
            assert await get(store, "k", 0, 5, etag=info.etag) == b"hello"
            with pytest.raises(PreconditionFailed):
                await get(store, "k", 0, 5, etag='"' + "0" * 32 + '"')
            with pytest.raises(PreconditionFailed):
                await get(store, "k", 0, 5, etag=info.etag.strip('"'))  # ETags compare quoted
        finally:
            await store.close()

    run(main())


# -- persistence ----------------------------------------------------------------------------


def test_reopen_keeps_objects_and_lru_order(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=10 * P)
        etags = {key: (await put(store, key, body(ord(key), 3 * P)))[0].etag for key in "abc"}
        await store.info("a")  # b is now the least recently used
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(StoreError):
            await store.info("a")

        store = await open_store(tmp_path, max_bytes=10 * P)
        try:
            for key in "abc":
                assert (await store.info(key)).etag == etags[key]
                assert await get(store, key, 0, 3 * P) == body(ord(key), 3 * P)
            for key in "bca":  # order b, c, a again; apart enough to persist distinct times
                await asyncio.sleep(0.002)
                await store.info(key)
        finally:
            await store.close()

        store = await open_store(tmp_path, max_bytes=10 * P)
        try:
            await put(store, "d", body(4, 3 * P))
            assert await store.contains(list("abcd")) == [True, False, True, True]
        finally:
            await store.close()

        store = await open_store(tmp_path, max_bytes=4 * P)  # shrunk: keeps the most recent
        try:
            assert await store.contains(list("acd")) == [False, False, True]
        finally:
            await store.close()
        assert stored_pieces(tmp_path) == pieces_of(3 * P)

    run(main())


def test_objects_outlive_a_change_of_piece_size(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        await put(store, "old", body(1, 5 * P + 7))
        await store.close()
        store = await open_store(tmp_path, piece_size=3 * P, write_batch=6 * P)
        try:
            await put(store, "new", body(2, 5 * P + 7))
            for key, seed in [("old", 1), ("new", 2)]:
                assert (
                    await get(store, key, P - 1, 4 * P + 2)
                    == body(seed, 5 * P + 7)[P - 1 : 4 * P + 2]
                )
        finally:
            await store.close()

    run(main())


def test_one_process_per_data_dir(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            with pytest.raises(StoreError, match="in use"):
                await open_store(tmp_path)
        finally:
            await store.close()
        await (await open_store(tmp_path)).close()

    run(main())


# -- crashes: a real writer process, SIGKILLed ----------------------------------------------

ROOT = Path(lynxkv.__file__).resolve().parents[1]
WORKERS = 3


def spawn_child(*args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "tests.kvstore.test_lmdb_store", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env)


def wait_for_lines(log: Path, count: int, prefix: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(line.startswith(prefix) for line in read_log(log)) < count:
        assert time.monotonic() < deadline, f"the child wrote fewer than {count} {prefix!r}"
        time.sleep(0.02)


def read_log(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def kill(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL


def child_size(seed: int) -> int:
    return 1 + seed * 7919 % (6 * P)


async def child_loop(path: Path, log: Path, first_seed: int) -> None:
    """Put objects forever: 'begin KEY SEED' before, 'ack KEY SEED' after each commit."""
    store = await open_store(path, max_bytes=1 << 26)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    async def worker(w: int) -> None:
        rng = random.Random(first_seed + w)
        for seed in range(first_seed + w, 1 << 40, WORKERS):
            key = f"w{w}-{rng.randrange(12)}"  # keys per worker: one put at a time per key
            os.write(fd, f"begin {key} {seed}\n".encode())
            await put(store, key, body(seed, child_size(seed)), chunk=5000)
            os.write(fd, f"ack {key} {seed}\n".encode())

    await asyncio.gather(*(worker(w) for w in range(WORKERS)))


async def child_orphan(path: Path, log: Path) -> None:
    """Commit one object, then die in the middle of a second one."""
    store = await open_store(path)
    await put(store, "keep", body(1, 3 * P))
    up = await store.begin_put("ghost", None)
    for _ in range(10):
        await up.write(body(2, P))
    log.write_text("ready\n")
    await asyncio.sleep(60)


async def child_touch(path: Path, log: Path) -> None:
    """Touch one object and live long enough for the access-time timer only."""
    store = await open_store(path, max_bytes=10 * P, access_flush_s=0.05)
    for key in "abc":
        await put(store, key, body(ord(key), 3 * P))
    await asyncio.sleep(0.1)
    await store.info("a")  # b is now the least recently used, in memory
    await asyncio.sleep(0.3)
    log.write_text("ready\n")
    await asyncio.sleep(60)


def expected_state(log: Path) -> dict[str, tuple[int | None, int | None]]:
    """Key -> (last acknowledged seed, seed begun after it): one of the two is stored."""
    state: dict[str, tuple[int | None, int | None]] = {}
    for line in read_log(log):
        what, key, seed = line.split()
        acked, _ = state.get(key, (None, None))
        state[key] = (acked, int(seed)) if what == "begin" else (int(seed), None)
    return state


async def check_after_crash(path: Path, log: Path) -> None:
    store = await open_store(path, max_bytes=1 << 26)
    try:
        expected = expected_state(log)
        present = {info.key: info for info in await store.list(limit=10_000)}
        assert set(present) <= set(expected)
        for key, (acked, pending) in expected.items():
            if key not in present:
                assert acked is None, f"acknowledged {key} is lost"
                continue
            data = await get(store, key, 0, present[key].size)
            seeds = [s for s in (acked, pending) if s is not None]
            assert any(data == body(s, child_size(s)) for s in seeds), f"{key} is damaged"
        sizes = [info.size for info in present.values()]
        assert (await store.stats()).bytes == sum(sizes)
    finally:
        await store.close()
    assert stored_pieces(path) == pieces_of(*sizes)  # no pieces of unfinished uploads


def test_sigkill_loses_no_acknowledged_object(tmp_path: Path) -> None:
    log = tmp_path / "acks.log"
    for round_ in range(2):  # the second round starts on what the first crash left
        acks_before = sum(line.startswith("ack") for line in read_log(log))
        with spawn_child("child-loop", str(tmp_path / "db"), str(log), str(round_ << 20)) as child:
            try:
                wait_for_lines(log, acks_before + 25, "ack")
                time.sleep(random.uniform(0, 0.05))
            finally:
                kill(child)
        run(check_after_crash(tmp_path / "db", log))


def test_an_interrupted_upload_leaves_no_trace(tmp_path: Path) -> None:
    log = tmp_path / "ready.log"
    with spawn_child("child-orphan", str(tmp_path / "db"), str(log)) as child:
        try:
            wait_for_lines(log, 1, "ready")
        finally:
            kill(child)
    assert stored_pieces(tmp_path / "db") == pieces_of(3 * P, 8 * P)  # two batches reached LMDB

    async def main() -> None:
        store = await open_store(tmp_path / "db")
        try:
            assert await store.contains(["keep", "ghost"]) == [True, False]
            assert (await store.stats()).bytes == 3 * P
            await put(store, "fill", body(3, MAX - 3 * P))  # the ghost's room is free
            assert (await store.stats()).evictions == 0
        finally:
            await store.close()

    run(main())
    assert stored_pieces(tmp_path / "db") == pieces_of(3 * P, MAX - 3 * P)


def test_access_times_reach_the_disk_without_close(tmp_path: Path) -> None:
    log = tmp_path / "ready.log"
    with spawn_child("child-touch", str(tmp_path / "db"), str(log)) as child:
        try:
            wait_for_lines(log, 1, "ready")
        finally:
            kill(child)

    async def main() -> None:
        store = await open_store(tmp_path / "db", max_bytes=10 * P)
        try:
            await put(store, "d", body(4, 3 * P))
            assert await store.contains(list("abcd")) == [True, False, True, True]
        finally:
            await store.close()

    run(main())


if __name__ == "__main__":
    mode, path, log_path, *rest = sys.argv[1:]
    if mode == "child-loop":
        run(child_loop(Path(path), Path(log_path), int(rest[0])))
    elif mode == "child-orphan":
        run(child_orphan(Path(path), Path(log_path)))
    elif mode == "child-touch":
        run(child_touch(Path(path), Path(log_path)))
