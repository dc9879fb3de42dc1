"""The embedded default storage backend: ``LmdbStore``, one LMDB environment in the data dir.

An upload writes its pieces under a fresh version id as they arrive; ``commit`` switches the
index entry in one transaction, so readers see the old object or the new one, never a mix, and
a crash leaves only pieces no entry references, which ``open`` deletes. A version that leaves
the index is deleted once its last reader is done. The layout is in ``lmdb_layout``.

The store keeps a mirror of the index in memory (an ``OrderedDict`` in LRU order) and the space
accounting: ``committed + uploading + retired <= max_bytes``, where *retired* counts versions
out of the index whose pieces are not deleted yet (readers still on them). Every index change
runs under one ``asyncio.Lock``, on one writer thread; the mirror changes before an entry
leaves the disk index (so no reader starts on it) and after one enters it (so no reader finds
an entry whose pieces are not all written).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from lynxkv.errors import NotFound, PreconditionFailed, StorageFull, StoreError
from lynxkv.kvstore import lmdb_layout as layout
from lynxkv.kvstore.lmdb_layout import IndexEntry, LmdbEnv, MapFull, Piece
from lynxkv.kvstore.store import ObjectInfo, PutHandle, StoreStats, piece_spans

__all__ = ["LmdbOptions", "LmdbStore", "plan_eviction"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class LmdbOptions:
    """Tuning of an ``LmdbStore``; the defaults suit objects of a few MiB."""

    #: Objects are stored in pieces of this many bytes; a read yields one piece at a time.
    piece_size: int = 1 * layout.MIB
    #: An upload buffers this much before one write transaction (one fsync) stores it.
    write_batch: int = 4 * layout.MIB
    #: Threads that run reads; writes run on one thread of their own (LMDB has one writer).
    #: One: more threads contend with the event loop for the GIL (bench/server.py measured
    #: 16 connections at 2.00 GB/s with 4 threads, 2.47 with 1).
    read_threads: int = 1
    #: The LMDB map size in bytes; None derives it from max_bytes (``lmdb_layout.map_size_for``).
    map_size: int | None = None
    #: Access times reach the disk within this many seconds, in one transaction, and on close.
    access_flush_s: float = 5.0

    def __post_init__(self) -> None:
        if self.piece_size < 1:
            raise ValueError(f"piece_size must be >= 1, got {self.piece_size}")
        if self.write_batch < self.piece_size:
            raise ValueError(f"write_batch {self.write_batch} is below piece_size")
        if self.read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {self.read_threads}")
        if self.map_size is not None and self.map_size < 256 * 1024:
            raise ValueError(f"map_size must be >= 256 KiB, got {self.map_size}")
        if self.access_flush_s < 0:
            raise ValueError(f"access_flush_s must be >= 0, got {self.access_flush_s}")


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


class _Phase(Enum):
    WRITING = "writing"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    ABORTED = "aborted"


class _Upload:
    """A ``PutHandle``: the state of one upload. Its methods must not run concurrently."""

    def __init__(self, store: LmdbStore, key: str) -> None:
        self.store, self.key = store, key
        self.vid = secrets.token_bytes(layout.VID_LEN)
        self.buf = bytearray()  # body bytes not yet in LMDB (less than a write batch)
        self.written = 0  # body bytes received
        self.reserved = 0  # bytes counted against max_bytes for this upload (>= written)
        self.flushed = 0  # pieces in LMDB
        self.phase = _Phase.WRITING

    async def write(self, data: bytes) -> None:
        await self.store._guard(self.store._write(self, data))

    async def commit(self, anchor_end: int) -> tuple[ObjectInfo, bool]:
        return await self.store._guard(self.store._commit(self, anchor_end))

    async def abort(self) -> None:
        await self.store._guard(self.store._abort(self))


def _expect(up: _Upload, phase: _Phase) -> None:
    if up.phase is not phase:
        raise StoreError(f"the upload of {up.key!r} is {up.phase.value}")


class LmdbStore:
    """The ``Store`` on LMDB. Make one with ``await LmdbStore.open(...)``; use it from the event
    loop it was opened on; ``await close()`` it."""

    def __init__(
        self,
        db: LmdbEnv,
        lock_fd: int,
        writer: ThreadPoolExecutor,
        max_bytes: int,
        options: LmdbOptions,
        index: list[tuple[str, IndexEntry]],
    ) -> None:
        self._db, self._lock_fd, self._writer = db, lock_fd, writer
        self._reader = ThreadPoolExecutor(options.read_threads, "lynxkv-lmdb-read")
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
        self._uploads: set[_Upload] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()  # held around every write transaction
        self._evictions = 0
        self._last_flush = time.monotonic()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._closing = self._closed = False
        self._close_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], max_bytes: int, options: LmdbOptions | None = None
    ) -> LmdbStore:
        """Open (or create) the store in directory ``path``, holding at most ``max_bytes`` of
        object data; deletes what a crash left behind and evicts down to ``max_bytes``."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        opts = options or LmdbOptions()
        root = Path(path)
        lock_fd = layout.lock_dir(root)
        writer = ThreadPoolExecutor(1, "lynxkv-lmdb-write")
        map_size = opts.map_size or layout.map_size_for(max_bytes, opts.piece_size)
        db: LmdbEnv | None = None
        try:
            db = await layout.run_in(writer, LmdbEnv, root, map_size, opts.read_threads)
            index, orphans = await layout.run_in(writer, db.recover)
        except (StoreError, asyncio.CancelledError):
            if db is not None:
                db.env.close()
            writer.shutdown()
            os.close(lock_fd)
            raise
        if orphans:
            _log.info("deleted %d unfinished uploads in %s", orphans, root)
        store = cls(db, lock_fd, writer, max_bytes, opts, index)
        try:
            async with store._lock:
                await store._make_room_locked(0)  # max_bytes may have shrunk since last time
        except StoreError:
            await store.close()
            raise
        return store

    # -- Store protocol ------------------------------------------------------------------

    async def begin_put(self, key: str, size_hint: int | None) -> PutHandle:
        self._check_open()
        if size_hint is not None and size_hint < 0:
            raise ValueError(f"size_hint must be >= 0, got {size_hint}")
        up = _Upload(self, key)
        self._uploads.add(up)
        try:
            if size_hint:
                await self._guard(self._reserve(up, size_hint))
        except (StoreError, asyncio.CancelledError):
            self._spawn(self._abort(up))
            raise
        return up

    async def info(self, key: str) -> ObjectInfo:
        entry = self._find(key, None)
        self._touch(key, entry)
        return entry.info(key)

    async def read(
        self, key: str, start: int, end: int, etag: str | None = None
    ) -> AsyncIterator[bytes]:
        entry = self._find(key, etag)
        if not 0 <= start <= end <= entry.size:
            raise ValueError(f"range [{start}, {end}) is outside [0, {entry.size})")
        self._touch(key, entry)
        self._pins[entry.vid] = self._pins.get(entry.vid, 0) + 1
        try:
            for n, lo, hi in piece_spans(start, end, entry.piece_size):
                yield await self._call(self._reader, self._db.read, entry.vid, n, lo, hi)
        finally:
            self._unpin(entry.vid)

    async def delete(self, key: str) -> bool:
        self._check_open()
        return await self._guard(self._delete(key))

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        self._check_open()
        return [key in self._entries for key in keys]

    async def list(self, prefix: str = "", limit: int = 1000) -> list[ObjectInfo]:
        self._check_open()
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        keys = await self._call(self._reader, self._db.keys, prefix.encode(), limit)
        return [self._entries[key].info(key) for key in keys if key in self._entries]

    async def stats(self) -> StoreStats:
        return StoreStats(len(self._entries), self._committed, self._max, self._evictions)

    async def close(self) -> None:
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._close_task)

    # -- uploads -------------------------------------------------------------------------

    async def _write(self, up: _Upload, data: bytes) -> None:
        _expect(up, _Phase.WRITING)
        try:
            await self._reserve(up, up.written + len(data) - up.reserved)
            up.buf += data
            up.written += len(data)
            if len(up.buf) >= self._opts.write_batch:
                await self._flush(up)
        except StoreError:
            if up.phase is _Phase.WRITING:
                up.phase = _Phase.FAILED
            raise

    async def _reserve(self, up: _Upload, n: int) -> None:
        _expect(up, _Phase.WRITING)
        if n <= 0:
            return
        if up.reserved + n > self._max:
            raise StorageFull(f"{up.reserved + n} bytes do not fit in a store of {self._max}")
        if self._room() < n:
            async with self._lock:
                _expect(up, _Phase.WRITING)
                await self._make_room_locked(n)
                up.reserved += n
                self._uploading += n
        else:
            up.reserved += n
            self._uploading += n

    async def _flush(self, up: _Upload) -> None:
        async with self._lock:
            _expect(up, _Phase.WRITING)
            count = len(up.buf) // self._opts.piece_size
            body, up.buf = up.buf, up.buf[count * self._opts.piece_size :]
            view = memoryview(body)[: count * self._opts.piece_size]
            pieces = layout.split_pieces(up.vid, up.flushed, view, self._opts.piece_size)
            await self._put_locked(pieces, ())
            up.flushed += count

    async def _commit(self, up: _Upload, anchor_end: int) -> tuple[ObjectInfo, bool]:
        _expect(up, _Phase.WRITING)
        if not 0 <= anchor_end <= up.written:
            raise ValueError(f"anchor_end {anchor_end} is outside [0, {up.written}]")
        up.phase = _Phase.COMMITTING
        entry = IndexEntry(up.vid, up.written, anchor_end, self._opts.piece_size, time.time())
        try:
            async with self._lock:
                tail = layout.split_pieces(
                    up.vid, up.flushed, memoryview(up.buf), self._opts.piece_size
                )
                await self._put_locked(tail, [(up.key.encode(), entry.pack())])
                old = self._publish(up, entry)
        except StoreError:
            up.phase = _Phase.FAILED
            raise
        up.phase, up.buf = _Phase.COMMITTED, bytearray()
        self._uploads.discard(up)
        return entry.info(up.key), old is None

    def _publish(self, up: _Upload, entry: IndexEntry) -> IndexEntry | None:
        """Mirror a committed entry; retire the version it replaces."""
        old = self._entries.pop(up.key, None)
        self._entries[up.key] = entry
        self._dirty.discard(up.key)
        self._committed += entry.size
        self._uploading -= up.reserved
        up.reserved = 0
        if old is not None:
            self._committed -= old.size
            self._retire(old.vid, old.size)
            if old.vid in self._pending:
                self._spawn(self._later(self._drain_locked))
        return old

    async def _abort(self, up: _Upload) -> None:
        async with self._lock:  # behind a commit in progress, which may still succeed
            if up.phase in (_Phase.COMMITTED, _Phase.ABORTED):
                return
            up.phase, up.buf = _Phase.ABORTED, bytearray()
            self._uploads.discard(up)
            self._uploading -= up.reserved
            reserved, up.reserved = up.reserved, 0
            if up.flushed:
                self._retire(up.vid, reserved)
                await self._drain_locked()

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

    async def _shutdown(self) -> None:
        self._closing = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        for up in list(self._uploads):
            try:
                await self._abort(up)  # waits for a commit in progress
            except StoreError as exc:
                _log.warning("closing: %s (the next open cleans up)", exc)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:
            for last_step in (self._flush_access_locked, self._drain_locked):
                try:
                    await last_step()
                except StoreError as exc:
                    _log.warning("closing: %s (the next open cleans up)", exc)
            self._closed = True
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        self._reader.shutdown(wait=True)  # no transaction may outlive the environment
        self._writer.shutdown(wait=True)
        self._db.env.close()
        os.close(self._lock_fd)
