"""Opening the store a config names (``lmdb`` now; a Redis Cluster URL later)."""

from __future__ import annotations

from lynxkv.kvstore.config import ServerConfig
from lynxkv.kvstore.store import Store

__all__ = ["open_store"]


async def open_store(config: ServerConfig) -> Store:
    if config.store == "lmdb":
        from lynxkv.kvstore.lmdb_store import LmdbStore

        return await LmdbStore.open(config.data_dir, config.max_bytes)
    raise ValueError(f"unknown store {config.store!r}")  # ServerConfig validates it first
