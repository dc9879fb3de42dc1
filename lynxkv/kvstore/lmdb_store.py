"""The embedded default storage backend: ``LmdbStore``, one LMDB environment in the data dir.

An upload writes its pieces under a fresh version id as they arrive; ``commit`` switches the
index entry in one transaction, so readers see the old object or the new one, never a mix, and
a crash leaves only pieces no entry references, which ``open`` deletes. A version that leaves
the index is deleted once its last reader is done. The layout is in ``lmdb_layout``; the index
mirror and the space accounting below are in ``lmdb_mirror``.

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
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

from lynxkv.errors import StorageFull, StoreError
from lynxkv.kvstore import lmdb_layout as layout
from lynxkv.kvstore.lmdb_layout import IndexEntry, LmdbEnv, LmdbOptions
from lynxkv.kvstore.lmdb_mirror import LmdbMirror, plan_eviction
from lynxkv.kvstore.store import (
    ObjectInfo,
    PutHandle,
    StoreStats,
    check_size_hint,
    piece_spans,
)

__all__ = ["LmdbOptions", "LmdbStore", "plan_eviction"]

_log = logging.getLogger(__name__)


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


class LmdbStore(LmdbMirror):
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
        super().__init__(db, writer, max_bytes, options, index)
        self._lock_fd = lock_fd
        self._reader = ThreadPoolExecutor(options.read_threads, "lynxkv-lmdb-read")
        self._uploads: set[_Upload] = set()
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
        check_size_hint(size_hint)
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

    # -- closing -------------------------------------------------------------------------

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
