"""What a request carries (keys, JSON bodies) and where the app keeps its parts."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from lynxkv.errors import BadRequest, InvalidKey, TooLarge
from lynxkv.kvstore.config import ServerConfig
from lynxkv.kvstore.metrics import Metrics
from lynxkv.kvstore.scheduler import AnchorFirst
from lynxkv.kvstore.store import Store

__all__ = [
    "CONFIG",
    "IN_FLIGHT",
    "MAX_JSON_BYTES",
    "MAX_KEYS",
    "METRICS",
    "SCHEDULER",
    "STORE",
    "TOKEN",
    "InFlight",
    "is_prepared",
    "key_list",
    "mark_prepared",
    "read_json",
    "valid_key",
]


class InFlight:
    """The requests a server is handling, so that a shutdown can wait for them to finish
    while their connections are still read (``serve.run_server``)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()


CONFIG = web.AppKey("config", ServerConfig)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
SCHEDULER = web.AppKey("scheduler", AnchorFirst)
TOKEN = web.AppKey("token", str)

_KEY = re.compile(r"[A-Za-z0-9._-]{1,200}")
#: Largest JSON body (lookup and stream requests).
MAX_JSON_BYTES = 4 << 20
#: Most keys one lookup or stream request may name.
MAX_KEYS = 16384


def valid_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise InvalidKey(f"key {key[:64]!r} must match [A-Za-z0-9._-]{{1,200}}")
    return key


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise TooLarge(f"JSON body of {request.content_length} bytes is over {MAX_JSON_BYTES}")
    try:
        body = await request.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def key_list(body: dict[str, Any]) -> list[str]:
    keys = body.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise BadRequest('"keys" must be a list of strings')
    if len(keys) > MAX_KEYS:
        raise BadRequest(f'"keys" names {len(keys)} keys; at most {MAX_KEYS} per request')
    return [valid_key(k) for k in keys]


# aiohttp >= 3.14 wants typed request keys (a str key raises NotAppKeyWarning); older
# versions, which pyproject still allows, have no RequestKey.
_PREPARED: web.RequestKey[bool] | str = (
    web.RequestKey("lynxkv_prepared", bool) if hasattr(web, "RequestKey") else "lynxkv.prepared"
)


def mark_prepared(request: web.Request) -> None:
    """Note that the response's headers are out: an error now cannot become a JSON body."""
    request[_PREPARED] = True


def is_prepared(request: web.Request) -> bool:
    return bool(request.get(_PREPARED))
