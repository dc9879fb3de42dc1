"""How ``RedisClusterStore`` lays objects out in a Redis Cluster: its options, key names,
the manifest, and the Lua scripts that switch versions. Pure: nothing here talks to Redis.

Per object ``key``, under the store's namespace ``ns``, every name carries the hash tag
``{key}`` so that all of an object lives on one slot and one script can change it atomically:

- ``ns:{key}:m``, the manifest, a hash: ``v`` version id (hex, also the ETag), ``s`` size,
  ``a`` anchor_end, ``p`` piece size, ``n`` piece count, ``t`` last access (Unix time).
- ``ns:{key}:d:<version>``, the data of one version, a hash: field ``"<n>"`` holds piece
  ``n`` (``p`` bytes, the last one shorter).

One hash per version rather than one key per piece: Redis evicts, expires and deletes a
version whole, so LRU pressure frees whole objects instead of leaving holes in them (an
anchor-only reader would keep the anchor pieces warm while the residual pieces aged out),
and a commit persists one key rather than one per piece. A range read still fetches only
the pieces it needs, with one ``HGET`` each.

Versions: an upload writes its pieces into a fresh data hash that expires unless committed;
the commit script checks that every piece is there with its exact length, persists the
data, rewrites the manifest, and retires the version it replaces (expires it after a grace
period that lets reads in flight finish, or unlinks it at once). Every script names the keys
it touches; a script that finds the manifest at another version than the caller expected
changes nothing and says which version it found, and the caller tries again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lynxkv.kvstore.store import ObjectInfo

__all__ = [
    "ABORT",
    "COMMIT",
    "DELETE",
    "DROP",
    "TOUCH",
    "Manifest",
    "RedisOptions",
    "data_key",
    "etag_of",
    "key_of_manifest",
    "manifest_key",
    "manifest_pattern",
]

MIB = 1 << 20
#: Redis refuses a single value over ``proto-max-bulk-len`` (512 MB by default).
MAX_PIECE = 512 * MIB
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)


@dataclass(frozen=True)
class RedisOptions:
    """Tuning of a ``RedisClusterStore``. Each may also be given in the store URL's query
    (``redis-cluster://h:6379?replicas=0&piece_size=4MiB``)."""

    #: Namespace of every key (``<prefix>:{<key>}:...``): deployments or tests that share a
    #: cluster keep apart by prefix.
    prefix: str = "lynxkv"
    #: Objects are stored in pieces of this many bytes; a range read fetches the pieces it
    #: overlaps, and a read yields one piece at a time.
    piece_size: int = 1 * MIB
    #: After each commit, ``WAIT`` until this many replicas of the key's master hold it; a
    #: PUT that gets fewer acknowledgements within ``wait_ms`` fails with a StoreError (503).
    #: 0 skips the wait (a cluster without replicas; a master's loss may lose acked PUTs).
    replicas: int = 1
    #: How long a commit waits for its replicas, in milliseconds.
    wait_ms: int = 1000
    #: A replaced or deleted version stays readable this long for reads already on it;
    #: 0 unlinks it at once (a read still on it then fails mid-body).
    retire_grace_s: float = 60.0
    #: An upload's pieces expire this long after its last write unless it commits, so that
    #: a server that dies mid-upload leaves nothing behind for good.
    upload_ttl_s: float = 600.0
    #: ``stats`` scans every master's manifests (cost grows with the object count); its
    #: answer is reused for this long. 0: scan on every call.
    stats_cache_s: float = 10.0
    #: Access times reach Redis within this many seconds, in one batch, and on close.
    access_flush_s: float = 5.0
    #: Seconds a command may take (a ``WAIT`` included) before its node counts as down.
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _NAMESPACE.fullmatch(self.prefix):
            raise ValueError(f"prefix must match [A-Za-z0-9._-]{{1,64}}; got {self.prefix!r}")
        _check_int("piece_size", self.piece_size, 1024, MAX_PIECE)
        _check_int("replicas", self.replicas, 0, 16)
        _check_int("wait_ms", self.wait_ms, 1, 3_600_000)
        for name in ("retire_grace_s", "stats_cache_s", "access_flush_s"):
            _check_seconds(name, getattr(self, name), 0.0)
        _check_seconds("upload_ttl_s", self.upload_ttl_s, 1.0)
        _check_seconds("timeout_s", self.timeout_s, 0.1)
        if self.replicas and self.timeout_s * 1000 <= self.wait_ms:
            raise ValueError(
                f"timeout_s ({self.timeout_s} s) must exceed wait_ms ({self.wait_ms} ms):"
                " a WAIT must end before its connection times out"
            )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def _check_seconds(name: str, value: object, low: float) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not low <= value <= 86400 * 365:  # type: ignore[operator]
        raise ValueError(f"{name} must be a number of seconds >= {low}; got {value!r}")


# -- names -----------------------------------------------------------------------------------


def manifest_key(ns: str, key: str) -> str:
    return f"{ns}:{{{key}}}:m"


def data_key(ns: str, key: str, vid: str) -> str:
    return f"{ns}:{{{key}}}:d:{vid}"


def manifest_pattern(ns: str, key_prefix: str) -> str:
    """A SCAN pattern for the manifests of keys starting with ``key_prefix``. Keys and
    namespaces hold no glob characters (``*?[]\\``) nor ``:``, so nothing else matches."""
    return f"{ns}:{{{key_prefix}*}}:m"


def key_of_manifest(ns: str, name: bytes) -> str:
    """The object key in a manifest's name (one ``manifest_pattern`` matched)."""
    text = name.decode()
    start = len(ns) + 2
    assert text.startswith(f"{ns}:{{") and text.endswith("}:m"), text
    return text[start:-3]


def etag_of(vid: str) -> str:
    return f'"{vid}"'


# -- the manifest ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A committed version, as its manifest hash holds it."""

    vid: str
    size: int
    anchor_end: int
    piece_size: int
    pieces: int
    last_access: float

    @classmethod
    def parse(cls, fields: Mapping[bytes, bytes]) -> Manifest | None:
        """The manifest in an ``HGETALL`` answer; None when there is none, or when it is not
        one this store wrote (then it is treated as missing)."""
        try:
            manifest = cls(
                fields[b"v"].decode("ascii"),
                int(fields[b"s"]),
                int(fields[b"a"]),
                int(fields[b"p"]),
                int(fields[b"n"]),
                float(fields[b"t"]),
            )
        except (KeyError, ValueError):
            return None
        return manifest if manifest.consistent() else None

    def consistent(self) -> bool:
        return (
            0 <= self.anchor_end <= self.size
            and self.piece_size > 0
            and self.pieces == -(-self.size // self.piece_size)
        )

    def piece_length(self, n: int) -> int:
        return min(self.piece_size, self.size - n * self.piece_size)

    def info(self, key: str, last_access: float | None = None) -> ObjectInfo:
        when = self.last_access if last_access is None else last_access
        return ObjectInfo(key, self.size, self.anchor_end, etag_of(self.vid), when)


# -- scripts ---------------------------------------------------------------------------------
# Redis runs a script atomically on the slot's master and replicates its effects in order,
# after the pieces written before it: a replica that has a manifest has all of its pieces.

_RETIRE = """
local function retire(name, grace_ms)
  if tonumber(grace_ms) > 0 then redis.call('PEXPIRE', name, grace_ms)
  else redis.call('UNLINK', name) end
end
"""

#: KEYS: manifest, new data, data of the expected current version (the manifest when none).
#: ARGV: expected current vid ('' for none), vid, size, anchor_end, piece size, piece count,
#: now, grace_ms. Returns {'ok', replaced vid or ''}, {'done', ''} (a retried commit that
#: had taken effect), {'moved', current vid}, or {'lost', ''} (pieces missing: expired,
#: evicted, or not on the master that took over).
COMMIT = (
    _RETIRE
    + """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur == ARGV[2] then return {'done', ''} end
if (cur or '') ~= ARGV[1] then return {'moved', cur or ''} end
local size, piece, n = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('HLEN', KEYS[2]) ~= n then return {'lost', ''} end
for i = 0, n - 1 do
  if redis.call('HSTRLEN', KEYS[2], i) ~= math.min(piece, size - i * piece) then
    return {'lost', ''}
  end
end
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 's', ARGV[3], 'a', ARGV[4], 'p', ARGV[5],
           'n', ARGV[6], 't', ARGV[7])
if cur then retire(KEYS[3], ARGV[8]) end
return {'ok', cur or ''}
"""
)

#: KEYS: manifest, data of the expected version. ARGV: expected vid, grace_ms.
#: Returns {1, ''} deleted, {0, ''} no object, {-1, current vid} another version.
DELETE = (
    _RETIRE
    + """
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur then return {0, ''} end
if cur ~= ARGV[1] then return {-1, cur} end
redis.call('DEL', KEYS[1])
retire(KEYS[2], ARGV[2])
return {1, ''}
"""
)

#: A version found broken (a piece missing or of the wrong length): unlink its data, and
#: its manifest if that still names it. KEYS: manifest, data. ARGV: vid. Returns 1 when the
#: manifest went too (0: the key had moved on to another version meanwhile).
DROP = """
local named = redis.call('HGET', KEYS[1], 'v') == ARGV[1]
if named then redis.call('DEL', KEYS[1]) end
redis.call('UNLINK', KEYS[2])
return named and 1 or 0
"""

#: An upload given up: unlink its data unless the manifest names it (its commit took
#: effect after all). KEYS: manifest, data. ARGV: vid. Returns 1 when unlinked.
ABORT = """
if redis.call('HGET', KEYS[1], 'v') == ARGV[1] then return 0 end
redis.call('UNLINK', KEYS[2])
return 1
"""

#: Record an access unless the key moved to another version meanwhile (an HSET alone would
#: recreate a deleted manifest with only ``t`` in it). KEYS: manifest. ARGV: vid, time.
TOUCH = """
if redis.call('HGET', KEYS[1], 'v') == ARGV[1] then redis.call('HSET', KEYS[1], 't', ARGV[2]) end
return 1
"""
