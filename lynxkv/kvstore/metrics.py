"""Prometheus metrics of one server, in a registry of its own (so that several apps in
one process, as in the tests, do not collide)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lynxkv.kvstore.store import StoreStats

__all__ = ["Metrics"]

#: Latency buckets from 0.5 ms to 30 s: small GETs of cached anchors up to long streams.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StoreCollector(Collector):
    """Reads the store's figures at scrape time (an LMDB stat is cheap)."""

    def __init__(self) -> None:
        self.latest = StoreStats(objects=0, bytes=0, max_bytes=0, evictions=0)

    def collect(self) -> Iterable[Metric]:
        s = self.latest
        yield GaugeMetricFamily("lynxkv_objects", "Objects stored", value=s.objects)
        yield GaugeMetricFamily("lynxkv_stored_bytes", "Bytes of object data stored", value=s.bytes)
        yield GaugeMetricFamily(
            "lynxkv_max_bytes", "Configured capacity in bytes", value=s.max_bytes
        )
        yield GaugeMetricFamily(
            "lynxkv_evictions", "Objects evicted to make room since start", value=s.evictions
        )
        # Only a store that can lose pieces behind the server's back (Redis: eviction,
        # failover) has a count here; LMDB reports 0.
        yield CounterMetricFamily(
            "lynxkv_store_missing_pieces",
            "Objects found with a piece missing (evicted or lost) and removed: reads of them 404",
            value=s.missing_pieces,
        )


class Metrics:
    """The server's metrics; ``refresh`` pulls the store's figures before a scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lynxkv_requests",
            "Requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lynxkv_request_seconds",
            "Time to answer a request, body included",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "lynxkv_sent_bytes",
            "Object bytes sent, by part (anchor, residual)",
            ["part"],
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "lynxkv_received_bytes", "Object bytes received in PUT bodies", registry=self.registry
        )
        self.streams = Gauge(
            "lynxkv_active_streams", "POST /v1/stream responses in progress", registry=self.registry
        )
        self.rejected = Counter(
            "lynxkv_rejected_uploads",
            "PUTs refused or cut short, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._store = _StoreCollector()
        self.registry.register(self._store)

    async def refresh(self, stats: Callable[[], Awaitable[StoreStats]]) -> None:
        self._store.latest = await stats()

    def sent(self, start: int, end: int, anchor_end: int) -> None:
        """Count bytes [start, end) of an object, split at its anchor end."""
        anchor = max(0, min(end, anchor_end) - start)
        if anchor:
            self.bytes_sent.labels("anchor").inc(anchor)
        if end - start - anchor:
            self.bytes_sent.labels("residual").inc(end - start - anchor)
