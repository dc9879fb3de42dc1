"""The benchmarks' load generator: a raw-socket HTTP/1.1 client, one thread per connection.

Each connection reads response bodies into one reused buffer and discards them (or lets
the kernel drop them: ``discard``, MSG_TRUNC), so the same code loads every server under
test. ``measure`` counts the body bytes received during a fixed window; a response still
in flight at the end of the window is read to its end, uncounted. CPU time per GB is
taken from /proc for the server processes and from this process for the client.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GB",
    "HOST",
    "Connection",
    "Request",
    "Sample",
    "Target",
    "WindowCount",
    "cpu_seconds",
    "fetch",
    "measure",
]

HOST = "127.0.0.1"
RECV_BYTES = 1 << 20
START_TIMEOUT_S = 30.0
IO_TIMEOUT_S = 120.0
GB = 1e9

Sink = Callable[[memoryview], None]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes = b""
    content_type: str = ""

    def head(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {HOST}"]
        if self.body or self.method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(self.body)}")
        if self.content_type:
            lines.append(f"Content-Type: {self.content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Connection:
    """One keep-alive connection; bodies go to a sink piece by piece, never assembled."""

    def __init__(self, port: int, *, discard: bool = False) -> None:
        self.discard = discard  # body bytes are dropped in the kernel, never copied here
        self.sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(RECV_BYTES)
        self.view = memoryview(self.buf)
        self.start = self.end = 0  # unread bytes: buf[start:end]

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.view.release()
        self.sock.close()

    def request(self, req: Request, sink: Sink) -> int:
        """Send ``req``, pass its response body to ``sink``; the status."""
        if len(req.body) > 1 << 16:
            self.sock.sendall(req.head())
            self.sock.sendall(req.body)
        else:
            self.sock.sendall(req.head() + req.body)
        status = int(self._line().split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while size := int(self._line().split(b";")[0], 16):
                self._body(size, sink)
                self._line()
            while self._line():  # trailers
                pass
        else:
            self._body(int(headers.get(b"content-length", b"0")), sink)
        return status

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            kept = self.end - self.start
            self.buf[:kept] = self.buf[self.start : self.end]
            self.start, self.end = 0, kept
        n = self.sock.recv_into(self.view[self.end :])
        if not n:
            raise ConnectionError("the server closed the connection mid-response")
        self.end += n

    def _line(self) -> bytes:
        while (at := self.buf.find(b"\r\n", self.start, self.end)) < 0:
            if self.end - self.start > 1 << 16:
                raise ConnectionError("a response line over 64 KiB")
            self._fill()
        line = bytes(self.buf[self.start : at])
        self.start = at + 2
        return line

    def _body(self, n: int, sink: Sink) -> None:
        while n:
            if self.start == self.end and self.discard:
                # MSG_TRUNC on TCP (Linux): consume up to n bytes without copying them
                got = self.sock.recv_into(self.view, min(n, len(self.buf)), socket.MSG_TRUNC)
                if not got:
                    raise ConnectionError("the server closed the connection mid-response")
                sink(self.view[:got])  # the count is right, the bytes are not
                n -= got
                continue
            if self.start == self.end:
                self._fill()
            take = min(n, self.end - self.start)
            sink(self.view[self.start : self.start + take])
            self.start += take
            n -= take


class WindowCount:
    """Counts the bytes that arrive before ``deadline`` and, apart, all of them; looks
    at no byte (so it may be fed discarded ones)."""

    def __init__(self) -> None:
        self.deadline = float("inf")
        self.counted = self.total = 0

    def __call__(self, data: memoryview) -> None:
        self.total += data.nbytes
        if time.perf_counter() < self.deadline:
            self.counted += data.nbytes


def fetch(port: int, req: Request) -> tuple[int, bytes]:
    """One request on a fresh connection: status and whole body (setup and checks only)."""
    body = bytearray()
    conn = Connection(port)
    try:
        status = conn.request(req, body.extend)
    finally:
        conn.close()
    return status, bytes(body)


@dataclass(frozen=True)
class Target:
    name: str
    #: connection i goes to ports[i % len(ports)]
    ports: tuple[int, ...]
    requests: tuple[Request, ...]  # connection i sends requests i, i+1, ... cyclically
    #: the server processes whose CPU time counts
    server_pids: tuple[int, ...]


def _drive(conn: Connection, target: Target, first: int, count: WindowCount) -> None:
    k = first
    while time.perf_counter() < count.deadline:
        status = conn.request(target.requests[k % len(target.requests)], count)
        if status != 200:
            raise RuntimeError(f"{target.name}: status {status}")
        k += 1


@dataclass
class Sample:
    gbps: float
    cpu_s_per_gb: float  # the server's
    client_cpu_s_per_gb: float


def measure(target: Target, connections: int, window_s: float, discard: bool) -> Sample:
    """Body GB/s over ``window_s`` with ``connections`` connections, each in a thread."""
    ports = target.ports
    conns = [Connection(ports[i % len(ports)], discard=discard) for i in range(connections)]
    counts = [WindowCount() for _ in range(connections)]

    def start_clock() -> None:  # runs once, when every thread is at the barrier
        deadline = time.perf_counter() + window_s
        for c in counts:
            c.deadline = deadline

    barrier = threading.Barrier(connections, action=start_clock)

    def run(i: int) -> None:
        barrier.wait(timeout=START_TIMEOUT_S)
        _drive(conns[i], target, i, counts[i])

    cpu_before, client_before = _server_cpu(target), time.process_time()
    pool = ThreadPoolExecutor(connections)
    try:
        for future in [pool.submit(run, i) for i in range(connections)]:
            future.result()
    finally:  # after an error or Ctrl-C, wake the threads still in recv or at the barrier
        barrier.abort()
        for conn in conns:
            conn.shutdown()
        pool.shutdown(wait=True)
        for conn in conns:
            conn.close()
    cpu = _server_cpu(target) - cpu_before
    client = time.process_time() - client_before
    total_gb = sum(c.total for c in counts) / GB
    return Sample(sum(c.counted for c in counts) / window_s / GB, cpu / total_gb, client / total_gb)


def _server_cpu(target: Target) -> float:
    return sum(cpu_seconds(pid) for pid in target.server_pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, its threads and its live child processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        pids += [int(c) for c in children]
    return total
