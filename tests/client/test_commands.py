"""``lynxkv put | get | ls | rm`` end to end, in process through ``lynxkv.cli.main``,
against a real server on a thread: outputs, exit codes, error lines, progress bars."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from lynxkv.cli import main
from lynxkv.client.progress import ProgressBar, format_bytes, render
from lynxkv.codec import parse_header
from lynxkv.errors import StoreError
from tests.client.conftest import DamagingProxy, closed_port_url, server_thread
from tests.client.test_fetch import damage_at
from tests.kvstore.conftest import make_object

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OBJ = make_object(5, layers=2, tokens=100)
END = parse_header(OBJ).anchor_end


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture
def obj_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.lkv"
    path.write_bytes(OBJ)
    return path


class Cli:
    """Runs ``main(argv)`` and keeps what it printed."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.out = self.err = ""

    def __call__(self, *argv: str | Path) -> int:
        code = main([str(a) for a in argv])
        self.out, self.err = self._capsys.readouterr()
        return code

    def error_line(self) -> str:
        """The one ``lynxkv: error: ...`` line a failure prints, and nothing else."""
        assert self.err.startswith("lynxkv: error: ") and self.err.count("\n") == 1, self.err
        return self.err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@contextlib.contextmanager
def in_thread(factory: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Enter an async context manager on an event loop in a thread (``main`` runs its own
    loop in this one), yield what it gives, and exit it there."""
    entered = threading.Event()
    state: dict[str, Any] = {}

    async def hold() -> None:
        state["stop"], state["loop"] = asyncio.Event(), asyncio.get_running_loop()
        async with factory() as value:
            state["value"] = value
            entered.set()
            await state["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(hold()), name="test-loop")
    thread.start()
    try:
        assert entered.wait(30), "the context did not start"
        yield state["value"]
    finally:
        if "loop" in state:
            state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


def store_failure(app: web.Application) -> None:
    """Make ``GET /v1/kv`` (the listing) fail as a broken store does: 503."""

    @web.middleware
    async def fail(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/kv":
            raise StoreError("the disk is on fire")
        return await handler(request)

    app.middlewares.append(fail)


def test_put_get_ls_rm(tmp_path: Path, obj_file: Path, cli: Cli) -> None:
    out = tmp_path / "out.lkv"
    with server_thread(tmp_path / "data") as url:
        assert cli("put", url, "chunk-1", obj_file) == 0
        assert cli.out.startswith(f"created chunk-1: {len(OBJ)} bytes, anchor_end {END}")
        assert cli.err == ""  # no bar: stderr is not a terminal here
        assert cli("put", url, "chunk-1", obj_file) == 0 and cli.out.startswith("replaced")
        assert cli("get", url, "chunk-1", "-o", out) == 0 and (cli.out, cli.err) == ("", "")
        assert out.read_bytes() == OBJ
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask()
        assert cli("get", url, "chunk-1", "-o", out, "--part", "anchor") == 0
        assert out.read_bytes() == OBJ[:END]
        assert cli("get", url, "chunk-1", "-o", out, "--part", "residual") == 0
        assert out.read_bytes() == OBJ[END:]

        assert cli("ls", url) == 0
        key, size, anchor_end, etag = cli.out.rstrip("\n").split("\t")
        assert (key, int(size), int(anchor_end)) == ("chunk-1", len(OBJ), END)
        assert etag.startswith('"')
        assert cli("ls", url, "--prefix", "chunk-2") == 0 and cli.out == ""
        assert cli("ls", url, "--json") == 0
        [listed] = json.loads(cli.out)
        assert listed["key"] == "chunk-1" and listed["etag"] == etag and listed["last_access"]

        assert cli("rm", url, "chunk-1") == 0 and cli.out == ""
        assert cli("ls", url) == 0 and cli.out == ""
        assert cli("rm", url, "chunk-1") == 3 and "chunk-1" in cli.error_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in.lkv", "out.lkv"]


def test_a_failed_get_leaves_the_file_alone(tmp_path: Path, obj_file: Path, cli: Cli) -> None:
    out = tmp_path / "out.lkv"
    out.write_bytes(b"old")
    needle, replacement = damage_at(OBJ, (END + len(OBJ)) // 2)
    with server_thread(tmp_path / "data") as url:
        assert cli("get", url, "nope", "-o", out) == 3
        assert cli.error_line() == "lynxkv: error: no object under key 'nope'\n"
        assert cli("put", url, "k", obj_file) == 0
        with in_thread(lambda: DamagingProxy(url, {needle: replacement})) as proxy:
            assert cli("get", proxy.url, "k", "-o", out) == 1
            assert "checksum mismatch in the residual section" in cli.error_line()
            # the anchor does not hold the damaged byte
            assert cli("get", proxy.url, "k", "-o", out, "--part", "anchor") == 0
            assert out.read_bytes() == OBJ[:END]
            out.write_bytes(b"old")
            assert cli("get", proxy.url, "k", "-o", out, "--part", "residual") == 1
            assert "checksum mismatch" in cli.error_line()
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in.lkv", "out.lkv"]


def test_tokens_and_exit_code_4(
    tmp_path: Path, obj_file: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LYNXKV_TOKEN", raising=False)
    (tmp_path / "right").write_text("s3cret-token\n")
    (tmp_path / "wrong").write_text("guess\n")
    with server_thread(tmp_path / "data", auth_token="s3cret-token") as url:
        assert cli("put", url, "k", obj_file) == 4
        assert "token" in cli.error_line()
        assert cli("ls", url, "--token-file", tmp_path / "wrong") == 4
        assert cli("put", url, "k", obj_file, "--token-file", tmp_path / "right") == 0
        monkeypatch.setenv("LYNXKV_TOKEN", "s3cret-token")
        assert cli("ls", url) == 0 and cli.out.startswith("k\t")
        # the file wins over the variable
        assert cli("rm", url, "k", "--token-file", tmp_path / "wrong") == 4
        assert cli("rm", url, "k", "--token-file", tmp_path / "missing") == 1
        assert "cannot read token file" in cli.error_line()


def test_server_errors_exit_5_and_a_dead_server_6(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "out.lkv"
    with server_thread(tmp_path / "data", setup=store_failure) as url:
        assert cli("ls", url, "--retries", "0") == 5
        assert "the disk is on fire" in cli.error_line()
    dead = closed_port_url()
    assert cli("ls", dead, "--retries", "0") == 6
    cli.error_line()
    assert cli("get", dead, "k", "-o", out, "--retries", "1") == 6
    assert not out.exists()


def test_bad_input_exits_1(tmp_path: Path, cli: Cli) -> None:
    junk = tmp_path / "junk.lkv"
    junk.write_bytes(b"not an object at all" * 10)
    with server_thread(tmp_path / "data") as url:
        assert cli("put", url, "k", junk) == 1
        assert "not a lynxkv object" in cli.error_line()
        assert cli("put", url, "k", tmp_path / "missing.lkv") == 1
        assert "no such file" in cli.error_line()
        assert cli("put", url, "bad key!", junk) == 1
        assert "key" in cli.error_line()
        assert cli("get", url, "k", "-o", tmp_path) == 1
        assert "is a folder" in cli.error_line()
        assert cli("get", url, "k", "-o", tmp_path / "no" / "out.lkv") == 1
        assert "no such folder" in cli.error_line()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls", "localhost:7470"], "is not an http:// or https:// URL"),
        (["ls", "ftp://host"], "is not an http:// or https:// URL"),
        (["ls", "http://host:port"], "http://host:port"),
        (["get", "http://h", "k"], "-o/--output"),
        (["get", "http://h", "k", "-o", "f", "--part", "middle"], "invalid choice"),
        (["get", "http://h", "k", "-o", "f", "--rate-limit", "fast"], "is not a rate"),
        (["put", "http://h", "k", "f", "--rate-limit", "1M"], "unrecognized arguments"),
        (["ls", "http://h", "--limit", "0"], "not in 1..10000"),
        (["ls", "http://h", "--retries", "-1"], "must not be negative"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["get", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes:" in out and "3  not found" in out and "6  cannot reach" in out


def test_progress_bars_when_forced_on(tmp_path: Path, obj_file: Path, cli: Cli) -> None:
    out = tmp_path / "out.lkv"
    with server_thread(tmp_path / "data") as url:
        assert cli("put", url, "k", obj_file, "--progress") == 0
        assert cli.err.startswith("\rput k [") and cli.err.endswith("\n")
        last = cli.err.rstrip("\n").split("\r")[-1]
        assert "100%" in last and f"{format_bytes(len(OBJ))}/{format_bytes(len(OBJ))}" in last
        assert cli("get", url, "k", "-o", out, "--progress", "--rate-limit", "20M") == 0
        assert "get k [" in cli.err and "100%" in cli.err.split("\r")[-1]
        assert cli("get", url, "k", "-o", out, "--no-progress") == 0 and cli.err == ""


def test_render_and_bar() -> None:
    assert render("get k", 512, 1024, 1.0, width=10) == (
        "get k [#####.....]  50% 512 B/1.0 KiB 512 B/s"
    )
    assert render("put k", 3 << 20, None, 0.0) == "put k 3.0 MiB -"
    now = [0.0]
    sink = io.StringIO()
    bar = ProgressBar("x", 100, stream=sink, clock=lambda: now[0])
    bar.update(10)  # the first update draws
    now[0] = 0.05
    bar.update(20)  # within the interval: not drawn
    now[0] = 0.2
    bar.update(100)
    bar.close()  # draws the final state and ends the line
    draws = sink.getvalue().split("\r")[1:]
    assert [d.split("] ")[1].split("%")[0].strip() for d in draws] == ["10", "100", "100"]
    assert draws[-1].endswith("\n") and "\n" not in "".join(draws[:-1])
    bar.update(5)  # closed: silent
    assert sink.getvalue().endswith("\n")
