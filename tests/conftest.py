"""Session fixtures shared by the whole suite: the real model and its KV cache; and
``running_server``, a real server in a thread for the synchronous engine tests."""

from __future__ import annotations

import os

# Before transformers is imported anywhere: the model comes from the installed wheel,
# and a test must never reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lynxkv.connector.model import LoadedModel, load_model, prefill_kv
from lynxkv.connector.texts import make_document
from lynxkv.errors import MissingDependency


def model_or_skip(dtype: str) -> LoadedModel:
    """SmolLM2-135M-Instruct in ``dtype`` on the CPU; skips where the engine extra is missing."""
    try:
        return load_model(dtype=dtype, device="cpu")
    except MissingDependency as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """SmolLM2-135M-Instruct in bf16 on the CPU; skips where the engine extra is missing."""
    return model_or_skip("bfloat16")


@pytest.fixture(scope="session")
def real_kv(smollm: LoadedModel) -> list[tuple[Any, Any]]:
    """The real KV cache of a generated 300-token report: 30 layers of [300, 3, 64] bf16."""
    tok = smollm.tokenizer
    doc = make_document(seed=3, tokens=300, count_tokens=lambda s: len(tok(s).input_ids))
    return prefill_kv(smollm.model, tok(doc.text).input_ids[:300])


@contextlib.contextmanager
def running_server(data_dir: Path) -> Iterator[str]:
    """``live_server`` on its own event loop in a thread (the engine is synchronous)."""
    from tests.kvstore.conftest import live_server  # the server extra, only when used

    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        async with live_server(data_dir, max_bytes=512 << 20) as srv:
            state["url"], state["stop"] = srv.url, asyncio.Event()
            state["loop"] = asyncio.get_running_loop()
            ready.set()
            await state["stop"].wait()

    def target() -> None:
        try:
            asyncio.run(main())
        finally:
            ready.set()

    thread = threading.Thread(target=target, name="test-server", daemon=True)
    thread.start()
    ready.wait(30)
    assert "url" in state, "the server did not start"
    try:
        yield str(state["url"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
