"""What the HTTP API tests share: two valid objects, their size and anchor end, and the
headers every answer that carries an object must have."""

from __future__ import annotations

from typing import Any

from tests.kvstore.conftest import anchor_end, make_object

OBJ = make_object(0)
OTHER = make_object(1)

N = len(OBJ)
A = anchor_end(OBJ)


def object_headers_ok(headers: Any, etag: str, obj: bytes) -> None:
    assert headers["ETag"] == etag
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["X-Lynx-Anchor-End"] == str(anchor_end(obj))
