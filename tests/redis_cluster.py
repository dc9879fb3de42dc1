"""A Redis Cluster on loopback, for the tests and the benchmarks.

``LocalCluster(root)`` starts ``redis-server`` processes on free ports of 127.0.0.1 (three
masters with one replica each by default), joins them with ``redis-cli --cluster create``,
waits until every node reports ``cluster_state:ok`` and every replica is in sync, and stops
them all on ``stop()`` (or at the end of a ``with`` block). ``kill`` SIGKILLs a node and
``wait_failover`` waits until its replica serves its slots.

From a shell: ``python -m tests.redis_cluster [--masters 3] [--replicas 1]`` prints the
``redis-cluster://`` URL for ``lynxkv serve --store`` and runs until interrupted.

The nodes keep nothing on disk (no RDB, no AOF) and evict with ``allkeys-lru`` past
``maxmemory``: a cache's settings (``lynxkv/kvstore/redis_store.py`` says why).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "free_ports", "local_cluster", "missing_tools", "require_tools"]

HOST = "127.0.0.1"
#: Redis listens on ``port + 10000`` for the cluster bus.
_BUS_OFFSET = 10000
_TOOLS = ("redis-server", "redis-cli")


def require_tools() -> None:
    """Skip the calling test when a cluster cannot start here; in CI (``CI`` set), where
    ``./dev`` installs redis-server, fail instead: a skip would hide an untested store."""
    import pytest

    reason = missing_tools()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Redis Cluster tests: {reason}")
    pytest.skip(reason)


def missing_tools() -> str | None:
    """Why a cluster cannot start here, or None when it can."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not found: apt-get install redis-server redis-tools"
        " (./dev test installs them when run as root)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Ports whose cluster-bus port (+10000) is free as well."""
    ports: list[int] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        start = 20000 + probe.getsockname()[1] % 20000  # spread concurrent runs apart
    for port in range(start, 55000 - _BUS_OFFSET):
        if len(ports) == count:
            break
        if _port_free(port) and _port_free(port + _BUS_OFFSET):
            ports.append(port)
    if len(ports) < count:
        raise RuntimeError(f"found {len(ports)} free port pairs, need {count}")
    return ports


def _wait(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class _Node:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, on loopback, in ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        maxmemory: str = "256mb",
        node_timeout_ms: int = 1000,
    ) -> None:
        if masters < 3:
            raise ValueError(f"redis-cli --cluster create needs 3 masters or more, got {masters}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        self.root, self.masters_wanted, self.replicas = root, masters, replicas
        self.maxmemory, self.node_timeout_ms = maxmemory, node_timeout_ms
        self.nodes = [
            _Node(port, root / str(port)) for port in free_ports(masters * (1 + replicas))
        ]

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        missing = missing_tools()
        if missing:
            raise RuntimeError(missing)
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                _wait(functools.partial(self._pings, node), f"redis-server on {node.address}", 20)
            self._create()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: _Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        args = {
            "port": str(node.port),
            "bind": HOST,
            "dir": str(node.dir),
            "logfile": str(node.log),
            "daemonize": "no",
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(self.node_timeout_ms),
            "appendonly": "no",
            "save": "",
            "maxmemory": self.maxmemory,
            "maxmemory-policy": "allkeys-lru",
            # a replica syncs at once rather than after the default 5 s batching delay
            "repl-diskless-sync-delay": "0",
            # CLUSTER SLOTS lists a replica (and clients learn of it) once its replication
            # offset is above 0: on an empty cluster, once the master's first ping (10 s)
            "repl-ping-replica-period": "1",
        }
        cmd = ["redis-server", *(part for k, v in args.items() for part in (f"--{k}", v))]
        node.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _create(self) -> None:
        cmd = ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes)]
        cmd += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")

    def stop(self) -> None:
        """Stop every node (SIGKILL: they keep nothing worth saving). Idempotent."""
        for node in self.nodes:
            if node.alive():
                assert node.proc is not None
                node.proc.kill()
        for node in self.nodes:
            if node.proc is not None:
                node.proc.wait(10)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it looks like ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The store URL: every node is a seed, so that any one of them may be down."""
        return "redis-cluster://" + ",".join(n.address for n in self.nodes)

    def command(self, port: int, *args: Any) -> Any:
        """One command on the node at ``port`` (a plain connection, not the cluster client)."""
        import redis

        with redis.Redis(HOST, port, socket_timeout=10, decode_responses=True) as conn:
            return conn.execute_command(*args)

    def config(self, port: int, **settings: str) -> dict[str, str]:
        """``CONFIG SET`` the ``settings`` (``maxmemory_policy=`` for ``maxmemory-policy``) on
        one node; their values before."""
        import redis

        names = {name: name.replace("_", "-") for name in settings}
        with redis.Redis(HOST, port, socket_timeout=10, decode_responses=True) as conn:
            before = {name: conn.config_get(names[name])[names[name]] for name in settings}
            for name, value in settings.items():
                conn.config_set(names[name], value)
        return before

    def _pings(self, node: _Node) -> bool:
        if not node.alive():
            raise RuntimeError(f"redis-server on {node.address} exited: {node.log_tail()}")
        import redis

        try:
            return bool(self.command(node.port, "PING"))
        except redis.RedisError:
            return False

    def info(self, port: int, section: str) -> dict[str, Any]:
        """``INFO section`` of one node, as redis-py parses it (``slave0`` is a dict)."""
        info: dict[str, Any] = self.command(port, "INFO", section)
        return info

    def pids(self) -> list[int]:
        """The process ids of the nodes that run."""
        return [n.proc.pid for n in self.nodes if n.proc is not None and n.alive()]

    def alive_ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.alive()]

    def roles(self) -> dict[int, str]:
        """``port -> "master" | "slave"`` of each live node, as it says itself."""
        return {port: self.info(port, "replication")["role"] for port in self.alive_ports()}

    def masters(self) -> list[int]:
        return sorted(port for port, role in self.roles().items() if role == "master")

    def replicas_of(self, port: int) -> list[int]:
        """Ports of the live replicas of the master at ``port``."""
        return sorted(int(r["port"]) for r in self._replica_rows(port))

    def _replica_rows(self, port: int) -> list[dict[str, Any]]:
        info = self.info(port, "replication")
        return [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]

    def master_of(self, name: str) -> int:
        """Port of the master that serves key ``name`` (by its hash slot)."""
        live = self.alive_ports()[0]
        slot = int(self.command(live, "CLUSTER", "KEYSLOT", name))
        for start, end, master, *_ in self.command(live, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(f"no master serves slot {slot}")

    def keys(self, pattern: str) -> list[str]:
        """Keys matching ``pattern`` on every master (KEYS: for small test data only)."""
        return sorted(k for port in self.masters() for k in self.command(port, "KEYS", pattern))

    def _cluster_ok(self, port: int) -> bool:
        import redis

        try:
            text = str(self.command(port, "CLUSTER", "INFO"))
        except redis.RedisError:
            return False
        return "cluster_state:ok" in text and "cluster_slots_ok:16384" in text

    def _slots_replicated(self, port: int) -> bool:
        """Whether the node's CLUSTER SLOTS lists every replica (clients learn them there)."""
        ranges = self.command(port, "CLUSTER", "SLOTS")
        return all(len(r) >= 3 + self.replicas for r in ranges)

    def _in_sync(self, port: int) -> bool:
        online = [r for r in self._replica_rows(port) if r.get("state") == "online"]
        return len(online) >= self.replicas

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every live node says ``cluster_state:ok`` and every master that had replicas
        has them online."""

        def healthy() -> bool:
            ports = self.alive_ports()
            if not all(self._cluster_ok(port) for port in ports):
                return False
            masters = self.masters()
            if len(masters) != self.masters_wanted:
                return False
            if len(ports) < len(self.nodes):  # a master may have lost its replica for good
                return True
            return all(self._in_sync(m) for m in masters) and all(
                self._slots_replicated(port) for port in ports
            )

        _wait(healthy, "the cluster to be healthy", timeout)

    # -- failures --------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL the node at ``port``."""
        node = self._node(port)
        assert node.proc is not None and node.alive(), f"{port} is not running"
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)

    def wait_failover(self, dead: int, timeout: float = 30.0) -> int:
        """Until a replica of the dead master ``dead`` has taken over its slots and every live
        node says ``cluster_state:ok``; the new master's port."""
        replicas = set(self._replicas_in_config(dead))
        found: list[int] = []

        def promoted() -> bool:
            found[:] = [p for p in self.masters() if p in replicas]
            return bool(found) and all(self._cluster_ok(p) for p in self.alive_ports())

        _wait(promoted, f"a replica of {dead} to take over", timeout)
        return found[0]

    def restart(self, port: int) -> None:
        """Start the node at ``port`` again (it rejoins as a replica of whoever took over)."""
        node = self._node(port)
        assert not node.alive(), f"{port} is running"
        self._spawn(node)
        _wait(lambda: self._pings(node), f"redis-server on {node.address}", 20)

    def _replicas_in_config(self, master: int) -> list[int]:
        """Replicas of ``master`` per CLUSTER NODES on a live node (works once it is dead)."""
        live = self.alive_ports()[0]
        lines = str(self.command(live, "CLUSTER", "NODES")).splitlines()
        rows = [line.split() for line in lines]
        master_id = next(r[0] for r in rows if r[1].split("@")[0] == f"{HOST}:{master}")
        return [int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows if r[3] == master_id]

    def _node(self, port: int) -> _Node:
        return next(n for n in self.nodes if n.port == port)


@contextlib.contextmanager
def local_cluster(root: Path | None = None, **kw: Any) -> Iterator[LocalCluster]:
    """A started ``LocalCluster`` in ``root`` (a temporary folder when None)."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lynx-redis-")))
        yield stack.enter_context(LocalCluster(root, **kw))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.redis_cluster",
        description="Run a Redis Cluster on 127.0.0.1 until interrupted; print its URL"
        " (for lynxkv serve --store).",
    )
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--maxmemory", default="256mb", help="per node (redis-server syntax)")
    parser.add_argument("--dir", type=Path, help="where the nodes keep their files")
    args = parser.parse_args(argv)
    kw = {"masters": args.masters, "replicas": args.replicas, "maxmemory": args.maxmemory}
    with local_cluster(args.dir, **kw) as cluster:
        print(cluster.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            signal.pause()


if __name__ == "__main__":
    main()
