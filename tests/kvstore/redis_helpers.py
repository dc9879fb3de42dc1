"""What the Redis Cluster store's tests share: small pieces, two objects, a store opened on
a backend's namespace, and shortcuts to write, read and inspect the cluster."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from lynxkv.kvstore.config import parse_redis_cluster_url
from lynxkv.kvstore.redis_store import RedisClusterStore
from lynxkv.kvstore.store import ObjectInfo
from tests.kvstore.conftest import Backend, make_object
from tests.redis_cluster import LocalCluster

PIECE = 4096
OBJ = make_object(0)  # 248 KiB: 61 pieces of 4 KiB, the anchor ends in piece 32
OTHER = make_object(1)


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
