"""The Python client SDK: async and sync clients, progressive fetch.

:class:`AsyncClient` is the asyncio client, :class:`Client` its blocking wrapper; both
retry transient failures, resume broken reads with ``Range`` and ``If-Range``, and raise
the typed errors of :mod:`lynxkv.errors`. :func:`fetch` loads objects progressively,
anchor first. :class:`TokenBucket` is the receive-side rate limit that emulates a slower
link for benchmarks.

The names load lazily, so that importing a submodule (the CLI's progress bar) does not
pull in aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lynxkv.client.aio import AsyncClient, LookupResult, ObjectMeta, Progress, PutResult
    from lynxkv.client.fetch import FetchHandle, fetch
    from lynxkv.client.ratelimit import TokenBucket
    from lynxkv.client.sync import Client

__all__ = [
    "AsyncClient",
    "Client",
    "FetchHandle",
    "LookupResult",
    "ObjectMeta",
    "Progress",
    "PutResult",
    "TokenBucket",
    "fetch",
]

_HOMES = {
    "AsyncClient": "aio",
    "LookupResult": "aio",
    "ObjectMeta": "aio",
    "Progress": "aio",
    "PutResult": "aio",
    "FetchHandle": "fetch",
    "fetch": "fetch",
    "TokenBucket": "ratelimit",
    "Client": "sync",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lynxkv.client' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"lynxkv.client.{_HOMES[name]}")
    except ImportError as exc:
        from lynxkv.errors import MissingDependency

        raise MissingDependency(exc.name or "aiohttp", "client") from exc
    return getattr(module, name)
