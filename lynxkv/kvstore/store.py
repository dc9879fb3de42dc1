"""The storage protocol every backend implements (the embedded LMDB, a Redis Cluster).

Who calls what: the server's route handlers, from the event loop. Every method is a
coroutine and must not block the loop (LMDB runs its calls in an executor). Keys are
already validated (``[A-Za-z0-9._-]{1,200}``) when they reach a store. Objects are
immutable once committed; a PUT of an existing key replaces it atomically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ObjectInfo", "PutHandle", "Store", "StoreStats", "check_size_hint", "piece_spans"]


@dataclass(frozen=True)
class ObjectInfo:
    """What the index knows of a committed object."""

    key: str
    size: int
    #: End of the Anchor sections (``Range: bytes=0-(anchor_end-1)`` is the anchor).
    anchor_end: int
    #: Strong ETag, quoted as HTTP sends it (``"..."``); changes with every PUT.
    etag: str
    #: Unix time of the last read or write (used for LRU eviction).
    last_access: float


@dataclass(frozen=True)
class StoreStats:
    #: Committed objects.
    objects: int
    #: Their total size (uploads in progress and replaced versions still being read also
    #: count against ``max_bytes`` but not here).
    bytes: int
    max_bytes: int
    #: Objects evicted to make room since the store was opened.
    evictions: int
    #: Objects found with a piece missing or damaged since the store was opened (by a read,
    #: or by ``stats``), answered as misses and removed. LMDB never loses a piece: 0.
    missing_pieces: int = 0


class PutHandle(Protocol):
    """An upload in progress. ``write`` the body in order, then ``commit`` or ``abort``.

    Nothing is visible to readers before ``commit``; after ``abort`` (or a crash) no
    trace of the upload is left, and its space is given back. The methods are called one at
    a time; after a failed ``write`` or ``commit`` only ``abort`` is left.
    """

    async def write(self, data: bytes) -> None:
        """Append body bytes. May evict other objects to make room; raises
        ``StorageFull`` when even that cannot."""

    async def commit(self, anchor_end: int) -> tuple[ObjectInfo, bool]:
        """Publish the object atomically; returns its info and whether the key was new.
        Raises ``ValueError`` unless ``0 <= anchor_end <= bytes written``. A commit whose
        caller is cancelled may still take effect; an ``abort`` after it then does nothing."""

    async def abort(self) -> None:
        """Drop the upload. Safe to call more than once, and after a failed write."""


class Store(Protocol):
    """A key -> object store with an index of sizes, anchor ends, ETags and access times."""

    async def begin_put(self, key: str, size_hint: int | None) -> PutHandle:
        """Start an upload; ``size_hint`` (Content-Length) lets the store make room early,
        and refuse at once (``StorageFull``) an object that can never fit. Without it, an
        upload may evict objects before it finds out that it does not fit."""

    async def info(self, key: str) -> ObjectInfo:
        """The index entry; raises ``NotFound``. Counts as an access."""

    def read(self, key: str, start: int, end: int, etag: str | None = None) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the object, in pieces of at most the store's piece
        size. Raises ``NotFound`` (before the first piece), or ``PreconditionFailed``
        when ``etag`` is given and the stored object is another version. A read that has
        started finishes on the version it started on, even if the key is replaced or
        deleted meanwhile: the old version's space is freed when its last reader ends, so a
        caller that stops early should close the iterator (``contextlib.aclosing``). Raises
        ``ValueError`` unless ``0 <= start <= end <= size``. Counts as an access."""

    async def delete(self, key: str) -> bool:
        """Remove the object; False when there was none."""

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        """For each key, whether an object is stored under it (not an access)."""

    async def list(self, prefix: str = "", limit: int = 1000) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""

    async def stats(self) -> StoreStats: ...

    async def close(self) -> None:
        """Flush what is pending and release the backend. Idempotent. Uploads not yet
        committed are aborted; reads still running fail with ``StoreError``."""


def check_size_hint(size_hint: int | None) -> None:
    """``begin_put``'s argument check, the same in every backend: ``ValueError`` if negative."""
    if size_hint is not None and size_hint < 0:
        raise ValueError(f"size_hint must be >= 0, got {size_hint}")


def piece_spans(start: int, end: int, piece_size: int) -> Iterator[tuple[int, int, int]]:
    """``(piece number, start, end)`` within each piece that bytes ``[start, end)`` touch:
    how a backend that stores objects in pieces of ``piece_size`` serves a range."""
    if start >= end:
        return
    for n in range(start // piece_size, -(-end // piece_size)):
        base = n * piece_size
        yield n, max(start - base, 0), min(end - base, piece_size)
