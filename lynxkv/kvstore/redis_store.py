"""``RedisClusterStore``: the ``Store`` on a Redis Cluster, so that any number of stateless
``lynxkv serve`` instances share one cache. The layout and the scripts are in
``redis_layout``, the connection in ``redis_client``.

What it guarantees, and where Redis sets the limits:

- Atomic publishing. An upload writes its pieces into a data hash of its own, which expires
  ``upload_ttl_s`` after its last write unless committed; the commit script checks every
  piece, persists the data and switches the manifest in one step. Readers see the old
  version or the new one, never a mix or a partial object; an aborted upload is unlinked
  at once, and one whose server died expires.
- Reads that have started. A read fetches the pieces of the version it started on. A
  replaced or deleted version stays readable for ``retire_grace_s`` (a store cannot count
  the readers of other servers); a read slower than that ends with ``PreconditionFailed``
  (replaced) or ``NotFound`` (deleted), never with bytes of another version.
- Missing pieces. Redis may evict a version (``allkeys-lru``) or lose writes that no replica
  had in a failover. A read that finds a piece missing or of the wrong length counts it
  (``missing_pieces``), removes the object and raises ``NotFound``: a 404 before the first
  piece, a cut response after. ``contains`` (lookups) checks that the data is there, and
  ``stats`` removes the manifests whose data Redis evicted.
- Durability. After each commit the store runs ``WAIT replicas wait_ms`` on the key's
  master, so an acknowledged PUT is in the memory of ``replicas`` replicas and survives the
  loss of its master: Redis promotes its most up-to-date replica (with one replica per
  master and ``replicas=1``, the one that acknowledged; with more per master, set
  ``replicas`` to their number to be sure). A commit that gets fewer acknowledgements is
  visible, but its PUT fails with a 503. WAIT does not make Redis consistent: an object is
  lost if its master and the replicas that hold it fail together, a network partition can
  still lose it, nothing reaches disk unless the nodes persist, and under memory pressure
  any object, acknowledged or not, may be evicted: this is a cache.
- Capacity is the cluster's: ``maxmemory`` on each master, with ``allkeys-lru`` eviction.
  A write Redis refuses for memory (``noeviction``, or nothing left to evict) raises
  ``StorageFull``. ``stats`` reports the masters' maxmemory and the keys they evicted since
  the store opened, and counts objects and bytes by scanning manifests (``stats_cache_s``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from lynxkv.errors import NotFound, PreconditionFailed, StorageFull, StoreError
from lynxkv.kvstore import redis_layout as layout
from lynxkv.kvstore.redis_client import ClusterClient
from lynxkv.kvstore.redis_layout import Manifest, RedisOptions
from lynxkv.kvstore.store import (
    ObjectInfo,
    PutHandle,
    StoreStats,
    check_size_hint,
    piece_spans,
)

__all__ = ["RedisClusterStore", "RedisStoreStats"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Tries of a script that found the key at another version than expected (racing writers).
_RACE_TRIES = 8


@dataclass(frozen=True)
class RedisStoreStats(StoreStats):
    #: Pieces fetched from Redis since the store opened.
    pieces_read: int = 0


class _Phase(Enum):
    WRITING = "writing"
    COMMITTED = "committed"
    FAILED = "failed"
    ABORTED = "aborted"


class _Upload:
    """A ``PutHandle``. ``lock`` orders an abort behind a commit still running for a caller
    that was cancelled."""

    def __init__(self, store: RedisClusterStore, key: str) -> None:
        self.store, self.key = store, key
        self.vid = secrets.token_hex(16)
        self.manifest = layout.manifest_key(store.options.prefix, key)
        self.data = layout.data_key(store.options.prefix, key, self.vid)
        self.buf = bytearray()  # bytes of the piece being filled
        self.written = 0
        self.flushed = 0  # pieces in Redis
        self.sent = False  # whether anything may have reached Redis (then abort unlinks)
        self.phase = _Phase.WRITING
        self.lock = asyncio.Lock()

    async def write(self, data: bytes) -> None:
        await self.store._write(self, data)

    async def commit(self, anchor_end: int) -> tuple[ObjectInfo, bool]:
        return await self.store._guard(self.store._commit(self, anchor_end))

    async def abort(self) -> None:
        await self.store._guard(self.store._abort(self))


class RedisClusterStore:
    """The ``Store`` on a Redis Cluster. Make one with ``await RedisClusterStore.open(...)``;
    use it from the event loop it was opened on; ``await close()`` it."""

    def __init__(self, redis: ClusterClient, options: RedisOptions) -> None:
        self._redis, self.options = redis, options
        self._uploads: set[_Upload] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dirty: dict[str, tuple[str, float]] = {}  # key -> (vid, access time) to record
        self._flush_timer: asyncio.TimerHandle | None = None
        self._last_flush = time.monotonic()
        self._evicted_at_open: dict[str, int] = {}
        self._maxmemory: dict[str, int] = {}  # master name -> maxmemory (0: none)
        self._cached: tuple[float, RedisStoreStats] | None = None
        self._missing = self._pieces_read = 0
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, nodes: Sequence[tuple[str, int]], options: RedisOptions | None = None
    ) -> RedisClusterStore:
        """Connect through the seed ``nodes`` (any live node of the cluster will do)."""
        if not nodes:
            raise ValueError("a Redis Cluster store needs at least one seed node")
        opts = options or RedisOptions()
        redis = ClusterClient(nodes, opts.timeout_s)
        store = cls(redis, opts)
        try:
            await redis.connect()
            if opts.replicas and not redis.replica_count():
                raise StoreError(
                    f"it has no replicas, and replicas={opts.replicas} waits for some after"
                    " every PUT: add replicas, or set ?replicas=0"
                )
            await store._read_masters(baseline=True)
        except StoreError as exc:
            await redis.close()
            raise StoreError(f"cannot use the Redis Cluster at {redis.seeds}: {exc}") from exc
        return store

    # -- Store protocol ------------------------------------------------------------------

    async def begin_put(self, key: str, size_hint: int | None) -> PutHandle:
        self._check_open()
        check_size_hint(size_hint)
        up = _Upload(self, key)
        limit = self._maxmemory.get(self._redis.master_name(up.manifest) or "", 0)
        if size_hint and limit and size_hint > limit:
            raise StorageFull(f"{size_hint} bytes do not fit in a master's maxmemory of {limit}")
        self._uploads.add(up)
        return up

    async def info(self, key: str) -> ObjectInfo:
        manifest = await self._manifest(key)
        return manifest.info(key, self._touch(key, manifest.vid))

    async def read(
        self, key: str, start: int, end: int, etag: str | None = None
    ) -> AsyncIterator[bytes]:
        manifest = await self._manifest(key)
        if etag is not None and etag != layout.etag_of(manifest.vid):
            now = layout.etag_of(manifest.vid)
            raise PreconditionFailed(f"{key!r} is at ETag {now}, not {etag}")
        if not 0 <= start <= end <= manifest.size:
            raise ValueError(f"range [{start}, {end}) is outside [0, {manifest.size})")
        self._touch(key, manifest.vid)
        data = layout.data_key(self.options.prefix, key, manifest.vid)
        for n, lo, hi in piece_spans(start, end, manifest.piece_size):
            piece = await self._redis.command("HGET", data, n)
            if not isinstance(piece, bytes) or len(piece) != manifest.piece_length(n):
                raise await self._lost(key, manifest, n)
            self._pieces_read += 1
            yield piece if hi - lo == len(piece) else piece[lo:hi]

    async def delete(self, key: str) -> bool:
        self._check_open()
        name = layout.manifest_key(self.options.prefix, key)
        vid = await self._redis.command("HGET", name, "v")
        grace = int(self.options.retire_grace_s * 1000)
        for _ in range(_RACE_TRIES):
            if vid is None:
                return False
            data = layout.data_key(self.options.prefix, key, vid.decode())
            status, current = await self._redis.eval(layout.DELETE, [name, data], [vid, grace])
            if status != -1:
                self._dirty.pop(key, None)
                return bool(status == 1)
            vid = current
        raise StoreError(f"{key!r} kept changing while being deleted; retry")

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key has a manifest and its version's data (a manifest whose data
        Redis evicted is no object): two pipelined round trips, not an access."""
        self._check_open()
        ns = self.options.prefix
        heads = await self._redis.batch(
            [("HMGET", layout.manifest_key(ns, key), "v", "s") for key in keys]
        )
        # an empty object has no data to look for
        found = [(k, v.decode()) for k, (v, s) in zip(keys, heads, strict=True) if v and s != b"0"]
        exist = iter(
            await self._redis.batch([("EXISTS", layout.data_key(ns, *kv)) for kv in found])
        )
        return [v is not None and (s == b"0" or bool(next(exist))) for v, s in heads]

    async def list(self, prefix: str = "", limit: int = 1000) -> list[ObjectInfo]:
        """A SCAN of every master for the matching manifests: the cost grows with the keys in
        the cluster, not with ``limit``. An admin call, not a hot path."""
        self._check_open()
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        ns = self.options.prefix
        names = await self._redis.scan(layout.manifest_pattern(ns, prefix))
        keys = sorted({layout.key_of_manifest(ns, name) for name in names})[:limit]
        if not keys:
            return []
        results = await self._redis.batch(
            [("HGETALL", layout.manifest_key(ns, key)) for key in keys]
        )
        found = []
        for key, fields in zip(keys, results, strict=True):
            manifest = Manifest.parse(fields)
            if manifest is not None:
                touched = self._dirty.get(key)
                later = touched[1] if touched and touched[0] == manifest.vid else None
                found.append(manifest.info(key, later))
        return found

    async def stats(self) -> RedisStoreStats:
        """Counts the manifests of every master whose data is there, and removes the others
        (data that Redis evicted): O(objects) round trips in pipelines of 1000, reused for
        ``stats_cache_s``."""
        self._check_open()
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.options.stats_cache_s:
            return self._cached[1]
        ns = self.options.prefix
        names = await self._redis.scan(layout.manifest_pattern(ns, ""))
        hashes = await self._redis.batch([("HGETALL", name) for name in names])
        found = [
            (layout.key_of_manifest(ns, name), manifest)
            for name, fields in zip(names, hashes, strict=True)
            if (manifest := Manifest.parse(fields)) is not None
        ]
        present = await self._sweep(found)
        evicted = await self._read_masters(baseline=False)
        stats = RedisStoreStats(
            objects=len(present),
            bytes=sum(manifest.size for manifest in present),
            max_bytes=sum(self._maxmemory.values()),
            evictions=evicted,
            missing_pieces=self._missing,
            pieces_read=self._pieces_read,
        )
        self._cached = (now, stats)
        return stats

    async def close(self) -> None:
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._close_task)

    # -- uploads -------------------------------------------------------------------------

    async def _write(self, up: _Upload, data: bytes) -> None:
        self._expect(up, _Phase.WRITING)
        up.buf += data
        up.written += len(data)
        size = self.options.piece_size
        if len(up.buf) < size:
            return
        count = len(up.buf) // size
        body, up.buf = up.buf[: count * size], up.buf[count * size :]
        fields = {up.flushed + i: bytes(body[i * size : (i + 1) * size]) for i in range(count)}
        try:
            await self._redis.batch(self._piece_commands(up, fields))
        except StoreError:
            up.phase = _Phase.FAILED
            raise
        up.flushed += count

    def _piece_commands(self, up: _Upload, fields: dict[int, bytes]) -> Sequence[tuple[Any, ...]]:
        """Write pieces (n -> bytes), and expire them unless a commit comes in time."""
        if not fields:
            return []
        up.sent = True
        ttl_ms = int(self.options.upload_ttl_s * 1000)
        pairs = (x for item in fields.items() for x in item)
        return [("HSET", up.data, *pairs), ("PEXPIRE", up.data, ttl_ms)]

    async def _commit(self, up: _Upload, anchor_end: int) -> tuple[ObjectInfo, bool]:
        async with up.lock:
            self._expect(up, _Phase.WRITING)
            if not 0 <= anchor_end <= up.written:
                raise ValueError(f"anchor_end {anchor_end} is outside [0, {up.written}]")
            size = self.options.piece_size
            manifest = Manifest(
                up.vid, up.written, anchor_end, size, -(-up.written // size), time.time()
            )
            tail = {up.flushed: bytes(up.buf)} if up.buf else {}
            try:
                status, replaced, acked = await self._publish(up, manifest, tail)
            except StoreError:
                up.phase = _Phase.FAILED
                raise
            up.phase, up.buf = _Phase.COMMITTED, bytearray()
            self._uploads.discard(up)
            self._cached = None
        if acked is not None and acked < self.options.replicas:
            raise StoreError(
                f"{up.key!r} is stored but on {acked} of {self.options.replicas} replicas after"
                f" {self.options.wait_ms} ms (a replica down or behind?): it may not survive a"
                " failover; retry the PUT"
            )
        return manifest.info(up.key), status == b"ok" and not replaced

    async def _publish(
        self, up: _Upload, manifest: Manifest, tail: dict[int, bytes]
    ) -> tuple[bytes, bytes, int | None]:
        """The commit script (with the last piece before it, and ``WAIT`` after it on the
        same connection: WAIT counts the writes of its own connection) until it does not
        race another writer; (status, replaced vid, replicas that acknowledged)."""
        opts, expected = self.options, b""
        m, grace = manifest, int(opts.retire_grace_s * 1000)
        wait = (up.manifest, opts.replicas, opts.wait_ms) if opts.replicas else None
        for _ in range(_RACE_TRIES):
            old = layout.data_key(opts.prefix, up.key, expected.decode()) if expected else None
            keys = (up.manifest, up.data, old or up.manifest)
            args = (expected, m.vid, m.size, m.anchor_end, m.piece_size, m.pieces)
            commit = ("EVAL", layout.COMMIT, 3, *keys, *args, repr(m.last_access), grace)
            commands = [*self._piece_commands(up, tail), commit]
            tail = {}
            results = await self._redis.batch(commands, wait=wait)
            acked = int(results[-1]) if opts.replicas else None
            status, other = results[-2 if opts.replicas else -1]
            if status == b"moved":
                expected = other
                continue
            if status == b"lost":
                raise StoreError(
                    f"the pieces of {up.key!r} are gone before its commit (expired after"
                    f" {opts.upload_ttl_s} s idle, evicted, or lost in a failover); retry the PUT"
                )
            return status, other, acked
        raise StoreError(f"{up.key!r} kept changing while being committed; retry")

    async def _abort(self, up: _Upload) -> None:
        async with up.lock:
            if up.phase in (_Phase.COMMITTED, _Phase.ABORTED):
                return
            up.phase, up.buf = _Phase.ABORTED, bytearray()
            self._uploads.discard(up)
            if not up.sent:
                return
            try:
                await self._redis.eval(layout.ABORT, [up.manifest, up.data], [up.vid])
            except StoreError as exc:  # its pieces expire on their own
                ttl = self.options.upload_ttl_s
                _log.warning("abort of %r: %s (its pieces expire within %s s)", up.key, exc, ttl)

    # -- reads -----------------------------------------------------------------------------

    async def _manifest(self, key: str) -> Manifest:
        self._check_open()
        name = layout.manifest_key(self.options.prefix, key)
        fields = await self._redis.command("HGETALL", name)
        manifest = Manifest.parse(fields) if fields else None
        if manifest is None:
            if fields:
                _log.warning("ignoring a malformed manifest at %s: %r", name, fields)
            raise NotFound(f"no object under key {key!r}")
        return manifest

    async def _lost(self, key: str, manifest: Manifest, n: int) -> Exception:
        """What a read that found piece ``n`` missing raises: its version was retired under
        a slow reader, or lost (then it is counted, and the object removed)."""
        name = layout.manifest_key(self.options.prefix, key)
        current = await self._redis.command("HGET", name, "v")
        if current is None:
            return NotFound(f"{key!r} was deleted while being read")
        if current.decode() != manifest.vid:
            return PreconditionFailed(f"{key!r} was replaced while being read")
        self._missing += 1
        self._cached = None
        data = layout.data_key(self.options.prefix, key, manifest.vid)
        await self._redis.eval(layout.DROP, [name, data], [manifest.vid])
        _log.warning("%r lost piece %d (evicted, or lost in a failover): removed it", key, n)
        return NotFound(f"{key!r} lost piece {n} (evicted or lost in a failover); removed it")

    def _touch(self, key: str, vid: str) -> float:
        """Record an access; Redis hears of it within ``access_flush_s``, in one batch."""
        now = time.time()
        self._dirty[key] = (vid, now)
        if self._flush_timer is None and not self._closing:
            due = self._last_flush + self.options.access_flush_s - time.monotonic()
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(max(due, 0.0), self._spawn_flush)
        return now

    def _spawn_flush(self) -> None:
        self._spawn(self._flush_access())

    async def _flush_access(self) -> None:
        """Access times are advisory (the LRU that counts is Redis's own): a batch that
        fails is dropped, not retried."""
        self._flush_timer, self._last_flush = None, time.monotonic()
        batch, self._dirty = self._dirty, {}
        if not batch:
            return
        ns = self.options.prefix
        touches = [
            ("EVAL", layout.TOUCH, 1, layout.manifest_key(ns, key), vid, repr(when))
            for key, (vid, when) in batch.items()
        ]
        try:
            await self._redis.batch(touches)
        except StoreError as exc:
            _log.info("dropped %d access times: %s", len(batch), exc)

    # -- cluster-wide ----------------------------------------------------------------------

    async def _sweep(self, found: Sequence[tuple[str, Manifest]]) -> Sequence[Manifest]:
        """The manifests whose data is there. The others lost it to eviction: Redis evicts
        by LRU, and reading manifests (as this scan does) keeps them warm while their data
        ages out, so they are removed here, and counted as missing."""
        ns = self.options.prefix
        names = [(layout.manifest_key(ns, k), layout.data_key(ns, k, m.vid)) for k, m in found]
        exist = await self._redis.batch([("EXISTS", data) for _, data in names])
        there = [bool(e) or not m.size for e, (_, m) in zip(exist, found, strict=True)]
        broken = [
            ("EVAL", layout.DROP, 2, *pair, manifest.vid)
            for pair, (_, manifest), ok in zip(names, found, there, strict=True)
            if not ok
        ]
        dropped = sum(await self._redis.batch(broken))  # not those replaced meanwhile
        if dropped:
            self._missing += dropped
            _log.info("removed %d objects whose data Redis evicted", dropped)
        return [m for (_, m), ok in zip(found, there, strict=True) if ok]

    async def _read_masters(self, *, baseline: bool) -> int:
        """Refresh the masters' maxmemory; the keys they evicted since the store opened
        (per node, so that a failover does not make the count go back)."""
        infos = await self._redis.masters_info("memory", "stats")
        self._maxmemory = {name: int(info.get("maxmemory", 0)) for name, info in infos.items()}
        evicted = {name: int(info.get("evicted_keys", 0)) for name, info in infos.items()}
        if baseline:
            self._evicted_at_open = evicted
        return sum(max(0, n - self._evicted_at_open.get(name, 0)) for name, n in evicted.items())

    # -- plumbing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise StoreError("the store is closed")

    @staticmethod
    def _expect(up: _Upload, phase: _Phase) -> None:
        if up.phase is not phase:
            raise StoreError(f"the upload of {up.key!r} is {up.phase.value}")

    def _spawn(self, op: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(op)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, op: Coroutine[Any, Any, _T]) -> _T:
        """Run ``op`` to its end even if the caller is cancelled (a client hanging up
        mid-commit), so that the upload's phase matches what reached Redis."""
        return await asyncio.shield(self._spawn(op))

    async def _shutdown(self) -> None:
        self._closing = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        for up in list(self._uploads):
            await self._abort(up)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_access()
        await self._redis.close()
