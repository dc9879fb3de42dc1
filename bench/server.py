"""GET and ``/v1/stream`` throughput of ``lynxkv serve`` against nginx, on the same bytes.

One run starts the lynxkv server (a subprocess, on a temp LMDB data dir) and nginx (a
subprocess, ``sendfile on``, one worker, serving the same bytes as static files), both
on 127.0.0.1; uploads N codec objects of ~64 MiB; checks once per system that the bytes
served are the object's (SHA-256; stream frames parsed with ``FrameParser``); then
measures body throughput at 1, 4 and 16 concurrent keep-alive connections for:

- ``lynxkv GET``     GET /v1/kv/{key}, whole objects;
- ``lynxkv stream``  POST /v1/stream, ``--stream-keys`` objects per request, both parts;
- ``nginx GET``      GET /{key}, the same bytes as files.

The load generator is this process: one thread per connection, each a raw-socket
HTTP/1.1 client reading into one reused buffer and discarding (the same code for both
servers). A measurement counts the body bytes received during a fixed window; a response
still in flight at the end of the window is read to its end, uncounted. The systems are
interleaved, each round in a rotated order, and the figures are medians over rounds;
"vs nginx" is the median of the ratios paired within a round. CPU s/GB: CPU time of the
server process(es), and of this process (the client), per GB sent, over the measurement.

Over loopback the sender's system calls also run most of the receive path, and the
receiver's copy is cheaper for bytes the sender has just copied (lynxkv) than for bytes
sent from the page cache (nginx's sendfile): the figures hold for loopback on this
machine, not for a NIC. With two cores, server and client share the CPU: on a busy
machine throughput follows the total CPU per byte.

    PYTHONPATH=. python bench/server.py [--quick] [--objects 4] [--rounds 7] [--discard]
                                        [--cluster]

``--cluster`` adds lynxkv on a local Redis Cluster (3 masters, 3 replicas, Debian's
redis-server): GET through one server and through two, on the same objects.
Installs Debian's nginx-light when nginx is missing (as root). The last line of the
output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from bench.loadgen import Connection, Request, Sample, Target, fetch, measure
from bench.procs import log_tail, start_lynxkv, start_nginx
from lynxkv.codec import encode
from lynxkv.kvstore.frames import DataFrame, FrameParser

CONCURRENCY = (1, 4, 16)
SYSTEMS = ("lynxkv GET", "lynxkv stream", "nginx GET")
#: GET through one lynxkv server on the Redis Cluster, and through two (connections split)
CLUSTER_SYSTEMS = ("cluster GET x1", "cluster GET x2")
LMDB_GET = "lynxkv GET"
HEADS, HEAD_DIM, LAYERS = 8, 128, 30  # ~1.08 byte per element with lynx-a4


@dataclass(frozen=True)
class Settings:
    objects: int
    tokens: int  # per object: T of every [T, H, D] tensor
    rounds: int
    window_s: float
    stream_keys: int
    discard: bool  # the load generator drops body bytes in the kernel (MSG_TRUNC)
    cluster: bool = False  # also lynxkv on a local Redis Cluster, through 1 and 2 servers

    @property
    def systems(self) -> tuple[str, ...]:
        return SYSTEMS + (CLUSTER_SYSTEMS if self.cluster else ())

    def __post_init__(self) -> None:
        if self.objects < 1 or self.tokens < 1 or self.rounds < 1 or self.window_s <= 0:
            raise ValueError("objects, tokens, rounds and window must be positive")
        if not 1 <= self.stream_keys <= self.objects:
            raise ValueError(f"stream_keys must be in [1, {self.objects}]")


# -- the data ------------------------------------------------------------------------------


def make_objects(settings: Settings) -> list[bytes]:
    """``settings.objects`` distinct lynx-a4 objects of LAYERS layers of random KV."""
    objects = []
    for i in range(settings.objects):
        rng = np.random.default_rng(1000 + i)
        shape = (settings.tokens, HEADS, HEAD_DIM)
        # k, v: [T, H, D] fp16
        kv = [
            (
                rng.standard_normal(shape, dtype=np.float32).astype(np.float16),
                rng.standard_normal(shape, dtype=np.float32).astype(np.float16),
            )
            for _ in range(LAYERS)
        ]
        objects.append(encode(kv, "lynx-a4", model="bench/server"))
    return objects


def key_of(i: int) -> str:
    return f"bench-{i:03d}"


# -- setup and checks ----------------------------------------------------------------------


def upload(port: int, objects: Sequence[bytes]) -> None:
    for i, body in enumerate(objects):
        status, reply = fetch(port, Request("PUT", f"/v1/kv/{key_of(i)}", body, "application/x"))
        if status not in (200, 201):
            raise RuntimeError(f"PUT {key_of(i)}: {status} {reply[:500]!r}")


def stream_request(keys: Sequence[str]) -> Request:
    body = json.dumps({"keys": list(keys), "parts": ["anchor", "residual"]}).encode()
    return Request("POST", "/v1/stream", body, "application/json")


def check_get(name: str, port: int, paths: Sequence[str], objects: Sequence[bytes]) -> None:
    for path, obj in zip(paths, objects, strict=True):
        digest = hashlib.sha256()
        conn = Connection(port)
        try:
            status = conn.request(Request("GET", path), digest.update)
        finally:
            conn.close()
        if status != 200 or digest.digest() != hashlib.sha256(obj).digest():
            raise RuntimeError(f"{name}: GET {path} did not return the object (status {status})")


def check_stream(port: int, objects: Sequence[bytes]) -> None:
    """Every DATA frame of one stream of all objects holds the object's bytes, and the
    frames cover every object exactly once."""
    keys = [key_of(i) for i in range(len(objects))]
    status, body = fetch(port, stream_request(keys))
    if status != 200:
        raise RuntimeError(f"lynxkv stream: status {status}")
    parser = FrameParser(len(keys))
    covered = [0] * len(objects)
    for frame in parser.feed(body):
        if isinstance(frame, DataFrame):
            if frame.payload != objects[frame.key][frame.offset : frame.end]:
                raise RuntimeError(f"lynxkv stream: wrong bytes at {frame.key}:{frame.offset}")
            covered[frame.key] += len(frame.payload)
    parser.close()
    if not parser.complete or covered != [len(o) for o in objects]:
        raise RuntimeError(f"lynxkv stream: incomplete ({covered} bytes of each object)")


# -- the run -------------------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)

    def add(self, name: str, conns: int, sample: Sample) -> None:
        self.samples.setdefault((name, conns), []).append(sample)

    def gbps(self, name: str, conns: int) -> list[float]:
        return [s.gbps for s in self.samples[(name, conns)]]

    def median(self, name: str, conns: int) -> float:
        return statistics.median(self.gbps(name, conns))

    def ratio(self, name: str, conns: int, base: str = "nginx GET") -> float:
        """Median over rounds of this system / ``base`` in the same round."""
        pairs = zip(self.gbps(name, conns), self.gbps(base, conns), strict=True)
        return statistics.median(a / b for a, b in pairs)

    def cpu(self, name: str, conns: int) -> float:
        return statistics.median(s.cpu_s_per_gb for s in self.samples[(name, conns)])

    def client_cpu(self, name: str, conns: int) -> float:
        return statistics.median(s.client_cpu_s_per_gb for s in self.samples[(name, conns)])


def run_rounds(targets: dict[str, Target], settings: Settings) -> Results:
    results = Results()
    systems = settings.systems
    for target in targets.values():  # warm up: connections, caches, the allocator
        measure(target, 1, min(0.3, settings.window_s), settings.discard)
    for r in range(settings.rounds):
        for conns in CONCURRENCY:
            order = list(systems[r % len(systems) :] + systems[: r % len(systems)])
            for name in order:
                sample = measure(targets[name], conns, settings.window_s, settings.discard)
                results.add(name, conns, sample)
        done = ", ".join(f"{n} {results.gbps(n, 1)[-1]:.2f}" for n in systems)
        print(f"round {r + 1}/{settings.rounds}: 1-conn GB/s {done}", flush=True)
    return results


def table(results: Results, systems: Sequence[str]) -> str:
    head = f"{'system':<15}{'conns':>6}{'GB/s':>8}{'min':>8}{'max':>8}{'vs nginx':>10}"
    head += f"{'CPU s/GB: server':>18}{'client':>8}"
    lines = [head, "-" * len(head)]
    for name in systems:
        for conns in CONCURRENCY:
            g = results.gbps(name, conns)
            ratio = "" if name == "nginx GET" else f"{results.ratio(name, conns):.2f}x"
            lines.append(
                f"{name:<15}{conns:>6}{statistics.median(g):>8.2f}{min(g):>8.2f}{max(g):>8.2f}"
                f"{ratio:>10}{results.cpu(name, conns):>18.3f}"
                f"{results.client_cpu(name, conns):>8.3f}"
            )
    return "\n".join(lines)


def summary(results: Results, settings: Settings, sizes: Sequence[int], nginx: str) -> Any:
    def per_conn(name: str) -> dict[str, float]:
        return {str(c): round(results.median(name, c), 3) for c in CONCURRENCY}

    return {
        "get_gbps": per_conn("lynxkv GET"),
        "stream_gbps": per_conn("lynxkv stream"),
        "nginx_gbps": per_conn("nginx GET"),
        "ratio_1conn": round(results.median("lynxkv GET", 1) / results.median("nginx GET", 1), 3),
        "paired_ratio_vs_nginx": {
            name: {str(c): round(results.ratio(name, c), 3) for c in CONCURRENCY}
            for name in ("lynxkv GET", "lynxkv stream")
        },
        "server_cpu_s_per_gb": {
            name: {str(c): round(results.cpu(name, c), 4) for c in CONCURRENCY}
            for name in settings.systems
        },
        "client_cpu_s_per_gb": {
            name: {str(c): round(results.client_cpu(name, c), 4) for c in CONCURRENCY}
            for name in settings.systems
        },
        **(
            {
                "cluster_gbps": {name: per_conn(name) for name in CLUSTER_SYSTEMS},
                "cluster_paired_ratio_vs_lmdb": {
                    name: {
                        str(c): round(results.ratio(name, c, "lynxkv GET"), 3) for c in CONCURRENCY
                    }
                    for name in CLUSTER_SYSTEMS
                },
                "cluster": "3 masters + 3 replicas, redis-server on loopback",
            }
            if settings.cluster
            else {}
        ),
        "load_generator": "raw socket, discard (MSG_TRUNC)" if settings.discard else "raw socket",
        "object_bytes": round(statistics.mean(sizes)),
        "objects": settings.objects,
        "stream_keys_per_request": settings.stream_keys,
        "rounds": settings.rounds,
        "window_s": settings.window_s,
        "nginx": nginx,
        "nginx_workers": 1,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def build_targets(
    lynx_port: int, lynx_pid: int, nginx_port: int, nginx_pid: int, settings: Settings
) -> dict[str, Target]:
    n, k = settings.objects, settings.stream_keys
    streams = tuple(stream_request([key_of((i + j) % n) for j in range(k)]) for i in range(n))
    return {
        "lynxkv GET": Target(
            "lynxkv GET",
            (lynx_port,),
            tuple(Request("GET", f"/v1/kv/{key_of(i)}") for i in range(n)),
            (lynx_pid,),
        ),
        "lynxkv stream": Target("lynxkv stream", (lynx_port,), streams, (lynx_pid,)),
        "nginx GET": Target(
            "nginx GET",
            (nginx_port,),
            tuple(Request("GET", f"/{key_of(i)}") for i in range(n)),
            (nginx_pid,),
        ),
    }


def _limits(settings: Settings, size: int) -> tuple[int, int]:
    """``--max-bytes`` and ``--max-object-bytes`` for objects of at most ``size`` bytes."""
    return 2 * settings.objects * size + (256 << 20), 2 * size


def start_cluster_targets(
    stack: contextlib.ExitStack, tmp: Path, settings: Settings, objects: Sequence[bytes]
) -> dict[str, Target]:
    """A local Redis Cluster (3 masters, 3 replicas) and two lynxkv servers on it; the
    objects are PUT through the first and checked through both."""
    from tests.redis_cluster import LocalCluster, missing_tools

    if (reason := missing_tools()) is not None:
        raise RuntimeError(f"--cluster: {reason}")
    mib = 4 * settings.objects * max(len(o) for o in objects) // 2**20 + 256
    cluster = stack.enter_context(LocalCluster(tmp / "redis", maxmemory=f"{mib}mb"))
    size = max(len(o) for o in objects)
    a = start_lynxkv(stack, tmp, *_limits(settings, size), store=cluster.url, name="cluster-a")
    b = start_lynxkv(stack, tmp, *_limits(settings, size), store=cluster.url, name="cluster-b")
    upload(a[0], objects)
    paths = [f"/v1/kv/{key_of(i)}" for i in range(settings.objects)]
    check_get("cluster GET a", a[0], paths, objects)
    check_get("cluster GET b", b[0], paths, objects)
    print(f"verified: two lynxkv servers on the cluster {cluster.url} return the objects' bytes")
    redis = tuple(cluster.pids())
    gets = tuple(Request("GET", path) for path in paths)
    return {
        "cluster GET x1": Target("cluster GET x1", (a[0],), gets, (a[1], *redis)),
        "cluster GET x2": Target("cluster GET x2", (a[0], b[0]), gets, (a[1], b[1], *redis)),
    }


def run(settings: Settings) -> None:
    started = time.monotonic()
    print(f"$ python {' '.join(sys.argv)}  # {settings}", flush=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lynxkv-bench-")))
        print(f"encoding {settings.objects} objects ...", flush=True)
        objects = make_objects(settings)
        sizes = [len(o) for o in objects]
        www = tmp / "www"
        www.mkdir()
        for i, obj in enumerate(objects):
            (www / key_of(i)).write_bytes(obj)
        lynx_port, lynx_pid = start_lynxkv(stack, tmp, *_limits(settings, max(sizes)))
        nginx_port, nginx_pid, nginx_version = start_nginx(stack, tmp, www)
        mib = statistics.mean(sizes) / 2**20
        print(f"uploading {settings.objects} objects of {mib:.1f} MiB to lynxkv :{lynx_port};")
        print(f"nginx :{nginx_port} ({nginx_version})", flush=True)
        upload(lynx_port, objects)
        keys = range(settings.objects)
        check_get("lynxkv GET", lynx_port, [f"/v1/kv/{key_of(i)}" for i in keys], objects)
        check_get("nginx GET", nginx_port, [f"/{key_of(i)}" for i in keys], objects)
        check_stream(lynx_port, objects)
        print("verified: lynxkv GET, lynxkv stream and nginx GET return the objects' bytes")
        targets = build_targets(lynx_port, lynx_pid, nginx_port, nginx_pid, settings)
        if settings.cluster:
            targets |= start_cluster_targets(stack, tmp, settings, objects)
        results = run_rounds(targets, settings)
        errors = "\n".join(
            log_tail(tmp / f"{name}.err").strip() for name in ("lynxkv", "cluster-a", "cluster-b")
        ).strip()
    print()
    print(
        f"GB/s = 1e9 body bytes per second over loopback; medians of {settings.rounds} rounds"
        f" of {settings.window_s:g} s windows; objects of {statistics.mean(sizes) / 2**20:.1f}"
        f" MiB; stream: {settings.stream_keys} object(s) per request; nginx: 1 worker, sendfile"
    )
    print(table(results, settings.systems))
    if errors:
        print(f"\nthe lynxkv server logged:\n{errors}")
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    print(json.dumps(summary(results, settings, sizes, nginx_version)))


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the ExitStack: processes, temp dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="16 MiB objects, 3 short rounds")
    parser.add_argument("--objects", type=int, default=4, help="objects to serve (4)")
    parser.add_argument("--tokens", type=int, help="tokens per object (1024: ~64 MiB)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (7; quick 3)")
    parser.add_argument("--window", type=float, help="seconds per measurement (1.5; quick 0.5)")
    parser.add_argument("--stream-keys", type=int, default=1, help="objects per stream (1)")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also serve the objects from a local Redis Cluster (3 masters, 3 replicas, from"
        " Debian's redis-server) through one and two lynxkv servers",
    )
    parser.add_argument(
        "--discard",
        action="store_true",
        help="drop body bytes in the kernel (MSG_TRUNC) instead of copying them: the"
        " load generator then costs almost nothing, and only the servers are measured",
    )
    args = parser.parse_args(argv)
    settings = Settings(
        objects=args.objects,
        tokens=args.tokens or (256 if args.quick else 1024),
        rounds=args.rounds or (3 if args.quick else 7),
        window_s=args.window or (0.5 if args.quick else 1.5),
        stream_keys=args.stream_keys,
        discard=args.discard,
        cluster=args.cluster,
    )
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        run(settings)
    except KeyboardInterrupt:  # the servers and the temp dir are gone by now
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
