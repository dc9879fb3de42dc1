"""The connection of ``RedisClusterStore`` to its cluster: redis-py's asyncio cluster client
behind the few calls the store makes (a command, a script, commands in pipelines, a SCAN
of every master, the masters' INFO), with Redis's errors translated into lynxkv's where they
enter: out of memory is ``StorageFull``, anything else ``StoreError``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, OutOfMemoryError, RedisClusterException, RedisError

from lynxkv.errors import StorageFull, StoreError

__all__ = ["ClusterClient"]

_T = TypeVar("_T")
#: Commands per pipeline: each node gets its share of one in one round trip.
_BATCH = 1000


def _translate(exc: BaseException) -> StoreError:
    if isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM"):  # OOM inside a script
        return StorageFull(f"the Redis Cluster is out of memory (maxmemory): {exc}")
    text = str(exc)
    return StoreError(text if text.startswith("Redis Cluster") else f"Redis Cluster: {text}")


def _raised_in_redis(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is redis-py's code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return isinstance(module, str) and module.split(".")[0] == "redis"


def _check(results: Sequence[Any]) -> None:
    """Raise the first error among a pipeline's results, translated."""
    for result in results:
        if isinstance(result, AskError):  # MovedError too: the slot moved mid-pipeline
            raise StoreError(f"the key's slot moved during the request, retry: {result}")
        if isinstance(result, Exception):
            raise _translate(result) from result


class ClusterClient:
    """One cluster client for one store. ``seeds`` may be any live nodes of the cluster."""

    def __init__(self, seeds: Sequence[tuple[str, int]], timeout_s: float) -> None:
        self.seeds = ",".join(f"{host}:{port}" for host, port in seeds)
        self._client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self.closed = False

    async def connect(self) -> None:
        """Learn the cluster's layout from the seeds."""
        await self.run(self._client.initialize)

    def replica_count(self) -> int:
        return len(self._client.get_replicas())

    def master_name(self, key: str) -> str | None:
        """``host:port`` of the master that serves ``key``, as the client last learned."""
        node = self._client.get_node_from_key(key)
        return None if node is None else node.name

    async def run(self, call: Callable[..., Awaitable[_T]], *args: Any, **kw: Any) -> _T:
        """Await one call to the cluster, translating its errors."""
        if self.closed:
            raise StoreError("the store is closed")
        try:
            return await call(*args, **kw)
        except (RedisError, RedisClusterException) as exc:
            raise _translate(exc) from exc
        except AttributeError as exc:
            # redis-py (8.1 seen) races with its own reconnects in a failover: a command
            # sent on a connection being torn down meets its writer gone (None). Raised
            # inside redis-py, that is a lost connection; raised anywhere else, a bug.
            if not _raised_in_redis(exc):
                raise
            raise StoreError(f"Redis Cluster: connection lost mid-command ({exc})") from exc

    async def command(self, *args: Any, **kw: Any) -> Any:
        return await self.run(self._client.execute_command, *args, **kw)

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A script whose ``keys`` share one hash tag (so it runs on their master)."""
        return await self.command("EVAL", script, len(keys), *keys, *args)

    async def batch(
        self, commands: Sequence[Sequence[Any]], *, wait: tuple[str, int, int] | None = None
    ) -> Sequence[Any]:
        """The commands' results, from pipelines of up to 1000. ``wait=(key, replicas, ms)``
        appends ``WAIT replicas ms`` on the master of ``key``, on the connection that ran the
        commands sent there (WAIT counts its own connection's writes); its count comes last."""
        results: list[Any] = []
        for at in range(0, max(len(commands), 1), _BATCH):
            pipe = self._client.pipeline(transaction=False)
            for command in commands[at : at + _BATCH]:
                pipe.execute_command(*command)
            if wait is not None and at + _BATCH >= len(commands):
                key, replicas, ms = wait
                node = self._client.get_node_from_key(key)
                pipe.execute_command("WAIT", replicas, ms, target_nodes=node)
            if len(pipe):
                results += await self.run(pipe.execute, raise_on_error=False)
        _check(results)
        return results

    async def scan(self, pattern: str) -> list[bytes]:
        """The names matching ``pattern`` on every master (a SCAN each, concurrently)."""

        async def one(node: ClusterNode) -> list[bytes]:
            found: list[bytes] = []
            cursor = 0
            while True:
                args = ("SCAN", cursor, "MATCH", pattern, "COUNT", _BATCH)
                cursors, names = await self.command(*args, target_nodes=node)
                found += names
                cursor = next(iter(cursors.values()))
                if not cursor:
                    return found

        per_node = await asyncio.gather(*(one(n) for n in self._client.get_primaries()))
        return sorted({name for names in per_node for name in names})

    async def masters_info(self, *sections: str) -> dict[str, dict[str, Any]]:
        """``INFO sections`` of every master, by ``host:port``."""
        infos: dict[str, dict[str, Any]] = await self.command(
            "INFO", *sections, target_nodes=RedisCluster.PRIMARIES
        )
        return infos

    async def close(self) -> None:
        self.closed = True
        await self._client.aclose()
