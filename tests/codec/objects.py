"""Helpers to take objects apart and put them back with a doctored header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from lynxkv.codec.container import PREAMBLE, checksum


def split(obj: bytes) -> tuple[dict[str, Any], bytes]:
    """The raw header map and the section bytes of a valid object."""
    _, _, header_len, _ = PREAMBLE.unpack_from(obj)
    end = PREAMBLE.size + header_len
    return msgpack.unpackb(obj[PREAMBLE.size : end]), obj[end:]


def rebuild(
    obj: bytes,
    mutate: Callable[[dict[str, Any]], None],
    *,
    shift_offsets: bool = True,
    version: int = 1,
) -> bytes:
    """Apply ``mutate`` to the header map and re-pack with a correct checksum, moving
    the offsets by the change in header length so that only the mutation is wrong."""
    header, body = split(obj)
    old_len = len(msgpack.packb(header))
    mutate(header)
    blob = msgpack.packb(header)
    for _ in range(8):
        delta = len(blob) - old_len if shift_offsets else 0
        fixed = dict(header)
        if delta and isinstance(header.get("sections"), list):
            fixed["sections"] = [
                [*s[:3], s[3] + delta, *s[4:]] if isinstance(s, list) and len(s) > 3 else s
                for s in header["sections"]
            ]
            for key in ("anchor_end", "total"):
                if isinstance(header.get(key), int):
                    fixed[key] = header[key] + delta
        new = msgpack.packb(fixed)
        if len(new) == len(blob):
            blob = new
            break
        blob = new
    out: bytes = PREAMBLE.pack(b"LYNXKV", version, len(blob), checksum(blob)) + blob + body
    return out
