"""The connector: what an inference engine calls to look up, save and load KV chunks.

:class:`KVConnector` is engine-agnostic: it takes token ids and per-layer numpy KV, and
talks to a lynxkv server through :class:`~lynxkv.client.AsyncClient` on an event loop
of its own (a daemon thread), so the engine's thread only blocks where the contract
below says so. Engine adapters (``lynxkv.connector.transformers``, ``lynxkv.connector.vllm``)
build on it.

Contract
--------
Every method is called from the engine's thread (one thread at a time; the class is not
meant to be shared by concurrent callers, except ``stats``, which any thread may read).

``lookup(token_ids, codec) -> int``
    Called once per request, before the engine decides what to prefill. Blocks for one
    ``POST /v1/lookup`` round trip (bounded by the client's timeout and retries). Returns
    the number of leading tokens whose chunks are stored (a multiple of ``chunk_tokens``).
``save(token_ids, kv, codec)``
    Called after a prefill, at most once per request; returns at once. Encoding and the
    PUTs run on a background worker (one, so saves are done in call order); chunks
    already stored (by a lookup of their keys) are not sent again. **Ownership of the
    ``kv`` arrays passes to the connector**: the caller must not write to them afterwards.
    ``wait_for_save()`` blocks until every save so far has finished (for tests, shutdown,
    and callers that must read their own writes).
``load(token_ids, codec, tokens) -> LoadHandle``
    Called once per request after ``lookup``, with ``tokens`` at most what it returned.
    Returns at once; the transfer runs in the background, anchors first. The engine then
    calls ``handle.anchor()`` (blocks until every anchor is decoded), polls
    ``handle.residual_ready`` between decode steps (never blocks), and calls
    ``handle.residual()`` (blocks until the full decode), then ``handle.close()``. The
    arrays the handle returns are new and belong to the caller. With ``decode=False``
    nothing is decoded on the host: ``anchor_sections()`` and ``residual_sections()``
    hand over each chunk's verified sections instead, for the engine to decode on its
    GPU (``lynxkv.gpu``).
``close()``
    Once, at shutdown: waits for pending saves, then stops the loop thread.

Failures
--------
A store that is down, answers 5xx, times out, or sends a damaged object never raises
into the engine: ``lookup`` answers 0, ``save`` drops the chunks it could not store,
``anchor()``/``residual()`` answer ``None``. Each failure is logged (logger
``lynxkv.connector``), counted in :attr:`KVConnector.stats`, and passed to the
:meth:`KVConnector.on_failure` hook (a no-op here). The engine then recomputes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from lynxkv.client.loopthread import LoopThread
from lynxkv.codec import encode_chunks
from lynxkv.codec.spec import CodecSpec, get_codec
from lynxkv.connector.keys import ChunkKeys
from lynxkv.errors import LynxError

if TYPE_CHECKING:
    from lynxkv.client.aio import AsyncClient
    from lynxkv.client.assembly import Stream
    from lynxkv.client.fetch import FetchHandle, FetchStats
    from lynxkv.codec.container import Header
    from lynxkv.codec.decoder import Section

__all__ = [
    "ConnectorStats",
    "KVConnector",
    "KeySections",
    "LoadHandle",
    "SaveLayers",
    "StoreFailure",
]

log = logging.getLogger("lynxkv.connector")

T = TypeVar("T")
#: per layer (K, V), each [T, H, D]
Layers = list[tuple[NDArray[Any], NDArray[Any]]]
#: per layer (K, V), each [T, H, D]: numpy arrays, or torch tensors (on the engine's
#: device) that ``lynxkv.gpu.encode_chunks`` encodes
SaveLayers = Sequence[tuple[Any, Any]]
#: one chunk's header and verified sections of one stream (a load with ``decode=False``)
KeySections = tuple["Header", list["Section"]]

#: What a store operation may fail with, once the client has translated it: lynxkv's own
#: errors, OSError (TransportError is a ConnectionError), timeouts, and a malformed answer.
StoreFailure = (LynxError, OSError, TimeoutError, ValueError, concurrent.futures.CancelledError)


@dataclass
class ConnectorStats:
    """Counters of one connector (a metric per field). Updated under a lock by the
    engine's thread and the save worker; read from any thread."""

    lookups: int = 0
    lookup_failures: int = 0
    chunks_saved: int = 0
    chunks_already_stored: int = 0
    save_failures: int = 0
    loads: int = 0
    load_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: int(v) for k, v in vars(self).items() if not k.startswith("_")}


class _LoopThread:
    """An event loop in a daemon thread, started on first use, with one AsyncClient."""

    def __init__(self, make_client: Any) -> None:
        self._make_client = make_client
        self._runner = LoopThread("lynxkv-connector")
        self._client: AsyncClient | None = None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._runner.loop())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    async def client(self) -> AsyncClient:
        """The client, made on the loop (aiohttp sessions belong to one loop)."""
        if self._client is None:
            self._client = self._make_client()
        assert self._client is not None
        return self._client

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def close(self) -> None:
        self._runner.stop(self._close_client)


def _encode(rows: SaveLayers, spec: CodecSpec, tokens: int, model: str) -> list[bytes]:
    """Objects of ``tokens`` tokens from per-layer (K, V) rows: numpy arrays by the numpy
    codec, torch tensors (the engine's own, possibly on its GPU) by ``lynxkv.gpu``."""
    if rows and not isinstance(rows[0][0], np.ndarray):
        from lynxkv.gpu import encode_chunks as encode_tensors

        ks, vs = [k for k, _ in rows], [v for _, v in rows]
        return encode_tensors(ks, vs, spec, tokens_per_object=tokens, model=model)
    return encode_chunks(list(rows), spec, tokens_per_object=tokens, model=model)


def _concat(per_key: list[Layers]) -> Layers:
    """Per-key lists of per-layer (K, V) [256, H, D] -> per layer (K, V) [P, H, D]."""
    layers = len(per_key[0])
    return [
        (
            np.concatenate([key[i][0] for key in per_key]),
            np.concatenate([key[i][1] for key in per_key]),
        )
        for i in range(layers)
    ]


class LoadHandle:
    """A running load of ``tokens`` cached tokens (made by :meth:`KVConnector.load`).

    ``anchor_at`` / ``residual_at`` are the ``time.perf_counter()`` instants each stage
    completed (``None`` until then, or if it failed)."""

    def __init__(
        self,
        connector: KVConnector,
        keys: Sequence[str],
        tokens: int,
        *,
        decode: bool = True,
    ) -> None:
        self.tokens = tokens
        self.keys = list(keys)
        #: False: the handle hands over verified sections (``anchor_sections``), not arrays
        self.decode = decode
        self.anchor_at: float | None = None
        self.residual_at: float | None = None
        self._connector = connector
        self._fetch: FetchHandle | None = None
        self._stats: FetchStats | None = None
        self._anchor: concurrent.futures.Future[Any] | None = None
        self._residual: concurrent.futures.Future[Any] | None = None
        self._failed = False
        if not self.keys:
            return
        io = connector._io
        try:
            self._fetch = io.run(self._open())
        except StoreFailure as exc:
            self.fail("load", exc)
            return
        self._stats = self._fetch.stats
        if decode:
            self._anchor = io.submit(self._fetch.anchor())
            self._residual = io.submit(self._fetch.residual())
        else:
            self._anchor = io.submit(self._sections(self._fetch, "anchor"))
            self._residual = io.submit(self._sections(self._fetch, "residual"))
        self._anchor.add_done_callback(lambda f: self._stamp("anchor_at", f))
        self._residual.add_done_callback(lambda f: self._stamp("residual_at", f))

    async def _open(self) -> FetchHandle:
        client = await self._connector._io.client()
        return await client.fetch(self.keys, decode=self.decode)

    async def _sections(self, fetch: FetchHandle, stream: Stream) -> list[KeySections]:
        return [await fetch.sections(i, stream) for i in range(len(self.keys))]

    def _stamp(self, name: str, future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            setattr(self, name, time.perf_counter())

    def fail(self, op: str, exc: BaseException) -> None:
        """Count this load as failed (once, whichever stage or caller saw it first): for an
        engine adapter that finds the data unusable (chunks of another shape, say)."""
        if not self._failed:
            self._failed = True
            self._connector._failure("load_failures", op, exc)

    def _wait(
        self,
        future: concurrent.futures.Future[Any] | None,
        what: str,
        timeout: float | None,
        decoded: bool,
    ) -> Any:
        if decoded != self.decode:
            raise ValueError(
                f"this load was started with decode={self.decode}: use "
                + ("anchor() and residual()" if self.decode else "the *_sections() methods")
            )
        if future is None:
            return None
        try:
            result = future.result(timeout)
        except StoreFailure as exc:
            self.fail(f"load ({what})", exc)
            return None
        return _concat(result) if decoded else result

    def anchor(self, timeout: float | None = None) -> Layers | None:
        """Blocks until every chunk's anchor is decoded: per layer (K, V) [tokens, H, D]
        float32 (the full decode for codecs without a residual); ``None`` on failure."""
        layers: Layers | None = self._wait(self._anchor, "anchor", timeout, True)
        return layers

    def anchor_sections(self, timeout: float | None = None) -> list[KeySections] | None:
        """With ``decode=False``: blocks until every chunk's anchor sections are verified;
        per chunk, its header and those sections (for ``lynxkv.gpu.decode_anchor``);
        ``None`` on failure."""
        sections: list[KeySections] | None = self._wait(self._anchor, "anchor", timeout, False)
        return sections

    def residual_sections(self, timeout: float | None = None) -> list[KeySections] | None:
        """With ``decode=False``: as :meth:`anchor_sections`, for the residual sections
        (for ``lynxkv.gpu.refine_residual``; none for codecs without a residual)."""
        sections: list[KeySections] | None = self._wait(self._residual, "residual", timeout, False)
        return sections

    @property
    def stats(self) -> FetchStats | None:
        """The transfer's bytes and times per stream (kept after :meth:`close`); ``None``
        when nothing was fetched."""
        return self._stats

    @property
    def residual_ready(self) -> bool:
        """Whether :meth:`residual` would answer without blocking (never blocks)."""
        return self._residual is None or self._residual.done()

    def residual(self, timeout: float | None = None) -> Layers | None:
        """Blocks until the full decode of every chunk; ``None`` on failure."""
        layers: Layers | None = self._wait(self._residual, "residual", timeout, True)
        return layers

    def close(self) -> None:
        """Cancel what still runs and drop the fetched data. Calling it again does nothing."""
        fetch, self._fetch = self._fetch, None
        for future in (self._anchor, self._residual):
            if future is not None:
                future.cancel()
        if fetch is not None:
            self._connector._io.run(fetch.close())


class KVConnector:
    """Lookup, save and load of chained KV chunks on one lynxkv server (module docstring:
    the contract). ``fingerprint`` names the model (``LoadedModel.fingerprint``);
    ``tp_rank`` the tensor-parallel rank whose heads the KV holds; the client options are
    :class:`~lynxkv.client.AsyncClient`'s."""

    def __init__(
        self,
        url: str,
        *,
        fingerprint: str,
        chunk_tokens: int = 256,
        tp_rank: int = 0,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        rate_limit_bps: float | None = None,
    ) -> None:
        self.url = url
        self.fingerprint = fingerprint
        self.chunk_tokens = chunk_tokens
        self.tp_rank = tp_rank
        self.stats = ConnectorStats()
        ChunkKeys(fingerprint, get_codec("raw"), chunk_tokens, tp_rank)  # validates

        def make_client() -> AsyncClient:
            from lynxkv.client.aio import AsyncClient

            return AsyncClient(
                url,
                token,
                timeout=timeout,
                retries=retries,
                backoff=backoff,
                rate_limit_bps=rate_limit_bps,
            )

        self._io = _LoopThread(make_client)
        self._saver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lynxkv-save")
        self._pending: list[concurrent.futures.Future[None]] = []

    # -- keys -------------------------------------------------------------------------------

    def keyer(self, codec: CodecSpec | str) -> ChunkKeys:
        spec = get_codec(codec) if isinstance(codec, str) else codec
        return ChunkKeys(self.fingerprint, spec, self.chunk_tokens, self.tp_rank)

    def keys(self, token_ids: Sequence[int], codec: CodecSpec | str) -> list[str]:
        """The keys of the full chunks of ``token_ids``."""
        return self.keyer(codec).keys(token_ids)

    # -- the contract -----------------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int], codec: CodecSpec | str) -> int:
        """How many leading tokens of ``token_ids`` are stored; 0 when the store fails."""
        keys = self.keys(token_ids, codec)
        self.stats.add("lookups")
        if not keys:
            return 0
        try:
            found = self._io.run(self._lookup(keys))
        except StoreFailure as exc:
            self._failure("lookup_failures", "lookup", exc)
            return 0
        return found * self.chunk_tokens

    async def _lookup(self, keys: list[str]) -> int:
        client = await self._io.client()
        return (await client.lookup(keys)).prefix

    def save(self, token_ids: Sequence[int], kv: SaveLayers, codec: CodecSpec | str) -> None:
        """Store every full chunk of ``kv`` (per layer (K, V) [T, H, D], T tokens of
        ``token_ids[:T]``) in the background. Never raises a store failure. numpy arrays
        are encoded by the numpy codec; torch tensors by ``lynxkv.gpu.encode_chunks``
        (the GPU kernels for CUDA tensors with CuPy; the same bytes)."""
        spec = get_codec(codec) if isinstance(codec, str) else codec
        ids = list(token_ids)
        job = self._saver.submit(self._save, ids, kv, spec)
        self._pending.append(job)

    def wait_for_save(self, timeout: float | None = None) -> None:
        """Block until every save so far has finished (stored or counted as failed)."""
        pending, self._pending = self._pending, []
        concurrent.futures.wait(pending, timeout)

    def load(
        self, token_ids: Sequence[int], codec: CodecSpec | str, tokens: int, *, decode: bool = True
    ) -> LoadHandle:
        """Start loading the first ``tokens`` tokens' chunks (a multiple of
        ``chunk_tokens``, at most what :meth:`lookup` answered). ``decode=False``: the
        handle only verifies the sections and hands them over, for an engine that decodes
        them on its GPU (``LoadHandle.anchor_sections``)."""
        if tokens % self.chunk_tokens or tokens < 0 or tokens > len(token_ids):
            raise ValueError(
                f"tokens must be a multiple of {self.chunk_tokens} within the sequence, "
                f"got {tokens}"
            )
        self.stats.add("loads")
        keys = self.keys(list(token_ids)[:tokens], codec)
        return LoadHandle(self, keys, tokens, decode=decode)

    def fetch_objects(self, keys: Sequence[str]) -> concurrent.futures.Future[list[bytes]]:
        """Start fetching the whole objects under ``keys``, in the background, for an
        adapter that decodes them itself (the vLLM one). The future's error is a store
        failure, which the caller reports with :meth:`report_failure`."""
        return self._io.submit(self._get_all(list(keys)))

    async def _get_all(self, keys: list[str]) -> list[bytes]:
        client = await self._io.client()
        return [await client.get(key) for key in keys]

    def report_failure(self, counter: str, op: str, exc: BaseException) -> None:
        """Log and count a store failure an adapter met (``counter`` in :attr:`stats`)."""
        self._failure(counter, op, exc)

    def close(self) -> None:
        self.wait_for_save()
        self._saver.shutdown(wait=True)
        self._io.close()

    def __enter__(self) -> KVConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks and internals --------------------------------------------------------------

    def on_failure(self, op: str, exc: BaseException) -> None:
        """Called after a store failure is logged and counted; a no-op here."""

    def _failure(self, counter: str, op: str, exc: BaseException) -> None:
        self.stats.add(counter)
        log.warning("lynxkv %s failed (%s: %s); the engine recomputes", op, type(exc).__name__, exc)
        self.on_failure(op, exc)

    def _save(self, ids: list[int], kv: SaveLayers, spec: CodecSpec) -> None:
        """The save worker's job: look up, encode the missing chunks, PUT them in order."""
        c = self.chunk_tokens
        tokens = min(len(ids), int(kv[0][0].shape[0])) if kv else 0
        keys = self.keys(ids[:tokens], spec)
        if not keys:
            return
        try:
            present = self._io.run(self._lookup(keys))
            self.stats.add("chunks_already_stored", present)
            # kv[i]: (K, V) [T, H, D] -> the missing chunks' rows only
            rows = [(k[present * c : len(keys) * c], v[present * c : len(keys) * c]) for k, v in kv]
            if present == len(keys):
                return
            objects = _encode(rows, spec, c, self.fingerprint)
            for key, data in zip(keys[present:], objects, strict=True):
                self._io.run(self._put(key, data))
                self.stats.add("chunks_saved")
        except StoreFailure as exc:
            self._failure("save_failures", "save", exc)

    async def _put(self, key: str, data: bytes) -> None:
        client = await self._io.client()
        await client.put(key, data)
