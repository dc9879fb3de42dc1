"""The benchmarks' server processes: ``lynxkv serve`` and nginx on free loopback ports,
started as children that die with this process, stopped when an ``ExitStack`` closes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import HOST

__all__ = [
    "free_port",
    "listening",
    "log_tail",
    "nginx_binary",
    "spawn",
    "start_lynxkv",
    "start_nginx",
    "stop",
]

START_TIMEOUT_S = 30.0


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when this process dies, even by SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(args: Sequence[str], stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    with stdout.open("wb") as out, stderr.open("wb") as err:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # Ctrl-C reaches this process only; it stops them
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def start_lynxkv(
    stack: contextlib.ExitStack,
    tmp: Path,
    max_bytes: int,
    max_object_bytes: int,
    store: str = "lmdb",
    name: str = "lynxkv",
) -> tuple[int, int]:
    """Start ``lynxkv serve`` on a free port (on ``store``, its files and logs in ``tmp``
    under ``name``); the port and the pid. Stopped when ``stack`` closes."""
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    args = [sys.executable, "-m", "lynxkv.cli", "serve", "--host", HOST, "--port", "0"]
    args += ["--data-dir", str(tmp / f"{name}-data"), "--log-level", "warning"]
    args += ["--store", store]
    args += ["--max-bytes", str(max_bytes), "--max-object-bytes", str(max_object_bytes)]
    proc = spawn(args, out, err)
    stack.callback(stop, proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    prefix = "lynxkv serving on http://"
    while time.monotonic() < deadline and proc.poll() is None:
        for line in out.read_text().splitlines():
            if line.startswith(prefix):
                return int(line.removeprefix(prefix).rsplit(":", 1)[1].strip("/")), proc.pid
        time.sleep(0.05)
    raise RuntimeError(f"lynxkv serve did not start:\n{log_tail(err)}")


def nginx_binary() -> str:
    """The nginx executable; installs Debian's nginx-light first when there is none."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("nginx is missing: apt-get install -y nginx-light (as root)")
    print("installing nginx-light ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "nginx-light"]
    if subprocess.run(install, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        raise RuntimeError("nginx-light installed, but no nginx executable found")
    return found


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx.err warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {root}/tmp-body;
    proxy_temp_path {root}/tmp-proxy;
    fastcgi_temp_path {root}/tmp-fastcgi;
    uwsgi_temp_path {root}/tmp-uwsgi;
    scgi_temp_path {root}/tmp-scgi;
    server {{
        listen {host}:{port};
        root {www};
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return True
        time.sleep(0.05)
    return False


def start_nginx(stack: contextlib.ExitStack, tmp: Path, www: Path) -> tuple[int, int, str]:
    """Start nginx serving ``www`` on a free port; the port, the pid and the version."""
    binary = nginx_binary()
    version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
    # as root, the worker would drop to "nobody", who cannot read our private temp dir
    user = "user root root;\n" if os.geteuid() == 0 else ""
    for _ in range(5):  # a free port may be taken before nginx binds it
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, root=tmp, host=HOST, port=port, www=www))
        args = [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx.err")]
        proc = spawn(args, tmp / "nginx.out", tmp / "nginx.stderr")
        if listening(port, proc):
            stack.callback(stop, proc)
            return port, proc.pid, version.removeprefix("nginx version: ")
        stop(proc)
        if "Address already in use" not in log_tail(tmp / "nginx.err"):
            break
    raise RuntimeError(f"nginx did not start:\n{log_tail(tmp / 'nginx.err')}")
