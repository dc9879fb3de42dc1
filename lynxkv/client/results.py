"""What the server answers, as Python values: :class:`ObjectMeta`, :class:`PutResult`,
:class:`LookupResult`, and the checked readers that build them.

The readers take a response's JSON body or headers and raise
:class:`~lynxkv.errors.FormatError` for anything missing or mistyped; they do no I/O
beyond reading the body they are handed. :class:`~lynxkv.client.aio.AsyncClient` calls
them from its per-request ``read`` callbacks; :mod:`lynxkv.client.aio` re-exports the
three result types, which are public API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from lynxkv.client.retry import header, header_int
from lynxkv.errors import FormatError

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "LookupResult",
    "ObjectMeta",
    "PutResult",
    "json_field",
    "object_meta",
    "read_json",
    "response_header",
    "response_header_int",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What the server knows of a stored object. ``etag`` is quoted, as HTTP sends it;
    ``last_access`` (Unix time) comes only from :meth:`AsyncClient.list`."""

    key: str
    size: int
    anchor_end: int
    etag: str
    last_access: float | None = None


@dataclass(frozen=True, slots=True)
class PutResult:
    """The stored object; ``created`` is False when it replaced an earlier version."""

    key: str
    size: int
    anchor_end: int
    etag: str
    created: bool


class LookupResult(NamedTuple):
    """``prefix``: how many leading keys are present; ``present``: each key's presence."""

    prefix: int
    present: tuple[bool, ...]


def response_header(resp: aiohttp.ClientResponse, name: str) -> str:
    return header(resp.headers, name, f"{resp.method} {resp.url.path}")


def response_header_int(resp: aiohttp.ClientResponse, name: str) -> int:
    return header_int(resp.headers, name, f"{resp.method} {resp.url.path}")


async def read_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        doc = json.loads(await resp.read())
    except ValueError as exc:
        raise FormatError(f"{resp.method} {resp.url.path}: the answer is not JSON") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{resp.method} {resp.url.path}: the answer is not a JSON object")
    return doc


def json_field(doc: Any, name: str, kind: type[T]) -> T:
    value = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"the server's answer has no valid {name!r}: {str(doc)[:200]}")
    return value


def object_meta(doc: Any) -> ObjectMeta:
    last_access = doc.get("last_access") if isinstance(doc, dict) else None
    return ObjectMeta(
        key=json_field(doc, "key", str),
        size=json_field(doc, "size", int),
        anchor_end=json_field(doc, "anchor_end", int),
        etag=json_field(doc, "etag", str),
        last_access=float(last_access) if isinstance(last_access, int | float) else None,
    )
