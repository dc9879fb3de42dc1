"""``lynxkv put | get | ls | rm``: the client's subcommands.

Each command runs one :class:`~lynxkv.client.aio.AsyncClient` under ``asyncio.run`` and
raises the typed errors of :mod:`lynxkv.errors`; ``lynxkv.cli.main`` prints them as one
line and turns them into the exit codes in :data:`EXIT_CODES_HELP`. Nothing heavy is
imported until a command runs, so that ``lynxkv --help`` and the codec commands stay light.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lynxkv.cli import CliError
from lynxkv.client.progress import ProgressBar
from lynxkv.errors import FormatError, NotFound, PreconditionFailed

if TYPE_CHECKING:
    from lynxkv.client.aio import AsyncClient
    from lynxkv.codec.decoder import ObjectDecoder

__all__ = ["EXIT_CODES_HELP", "TOKEN_ENV", "add_commands"]

#: The environment variable that may hold the bearer token (``--token-file`` wins).
TOKEN_ENV = "LYNXKV_TOKEN"

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  an error not listed below: bad input, a file that cannot be read or written,
     an object the server refuses, a checksum mismatch
  2  bad usage: unknown option, missing argument, malformed URL
  3  not found: no object under the key
  4  unauthorized: missing or wrong token (--token-file, $LYNXKV_TOKEN)
  5  server error: the server answered 5xx (after retries) or has no room
  6  cannot reach the server, or the connection kept breaking (after retries)
  130 interrupted (Ctrl-C)
errors are reported as one line on stderr: "lynxkv: error: ..."
"""

_KEY_HELP = "the object's key: [A-Za-z0-9._-]{1,200}"
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


# -- argument types (argparse turns their ValueError into a usage error, exit 2) -----------


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    try:
        _ = parts.port  # a port that is not a number raises
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text


def _bits_per_second(text: str) -> float:
    """``100M`` -> 1e8: a rate in bits per second with an optional k, M or G suffix."""
    number = text.rstrip("kKmMgG")
    try:
        value = float(number) * _SUFFIXES[text[len(number) :].lower()]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate like 100M (bits/s)") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"rate {text!r} must be positive")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 1..10000")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


# -- registration ----------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Options every client command takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("url", type=_url, metavar="URL", help="server base URL, http://host:7470")
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the bearer token (default: ${TOKEN_ENV}, else none)",
    )
    p.add_argument(
        "--timeout", type=_positive, default=30.0, metavar="S", help="connect/read timeout (30)"
    )
    p.add_argument(
        "--retries", type=_count, default=4, metavar="N", help="retries of transient failures (4)"
    )
    return p


def _transfer() -> argparse.ArgumentParser:
    """Options of the commands that move an object's bytes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    return p


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register put, get, ls and rm on the ``lynxkv`` parser's subcommands."""
    common, transfer = _common(), _transfer()
    kw: dict[str, Any] = {
        "epilog": EXIT_CODES_HELP,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }

    p = sub.add_parser("put", help="store an object file", parents=[common, transfer], **kw)
    p.add_argument("key", metavar="KEY", help=_KEY_HELP)
    p.add_argument("file", type=Path, metavar="FILE", help="an object (lynxkv encode writes them)")
    p.set_defaults(func=_command(_put))

    p = sub.add_parser("get", help="fetch an object into a file", parents=[common, transfer], **kw)
    p.add_argument("key", metavar="KEY", help=_KEY_HELP)
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="written atomically"
    )
    p.add_argument(
        "--part",
        choices=["anchor", "residual"],
        help="only bytes [0, anchor_end) or [anchor_end, size) (default: the whole object)",
    )
    p.add_argument(
        "--rate-limit",
        type=_bits_per_second,
        metavar="BITS",
        help="emulate a slower link: receive at most BITS/s, e.g. 100M",
    )
    p.set_defaults(func=_command(_get))

    p = sub.add_parser("ls", help="list stored objects", parents=[common], **kw)
    p.add_argument("--prefix", default="", help="only keys that start with it")
    p.add_argument("--limit", type=_limit, default=1000, help="at most this many, 1..10000 (1000)")
    p.add_argument("--json", action="store_true", help="one JSON array instead of lines")
    p.set_defaults(func=_command(_ls))

    p = sub.add_parser("rm", help="delete an object", parents=[common], **kw)
    p.add_argument("key", metavar="KEY", help=_KEY_HELP)
    p.set_defaults(func=_command(_rm))


Command = Callable[[argparse.Namespace], Coroutine[Any, Any, None]]


def _command(body: Command) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        import asyncio

        asyncio.run(body(args))

    return run


# -- shared pieces ---------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    path: Path | None = args.token_file
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read token file {path}: {exc}") from exc
    if not token:
        raise CliError(f"token file {path} is empty")
    return token


def _client(args: argparse.Namespace) -> AsyncClient:
    from lynxkv.client.aio import AsyncClient

    return AsyncClient(
        args.url,
        _token(args),
        timeout=args.timeout,
        retries=args.retries,
        rate_limit_bps=getattr(args, "rate_limit", None),
    )


def _progress(args: argparse.Namespace, label: str, total: int) -> ProgressBar:
    enabled = args.progress if args.progress is not None else sys.stderr.isatty()
    return ProgressBar(label, total, enabled=enabled)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temp file next to ``path`` that replaces it only when the block succeeds; on any
    failure (Ctrl-C included) it is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    # os.open rather than mkstemp: the file gets the umask's mode, as any new file would
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- the commands ----------------------------------------------------------------------------


async def _put(args: argparse.Namespace) -> None:
    path: Path = args.file
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    bar = _progress(args, f"put {args.key}", path.stat().st_size)
    async with _client(args) as client:
        try:
            result = await client.put(args.key, path, progress=bar.advance)
        finally:
            bar.close()
    verb = "created" if result.created else "replaced"
    print(
        f"{verb} {result.key}: {result.size} bytes, anchor_end {result.anchor_end},"
        f" etag {result.etag}"
    )


async def _get(args: argparse.Namespace) -> None:
    if args.output.is_dir():
        raise CliError(f"{args.output} is a folder; -o takes a file name")
    if not args.output.parent.is_dir():
        raise CliError(f"{args.output.parent}: no such folder")
    async with _client(args) as client:
        try:
            await _download(client, args)
        except PreconditionFailed:
            # replaced while we read it: start over once on the new version
            await _download(client, args)


async def _download(client: AsyncClient, args: argparse.Namespace) -> None:
    """Fetch the object (or one part) into ``args.output``, feeding every byte through an
    ObjectDecoder first, so that a section whose checksum fails never reaches the file."""
    from lynxkv.codec.decoder import ObjectDecoder

    try:
        meta = await client.head(args.key)
    except NotFound as exc:  # a HEAD answer has no body to say more
        raise NotFound(f"no object under key {args.key!r}") from exc
    start, end = {
        None: (0, meta.size),
        "anchor": (0, meta.anchor_end),
        "residual": (meta.anchor_end, meta.size),
    }[args.part]
    decoder = ObjectDecoder()
    if args.part == "residual" and start < end:
        await _prime_header(client, args.key, meta.etag, decoder)
    bar = _progress(args, f"get {args.key}", end - start)
    try:
        with _atomic_file(args.output) as out:
            pieces = client.iter_bytes(args.key, start, end, etag=meta.etag, progress=bar.advance)
            async for offset, chunk in pieces:
                decoder.feed(chunk, at=offset)
                out.write(chunk)
            _check_complete(decoder, args.part)
    finally:
        bar.close()


async def _prime_header(client: AsyncClient, key: str, etag: str, decoder: ObjectDecoder) -> None:
    """Give the decoder the object's header, without which the residual sections'
    checksums are unknown: the preamble, then the header it announces."""
    from lynxkv.codec.container import PREAMBLE, parse_preamble

    async def read(start: int, end: int) -> bytes:
        return b"".join([c async for _, c in client.iter_bytes(key, start, end, etag=etag)])

    head = await read(0, PREAMBLE.size)
    head += await read(PREAMBLE.size, PREAMBLE.size + parse_preamble(head))
    decoder.feed(head)


def _check_complete(decoder: ObjectDecoder, part: str | None) -> None:
    # iter_bytes delivers every byte of the range; this guards the decoder's view of it
    ready = {None: decoder.complete, "anchor": decoder.anchor_complete}.get(part)
    if ready is not None and not ready():
        raise FormatError(f"incomplete object: {decoder.missing()}")


async def _ls(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        objects = await client.list(args.prefix, args.limit)
    if args.json:
        fields = ("key", "size", "anchor_end", "etag", "last_access")
        print(json.dumps([{f: getattr(o, f) for f in fields} for o in objects], indent=2))
        return
    for o in objects:
        print(f"{o.key}\t{o.size}\t{o.anchor_end}\t{o.etag}")


async def _rm(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        await client.delete(args.key)
