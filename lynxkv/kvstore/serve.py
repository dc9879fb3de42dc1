"""``lynxkv serve``: run the kvstore daemon until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from lynxkv.kvstore.app import make_app
from lynxkv.kvstore.config import ServerConfig
from lynxkv.kvstore.requests import IN_FLIGHT, InFlight

__all__ = ["DRAIN_SECONDS", "run_server", "serve"]

log = logging.getLogger("lynxkv.kvstore")

#: How long in-flight requests may take to finish after SIGTERM.
DRAIN_SECONDS = 30.0
#: Then, what aiohttp's shutdown gives a request that started meanwhile on a kept-alive
#: connection.
_GRACE_SECONDS = 1.0


async def run_server(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM / SIGINT), then stop accepting, let the
    requests in flight finish (up to DRAIN_SECONDS) and close the store."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = make_app(config)
    runner = web.AppRunner(app, shutdown_timeout=_GRACE_SECONDS, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        for host, port in (a[:2] for a in runner.addresses):
            # one line that scripts (and tests) read to find an ephemeral port
            print(f"lynxkv serving on http://{_url_host(host)}:{port}", flush=True)
        log.info(
            "data in %s, store %s, max %d bytes", config.data_dir, config.store, config.max_bytes
        )
        await stop.wait()
        log.info("stopping: draining requests in flight")
        await site.stop()
        await _drain(app[IN_FLIGHT])
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _drain(in_flight: InFlight) -> None:
    """Wait for the requests in flight, their connections still open and read: aiohttp's
    own shutdown (``runner.cleanup``) stops reading at once, which would strand an upload
    mid-body until its timeout and then cut it."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            await in_flight.idle()
    except TimeoutError:
        log.warning(
            "%d requests still in flight after %.0f s: cutting them", in_flight.count, DRAIN_SECONDS
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 literal (RFC 3986 3.2.2)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve(config: ServerConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(run_server(config))
