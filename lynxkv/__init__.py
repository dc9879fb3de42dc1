"""lynxkv: KV-cache storage and progressive (Anchor-first) streaming for LLM inference.

``import lynxkv`` stays light: it imports no torch, cupy, lmdb or aiohttp. The codec
lives in :mod:`lynxkv.codec`; the server, client, GPU kernels and engine connector in
their own subpackages.
"""

from lynxkv.errors import ChecksumError, CodecError, FormatError, LynxError, MissingDependency

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "CodecError",
    "FormatError",
    "LynxError",
    "MissingDependency",
    "__version__",
]
