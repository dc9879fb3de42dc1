"""What a failed request means: which failures are retried, after how long, how a read
resumes, and which typed error (:mod:`lynxkv.errors`) each failure becomes.

aiohttp's and asyncio's exceptions are translated here and only here. Transient failures
(the connection could not be made or broke, a read timed out, the server answered 502,
503 or 504) are retried with exponential backoff and jitter; everything else is final. An
error response becomes the error class its JSON ``error`` code and status name
(docs/http-api.md, "Errors").

A read resumes from its first missing byte (:class:`Resume`): ``Range`` asks for the
rest, ``If-Range`` with the first response's ETag makes sure the rest is from the same
version (RFC 9110 13.1.5), and each 206's ``Content-Range`` is checked against the ask.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Self

import aiohttp

from lynxkv.errors import (
    BadRequest,
    ChecksumError,
    FormatError,
    InvalidKey,
    LynxError,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    RequestError,
    ServerError,
    StorageFull,
    TooLarge,
    TransportError,
    Unauthorized,
)
from lynxkv.kvstore.ranges import format_range, parse_content_range

__all__ = [
    "FAILURES",
    "RETRY_STATUSES",
    "TRANSIENT",
    "Attempts",
    "Resume",
    "RetryPolicy",
    "Truncated",
    "error_for",
    "header",
    "header_int",
    "read_error",
    "transport_error",
]

#: Statuses that say "try again": a gateway could not reach the server, or the store failed.
RETRY_STATUSES = frozenset({502, 503, 504})


class Truncated(Exception):
    """A body ended before the length its response announced (raised and caught inside the
    client; it leaves as :class:`TransportError`)."""


#: Failures worth another attempt: the connection failed or broke, or a read timed out.
#: (aiohttp's own timeouts subclass asyncio.TimeoutError, which is TimeoutError.) A TLS
#: failure, though a connection error to aiohttp, is not retried: it would fail again.
TRANSIENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    TimeoutError,
    Truncated,
)

#: Everything :meth:`Attempts.failed` knows how to judge.
FAILURES: tuple[type[BaseException], ...] = (ServerError, aiohttp.ClientError, *TRANSIENT)

# Derived from the error classes' own ``code`` and ``status``, which the server's error
# middleware answers with: one source of truth for both ends.
_BY_CODE: Mapping[str, Callable[[str], LynxError]] = {
    cls.code: cls for cls in (BadRequest, InvalidKey, FormatError, ChecksumError)
}
_BY_STATUS: Mapping[int, Callable[[str], LynxError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthorized, NotFound, PreconditionFailed, TooLarge, StorageFull)
}


def error_for(status: int, code: str | None, message: str, size: int | None = None) -> LynxError:
    """The typed error for an error response: ``status``, the JSON ``error`` code (None if
    the body had none) and message; ``size`` is a 416's complete length (-1 if unknown)."""
    if status == 416:
        return RangeNotSatisfiable(message, size if size is not None else -1)
    if status == 400 and code is not None and code in _BY_CODE:
        return _BY_CODE[code](message)
    if status in _BY_STATUS:
        return _BY_STATUS[status](message)
    if status >= 500:
        return ServerError(message, status)
    return RequestError(message)


async def read_error(resp: aiohttp.ClientResponse) -> LynxError:
    """Read an error response's body and return (not raise) its typed error."""
    body = await resp.read()
    code, message = _error_body(body)
    if message is None:
        message = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
    size = None
    unsatisfied = resp.headers.get("Content-Range", "")
    if unsatisfied.startswith("bytes */") and unsatisfied[8:].isdigit():
        size = int(unsatisfied[8:])
    return error_for(resp.status, code, f"{resp.method} {resp.url.path}: {message}", size)


def _error_body(body: bytes) -> tuple[str | None, str | None]:
    """(code, message) of a ``{"error", "message"}`` body; Nones where it is not one (a
    proxy's HTML page, a HEAD answer)."""
    try:
        parsed = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both derive from it
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    code, message = parsed.get("error"), parsed.get("message")
    return (
        code if isinstance(code, str) else None,
        message if isinstance(message, str) else None,
    )


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more attempts after the first; waits grow from ``backoff`` seconds."""

    retries: int = 4
    backoff: float = 0.2
    #: No single wait is longer than this.
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0; got {self.retries}")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ValueError(f"backoff must be in [0, {self.max_backoff}]; got {self.backoff}")

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after ``failures`` consecutive failures (>= 1): exponential, with
        "equal jitter" (half fixed, half random) so that clients cut off together do not
        come back together."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        return ceiling / 2 + rand() * ceiling / 2


@dataclass
class Attempts:
    """The consecutive failures of one operation (``what``, for messages)."""

    policy: RetryPolicy
    what: str
    #: False for a request that cannot be repeated (a one-shot upload body).
    enabled: bool = True
    failures: int = field(default=0, init=False)
    #: Whether a try may have reached the server without its answer reaching us.
    uncertain: bool = field(default=False, init=False)

    def progressed(self) -> None:
        """The operation moved forward (bytes arrived): earlier failures are forgiven, so a
        connection that keeps breaking still finishes as long as each try gets further."""
        self.failures = 0

    async def failed(self, exc: BaseException) -> None:
        """Wait before the next attempt; or raise the final, typed error when ``exc`` is not
        transient or the retries are spent. Call it from an ``except FAILURES`` clause."""
        self.failures += 1
        final = not self.enabled or self.failures > self.policy.retries
        if isinstance(exc, ServerError):
            if final or exc.status not in RETRY_STATUSES:
                raise exc
        elif final or not isinstance(exc, TRANSIENT) or isinstance(exc, aiohttp.ClientSSLError):
            tries = f" (tried {self.failures} times)" if self.failures > 1 else ""
            raise transport_error(self.what + tries, exc) from exc
        else:
            self.uncertain = True
        await asyncio.sleep(self.policy.delay(self.failures))


def transport_error(what: str, exc: BaseException) -> TransportError:
    """The :class:`TransportError` for a connection-level failure ``exc`` of ``what``; the
    caller raises it ``from exc``."""
    text = str(exc)
    cause = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return TransportError(f"{what}: {cause}")


# -- resuming reads ---------------------------------------------------------------------------

_PARTS = ("anchor", "residual", "all")


@dataclass
class Resume:
    """Where a resumable read of bytes ``[position, end)`` of ``key`` stands.

    ``end`` and ``etag`` come from the first response when the caller did not know them;
    ``part`` (the ``?part=`` shortcut) is asked for by the first request only, after which
    the span it resolved to is known. The reader advances ``position`` as bytes arrive.
    """

    key: str
    position: int
    end: int | None = None
    etag: str | None = None
    part: str | None = None

    @classmethod
    def new(
        cls,
        key: str,
        start: int = 0,
        end: int | None = None,
        *,
        etag: str | None = None,
        part: str | None = None,
    ) -> Self:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        if part is not None and part not in _PARTS:
            raise ValueError(f"part must be one of {', '.join(_PARTS)}; got {part!r}")
        return cls(key, start, end, etag, part)

    @property
    def done(self) -> bool:
        return self.end is not None and self.position >= self.end

    def request(self) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and query of the next GET."""
        if self.part is not None:
            return {}, {"part": self.part}
        if self.position == 0 and self.end is None and self.etag is None:
            return {}, {}
        if self.end is None:
            headers = {"Range": f"bytes={self.position}-"}
        else:
            headers = {"Range": format_range([(self.position, self.end)])}
        if self.etag is not None:
            headers["If-Range"] = self.etag
        return headers, {}

    def accept(self, status: int, headers: Mapping[str, str]) -> None:
        """Check a 200 or 206 answer to :meth:`request`; learn ``end`` and ``etag``.

        A 200 to a request with ``If-Range`` means the object is no longer the version the
        read started on (RFC 9110 13.1.5): :class:`PreconditionFailed`, never a splice."""
        etag = header(headers, "ETag", f"GET {self.key}")
        if status == 200:
            self._accept_whole(etag, headers)
        elif status == 206:
            self._accept_partial(headers)
        else:
            raise FormatError(f"GET {self.key}: unexpected status {status}")
        if self.etag is not None and etag != self.etag:
            raise PreconditionFailed(f"{self.key} is {etag}, not the version {self.etag} asked for")
        self.etag, self.part = etag, None

    def _accept_whole(self, etag: str, headers: Mapping[str, str]) -> None:
        asked, _ = self.request()
        if "If-Range" in asked:
            raise PreconditionFailed(
                f"{self.key} was replaced (now {etag}, was {self.etag}) while reading it"
                f" at byte {self.position}: not splicing two versions"
            )
        if "Range" in asked:
            raise FormatError(f"GET {self.key}: the server ignored the Range header")
        self.end = header_int(headers, "Content-Length", f"GET {self.key}")

    def _accept_partial(self, headers: Mapping[str, str]) -> None:
        got, size = parse_content_range(header(headers, "Content-Range", f"GET {self.key}"))
        if self.part is not None:  # the server resolved the part: that is the span now
            self.position, self.end = got.start, got.end
        if self.end is None:
            expected = got.end if size is None else size
        else:  # a last-pos beyond the end is clamped to it (RFC 9110 14.1.2)
            expected = self.end if size is None else min(self.end, size)
        if got.start != self.position or got.end != expected:
            raise FormatError(
                f"GET {self.key}: asked for bytes [{self.position}, {self.end}),"
                f" got [{got.start}, {got.end}) of {size}"
            )
        self.end = got.end


def header(headers: Mapping[str, str], name: str, what: str) -> str:
    """A response header that must be there; ``what`` names the request for the message."""
    value = headers.get(name)
    if value is None:
        raise FormatError(f"{what}: no {name} header in the answer")
    return value


def header_int(headers: Mapping[str, str], name: str, what: str) -> int:
    value = header(headers, name, what)
    if not (value.isascii() and value.isdigit()):
        raise FormatError(f"{what}: bad {name} header {value[:40]!r}")
    return int(value)
