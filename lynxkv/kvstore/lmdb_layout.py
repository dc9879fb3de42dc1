"""How ``LmdbStore`` lays objects out in LMDB, the synchronous transactions on them, and the
store's tuning (``LmdbOptions``).

One environment in the data directory, with three named sub-databases:

- ``index``: key (UTF-8) -> msgpack map ``{v: version id, s: size, a: anchor_end,
  p: piece size, n: piece count, t: last access}``. The ETag is the version id in hex.
- ``data``: version id (16 random bytes) + piece number (u32, big-endian so that a version's
  pieces sit together and in order) -> piece bytes.
- ``meta``: ``format`` -> the layout version.

Each ``LmdbEnv`` method runs on an executor thread and owns one transaction; nothing here
knows about asyncio but ``run_in``, which translates LMDB's errors where they enter lynxkv.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgpack

from lynxkv.errors import StorageFull, StoreError
from lynxkv.kvstore.store import ObjectInfo

__all__ = [
    "MIB",
    "VID_LEN",
    "IndexEntry",
    "LmdbEnv",
    "LmdbOptions",
    "MapFull",
    "Piece",
    "etag_of",
    "lock_dir",
    "map_size_for",
    "run_in",
    "split_pieces",
]

_T = TypeVar("_T")

MIB = 1 << 20
VID_LEN = 16
_FORMAT = b"1"
_PAGE = 4096  # LMDB's page is the OS page: 4 KiB on the platforms we run on
_OVERFLOW_HEADER = 16  # a value too big for a leaf page gets its own pages behind this header

#: (key in ``data``, piece bytes)
Piece = tuple[bytes, bytes | memoryview]


@dataclass(frozen=True)
class LmdbOptions:
    """Tuning of an ``LmdbStore``; the defaults suit objects of a few MiB."""

    #: Objects are stored in pieces of this many bytes; a read yields one piece at a time.
    piece_size: int = 1 * MIB
    #: An upload buffers this much before one write transaction (one fsync) stores it.
    write_batch: int = 4 * MIB
    #: Threads that run reads; writes run on one thread of their own (LMDB has one writer).
    #: One: more threads contend with the event loop for the GIL (bench/server.py measured
    #: 16 connections at 2.00 GB/s with 4 threads, 2.47 with 1).
    read_threads: int = 1
    #: The LMDB map size in bytes; None derives it from max_bytes (``map_size_for``).
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


def map_size_for(max_bytes: int, piece_size: int) -> int:
    """The LMDB map size for ``max_bytes`` of object data kept in ``piece_size`` pieces.

    ``pages = ceil(max_bytes / piece_size) * ceil((piece_size + 16) / 4096)`` counts the
    overflow pages of full pieces; ``map = pages * 4096 * 1.5 + 64 MiB``, rounded up to 1 MiB.
    The half again covers B-tree pages (index entries, piece keys), the free list, pages freed
    while an older read snapshot is open, and fragmentation (a piece needs a run of contiguous
    free pages); 64 MiB covers small stores. The map is address space, not disk: the file grows
    as pages are used. Should many tiny objects outgrow it anyway, writes evict and retry.
    """
    pages = -(-max_bytes // piece_size) * -(-(piece_size + _OVERFLOW_HEADER) // _PAGE)
    return -(-(pages * _PAGE * 3 // 2 + 64 * MIB) // MIB) * MIB


def etag_of(vid: bytes) -> str:
    return f'"{vid.hex()}"'


def _piece_key(vid: bytes, n: int) -> bytes:
    return vid + n.to_bytes(4, "big")


def split_pieces(vid: bytes, first: int, body: memoryview, piece_size: int) -> list[Piece]:
    """``body`` as pieces ``first``, ``first + 1``, ... of version ``vid`` (views, no copies)."""
    offsets = range(0, len(body), piece_size)
    return [(_piece_key(vid, first + i), body[o : o + piece_size]) for i, o in enumerate(offsets)]


@dataclass(slots=True)
class IndexEntry:
    """One committed object; the store keeps them in memory, mutating only ``last_access``."""

    vid: bytes
    size: int
    anchor_end: int
    piece_size: int
    last_access: float

    def pack(self) -> bytes:
        pieces = -(-self.size // self.piece_size)
        fields = {"v": self.vid, "s": self.size, "a": self.anchor_end, "p": self.piece_size}
        packed: bytes = msgpack.packb({**fields, "n": pieces, "t": self.last_access})
        return packed

    @classmethod
    def unpack(cls, key: bytes, raw: bytes) -> IndexEntry:
        try:
            f = msgpack.unpackb(raw)
            return cls(bytes(f["v"]), int(f["s"]), int(f["a"]), int(f["p"]), float(f["t"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"index entry of {key!r} is damaged: {exc}") from exc

    def info(self, key: str) -> ObjectInfo:
        return ObjectInfo(key, self.size, self.anchor_end, etag_of(self.vid), self.last_access)


def _delete_run(cur: lmdb.Cursor[bytes], vid: bytes) -> None:
    """Delete the pieces of ``vid`` from the cursor's position on."""
    while cur.key()[:VID_LEN] == vid and cur.delete():
        pass


class LmdbEnv:
    """The environment and its sub-databases; one transaction per method call."""

    def __init__(self, path: Path, map_size: int, read_threads: int) -> None:
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=3, max_spare_txns=read_threads)
        try:
            self.index = self.env.open_db(b"index")
            self.data = self.env.open_db(b"data")
            self.meta = self.env.open_db(b"meta")
        except lmdb.Error:
            self.env.close()
            raise

    def recover(self) -> tuple[list[tuple[str, IndexEntry]], int]:
        """Check the layout version and delete the pieces of versions no entry references
        (uploads a crash interrupted); returns the index and how many versions went."""
        with self.env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self.meta)
            if fmt not in (None, _FORMAT):
                raise StoreError(f"unknown data layout {fmt!r} in {self.env.path()}")
            txn.put(b"format", _FORMAT, db=self.meta)
            index = [(k.decode(), IndexEntry.unpack(k, v)) for k, v in txn.cursor(db=self.index)]
            live = {entry.vid for _, entry in index}
            orphans = 0
            cur = txn.cursor(db=self.data)
            found = cur.first()
            while found:
                vid = cur.key()[:VID_LEN]
                if vid in live:
                    found = cur.set_range(vid + b"\xff" * 5)  # past its last piece
                else:
                    orphans += 1
                    _delete_run(cur, vid)
                    found = bool(cur.key())
        return index, orphans

    def put(self, pieces: Sequence[Piece], entries: Sequence[tuple[bytes, bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            for key, value in pieces:
                txn.put(key, value, db=self.data)
            for key, value in entries:
                txn.put(key, value, db=self.index)

    def drop(self, keys: Sequence[bytes], vids: Sequence[bytes]) -> None:
        """Delete index entries and every piece of the given versions."""
        with self.env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key, db=self.index)
            cur = txn.cursor(db=self.data)
            for vid in vids:
                if cur.set_range(vid):
                    _delete_run(cur, vid)

    def read(self, vid: bytes, n: int, start: int, end: int) -> bytes:
        with self.env.begin(db=self.data, buffers=True) as txn:
            piece = txn.get(_piece_key(vid, n))
            if piece is None:
                raise StoreError(f"piece {n} of version {vid.hex()} is missing")
            return bytes(piece[start:end])  # one copy, out of the map before the txn ends

    def keys(self, prefix: bytes, limit: int) -> list[str]:
        found: list[str] = []
        with self.env.begin(db=self.index) as txn:
            cur = txn.cursor()
            if limit and cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix) or len(found) == limit:
                        break
                    found.append(key.decode())
        return found


class MapFull(StorageFull):
    """LMDB's map is full; writers evict and retry. Should it escape, it is a 507."""


async def run_in(pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` on ``pool``, with LMDB's errors translated."""
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    except lmdb.MapFullError as exc:
        raise MapFull(f"the LMDB map is full: {exc}") from exc
    except lmdb.Error as exc:
        raise StoreError(f"LMDB failed: {exc}") from exc


def lock_dir(root: Path) -> int:
    """Lock the data directory for this process: the index mirror and the space accounting
    live in the store's memory, so a second process on the same directory would corrupt both."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / "lynxkv.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot use data directory {root}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StoreError(f"{root} is in use by another lynxkv store") from exc
    return fd
