"""The one exception hierarchy of lynxkv.

::

    LynxError
    ├── FormatError(ValueError)      a stored object or its bytes are malformed
    │   └── ChecksumError            a section's bytes do not match its checksum
    ├── CodecError(ValueError)       a codec name, parameter or input array is not valid
    └── MissingDependency(ImportError)  an optional extra is not installed

Later layers (server, client) add their own branches here, so that a caller can catch
``LynxError`` for everything lynxkv raises on purpose.
"""

from __future__ import annotations

__all__ = ["ChecksumError", "CodecError", "FormatError", "LynxError", "MissingDependency"]


class LynxError(Exception):
    """Base of every error lynxkv raises on purpose."""


class FormatError(LynxError, ValueError):
    """The bytes of an object are malformed: the message says what and where."""


class ChecksumError(FormatError):
    """A section's stored bytes do not match the checksum in the header."""


class CodecError(LynxError, ValueError):
    """An unknown codec, a bad codec parameter, or an input array the codec cannot take."""


class MissingDependency(LynxError, ImportError):
    """An optional dependency is missing; the message names the command that installs it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'lynxkv[{extra}]'")
        self.package = package
        self.extra = extra
