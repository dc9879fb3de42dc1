"""Progressive fetch against a real server (port 0, LMDB in a temp dir), over both
transports; cuts and damaged bytes come from a small TCP proxy between client and server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lynxkv.client.aio import AsyncClient
from lynxkv.client.assembly import KeyState, Layers
from lynxkv.client.fetch import FetchHandle, Transport, fetch
from lynxkv.codec import ObjectDecoder, decode, parse_header
from lynxkv.errors import (
    ChecksumError,
    NotFound,
    PreconditionFailed,
    TransportError,
    Unauthorized,
)
from tests.client.conftest import DamagingProxy, Proxy, closed_port_url
from tests.kvstore.conftest import Server, hooked_server, live_server, make_object, run

TRANSPORTS = ["stream", "ranges"]


# -- a TCP proxy that damages what the server sends -----------------------------------------


def damage_at(obj: bytes, at: int) -> tuple[bytes, bytes]:
    """A needle of ``obj`` that starts at ``at`` (unique in it), and that needle with one
    bit flipped."""
    needle = obj[at : at + 16]
    assert obj.count(needle) == 1
    return needle, bytes([needle[0] ^ 0x40]) + needle[1:]


# -- helpers ---------------------------------------------------------------------------------

OBJECTS = {
    "k0": make_object(1, layers=2, tokens=300),
    "k1": make_object(2, layers=3, tokens=100),
    "k2": make_object(3, layers=2, tokens=64, codec="raw"),  # all anchor: no residual
}


async def put_all(srv: Server, objects: dict[str, bytes] = OBJECTS) -> None:
    for key, obj in objects.items():
        await srv.put(key, obj)


def client_for(url: str, **kw: Any) -> AsyncClient:
    kw.setdefault("backoff", 0.01)
    return AsyncClient(url, **kw)


@contextlib.asynccontextmanager
async def fetching(
    url: str,
    keys: Sequence[str],
    transport: Transport = "stream",
    *,
    decode: bool = True,
    **client: Any,
) -> AsyncIterator[FetchHandle]:
    """A client on ``url`` (fast retries) and a fetch of ``keys`` with it."""
    async with (
        client_for(url, **client) as c,
        await fetch(c, keys, transport=transport, decode=decode) as handle,
    ):
        yield handle


def assert_layers_equal(got: Layers, expected: Layers) -> None:
    assert len(got) == len(expected)
    for (k, v), (ek, ev) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(k, ek)
        np.testing.assert_array_equal(v, ev)


async def assert_correct(handle: FetchHandle, objects: Sequence[bytes]) -> None:
    """Anchor, full decode and bytes of every key equal the codec's own decode."""
    anchors, fulls, raws = await handle.anchor(), await handle.residual(), await handle.raw()
    for obj, anchor, full, raw in zip(objects, anchors, fulls, raws, strict=True):
        assert raw == obj
        assert_layers_equal(anchor, decode(obj, "anchor").kv)
        assert_layers_equal(full, decode(obj).kv)
    stats = handle.stats
    for obj, key in zip(objects, stats.keys, strict=True):
        end = parse_header(obj).anchor_end
        assert (key.anchor_bytes, key.residual_bytes) == (end, len(obj) - end)
    assert stats.anchor_bytes == sum(parse_header(o).anchor_end for o in objects)
    assert stats.anchor_bytes + stats.residual_bytes == sum(map(len, objects))
    assert await handle.wait() == [None] * len(objects)


def at(t: float | None) -> float:
    """A time the stats must have recorded."""
    assert t is not None
    return t


def serve(tmp_path: Path, check: Any, **config: Any) -> None:
    async def main() -> None:
        async with live_server(tmp_path / "data", **config) as srv:
            await check(srv)

    run(main())


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fetch_equals_the_codecs_decode(tmp_path: Path, transport: Transport) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        async with fetching(srv.url, list(OBJECTS), transport) as handle:
            k, v = await handle.layer_ready(1, 2, "anchor")
            expected = decode(OBJECTS["k1"], "anchor").kv[2]
            np.testing.assert_array_equal(k, expected[0])
            np.testing.assert_array_equal(v, expected[1])
            await assert_correct(handle, list(OBJECTS.values()))
            events = [e async for e in handle.events()]
        stats = handle.stats
        assert stats.start <= at(stats.first_byte) <= at(stats.anchor_complete)
        assert at(stats.anchor_complete) <= at(stats.residual_complete)
        for key in stats.keys:
            assert at(key.anchor_complete) <= at(key.residual_complete)
        assert stats.resumed == 0
        # one anchor then one full event per tensor of a residual codec; the raw one, full only
        layers = [parse_header(o).layers for o in OBJECTS.values()]
        assert len(events) == 2 * 2 * (layers[0] + layers[1]) + 2 * layers[2]
        seen: dict[tuple[int, int, str], str] = {}
        for e in events:
            assert seen.get((e.key_index, e.layer, e.kv)) in (None, "anchor"), e
            seen[e.key_index, e.layer, e.kv] = e.part
        assert set(seen.values()) == {"full"}

    serve(tmp_path, check)


def test_the_clients_fetch_method_is_the_same_fetch(tmp_path: Path) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        async with client_for(srv.url) as c, await c.fetch(list(OBJECTS), transport="ranges") as h:
            await assert_correct(h, list(OBJECTS.values()))

    serve(tmp_path, check)


def test_stream_sends_every_anchor_before_any_residual(tmp_path: Path) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        # a slow link, so that what comes first also lands first by a clear margin
        async with fetching(srv.url, list(OBJECTS), rate_limit_bps=40e6) as handle:
            events = [e async for e in handle.events()]
            await assert_correct(handle, list(OBJECTS.values()))
        last_anchor = max(e.t for e in events if e.part == "anchor")
        first_refined = min(e.t for e in events if e.part == "full" and e.key_index != 2)
        assert last_anchor < first_refined
        stats = handle.stats.keys
        assert max(at(k.anchor_complete) for k in stats) < at(stats[0].residual_complete)

    serve(tmp_path, check)


def test_layers_are_decoded_as_their_sections_land(tmp_path: Path) -> None:
    big = make_object(4, layers=8, tokens=256)  # an anchor of about 0.5 MB

    async def check(srv: Server) -> None:
        await srv.put("big", big)
        # 40 Mbit/s: the anchor takes about 0.1 s to land, in several reads
        async with fetching(srv.url, ["big"], "ranges", rate_limit_bps=40e6) as handle:
            events = [e async for e in handle.events() if e.part == "anchor"]
            assert_layers_equal(await handle.anchor(0), decode(big, "anchor").kv)
        assert len(events) == 16
        assert len({e.t for e in events}) > 1  # not all at the end
        assert events[0].t < at(handle.stats.keys[0].anchor_complete)

    serve(tmp_path, check)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_missing_key_fails_that_key_only(tmp_path: Path, transport: Transport) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        keys = ["k0", "nope", "k1"]
        async with fetching(srv.url, keys, transport) as handle:
            with pytest.raises(NotFound):
                await handle.anchor(1)
            with pytest.raises(NotFound):
                await handle.residual()
            with pytest.raises(NotFound):
                await handle.layer_ready(1, 0)
            assert_layers_equal(await handle.residual(2), decode(OBJECTS["k1"]).kv)
            assert await handle.raw(0) == OBJECTS["k0"]
            errors = await handle.wait()
        assert errors[0] is None and errors[2] is None and isinstance(errors[1], NotFound)
        assert handle.stats.residual_complete is not None

    serve(tmp_path, check)


@pytest.mark.parametrize("fraction", [0.1, 0.45, 0.8])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_cut_connection_is_resumed_with_ranges(
    tmp_path: Path, transport: Transport, fraction: float
) -> None:
    total = sum(map(len, OBJECTS.values()))

    async def check(srv: Server) -> None:
        await put_all(srv)
        cut = int(total * fraction)
        async with (
            Proxy(srv.url, cut_after=cut, cut_count=2) as proxy,
            fetching(proxy.url, list(OBJECTS), transport) as handle,
        ):
            await assert_correct(handle, list(OBJECTS.values()))
        assert proxy.connections >= 3  # two cut, then at least one that finished
        if transport == "stream":
            assert handle.stats.resumed >= 1  # the stream broke: ranged GETs finished it

    serve(tmp_path, check)


@pytest.mark.parametrize("where", ["anchor", "residual"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_damaged_byte_fails_its_key_with_checksum_error(
    tmp_path: Path, transport: Transport, where: str
) -> None:
    obj = OBJECTS["k1"]
    end = parse_header(obj).anchor_end
    at = end // 2 if where == "anchor" else (end + len(obj)) // 2
    needle, replacement = damage_at(obj, at)
    assert all(needle not in o for o in (OBJECTS["k0"], OBJECTS["k2"]))

    async def check(srv: Server) -> None:
        await put_all(srv)
        async with (
            DamagingProxy(srv.url, {needle: replacement}) as proxy,
            fetching(proxy.url, list(OBJECTS), transport) as handle,
        ):
            if where == "residual":  # the anchor was fine and stays usable
                assert_layers_equal(await handle.anchor(1), decode(obj, "anchor").kv)
            else:
                with pytest.raises(ChecksumError):
                    await handle.anchor(1)
            with pytest.raises(ChecksumError):
                await handle.residual(1)
            with pytest.raises(ChecksumError):
                await handle.raw(1)
            assert_layers_equal(await handle.residual(0), decode(OBJECTS["k0"]).kv)
            assert await handle.raw(2) == OBJECTS["k2"]
            errors = await handle.wait()
        assert proxy.replaced == 1
        assert [type(e) for e in errors] == [type(None), ChecksumError, type(None)]

    serve(tmp_path, check)


def test_an_object_replaced_mid_stream_fails_with_precondition_failed(tmp_path: Path) -> None:
    async def main() -> None:
        async with hooked_server(tmp_path / "data") as (srv, hooked):
            await put_all(srv)
            hooked.gates["k1"] = gate = asyncio.Event()
            async with fetching(srv.url, list(OBJECTS)) as handle:
                # the stream announced k1 (INFO, old ETag) and now waits to read its bytes
                await hooked.event(hooked.held, "k1").wait()
                await srv.put("k1", OBJECTS["k0"])
                gate.set()
                # the server stops k1 with an ERROR frame; the ranged GET with If-Range
                # finds the new version and refuses to splice it onto the old one
                with pytest.raises(PreconditionFailed):
                    await handle.anchor(1)
                assert_layers_equal(await handle.residual(0), decode(OBJECTS["k0"]).kv)
                assert await handle.raw(2) == OBJECTS["k2"]
            assert handle.stats.resumed == 1

    run(main())


def test_residual_bytes_may_come_before_their_anchor() -> None:
    """The ranges transport's two connections race: residual bytes that land before the
    header, or before their anchor section, wait and are decoded once they can be."""
    obj = OBJECTS["k0"]
    header = parse_header(obj)
    expected = {"anchor": decode(obj, "anchor").kv, "full": decode(obj).kv}

    async def main() -> None:
        key = KeyState(0, "k0", decode=True)
        key.set_meta(len(obj), header.anchor_end, '"v1"')
        assert key.take("residual", header.anchor_end, obj[header.anchor_end :]) == []
        first = header.sections[1].offset  # header, anchor of layer 0 K, a bit of its V
        key.record(key.assemble(key.take("anchor", 0, obj[: first + 10])))
        assert list(key.tensors["anchor"]) == [(0, "k")] and list(key.tensors["full"]) == [(0, "k")]
        key.record(
            key.assemble(key.take("anchor", first + 10, obj[first + 10 : header.anchor_end]))
        )
        assert key.done("full") and key.error is None
        for stage in ("anchor", "full"):
            assert_layers_equal(key.layers(stage), expected[stage])
        assert bytes(key.raw) == obj

    run(main())


def test_close_cancels_the_transfers(tmp_path: Path) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        async with client_for(srv.url, rate_limit_bps=2e6) as client:
            handle = await fetch(client, list(OBJECTS), transport="ranges")
            async for _ in handle.events():
                break
            started = time.perf_counter()
            await handle.close()
            assert time.perf_counter() - started < 1.0
            with pytest.raises(TransportError, match="closed"):
                await handle.residual(0)
            assert await handle.wait() != [None] * 3
            left = [t for t in asyncio.all_tasks() if "FetchHandle" in repr(t.get_coro())]
            assert left == []

    serve(tmp_path, check)


def test_decode_false_keeps_verified_bytes_only(tmp_path: Path) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        async with fetching(srv.url, ["k1", "k0"], decode=False) as handle:
            assert await handle.raw() == [OBJECTS["k1"], OBJECTS["k0"]]
            with pytest.raises(ValueError, match="decode=False"):
                await handle.anchor()
            assert handle.stats.residual_complete is not None

    serve(tmp_path, check)


def reference_sections(obj: bytes, stream: str) -> list[tuple[object, bytes]]:
    decoder = ObjectDecoder()
    return [(s.ref, bytes(s.payload)) for s in decoder.feed(obj) if s.ref.stream == stream]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decode_false_hands_over_the_verified_sections(
    tmp_path: Path, transport: Transport
) -> None:
    async def check(srv: Server) -> None:
        await put_all(srv)
        async with fetching(srv.url, ["k1", "k0", "k2"], transport, decode=False) as handle:
            for i, key in enumerate(["k1", "k0", "k2"]):
                for stream in ("anchor", "residual"):
                    header, sections = await handle.sections(i, stream)
                    assert header == parse_header(OBJECTS[key])
                    got = sorted(((s.ref, bytes(s.payload)) for s in sections), key=repr)
                    assert got == sorted(reference_sections(OBJECTS[key], stream), key=repr)
            assert not (await handle.sections(2, "residual"))[1]  # raw: all anchor
        async with fetching(srv.url, ["k1"], transport) as handle:
            with pytest.raises(ValueError, match="decode=False"):
                await handle.sections(0, "anchor")

    serve(tmp_path, check)


@pytest.mark.parametrize("where", ["anchor", "residual"])
def test_sections_of_a_damaged_stream_raise_checksum_error(tmp_path: Path, where: str) -> None:
    obj = OBJECTS["k1"]
    end = parse_header(obj).anchor_end
    needle, replacement = damage_at(obj, end // 2 if where == "anchor" else (end + len(obj)) // 2)

    async def check(srv: Server) -> None:
        await put_all(srv)
        async with (
            DamagingProxy(srv.url, {needle: replacement}) as proxy,
            fetching(proxy.url, ["k1", "k0"], decode=False) as handle,
        ):
            if where == "residual":  # the anchor was fine and stays usable
                assert len((await handle.sections(0, "anchor"))[1]) > 0
            else:
                with pytest.raises(ChecksumError):
                    await handle.sections(0, "anchor")
            with pytest.raises(ChecksumError):
                await handle.sections(0, "residual")
            assert len((await handle.sections(1, "residual"))[1]) > 0
        assert proxy.replaced == 1

    serve(tmp_path, check)


def test_one_failure_for_all_keys(tmp_path: Path) -> None:
    async def check(srv: Server) -> None:
        async with fetching(srv.url, ["k0", "k1"], token="wrong") as handle:
            with pytest.raises(Unauthorized):
                await handle.anchor()
            assert all(isinstance(e, Unauthorized) for e in await handle.wait())

    serve(tmp_path, check, auth_token="right")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dead_server_fails_every_key_with_transport_error(transport: Transport) -> None:
    async def main() -> None:
        async with fetching(closed_port_url(), ["a", "b"], transport, retries=1) as handle:
            with pytest.raises(TransportError):
                await handle.residual()
            assert all(isinstance(e, TransportError) for e in await handle.wait())

    run(main())


def test_bad_arguments() -> None:
    async def main() -> None:
        async with client_for("http://127.0.0.1:9") as client:
            with pytest.raises(TypeError):
                await fetch(client, "k0")
            with pytest.raises(ValueError, match="transport"):
                await fetch(client, ["k0"], transport="carrier-pigeon")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="connections"):
                await fetch(client, ["k0"], connections=0)
            async with await fetch(client, []) as handle:
                assert await handle.anchor() == [] and await handle.wait() == []

    run(main())
