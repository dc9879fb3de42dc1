"""Link emulation: the token bucket's arithmetic on a fake clock, its fairness, and the
rate real transfers get through the client (within 10% of the setting)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lynxkv.client import AsyncClient, TokenBucket
from tests.client.conftest import client_on, make_object, run
from tests.kvstore.conftest import assemble


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reservations_follow_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(8000, burst=100, clock=clock)  # 1000 bytes/s
    assert (bucket.rate_bps, bucket.burst) == (8000, 100)
    assert bucket.reserve(100) == 0.0  # within the burst
    assert bucket.reserve(100) == pytest.approx(0.1)
    assert bucket.reserve(1000) == pytest.approx(1.1)  # larger than the burst: waits longer
    clock.now = 10.0  # idle: no credit beyond the burst piles up
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(150) == pytest.approx(0.15)


def test_default_burst() -> None:
    assert TokenBucket(1e9).burst == 1_250_000  # 10 ms at 1 Gbit/s
    assert TokenBucket(1e3).burst == 4096  # but at least 4 KiB


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate)
    with pytest.raises(ValueError):
        AsyncClient("http://127.0.0.1:1", rate_limit_bps=rate)


def test_bad_burst_and_size() -> None:
    with pytest.raises(ValueError):
        TokenBucket(1000, burst=0)
    with pytest.raises(ValueError):
        TokenBucket(1000).reserve(-1)


def test_waiters_are_served_fairly() -> None:
    """Four tasks taking chunks from one bucket advance together: they finish within a
    couple of chunks' time of each other, in the order they asked."""
    chunk, rounds, rate = 16 << 10, 8, 8e6  # 1 MB/s: 16 ms a chunk, about 0.5 s in all

    async def main() -> None:
        bucket = TokenBucket(rate)
        finished: list[tuple[float, int]] = []

        async def take(name: int) -> None:
            for _ in range(rounds):
                await bucket.acquire(chunk)
            finished.append((time.monotonic(), name))

        start = time.monotonic()
        await asyncio.gather(*(take(i) for i in range(4)))
        times = [t - start for t, _ in finished]
        assert [name for _, name in finished] == [0, 1, 2, 3]
        assert max(times) - min(times) < 4 * chunk / (rate / 8)
        assert max(times) == pytest.approx(4 * rounds * chunk / (rate / 8), rel=0.1)

    run(main())


def measured_bps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds


def test_a_transfer_runs_at_the_set_rate(tmp_path: Path) -> None:
    obj = make_object(7, layers=8, tokens=1024)  # about 3.3 MB
    rate = 20e6

    async def main() -> None:
        async with client_on(tmp_path, rate_limit_bps=rate) as (srv, c):
            await srv.put("k", obj)
            assert c.rate_limiter is not None and c.rate_limiter.rate_bps == rate
            start = time.monotonic()
            assert await c.get("k") == obj
            measured = measured_bps(len(obj), time.monotonic() - start)
            print(f"{len(obj)} bytes at {measured / 1e6:.2f} Mbit/s (set: {rate / 1e6:g})")
            assert measured == pytest.approx(rate, rel=0.1)

    run(main())


def test_connections_share_the_rate(tmp_path: Path) -> None:
    """Two GETs and a stream at once: together they get the rate, not three times it."""
    obj = make_object(8, layers=4, tokens=1024)  # about 1.7 MB
    rate = 40e6

    async def main() -> None:
        async with client_on(tmp_path, rate_limit_bps=rate, chunk_size=64 << 10) as (srv, c):
            await srv.put("k", obj)

            async def streamed() -> bytes:
                return assemble([f async for f in c.stream(["k"])])[0]

            start = time.monotonic()
            got = await asyncio.gather(c.get("k"), c.get("k"), streamed())
            elapsed = time.monotonic() - start
            assert list(got) == [obj, obj, obj]
            measured = measured_bps(3 * len(obj), elapsed)
            print(f"3 x {len(obj)} bytes at {measured / 1e6:.2f} Mbit/s (set: {rate / 1e6:g})")
            assert measured == pytest.approx(rate, rel=0.1)

    run(main())


def test_no_limit_by_default() -> None:
    assert AsyncClient("http://127.0.0.1:1").rate_limiter is None
