"""Opening the store a config names: ``lmdb``, or a ``redis-cluster://`` URL."""

from __future__ import annotations

from lynxkv.errors import MissingDependency
from lynxkv.kvstore.config import ServerConfig, parse_redis_cluster_url
from lynxkv.kvstore.store import Store

__all__ = ["open_store"]


async def open_store(config: ServerConfig) -> Store:
    if config.store == "lmdb":
        from lynxkv.kvstore.lmdb_store import LmdbStore

        return await LmdbStore.open(config.data_dir, config.max_bytes)
    url = parse_redis_cluster_url(config.store)  # ServerConfig validated it
    try:
        import redis  # noqa: F401  (only its absence matters here)
    except ImportError as exc:
        raise MissingDependency("redis", "server") from exc
    from lynxkv.kvstore.redis_store import RedisClusterStore

    return await RedisClusterStore.open(url.nodes, url.options)
