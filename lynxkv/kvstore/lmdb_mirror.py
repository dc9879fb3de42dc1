"""The in-memory half of ``LmdbStore``: the index mirror, the space accounting and the
versions that readers still hold, with the background work that brings the disk in step.

``LmdbMirror`` keeps the index as an ``OrderedDict`` in LRU order and the counts behind
``committed + uploading + retired <= max_bytes``; it evicts to make room (``plan_eviction``
picks the victims), deletes a retired version once its last reader is done, and writes access
times to disk in batches. ``LmdbStore`` builds the uploads and the ``Store`` protocol on it;
when the mirror changes relative to the disk index is told in ``lmdb_store``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lynxkv.errors import NotFound, PreconditionFailed, StorageFull, StoreError
from lynxkv.kvstore import lmdb_layout as layout
from lynxkv.kvstore.lmdb_layout import IndexEntry, LmdbEnv, LmdbOptions, MapFull, Piece

__all__ = ["LmdbMirror", "plan_eviction"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


def plan_eviction(candidates: Iterable[tuple[str, int]], need: int) -> list[str] | None:
    """The first keys of ``candidates`` (key, size), least recently used first, whose sizes
    add up to ``need``; None when all of them together do not."""
    chosen: list[str] = []
    freed = 0
    for key, size in candidates:
        if freed >= need:
            break
        chosen.append(key)
        freed += size
    return chosen if freed >= need else None


class LmdbMirror:
    """The index mirror and the space accounting of one LMDB environment; the base of
    ``LmdbStore``. Every index change runs under ``_lock``, on the one ``writer`` thread."""

    def __init__(
        self,
        db: LmdbEnv,
        writer: ThreadPoolExecutor,
        max_bytes: int,
        options: LmdbOptions,
        index: list[tuple[str, IndexEntry]],
    ) -> None:
        self._db, self._writer = db, writer
        self._max, self._opts = max_bytes, options
        lru = sorted(index, key=lambda item: (item[1].last_access, item[0]))
        self._entries: OrderedDict[str, IndexEntry] = OrderedDict(lru)  # least recent first
        self._committed = sum(entry.size for _, entry in index)
        self._uploading = 0  # reserved by uploads
        self._retired = 0  # versions out of the index whose pieces are not yet deleted
        self._pins: dict[bytes, int] = {}  # version -> readers
        self._doomed: dict[bytes, int] = {}  # retired version -> size, waiting for readers
        self._pending: dict[bytes, int] = {}  # retired version -> size, to delete
        self._dirty: set[str] = set()  # keys whose last access is not on disk
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()  # held around every write transaction
        self._evictions = 0
        self._last_flush = time.monotonic()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._closing = self._closed = False

    # -- space ---------------------------------------------------------------------------

    def _room(self) -> int:
        return self._max - self._committed - self._uploading - self._retired

    def _evictable(self) -> Iterator[tuple[str, int]]:
        """Committed objects, least recently used first, but for those being read: evicting
        them would free nothing until their readers are done."""
        return ((k, e.size) for k, e in self._entries.items() if e.vid not in self._pins)

    async def _make_room_locked(self, n: int) -> None:
        need = n - self._room()
        if need <= 0:
            return
        victims = plan_eviction(self._evictable(), need)
        if victims is None:
            held = f"{self._uploading} uploading, {self._retired} awaiting readers"
            raise StorageFull(f"no room for {n} bytes in {self._max} ({held})")
        await self._evict_locked(victims)

    async def _evict_locked(self, keys: Sequence[str]) -> None:
        victims = [(key, self._entries.pop(key)) for key in keys]
        freed = sum(entry.size for _, entry in victims)
        self._committed -= freed
        try:
            vids = [entry.vid for _, entry in victims]
            await self._call(self._writer, self._db.drop, [k.encode() for k in keys], vids)
        except StoreError:
            for key, entry in reversed(victims):
                self._entries[key] = entry
                self._entries.move_to_end(key, last=False)
            self._committed += freed
            raise
        self._evictions += len(victims)
        self._dirty.difference_update(keys)
        _log.debug("evicted %d objects (%d bytes)", len(victims), freed)

    async def _put_locked(
        self, pieces: Sequence[Piece], entries: Sequence[tuple[bytes, bytes]]
    ) -> None:
        """Write, evicting when LMDB's map is full (its overhead outgrew the headroom)."""
        need = max(1, sum(len(value) for _, value in pieces))
        while True:
            try:
                return await self._call(self._writer, self._db.put, pieces, entries)
            except MapFull:
                everything = [key for key, _ in self._evictable()]
                if not everything:
                    raise
                await self._evict_locked(plan_eviction(self._evictable(), need) or everything)

    # -- versions and readers ------------------------------------------------------------

    def _retire(self, vid: bytes, size: int) -> None:
        """A version left the index (or an upload was dropped): delete it when unread."""
        self._retired += size
        self._park(vid, size)

    def _park(self, vid: bytes, size: int) -> None:
        if vid in self._pins:
            self._doomed[vid] = size
        else:
            self._pending[vid] = size

    def _unpin(self, vid: bytes) -> None:
        left = self._pins.pop(vid) - 1
        if left:
            self._pins[vid] = left
        elif vid in self._doomed:
            self._pending[vid] = self._doomed.pop(vid)
            self._spawn(self._later(self._drain_locked))

    async def _later(self, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Background work: failures are logged, and retried by the next call or by close."""
        async with self._lock:
            try:
                await step()
            except StoreError as exc:
                _log.warning("%s failed, will retry: %s", step.__name__, exc)

    async def _drain_locked(self) -> None:
        if not self._pending or self._closed:
            return
        batch, self._pending = self._pending, {}
        try:
            await self._call(self._writer, self._db.drop, (), list(batch))
        except StoreError:
            self._pending.update(batch)
            raise
        self._retired -= sum(batch.values())

    async def _delete(self, key: str) -> bool:
        async with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            busy = entry.vid in self._pins  # then its pieces outlive the index entry
            self._committed -= entry.size
            self._retired += entry.size if busy else 0
            try:
                vids = [] if busy else [entry.vid]
                await self._call(self._writer, self._db.drop, [key.encode()], vids)
            except StoreError:
                self._entries[key] = entry
                self._committed += entry.size
                self._retired -= entry.size if busy else 0
                raise
            self._dirty.discard(key)
            if busy:
                self._park(entry.vid, entry.size)
                await self._drain_locked()  # in case its readers ended meanwhile
            return True

    # -- access times ----------------------------------------------------------------------

    def _find(self, key: str, etag: str | None) -> IndexEntry:
        self._check_open()
        entry = self._entries.get(key)
        if entry is None:
            raise NotFound(f"no object under key {key!r}")
        if etag is not None and etag != layout.etag_of(entry.vid):
            raise PreconditionFailed(f"{key!r} is at ETag {layout.etag_of(entry.vid)}, not {etag}")
        return entry

    def _touch(self, key: str, entry: IndexEntry) -> None:
        entry.last_access = time.time()
        self._entries.move_to_end(key)
        self._dirty.add(key)
        if self._flush_timer is None:  # one transaction per interval, not one per read
            due = self._last_flush + self._opts.access_flush_s - time.monotonic()
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(max(due, 0.0), self._spawn_flush)

    def _spawn_flush(self) -> None:
        self._spawn(self._later(self._flush_access_locked))

    async def _flush_access_locked(self) -> None:
        self._flush_timer = None  # accesses from here on are for the next flush
        self._last_flush = time.monotonic()
        keys = [key for key in self._dirty if key in self._entries]
        self._dirty.clear()
        if not keys:
            return
        try:
            entries = [(key.encode(), self._entries[key].pack()) for key in keys]
            await self._call(self._writer, self._db.put, (), entries)
        except StoreError:
            self._dirty.update(keys)
            raise

    # -- plumbing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise StoreError("the store is closed")

    async def _call(self, pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise StoreError("the store is closed")
        return await layout.run_in(pool, fn, *args)

    def _spawn(self, op: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(op)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.debug("store operation failed: %r", task.exception())

    async def _guard(self, op: Coroutine[Any, Any, _T]) -> _T:
        """Run ``op`` to its end even if the caller is cancelled (a client hanging up
        mid-commit): the in-memory state must match what reached the disk."""
        return await asyncio.shield(self._spawn(op))
