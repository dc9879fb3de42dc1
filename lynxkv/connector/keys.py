"""Chained chunk keys: the name of each stored chunk of a token sequence.

Key ``i`` is a BLAKE2b-256 hash over (key format version, model fingerprint, codec
parameters, tensor-parallel rank, key ``i - 1``, the chunk's token ids), hex-encoded. A
key therefore names the whole prefix that ends with its chunk, and a lookup of the keys
of a sequence answers "how many leading chunks are cached". Every input is encoded
canonically (length-prefixed fields, codec parameters as sorted JSON, token ids as
little-endian int64), so keys are the same in every process, host and restart; Python's
``hash()`` is never involved.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from lynxkv.codec.spec import CodecSpec, get_codec

__all__ = ["KEY_PATTERN", "KEY_VERSION", "ChunkKeys", "chunk_keys", "codec_identity"]

#: Bump when anything that goes into a key changes meaning: old keys then simply miss.
KEY_VERSION = 1
#: What the server accepts as a key (docs/http-api.md); ours are 64 hex digits.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,200}")

_DOMAIN = b"lynxkv-chunk-key"
_MAX_TOKEN = 2**63 - 1


def codec_identity(codec: CodecSpec | str) -> str:
    """The codec's parameters as canonical JSON (sorted keys, no spaces)."""
    spec = get_codec(codec) if isinstance(codec, str) else codec
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _field(data: bytes) -> bytes:
    # length-prefixed, so that no two field lists encode to the same bytes
    return struct.pack("<Q", len(data)) + data


def _token_bytes(tokens: Sequence[int]) -> bytes:
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _MAX_TOKEN:
            raise ValueError(f"token ids must be non-negative integers, got {t!r}")
    return struct.pack(f"<{len(tokens)}q", *tokens)


@dataclass(frozen=True)
class ChunkKeys:
    """What names the chunks of one model, codec and rank; :meth:`keys` makes the keys."""

    fingerprint: str
    codec: CodecSpec
    chunk_tokens: int = 256
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if not self.fingerprint:
            raise ValueError("the model fingerprint must not be empty")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.tp_rank < 0:
            raise ValueError(f"tp_rank must be non-negative, got {self.tp_rank}")

    def _fixed(self) -> bytes:
        return b"".join(
            _field(part)
            for part in (
                _DOMAIN,
                str(KEY_VERSION).encode(),
                self.fingerprint.encode("utf-8"),
                codec_identity(self.codec).encode("utf-8"),
                str(self.tp_rank).encode(),
            )
        )

    def next_key(self, previous: str, tokens: Sequence[int]) -> str:
        """The key of a chunk of ``tokens`` that follows the chunk keyed ``previous``
        (``""`` for the first chunk)."""
        h = hashlib.blake2b(digest_size=32)
        h.update(self._fixed())
        h.update(_field(previous.encode("ascii")))
        h.update(_field(_token_bytes(tokens)))
        return h.hexdigest()

    def keys(self, token_ids: Sequence[int]) -> list[str]:
        """The keys of the full chunks of ``token_ids`` (a partial last chunk has none)."""
        ids = list(token_ids)
        c = self.chunk_tokens
        out: list[str] = []
        previous = ""
        for start in range(0, len(ids) - c + 1, c):
            previous = self.next_key(previous, ids[start : start + c])
            out.append(previous)
        return out


def chunk_keys(
    token_ids: Sequence[int],
    chunk_tokens: int = 256,
    *,
    fingerprint: str,
    codec: CodecSpec | str,
    tp_rank: int = 0,
) -> list[str]:
    """The chained keys of the full chunks of ``token_ids``; see :class:`ChunkKeys`."""
    spec = get_codec(codec) if isinstance(codec, str) else codec
    return ChunkKeys(fingerprint, spec, chunk_tokens, tp_rank).keys(token_ids)
