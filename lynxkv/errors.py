"""The one exception hierarchy of lynxkv.

::

    LynxError
    ├── FormatError(ValueError)          an object's bytes are malformed
    │   └── ChecksumError                a section's bytes do not match their checksum
    ├── CodecError(ValueError)           a codec name, parameter or input array is not valid
    ├── MissingDependency(ImportError)   an optional extra is not installed
    ├── RequestError(ValueError)         a request the server refuses (HTTP 4xx)
    │   ├── BadRequest                   400: malformed JSON, bad parameters
    │   ├── InvalidKey                   400: a key outside [A-Za-z0-9._-]{1,200}
    │   ├── Unauthorized                 401: missing or wrong bearer token
    │   ├── NotFound(KeyError)           404: no object under that key
    │   ├── PreconditionFailed           412: the object changed (ETag mismatch)
    │   ├── TooLarge                     413: over the maximum object size
    │   └── RangeNotSatisfiable          416: no requested range overlaps the object
    ├── StoreError(OSError)              the storage backend failed (HTTP 503)
    │   └── StorageFull                  507: no room even after eviction
    ├── ServerError                      client side: the server answered 5xx (after retries)
    └── TransportError(ConnectionError)  client side: unreachable, or the connection broke
                                         and retries ran out

The server maps each branch to its HTTP status in one middleware (``status`` below).
Third-party errors are translated into these once, where they enter lynxkv.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ChecksumError",
    "CodecError",
    "FormatError",
    "InvalidKey",
    "LynxError",
    "MissingDependency",
    "NotFound",
    "PreconditionFailed",
    "RangeNotSatisfiable",
    "RequestError",
    "ServerError",
    "StorageFull",
    "StoreError",
    "TooLarge",
    "TransportError",
    "Unauthorized",
]


class LynxError(Exception):
    """Base of every error lynxkv raises on purpose."""

    #: HTTP status the server answers with; a short machine-readable code for the JSON body.
    status = 500
    code = "internal"


class FormatError(LynxError, ValueError):
    """The bytes of an object are malformed: the message says what and where."""

    status, code = 400, "bad_object"


class ChecksumError(FormatError):
    """A section's stored bytes do not match the checksum in the header."""

    code = "checksum_mismatch"


class CodecError(LynxError, ValueError):
    """An unknown codec, a bad codec parameter, or an input array the codec cannot take."""

    status, code = 400, "bad_codec"


class MissingDependency(LynxError, ImportError):
    """An optional dependency is missing; the message names the command that installs it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'lynxkv[{extra}]'")
        self.package = package
        self.extra = extra


class RequestError(LynxError, ValueError):
    """A request the server refuses."""

    status, code = 400, "bad_request"


class BadRequest(RequestError):
    """Malformed JSON, a bad parameter or header."""


class InvalidKey(RequestError):
    """A key outside ``[A-Za-z0-9._-]{1,200}``."""

    code = "invalid_key"


class Unauthorized(RequestError):
    """Missing or wrong bearer token."""

    status, code = 401, "unauthorized"


class NotFound(RequestError, KeyError):
    """No object under that key."""

    status, code = 404, "not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class PreconditionFailed(RequestError):
    """The object is not the version the request expected (ETag mismatch)."""

    status, code = 412, "precondition_failed"


class TooLarge(RequestError):
    """The body is over the maximum object size."""

    status, code = 413, "too_large"


class RangeNotSatisfiable(RequestError):
    """No requested range overlaps the object."""

    status, code = 416, "range_not_satisfiable"

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class StoreError(LynxError, OSError):
    """The storage backend failed; the request may succeed later."""

    status, code = 503, "store_unavailable"


class StorageFull(StoreError):
    """No room for the object even after evicting everything that may be evicted."""

    status, code = 507, "storage_full"


class ServerError(LynxError):
    """The server answered with a 5xx status (after the client's retries)."""

    code = "server_error"

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class TransportError(LynxError, ConnectionError):
    """The server could not be reached, or the connection broke and retries ran out."""

    status, code = 503, "transport"
