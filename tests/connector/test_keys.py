"""Chained chunk keys: stable across processes, sensitive to every input, prefix-closed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lynxkv.codec import get_codec
from lynxkv.connector.keys import KEY_PATTERN, ChunkKeys, chunk_keys

REPO = Path(__file__).resolve().parents[2]
FP = "f" * 64
IDS = [(i * 7919) % 49152 for i in range(1100)]


def test_known_answer() -> None:
    # Pinned: a change here orphans every stored cache, so it must be deliberate
    # (bump KEY_VERSION).
    assert chunk_keys(list(range(4)), 2, fingerprint="model", codec="raw", tp_rank=1) == [
        "9a41f1b3799a5a9a7e56664c501d77e906a1e416b18bf0564ff2ec7a1cfa9386",
        "c1021f0bb589248840f6c9c0eb48adb7c81aa4524a63e7d9063579fc8d522ef2",
    ]


def test_identical_in_another_process() -> None:
    code = (
        "import json, sys; from lynxkv.connector.keys import chunk_keys; "
        "ids = json.loads(sys.stdin.read()); "
        f"print(json.dumps(chunk_keys(ids, fingerprint={FP!r}, codec='lynx-a4')))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(IDS),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(out.stdout) == chunk_keys(IDS, fingerprint=FP, codec="lynx-a4")


def test_full_chunks_only_and_server_safe() -> None:
    keys = chunk_keys(IDS, fingerprint=FP, codec="lynx-a4")
    assert len(keys) == len(IDS) // 256 == 4
    assert len(set(keys)) == 4
    assert all(KEY_PATTERN.fullmatch(k) and len(k) == 64 for k in keys)
    assert chunk_keys(IDS[:255], fingerprint=FP, codec="lynx-a4") == []


def test_prefix_property() -> None:
    keys = chunk_keys(IDS, fingerprint=FP, codec="lynx-a4")
    for n in (256, 300, 512, 767, 768):
        assert chunk_keys(IDS[:n], fingerprint=FP, codec="lynx-a4") == keys[: n // 256]
    # a different token in chunk 1 keeps key 0 and changes every later key
    changed = [*IDS[:300], IDS[300] + 1, *IDS[301:]]
    other = chunk_keys(changed, fingerprint=FP, codec="lynx-a4")
    assert other[0] == keys[0]
    assert all(a != b for a, b in zip(other[1:], keys[1:], strict=True))


def test_every_input_changes_the_keys() -> None:
    base = ChunkKeys(FP, get_codec("lynx-a4"))
    ref = base.keys(IDS)
    variants = [
        dataclasses.replace(base, fingerprint="e" * 64),
        dataclasses.replace(base, codec=get_codec("uniform-a4")),
        dataclasses.replace(base, codec=dataclasses.replace(get_codec("lynx-a4"), alpha_k=0.06)),
        dataclasses.replace(base, tp_rank=1),
    ]
    for variant in variants:
        assert set(variant.keys(IDS)).isdisjoint(ref), variant
    # int64 token bytes: ids past 2**32 are not aliased onto small ones
    big = [t + 2**32 for t in IDS]
    assert set(base.keys(big)).isdisjoint(ref)
    assert base.keys(IDS[:512])[1] != base.next_key("", IDS[256:512])  # the chain matters


@pytest.mark.parametrize("bad", [[-1], [1.5], [True], [2**63]])
def test_bad_token_ids(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        ChunkKeys(FP, get_codec("raw"), chunk_tokens=1).keys(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fingerprint": ""}, "fingerprint"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"tp_rank": -1}, "tp_rank"),
    ],
)
def test_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"fingerprint": FP, "codec": get_codec("raw"), **kwargs}
    with pytest.raises(ValueError, match=message):
        ChunkKeys(**settings)  # type: ignore[arg-type]
