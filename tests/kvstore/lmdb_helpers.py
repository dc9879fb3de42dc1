"""What the LMDB store's tests share: small pieces, a store opened on a temp dir, and
shortcuts to write, read and count what LMDB holds."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from lynxkv.errors import StoreError
from lynxkv.kvstore.lmdb_store import LmdbOptions, LmdbStore
from lynxkv.kvstore.store import ObjectInfo, Store

P = 4096  # a small piece, so that objects of a few KiB span several pieces
MAX = 40 * P
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def options(**kw: Any) -> LmdbOptions:
    return LmdbOptions(**{"piece_size": P, "write_batch": 4 * P, "read_threads": 2, **kw})


async def open_store(path: Path, max_bytes: int = MAX, **kw: Any) -> LmdbStore:
    return await LmdbStore.open(path, max_bytes, options(**kw))


def body(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def put(
    store: Store, key: str, data: bytes, chunk: int = 1000, hint: bool = True
) -> tuple[ObjectInfo, bool]:
    up = await store.begin_put(key, len(data) if hint else None)
    try:
        for i in range(0, len(data), chunk):
            await up.write(data[i : i + chunk])
        return await up.commit(len(data) // 3)
    except StoreError:
        await up.abort()
        raise


async def get(store: Store, key: str, start: int, end: int, etag: str | None = None) -> bytes:
    return b"".join([piece async for piece in store.read(key, start, end, etag)])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait for background work (freeing a version after its last reader)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def stored_pieces(path: Path) -> int:
    """Pieces on disk, counted by LMDB itself (the store must be closed)."""
    with lmdb.open(str(path), readonly=True, max_dbs=3, lock=False) as env:
        data = env.open_db(b"data", create=False)
        with env.begin() as txn:
            return txn.stat(data)["entries"]


def pieces_of(*sizes: int) -> int:
    return sum(-(-size // P) for size in sizes)
