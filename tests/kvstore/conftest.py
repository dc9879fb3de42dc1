"""What the server tests share: a real server on 127.0.0.1 port 0 with a real LMDB in a temp
dir, in this process (``live_server``, the ``serve`` fixture) or as a ``lynxkv serve``
subprocess (``ServerProcess``); valid codec objects; readers of frames and multipart bodies.

The ``backend`` fixture runs a test once per store: on LMDB, and on the session's Redis
Cluster (``redis_cluster``, three masters with a replica each, started on first use) in a
key namespace of the test's own. ``serve`` and ``hooked_server`` take it.

pytest-asyncio is not used: a test is a plain function that hands a coroutine to ``serve``
(or to ``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lynxkv.codec import encode, parse_header
from lynxkv.kvstore.app import make_app
from lynxkv.kvstore.config import ServerConfig, parse_redis_cluster_url
from lynxkv.kvstore.frames import DataFrame, Frame, FrameParser, InfoFrame
from lynxkv.kvstore.lmdb_store import LmdbOptions, LmdbStore
from lynxkv.kvstore.requests import MAX_KEYS, STORE
from lynxkv.kvstore.store import ObjectInfo, PutHandle, Store, StoreStats
from tests.codec.kvgen import make_kv
from tests.redis_cluster import LocalCluster, require_tools

MiB = 1 << 20
#: No server test may hang: each coroutine a test runs is cut off after this long.
TEST_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[2]


# -- objects -------------------------------------------------------------------------------


@functools.cache
def make_object(seed: int, layers: int = 2, tokens: int = 300, codec: str = "lynx-a4") -> bytes:
    """A valid object from synthetic KV; equal shapes give equal sizes. ("raw" objects are
    all anchor: no residual.)"""
    return encode(make_kv(seed, layers=layers, tokens=tokens), codec)


def anchor_end(obj: bytes) -> int:
    return parse_header(obj).anchor_end


# -- an in-process server ----------------------------------------------------------------


@dataclass
class Server:
    """A running server and a client session whose base URL is the server's."""

    url: str
    app: web.Application
    session: aiohttp.ClientSession
    config: ServerConfig

    @property
    def store(self) -> Store:
        return self.app[STORE]

    async def put(self, key: str, obj: bytes) -> dict[str, Any]:
        # a file-like body: aiohttp warns (ResourceWarning) on large raw bytes
        async with self.session.put(f"/v1/kv/{key}", data=io.BytesIO(obj)) as resp:
            assert resp.status in (200, 201), await resp.text()
            body: dict[str, Any] = await resp.json()
            return body

    async def get(self, key: str, **kw: Any) -> bytes:
        async with self.session.get(f"/v1/kv/{key}", **kw) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()

    async def status(self, method: str, path: str) -> int:
        async with self.session.request(method, path) as resp:
            await resp.read()
            return resp.status

    async def metrics(self) -> Samples:
        return await scrape(self.session)


#: Prometheus samples: (name, sorted (label, value) pairs) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession) -> Samples:
    """GET /metrics, parsed with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def config_for(data_dir: Path, **overrides: Any) -> ServerConfig:
    settings: dict[str, Any] = {"max_bytes": 64 * MiB, **overrides}
    settings.setdefault("max_object_bytes", min(16 * MiB, settings["max_bytes"]))
    return ServerConfig(host="127.0.0.1", port=0, data_dir=data_dir, **settings)


@contextlib.asynccontextmanager
async def live_server(
    data_dir: Path,
    *,
    store: Store | None = None,
    backend: str = "lmdb",
    setup: Callable[[web.Application], None] | None = None,
    **config: Any,
) -> AsyncIterator[Server]:
    """``make_app`` served by ``web.AppRunner`` and ``web.TCPSite`` on 127.0.0.1 port 0.

    ``backend`` is the config's ``store`` (``lmdb`` or a ``redis-cluster://`` URL), which
    the app opens; ``store`` replaces it (the app closes it); ``setup`` may adjust the app
    before it starts; ``config`` overrides ``config_for``'s settings."""
    cfg = config_for(data_dir, store=backend, **config)
    app = make_app(cfg, store=store)
    if setup is not None:
        setup(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        async with aiohttp.ClientSession(url) as session:
            yield Server(url, app, session, cfg)
    finally:
        await runner.cleanup()


# -- the stores a test runs on ----------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One Redis Cluster for the session (tests keep apart by key namespace); skips when
    redis-server is not installed (fails in CI: ``require_tools``)."""
    require_tools()
    with LocalCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def ns(redis_cluster: LocalCluster) -> Backend:
    """A namespace of the test's own on the session's cluster."""
    return redis_backend(redis_cluster)


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Starts clusters of the test's own (for tests that break them); stops them after."""
    require_tools()
    started: list[LocalCluster] = []

    def start(**kw: Any) -> LocalCluster:
        started.append(LocalCluster(tmp_path / f"cluster-{len(started)}", **kw))
        return started[-1].start()

    yield start
    for cluster in started:
        cluster.stop()


@dataclass(frozen=True)
class Backend:
    """The store a test runs on: LMDB in the test's folder, or a namespace of its own on the
    session's Redis Cluster."""

    kind: str
    cluster: LocalCluster | None = None
    #: Options for the Redis store's URL (``stats_cache_s=0``: tests count right after acting).
    query: str = ""

    @property
    def setting(self) -> str:
        """The config's ``store`` value."""
        if self.cluster is None:
            return "lmdb"
        return f"{self.cluster.url}?" + "&".join(filter(None, ["stats_cache_s=0", self.query]))

    @property
    def prefix(self) -> str:
        """The Redis store's key namespace."""
        return parse_redis_cluster_url(self.setting).options.prefix

    def with_options(self, query: str) -> Backend:
        """The same store with more URL options (``piece_size=4KiB&retire_grace_s=0``)."""
        return replace(self, query="&".join(filter(None, [self.query, query])))

    async def open(self, data_dir: Path, max_bytes: int, piece_size: int | None = None) -> Store:
        """The store itself, as the app would open it (with pieces of ``piece_size``)."""
        if self.cluster is None:
            options = None
            if piece_size is not None:
                options = LmdbOptions(piece_size=piece_size, write_batch=4 * piece_size)
            return await LmdbStore.open(data_dir, max_bytes, options)
        from lynxkv.kvstore.redis_store import RedisClusterStore

        url = parse_redis_cluster_url(self.setting)
        opts = url.options if piece_size is None else replace(url.options, piece_size=piece_size)
        return await RedisClusterStore.open(url.nodes, opts)

    def max_bytes(self, config: ServerConfig) -> int:
        """The capacity the store reports: LMDB's configured one, or the masters' maxmemory."""
        if self.cluster is None:
            return config.max_bytes
        return sum(int(self.cluster.info(p, "memory")["maxmemory"]) for p in self.cluster.masters())


def redis_backend(cluster: LocalCluster, query: str = "") -> Backend:
    """A fresh namespace on ``cluster``."""
    prefix = f"prefix=t-{uuid.uuid4().hex[:12]}"
    return Backend("redis-cluster", cluster, "&".join(filter(None, [prefix, query])))


@pytest.fixture(params=["lmdb", pytest.param("redis-cluster", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each store in turn (the cluster starts only when a Redis test runs)."""
    if request.param == "lmdb":
        return Backend("lmdb")
    return redis_backend(request.getfixturevalue("redis_cluster"))


Check = Callable[[Server], Awaitable[None]]
Serve = Callable[..., None]


@pytest.fixture
def serve(tmp_path: Path, backend: Backend) -> Serve:
    """``serve(check, **config)`` runs ``await check(server)`` against a fresh server on each
    store (``backend``), whose data lives in the test's temp dir or namespace;
    ``live_server``'s keywords pass through."""

    def run(check: Check, **kw: Any) -> None:
        async def main() -> None:
            async with (
                asyncio.timeout(TEST_TIMEOUT),
                live_server(tmp_path / "data", backend=backend.setting, **kw) as srv,
            ):
                await check(srv)

        asyncio.run(main())

    return run


#: Bodies that /v1/lookup and /v1/stream both refuse, and the error code.
BAD_JSON_BODIES: list[tuple[str, bytes, str]] = [
    ("not-json", b"{keys: [}", "bad_request"),
    ("not-utf8", b'{"keys": ["\xff"]}', "bad_request"),
    ("empty", b"", "bad_request"),
    ("array", b'["k"]', "bad_request"),
    ("string", b'"k"', "bad_request"),
    ("no-keys", b"{}", "bad_request"),
    ("keys-not-list", b'{"keys": "k"}', "bad_request"),
    ("key-not-string", b'{"keys": ["k", 1]}', "bad_request"),
    ("key-null", b'{"keys": [null]}', "bad_request"),
    ("bad-key", b'{"keys": ["ok", "not ok"]}', "invalid_key"),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, "bad_request"),
    ("too-many-keys", json.dumps({"keys": ["k"] * (MAX_KEYS + 1)}).encode(), "bad_request"),
]


# -- a store with hooks ---------------------------------------------------------------------


@dataclass
class HookedStore:
    """The real store, with events a test can await and gates that hold a read back.

    ``began[key]`` is set once ``begin_put`` returned (space is reserved); a read of a key
    in ``gates`` sets ``held[key]`` and waits for the gate before its first byte. For a
    read of ``[start, ...)``, ``before_piece(key, start)`` runs as each piece is handed
    over and ``after_piece(key, start)`` when the reader comes back for the next one, i.e.
    once it has sent the previous one."""

    inner: Store
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    began: dict[str, asyncio.Event] = field(default_factory=dict)
    before_piece: Callable[[str, int], None] = lambda key, start: None
    after_piece: Callable[[str, int], None] = lambda key, start: None

    def event(self, table: dict[str, asyncio.Event], key: str) -> asyncio.Event:
        return table.setdefault(key, asyncio.Event())

    async def begin_put(self, key: str, size_hint: int | None) -> PutHandle:
        handle = await self.inner.begin_put(key, size_hint)
        self.event(self.began, key).set()
        return handle

    async def info(self, key: str) -> ObjectInfo:
        return await self.inner.info(key)

    async def read(
        self, key: str, start: int, end: int, etag: str | None = None
    ) -> AsyncIterator[bytes]:
        if key in self.gates:
            self.event(self.held, key).set()
            await self.gates[key].wait()
        pieces = self.inner.read(key, start, end, etag)
        try:
            async for piece in pieces:
                self.before_piece(key, start)
                yield piece
                self.after_piece(key, start)
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        return await self.inner.contains(keys)

    async def list(self, prefix: str = "", limit: int = 1000) -> list[ObjectInfo]:
        return await self.inner.list(prefix, limit)

    async def stats(self) -> StoreStats:
        return await self.inner.stats()

    async def close(self) -> None:
        await self.inner.close()


@contextlib.asynccontextmanager
async def hooked_server(
    data_dir: Path,
    options: LmdbOptions | None = None,
    *,
    backend: Backend | None = None,
    piece_size: int | None = None,
    **kw: Any,
) -> AsyncIterator[tuple[Server, HookedStore]]:
    """``live_server`` on a ``HookedStore`` around a real store: an ``LmdbStore`` with
    ``options``, or the ``backend``'s store with pieces of ``piece_size``."""
    max_bytes = kw.get("max_bytes", config_for(data_dir).max_bytes)
    if backend is None:
        inner: Store = await LmdbStore.open(data_dir, max_bytes, options)
    else:
        assert options is None, "options are LMDB's: give piece_size"
        inner = await backend.open(data_dir, max_bytes, piece_size)
    hooked = HookedStore(inner)
    async with live_server(data_dir, store=hooked, **kw) as srv:
        yield srv, hooked


def run(coro: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` with the tests' time bound."""

    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await coro

    asyncio.run(bounded())


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    """Poll for server-side clean-up that no event announces (a handler ending after its
    client hung up)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- reading responses ----------------------------------------------------------------------


async def expect_error(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    """Assert the status and the JSON error body; return its message."""
    body = await resp.read()
    assert resp.status == status, body[:300]
    assert resp.content_type == "application/json", resp.content_type
    error = await resp.json()
    assert set(error) == {"error", "message"}, error
    assert error["error"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    message: str = error["message"]
    return message


async def read_frames(resp: aiohttp.ClientResponse, key_count: int) -> list[Frame]:
    """A /v1/stream body, parsed (and its order checked) by ``FrameParser``."""
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/vnd.lynxkv.frames"
    parser = FrameParser(key_count)
    frames: list[Frame] = []
    async for data in resp.content.iter_any():
        frames += parser.feed(data)
    parser.close()
    return frames


async def stream(
    session: aiohttp.ClientSession, keys: Sequence[str], parts: Sequence[str] | None = None
) -> list[Frame]:
    body: dict[str, Any] = {"keys": list(keys)}
    if parts is not None:
        body["parts"] = list(parts)
    async with session.post("/v1/stream", json=body) as resp:
        return await read_frames(resp, len(keys))


def assemble(frames: Sequence[Frame]) -> dict[int, bytes]:
    """Each key's bytes from its DATA frames, placed at their offsets (sized by INFO)."""
    infos = {f.key: f for f in frames if isinstance(f, InfoFrame)}
    out = {key: bytearray(info.size) for key, info in infos.items()}
    for f in frames:
        if isinstance(f, DataFrame):
            out[f.key][f.offset : f.end] = f.payload
    return {key: bytes(data) for key, data in out.items()}


async def read_multipart(resp: aiohttp.ClientResponse) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body, read with
    aiohttp's ``MultipartReader``."""
    parts = []
    reader = aiohttp.MultipartReader.from_response(resp)
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        assert part.headers["Content-Type"] == "application/octet-stream"
        parts.append((part.headers["Content-Range"], bytes(await part.read(decode=False))))
    return parts


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def error(self) -> tuple[str, str]:
        """(code, message) of a JSON error body."""
        assert self.headers["content-type"].startswith("application/json"), self.headers
        error = json.loads(self.body)
        assert set(error) == {"error", "message"}, error
        return error["error"], error["message"]


async def raw_request(
    url: str, head: str, body: bytes = b"", *, answer: bool = True
) -> RawResponse:
    """Send ``head`` (request line and headers, without the blank line) and ``body`` on a
    fresh connection, which may announce more body than it sends; read the answer (unless
    ``answer`` is false); then close the connection."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode("latin-1") + b"\r\n\r\n" + body)
        await writer.drain()
        if not answer:
            return RawResponse(0, {}, b"")
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        return RawResponse(int(status_line.split()[1]), headers, await reader.readexactly(length))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- a server in a subprocess -----------------------------------------------------------------


class ServerProcess:
    """``python -m lynxkv.cli serve --port 0 --data-dir DIR ARGS``; the URL comes from the
    line it prints once listening. Its log goes to ``DIR.log``. Killed on exit if running."""

    def __init__(self, data_dir: Path, *args: str, startup: float = 30.0) -> None:
        self.log_path = data_dir.with_suffix(".log")
        path = [str(REPO), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        cmd = [sys.executable, "-m", "lynxkv.cli", "serve", "--port", "0"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--data-dir", str(data_dir), *args],
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=REPO,
            )
        try:
            self.url = self._read_url(startup)
        except BaseException:
            self.close()
            raise

    def _read_url(self, startup: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + startup
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"no 'serving on' line in {startup} s; log: {self.log()}"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                byte = os.read(self.proc.stdout.fileno(), 1)
                assert byte, f"the server exited ({self.proc.poll()}); log: {self.log()}"
                line += byte
        prefix = "lynxkv serving on "
        text = line.decode().strip()
        assert text.startswith(prefix), text
        return text.removeprefix(prefix)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
