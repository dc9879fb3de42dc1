"""Progressive fetch: every key's anchor decoded as its sections land, then the residual.

``await fetch(client, keys)`` starts the transfer in background tasks and returns a
:class:`FetchHandle` at once. Each key's bytes go through an ``ObjectDecoder``, which
verifies every section's checksum as its last byte lands, and each verified section is
decoded right away (in a worker thread, so the loop keeps receiving). Transports:
``"stream"``, one ``POST /v1/stream`` whose gaps after a cut are filled by ranged GETs
guarded by the ETag; ``"ranges"``, the paper's two queues of anchor and residual Range
connections. A failure belongs to a key (and a residual failure leaves its anchor
usable). docs/client.md describes the whole contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from lynxkv.client.assembly import (
    FetchStats,
    KeyState,
    KeyStats,
    LayerEvent,
    Layers,
    Stage,
    Stream,
    Tensor,
)
from lynxkv.codec.container import Header
from lynxkv.codec.decoder import Section
from lynxkv.codec.kv import LayerKV
from lynxkv.errors import FormatError, LynxError, NotFound, TransportError
from lynxkv.kvstore.frames import DataFrame, Frame, InfoFrame, MissingFrame

if TYPE_CHECKING:
    from lynxkv.client.aio import AsyncClient

__all__ = ["FetchHandle", "FetchStats", "KeyStats", "LayerEvent", "fetch"]

Transport = Literal["stream", "ranges"]
_T = TypeVar("_T")


class _Queues:
    """The ranges transport's two queues: connection slots for anchors and for residuals,
    and the moment every anchor is in flight (residuals start then)."""

    def __init__(self, total: int, connections: int) -> None:
        self.waiting = total
        self.anchors_out = asyncio.Event()
        self.anchor_slots = asyncio.Semaphore(connections)
        self.residual_slots = asyncio.Semaphore(connections)

    def anchor_started(self) -> None:
        self.waiting -= 1
        if not self.waiting:
            self.anchors_out.set()


class FetchHandle:
    """A running progressive fetch (made by :func:`fetch`). Use it as an async context
    manager, or call :meth:`close`: closing cancels the transfers still running."""

    def __init__(
        self,
        client: AsyncClient,
        keys: Sequence[str],
        *,
        transport: Transport,
        decode: bool,
        connections: int,
    ) -> None:
        self._client = client
        self._keys = [KeyState(i, name, decode) for i, name in enumerate(keys)]
        self._transport = transport
        self._decode = decode
        self._connections = connections
        self._events: list[LayerEvent] = []
        self._tick = asyncio.Event()
        self._finished = False
        self._open: dict[Stage, int] = {"anchor": len(self._keys), "full": len(self._keys)}
        self.stats = FetchStats(time.perf_counter(), [k.stats for k in self._keys])
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self.stats.start = time.perf_counter()
        self._task = asyncio.create_task(self._run(), name="lynxkv-fetch")

    @property
    def keys(self) -> list[str]:
        return [k.name for k in self._keys]

    # -- results -------------------------------------------------------------------------

    @overload
    async def anchor(self) -> list[Layers]: ...
    @overload
    async def anchor(self, index: int) -> Layers: ...
    async def anchor(self, index: int | None = None) -> list[Layers] | Layers:
        """Every layer's (K, V) decoded from the anchor alone: of key number ``index``, or
        of every key (raising the error of the first key that failed)."""
        return await self._results("anchor", index)

    @overload
    async def residual(self) -> list[Layers]: ...
    @overload
    async def residual(self, index: int) -> Layers: ...
    async def residual(self, index: int | None = None) -> list[Layers] | Layers:
        """Every layer's (K, V) decoded from anchor and residual: the full decode."""
        return await self._results("full", index)

    @overload
    async def raw(self) -> list[bytes]: ...
    @overload
    async def raw(self, index: int) -> bytes: ...
    async def raw(self, index: int | None = None) -> list[bytes] | bytes:
        """The object's bytes, every section verified."""
        if index is None:
            return [await self._raw(k) for k in self._keys]
        return await self._raw(self._keys[index])

    async def sections(self, index: int, stream: Stream) -> tuple[Header, list[Section]]:
        """Key number ``index``'s header and verified sections of ``stream`` (in arrival
        order), once all of them are in: for a caller that decodes them itself (on the
        GPU, ``lynxkv.gpu``). Needs ``decode=False``; raises the key's error."""
        if self._decode:
            raise ValueError("sections are kept only by a fetch started with decode=False")
        k = self._keys[index]
        stage = _STAGE[stream]
        await self._until(lambda: k.over(stage))
        if not k.done(stage):
            raise k.errors[stage]
        header = k.decoder.header
        assert header is not None
        return header, [s for s in k.verified if s.ref.stream == stream]

    async def layer_ready(self, key_index: int, layer: int, part: Stage = "anchor") -> LayerKV:
        """(K, V) of one layer of one key, once both are decoded at ``part`` precision."""
        self._need_decode()
        k = self._keys[key_index]
        tensors = k.tensors[part]

        def have() -> bool:
            return (layer, "k") in tensors and (layer, "v") in tensors

        await self._until(lambda: have() or k.over(part))
        if have():
            return tensors[layer, "k"], tensors[layer, "v"]
        if part in k.errors:
            raise k.errors[part]
        raise IndexError(f"key {k.name!r} has no layer {layer}")

    async def events(self) -> AsyncIterator[LayerEvent]:
        """Every tensor as it is decoded, from the first (each call replays from the
        start); ends when the transfer has ended. Failures are not raised here: see
        :meth:`wait`."""
        seen = 0
        while True:
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if self._finished:
                return
            await self._tick.wait()

    async def wait(self) -> list[Exception | None]:
        """Wait until every transfer has ended; per key, its error or None."""
        await self._until(lambda: self._finished)
        return [k.error for k in self._keys]

    async def close(self) -> None:
        """Cancel what is still running and wait for it to stop. Keys that had not
        completed fail with :class:`~lynxkv.errors.TransportError`."""
        task = self._task
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc  # a bug in the transfer loop: do not hide it

    async def __aenter__(self) -> FetchHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _need_decode(self) -> None:
        if not self._decode:
            raise ValueError("this fetch was started with decode=False: use raw()")

    async def _results(self, stage: Stage, index: int | None) -> list[Layers] | Layers:
        self._need_decode()
        if index is None:
            return [await self._stage(k, stage) for k in self._keys]
        return await self._stage(self._keys[index], stage)

    async def _stage(self, k: KeyState, stage: Stage) -> Layers:
        await self._until(lambda: k.over(stage))
        if k.done(stage):
            return k.layers(stage)
        raise k.errors[stage]

    async def _raw(self, k: KeyState) -> bytes:
        await self._until(lambda: k.decoder.complete() or k.error is not None)
        if not k.decoder.complete():
            raise k.errors["full"]
        return bytes(k.raw)

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._tick.wait()

    def _notify(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    # -- bookkeeping ---------------------------------------------------------------------

    def _mark(self, k: KeyState) -> None:
        """Record the stages ``k`` has reached (or will never reach), then wake waiters."""
        now = time.perf_counter()
        for stage in ("anchor", "full"):
            if stage in k.reached or not k.over(stage):
                continue
            k.reached.add(stage)
            self._open[stage] -= 1
            if k.done(stage):
                setattr(k.stats, _TIME_FIELD[stage], now)
            if self._open[stage] == 0:
                setattr(self.stats, _TIME_FIELD[stage], now)
        if self.stats.first_byte is None and k.stats.first_byte is not None:
            self.stats.first_byte = k.stats.first_byte
        self._notify()

    def _fail(self, k: KeyState, exc: Exception, stage: Stage = "anchor") -> None:
        if k.fail(exc, stage):
            self._mark(k)

    async def _feed(self, k: KeyState, part: Stream, offset: int, data: bytes) -> None:
        stage = _STAGE[part]
        if stage in k.errors:
            return
        try:
            sections = k.take(part, offset, data)
            if not self._decode:
                k.verified += sections
            elif sections:
                async with k.lock:
                    tensors = await asyncio.to_thread(k.assemble, sections)
                self._record(k, tensors)
        except (LynxError, ValueError) as exc:  # ChecksumError above all: drop the part
            self._fail(k, exc, stage)
            return
        self._mark(k)

    def _record(self, k: KeyState, tensors: list[tuple[int, str, Stage, Tensor]]) -> None:
        k.record(tensors)
        now = time.perf_counter()
        self._events += (LayerEvent(k.index, *t, now) for t in tensors)

    # -- transfers -----------------------------------------------------------------------

    async def _run(self) -> None:
        outcome: Exception = TransportError("the transfer ended before this key completed")
        try:
            await (self._run_stream() if self._transport == "stream" else self._run_ranges())
        except (LynxError, ValueError) as exc:  # one failure for all: 401, a dead server
            outcome = exc
        except asyncio.CancelledError:
            outcome = TransportError("the fetch was closed before this key completed")
            raise
        except Exception as exc:  # a bug: fail the keys with it rather than leave waiters
            outcome = exc
            raise
        finally:
            for k in self._keys:
                self._fail(k, outcome)
            self._finished = True
            self._notify()

    async def _run_stream(self) -> None:
        received = False
        try:
            async with _closing(self._client.stream(self.keys)) as frames:
                async for frame in frames:
                    received = True
                    await self._on_frame(frame)
        except (TransportError, FormatError):
            # cut, or garbled by a broken connection: resume from what was verified; a
            # stream that failed before its first frame fails every key instead
            if not received:
                raise
        await self._run_ranges(resume=True)

    async def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, DataFrame):
            await self._feed(self._keys[frame.key], frame.part, frame.offset, frame.payload)
        elif isinstance(frame, InfoFrame):
            self._keys[frame.key].set_meta(frame.size, frame.anchor_end, frame.etag)
        elif isinstance(frame, MissingFrame):
            k = self._keys[frame.key]
            self._fail(k, NotFound(f"no object under key {k.name!r}"))
        # An ERROR frame stops a key's bytes (evicted, replaced, a read failed): the
        # ranged GETs after the stream find out which, with the ETag as guard.

    async def _run_ranges(self, *, resume: bool = False) -> None:
        todo = [k for k in self._keys if not k.settled]
        if not todo:
            return
        if resume:
            self.stats.resumed += len(todo)
        queues = _Queues(len(todo), self._connections)
        async with asyncio.TaskGroup() as group:
            for k in todo:
                group.create_task(self._guard(k, "anchor", self._anchor_side(k, queues)))
            for k in todo:
                group.create_task(self._guard(k, "full", self._residual_side(k, queues)))

    async def _guard(self, k: KeyState, stage: Stage, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except (LynxError, ValueError) as exc:
            self._fail(k, exc, stage)

    async def _anchor_side(self, k: KeyState, queues: _Queues) -> None:
        async with queues.anchor_slots:
            queues.anchor_started()
            if not k.known.is_set():
                try:
                    meta = await self._client.head(k.name)
                except NotFound as exc:  # a HEAD answer has no body to say more
                    raise NotFound(f"no object under key {k.name!r}") from exc
                k.set_meta(meta.size, meta.anchor_end, meta.etag)
            await self._pull(k, "anchor")

    async def _residual_side(self, k: KeyState, queues: _Queues) -> None:
        await queues.anchors_out.wait()
        await k.known.wait()
        async with queues.residual_slots:
            await self._pull(k, "residual")

    async def _pull(self, k: KeyState, part: Stream) -> None:
        """Fetch what ``k`` lacks of ``part`` with ranged GETs; ``iter_bytes`` resumes cut
        responses itself and raises PreconditionFailed if the object was replaced."""
        start, end = k.next[part], k.anchor_end if part == "anchor" else k.size
        if _STAGE[part] in k.errors or start >= end:
            return
        chunks = self._client.iter_bytes(k.name, start, end, etag=k.etag)
        async with _closing(chunks) as pieces:
            async for offset, piece in pieces:
                await self._feed(k, part, offset, piece)
                if _STAGE[part] in k.errors:
                    return


_TIME_FIELD: dict[str, str] = {"anchor": "anchor_complete", "full": "residual_complete"}
_STAGE: dict[Stream, Stage] = {"anchor": "anchor", "residual": "full"}


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """Close an async generator when the loop over it stops early (its connection with it)."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


async def fetch(
    client: AsyncClient,
    keys: Sequence[str],
    *,
    transport: Transport = "stream",
    decode: bool = True,
    connections: int = 8,
) -> FetchHandle:
    """Start fetching ``keys`` progressively (docs/client.md). ``decode=False`` only
    verifies and keeps the bytes (:meth:`FetchHandle.raw`) and the verified sections
    (:meth:`FetchHandle.sections`). ``connections`` bounds the
    anchor connections, and separately the residual ones, of the ranges transport (and of
    the resume after a cut stream)."""
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of keys, not one string")
    if transport not in ("stream", "ranges"):
        raise ValueError(f"transport must be 'stream' or 'ranges', got {transport!r}")
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections}")
    handle = FetchHandle(
        client, list(keys), transport=transport, decode=decode, connections=connections
    )
    handle._start()
    return handle
