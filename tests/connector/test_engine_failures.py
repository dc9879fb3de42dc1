"""Store failures under the transformers engine: a 5xx, a stalled transfer, a damaged
object. The engine's client talks to a real server through a misbehaving proxy; every
mode must answer exactly what a full recompute answers, and no exception may escape."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lynxkv.client.sync import Client
from lynxkv.codec.container import parse_header
from lynxkv.connector.model import LoadedModel
from lynxkv.connector.transformers import DecodeOn, TransformersEngine
from tests.client.conftest import DamagingProxy, Proxy, http_answer
from tests.conftest import running_server
from tests.connector.test_engine import chat_ids

pytestmark = pytest.mark.model

MODES = ("lynx", "int8-lynx", "int4")
CODECS = ("lynx-a4", "uniform-a4")
#: the client decodes on the host, or the engine decodes verified sections (lynxkv.gpu)
DECODE_ON: tuple[DecodeOn, ...] = ("client", "engine")
#: fail fast: one retry, no real backoff
FAST: dict[str, Any] = {"retries": 1, "backoff": 0.01, "timeout": 1.0}


@contextlib.contextmanager
def on_loop(cm: contextlib.AbstractAsyncContextManager[Any]) -> Iterator[Any]:
    """Enter the async context manager ``cm`` on an event loop in a thread of its own (the
    engine is synchronous); yield what it yields, and cancel what is left on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-proxy", daemon=True)
    thread.start()

    async def shutdown() -> None:
        await cm.__aexit__(None, None, None)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield asyncio.run_coroutine_threadsafe(cm.__aenter__(), loop).result(10)
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass
class Case:
    url: str
    ids: list[int]
    reference: list[int]
    prefix: int


@pytest.fixture(scope="module")
def case(smollm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    """A real server holding a ~300-token prompt's chunk in both codecs, and the tokens a
    full recompute answers for it."""
    ids = chat_ids(smollm, seed=21, tokens=300)
    prefix = (len(ids) - 1) // 256 * 256
    assert prefix >= 256
    with running_server(tmp_path_factory.mktemp("failures") / "data") as url:
        with TransformersEngine(smollm, url) as engine:
            engine.save_context(ids, codecs=CODECS)
            assert engine.connector.stats.snapshot()["save_failures"] == 0
            reference = engine.generate(ids, 8, "none").tokens
            # the store works: without a fault, no mode recomputes
            assert not engine.generate(ids, 8, "int4").timeline.recomputed
        yield Case(url, ids, reference, prefix)


def assert_recomputes(engine: TransformersEngine, case: Case) -> None:
    for mode in MODES:
        gen = engine.generate(case.ids, 8, mode)
        assert gen.tokens == case.reference, mode
        assert gen.timeline.recomputed, mode
        assert gen.timeline.prefix_tokens == 0, mode


# -- 5xx ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "reason"), [(503, "Service Unavailable"), (500, "Error")])
def test_5xx_recomputes(smollm: LoadedModel, case: Case, status: int, reason: str) -> None:
    answer = http_answer(status, reason, "injected")
    with (
        on_loop(Proxy(case.url, canned=answer, canned_count=1 << 30)) as proxy,
        TransformersEngine(smollm, proxy.url, **FAST) as engine,
    ):
        assert engine.save_context(case.ids, codecs=CODECS) == case.prefix
        stats = engine.connector.stats.snapshot()
        assert stats["save_failures"] == 2 and stats["chunks_saved"] == 0
        assert_recomputes(engine, case)
        stats = engine.connector.stats.snapshot()
        assert stats["lookup_failures"] == len(MODES) and stats["loads"] == 0
    assert proxy.connections >= 2 + len(MODES)


# -- a stall mid-transfer -----------------------------------------------------------------------


async def forever() -> None:
    await asyncio.Event().wait()


def test_stall_mid_transfer_recomputes(smollm: LoadedModel, case: Case) -> None:
    # 4 KiB passes (the lookup's answer and the start of the object), then nothing more
    stall = Proxy(case.url, cut_after=4096, cut_count=None, before_cut=forever)
    with (
        on_loop(stall) as proxy,
        TransformersEngine(smollm, proxy.url, retries=0, backoff=0.01, timeout=0.5) as engine,
    ):
        assert_recomputes(engine, case)
        stats = engine.connector.stats.snapshot()
        # the lookups got through: each load was cut mid-object and timed out
        assert stats["lookup_failures"] == 0
        assert stats["loads"] == stats["load_failures"] == len(MODES)


# -- a damaged object ---------------------------------------------------------------------------


def damage(engine: TransformersEngine, case: Case, codec: str, stream: str) -> dict[bytes, bytes]:
    """16 bytes from the middle of the first ``stream`` section of every stored chunk of
    ``codec`` (unique in its object), and the same bytes with one bit flipped."""
    out = {}
    with Client(case.url) as client:
        for key in engine.connector.keys(case.ids, codec):
            obj = client.get(key)
            ref = next(s for s in parse_header(obj).sections if s.stream == stream)
            at = ref.offset + ref.length // 2
            needle = obj[at : at + 16]
            assert obj.count(needle) == 1
            out[needle] = bytes([needle[0] ^ 0x40]) + needle[1:]
    return out


@pytest.mark.parametrize("decode_on", DECODE_ON)
def test_damaged_anchor_recomputes(smollm: LoadedModel, case: Case, decode_on: DecodeOn) -> None:
    with TransformersEngine(smollm, case.url) as plain:
        faults = {k: v for c in CODECS for k, v in damage(plain, case, c, "anchor").items()}
    with (
        on_loop(DamagingProxy(case.url, faults)) as proxy,
        TransformersEngine(smollm, proxy.url, decode_on=decode_on, **FAST) as engine,
    ):
        assert_recomputes(engine, case)
        stats = engine.connector.stats.snapshot()
        assert stats["lookup_failures"] == 0
        assert stats["loads"] == stats["load_failures"] == len(MODES)
    assert proxy.replaced >= len(MODES)


@pytest.mark.parametrize("decode_on", DECODE_ON)
def test_damaged_residual_lynx_verifies_on_a_recompute(
    smollm: LoadedModel, case: Case, decode_on: DecodeOn
) -> None:
    """The anchor arrives and the drafts run on it; the residual is damaged, so the drafts
    are verified against a recomputed prefix instead."""
    with TransformersEngine(smollm, case.url) as plain:
        faults = damage(plain, case, "lynx-a4", "residual")
    options: dict[str, Any] = {"max_draft": 4, "draft_policy": "fixed", "decode_on": decode_on}
    with (
        on_loop(DamagingProxy(case.url, faults)) as proxy,
        TransformersEngine(smollm, proxy.url, **options, **FAST) as engine,
    ):
        gen = engine.generate(case.ids, 8, "lynx")
        assert gen.tokens == case.reference
        tl = gen.timeline
        assert tl.recomputed and tl.prefix_tokens == 0
        assert tl.anchor_ready is not None and tl.residual_ready is None
        assert tl.drafted == 4 and 0 <= tl.accepted <= 4
        full = engine.generate(case.ids, 8, "int8-lynx")
        assert full.tokens == case.reference and full.timeline.recomputed
        stats = engine.connector.stats.snapshot()
        assert stats["lookup_failures"] == 0 and stats["load_failures"] == 2
    assert proxy.replaced >= 2


@pytest.mark.parametrize(("layers", "heads"), [(2, 3), (30, 2)], ids=["layers", "heads"])
@pytest.mark.parametrize("decode_on", DECODE_ON)
def test_chunks_of_another_shape_recompute(
    smollm: LoadedModel,
    case: Case,
    decode_on: DecodeOn,
    layers: int,
    heads: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Objects under the right keys but of another shape (a store written by a buggy or
    foreign writer) are a failed load: the engine recomputes, nothing raises."""
    from lynxkv.codec import encode
    from tests.codec.kvgen import make_kv

    with (
        running_server(tmp_path_factory.mktemp("foreign") / "data") as url,
        TransformersEngine(smollm, url, decode_on=decode_on, **FAST) as engine,
    ):
        keys = engine.connector.keys(case.ids[: case.prefix], "lynx-a4")
        # SmolLM2 has 30 layers of 3 KV heads of 64
        wrong = encode(make_kv(5, layers=layers, tokens=256, heads=heads, dim=64), "lynx-a4")
        with Client(url) as client:
            for key in keys:
                client.put(key, wrong)
        for mode in ("lynx", "int8-lynx"):
            gen = engine.generate(case.ids, 8, mode)
            assert gen.tokens == case.reference, mode
            assert gen.timeline.recomputed, mode
        assert engine.connector.stats.snapshot()["load_failures"] == 2
