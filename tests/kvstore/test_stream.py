"""``POST /v1/stream`` on a real server: frames parsed with ``FrameParser``, anchors before
residuals, missing keys, parts subsets, bad bodies, DATA decoded with ``ObjectDecoder``; and
the server-wide ``AnchorFirst`` scheduler, across concurrent streams and on its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from lynxkv.codec import LayerAssembler, ObjectDecoder, decode
from lynxkv.kvstore.frames import (
    DataFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InfoFrame,
    MissingFrame,
    Part,
)
from lynxkv.kvstore.requests import SCHEDULER
from lynxkv.kvstore.scheduler import AnchorFirst
from lynxkv.kvstore.streaming import FRAME_BYTES
from tests.kvstore.conftest import (
    BAD_JSON_BODIES,
    TEST_TIMEOUT,
    Backend,
    Serve,
    Server,
    anchor_end,
    assemble,
    eventually,
    expect_error,
    hooked_server,
    make_object,
    run,
    stream,
)

#: Three sizes: one DATA frame per part, a small object, several frames per part.
OBJECTS = {
    "k0": make_object(10),
    "k1": make_object(11, layers=1, tokens=64),
    "k2": make_object(12, layers=16, tokens=512),  # several 1 MiB frames per part
}


async def put_all(srv: Server, objects: dict[str, bytes] = OBJECTS) -> dict[str, str]:
    """PUT each object; their ETags."""
    return {key: (await srv.put(key, obj))["etag"] for key, obj in objects.items()}


def data_frames(frames: Sequence[Frame], key: int | None = None) -> list[DataFrame]:
    return [f for f in frames if isinstance(f, DataFrame) and key in (None, f.key)]


def same_kv(got: Sequence[tuple[Any, Any]], want: Sequence[tuple[Any, Any]]) -> bool:
    return len(got) == len(want) and all(
        np.array_equal(gk, wk) and np.array_equal(gv, wv)
        for (gk, gv), (wk, wv) in zip(got, want, strict=True)
    )


def decode_frames(frames: Sequence[Frame], key: int, obj: bytes, *, full: bool = True) -> None:
    """Feed the key's DATA frames to an ``ObjectDecoder`` at their offsets: the anchor
    tensors (complete as soon as the anchor bytes are in) and, when ``full``, the refined
    ones must equal what ``decode`` makes of the object."""
    decoder = ObjectDecoder()
    assembler: LayerAssembler | None = None
    tensors: dict[str, dict[tuple[int, str], Any]] = {"anchor": {}, "full": {}}
    layers = decode(obj).header.layers
    for frame in data_frames(frames, key):
        for section in decoder.feed(frame.payload, at=frame.offset):
            assert decoder.header is not None
            assembler = assembler or LayerAssembler(decoder.header)
            for layer, kv, part, tensor in assembler.add(section):
                tensors[part][layer, kv] = tensor
        if frame.end == anchor_end(obj):
            assert decoder.anchor_complete()
            assert len(tensors["anchor"]) == 2 * layers
    for name in ("anchor", "full") if full else ("anchor",):
        got = [(tensors[name][i, "k"], tensors[name][i, "v"]) for i in range(layers)]
        assert same_kv(got, decode(obj, part=name).kv), name
    assert decoder.complete() == full


# -- one stream --------------------------------------------------------------------------------


def test_stream_sends_every_anchor_before_any_residual(serve: Serve) -> None:
    keys = ["k0", "absent", "k1", "k2"]

    async def check(srv: Server) -> None:
        etags = await put_all(srv)
        frames = await stream(srv.session, keys)
        announced = frames[: len(keys)]
        assert announced[1] == MissingFrame(1)
        for index, frame in enumerate(announced):
            if keys[index] in OBJECTS:
                obj = OBJECTS[keys[index]]
                assert frame == InfoFrame(
                    index, len(obj), anchor_end(obj), etags[keys[index]], ("anchor", "residual")
                )
        assert frames[-1] == EndFrame()
        data = data_frames(frames)
        assert len(frames) == len(keys) + len(data) + 1
        parts = [f.part for f in data]
        assert parts == sorted(parts), "an anchor DATA frame came after a residual one"
        for part in ("anchor", "residual"):
            order = [f.key for f in data if f.part == part]
            assert order == sorted(order), f"{part} frames out of key order"
            assert set(order) == {0, 2, 3}
        assert all(len(f.payload) <= FRAME_BYTES for f in data)
        assert len(data_frames(frames, 3)) > 2, "k2 should need several frames per part"
        assert assemble(frames) == {i: OBJECTS[k] for i, k in enumerate(keys) if k in OBJECTS}
        for index, key in enumerate(keys):
            if key in OBJECTS:
                decode_frames(frames, index, OBJECTS[key])
        metrics = await srv.metrics()
        anchors = sum(anchor_end(o) for o in OBJECTS.values())
        residuals = sum(len(o) for o in OBJECTS.values()) - anchors
        assert metrics["lynxkv_sent_bytes_total", (("part", "anchor"),)] == anchors
        assert metrics["lynxkv_sent_bytes_total", (("part", "residual"),)] == residuals
        assert metrics["lynxkv_active_streams", ()] == 0

    serve(check)


@pytest.mark.parametrize(
    ("parts", "sent"),
    [
        (["anchor"], ("anchor",)),
        (["residual"], ("residual",)),
        (["residual", "anchor"], ("anchor", "residual")),
        (["anchor", "anchor"], ("anchor",)),
    ],
)
def test_stream_sends_the_parts_asked_for(
    serve: Serve, parts: list[str], sent: tuple[Part, ...]
) -> None:
    keys = sorted(OBJECTS)

    async def check(srv: Server) -> None:
        await put_all(srv)
        frames = await stream(srv.session, keys, parts)
        for index, key in enumerate(keys):
            obj = OBJECTS[key]
            info = frames[index]
            assert isinstance(info, InfoFrame) and info.parts == sent
            data = data_frames(frames, index)
            assert {f.part for f in data} == set(sent)
            for part in sent:
                start, end = info.bounds(part)
                got = b"".join(f.payload for f in data if f.part == part)
                assert got == obj[start:end], (key, part)
            if sent == ("anchor",):
                decode_frames(frames, index, obj, full=False)  # the anchor alone decodes
        assert frames[-1] == EndFrame()

    serve(check)


def test_stream_of_missing_and_repeated_keys(serve: Serve) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        assert await stream(srv.session, []) == [EndFrame()]
        assert await stream(srv.session, ["x", "y"]) == [
            MissingFrame(0),
            MissingFrame(1),
            EndFrame(),
        ]
        frames = await stream(srv.session, ["k1", "x", "k1"])
        assert assemble(frames) == {0: OBJECTS["k1"], 2: OBJECTS["k1"]}
        assert frames[1] == MissingFrame(1)

    serve(check)


def test_stream_of_an_object_without_residual(serve: Serve) -> None:
    raw = make_object(13, layers=1, tokens=64, codec="raw")

    async def check(srv: Server) -> None:
        etag = (await srv.put("raw", raw))["etag"]
        frames = await stream(srv.session, ["raw"])
        assert frames[0] == InfoFrame(0, len(raw), len(raw), etag, ("anchor",))
        assert {f.part for f in data_frames(frames)} == {"anchor"}
        assert assemble(frames) == {0: raw}
        frames = await stream(srv.session, ["raw"], ["residual"])
        assert frames == [InfoFrame(0, len(raw), len(raw), etag, ()), EndFrame()]

    serve(check)


STREAM_BAD_BODIES = [
    *BAD_JSON_BODIES,
    ("parts-string", b'{"keys": ["k0"], "parts": "anchor"}', "bad_request"),
    ("parts-empty", b'{"keys": ["k0"], "parts": []}', "bad_request"),
    ("parts-null", b'{"keys": ["k0"], "parts": null}', "bad_request"),
    ("parts-unknown", b'{"keys": ["k0"], "parts": ["anchor", "header"]}', "bad_request"),
    ("parts-number", b'{"keys": ["k0"], "parts": [1]}', "bad_request"),
    ("parts-nested", b'{"keys": ["k0"], "parts": [["anchor"]]}', "bad_request"),
    ("parts-object", b'{"keys": ["k0"], "parts": [{"anchor": 1}]}', "bad_request"),
]


@pytest.mark.parametrize(
    ("body", "code"), [c[1:] for c in STREAM_BAD_BODIES], ids=[c[0] for c in STREAM_BAD_BODIES]
)
def test_stream_bad_body(serve: Serve, body: bytes, code: str) -> None:
    async def check(srv: Server) -> None:
        await srv.put("k0", OBJECTS["k0"])
        headers = {"Content-Type": "application/json"}
        async with srv.session.post("/v1/stream", data=body, headers=headers) as resp:
            await expect_error(resp, 400, code)
        assert (await srv.metrics())["lynxkv_active_streams", ()] == 0

    serve(check)


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_key_that_changes_mid_stream_gets_an_error_frame(
    tmp_path: Path, backend: Backend, change: str
) -> None:
    """k1 is deleted or replaced after its INFO went out, before its bytes: its ERROR frame
    says so and the stream goes on with the other keys."""

    async def main() -> None:
        async with hooked_server(tmp_path / "data", backend=backend) as (srv, store):
            await put_all(srv)
            store.gates["k1"] = gate = asyncio.Event()
            task = asyncio.create_task(stream(srv.session, ["k0", "k1", "k2"]))
            await store.event(store.held, "k1").wait()
            if change == "delete":
                assert await srv.status("DELETE", "/v1/kv/k1") == 204
            else:
                await srv.put("k1", OBJECTS["k0"])
            gate.set()
            frames = await task
        errors = [f for f in frames if isinstance(f, ErrorFrame)]
        status, code = (404, "not_found") if change == "delete" else (412, "precondition_failed")
        assert [(e.key, e.status, e.code) for e in errors] == [(1, status, code)]
        assert data_frames(frames, 1) == []
        got = assemble(frames)
        assert (got[0], got[2]) == (OBJECTS["k0"], OBJECTS["k2"])
        assert frames[-1] == EndFrame()

    run(main())


# -- across streams ----------------------------------------------------------------------------


def patient(app: web.Application) -> None:
    """A scheduler that waits as long as the test may (its 2 s bound is for production): on
    a slow machine a residual must not slip through on the timeout."""
    app[SCHEDULER] = AnchorFirst(max_wait=TEST_TIMEOUT)


def test_no_residual_leaves_while_another_stream_has_anchor_pending(
    tmp_path: Path, backend: Backend
) -> None:
    """Stream B declares its anchor and is held before its first byte; stream A then sends
    its anchor, and B is let go the moment A has a residual piece in hand. Each piece sent
    is logged with the anchor bytes then pending server-wide: every residual must log 0."""
    objects = {"a": make_object(20), "b": make_object(21)}
    ends = {key: anchor_end(obj) for key, obj in objects.items()}

    async def main() -> None:
        async with hooked_server(tmp_path / "data", backend=backend, setup=patient) as (
            srv,
            store,
        ):
            await put_all(srv, objects)
            scheduler = srv.app[SCHEDULER]
            sent: list[tuple[str, str, int]] = []

            def before(key: str, start: int) -> None:
                if key == "a" and start >= ends["a"]:
                    store.gates["b"].set()

            def after(key: str, start: int) -> None:
                part = "residual" if start >= ends[key] else "anchor"
                sent.append((key, part, scheduler.pending))

            store.before_piece, store.after_piece = before, after
            store.gates["b"] = asyncio.Event()
            b = asyncio.create_task(stream(srv.session, ["b"]))
            await store.event(store.held, "b").wait()
            assert scheduler.pending == ends["b"]
            a_frames = await stream(srv.session, ["a"])
            b_frames = await b
        assert assemble(a_frames) == {0: objects["a"]}
        assert assemble(b_frames) == {0: objects["b"]}
        order = [(key, part) for key, part, _ in sent]
        assert order.index(("b", "anchor")) < order.index(("a", "residual")), sent
        assert {key for key, part, _ in sent if part == "residual"} == {"a", "b"}
        assert all(pending == 0 for _, part, pending in sent if part == "residual"), sent
        assert scheduler.pending == 0

    run(main())


def test_client_gone_mid_anchor_leaves_nothing_pending(tmp_path: Path, backend: Backend) -> None:
    obj = make_object(22)

    async def main() -> None:
        async with hooked_server(tmp_path / "data", backend=backend, setup=patient) as (
            srv,
            store,
        ):
            await srv.put("a", obj)
            await srv.put("b", obj)
            scheduler = srv.app[SCHEDULER]
            store.gates["b"] = gate = asyncio.Event()
            resp = await srv.session.post("/v1/stream", json={"keys": ["b"]})
            await store.event(store.held, "b").wait()
            assert scheduler.pending == anchor_end(obj)
            resp.close()  # hang up while the anchor is pending
            gate.set()

            async def idle() -> bool:
                active = (await srv.metrics())["lynxkv_active_streams", ()]
                return scheduler.pending == 0 and active == 0

            await eventually(idle, "the abandoned stream to end")
            # a residual goes at once (the patient scheduler would hold it past the test)
            assert assemble(await stream(srv.session, ["a"])) == {0: obj}

    run(main())


# -- AnchorFirst on its own --------------------------------------------------------------------


async def turns(n: int = 5) -> None:
    """Let other tasks run ``n`` times (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_anchor_first_counts_pending_bytes() -> None:
    gate = AnchorFirst()
    with gate.anchors(100) as one:
        assert gate.pending == 100
        one.sent(30)
        assert (gate.pending, one.pending) == (70, 70)
        with gate.anchors(50) as two:
            assert gate.pending == 120
            two.sent(80)  # more than declared: clamped
            assert (gate.pending, two.pending) == (70, 0)
        assert gate.pending == 70
    assert gate.pending == 0
    with gate.anchors(0):
        assert gate.pending == 0


def test_anchor_first_releases_unsent_bytes_on_error() -> None:
    gate = AnchorFirst()
    with pytest.raises(ConnectionResetError), gate.anchors(100) as ticket:
        ticket.sent(10)
        raise ConnectionResetError("client gone")
    assert gate.pending == 0


def test_residual_turn_waits_for_every_ticket() -> None:
    async def main() -> None:
        gate = AnchorFirst(max_wait=TEST_TIMEOUT)
        with contextlib.ExitStack() as stack:
            one = stack.enter_context(gate.anchors(10))
            two = stack.enter_context(gate.anchors(20))
            waiter = asyncio.create_task(gate.residual_turn())
            await turns()
            assert not waiter.done()
            one.sent(10)
            await turns()
            assert not waiter.done()
            two.sent(19)
            await turns()
            assert not waiter.done()
            two.sent(1)
            await waiter
            assert gate.pending == 0

    run(main())


def test_residual_turn_is_immediate_when_no_anchor_is_pending() -> None:
    async def main() -> None:
        gate = AnchorFirst(max_wait=TEST_TIMEOUT)
        with gate.anchors(0):
            waiter = asyncio.create_task(gate.residual_turn())
            await turns(1)
            assert waiter.done()
        with gate.anchors(5):
            pass  # released on exit
        waiter = asyncio.create_task(gate.residual_turn())
        await turns(1)
        assert waiter.done()

    run(main())


def test_residual_turn_gives_up_after_max_wait() -> None:
    async def main() -> None:
        gate = AnchorFirst(max_wait=0.01)
        with gate.anchors(10):
            await gate.residual_turn()  # returns although the anchor is still pending
            assert gate.pending == 10

    run(main())
