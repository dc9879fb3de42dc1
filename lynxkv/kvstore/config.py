"""Settings of ``lynxkv serve``: :class:`ServerConfig` and where its values come from.

Precedence, lowest first: the defaults, a TOML file (``--config``), ``LYNXKV_*``
environment variables, command-line flags. Every value given anywhere is checked, even
one a later source overrides, so that a typo never hides. A bad value raises
``ValueError`` whose message names its source (the flag, the variable, or the file and
key); the CLI prints it as one line.

The TOML file holds top-level keys named as the flags without their dashes
(``data_dir = "/var/lib/lynxkv"``, ``max_bytes = "64GiB"``). Relative paths in it are
relative to the file's folder; relative paths in flags and variables, to the working
directory. An empty variable counts as unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from lynxkv.kvstore.redis_layout import RedisOptions

__all__ = [
    "LOG_LEVELS",
    "REDIS_CLUSTER_SCHEME",
    "STORES",
    "RedisClusterUrl",
    "ServerConfig",
    "add_arguments",
    "format_size",
    "load_config",
    "parse_redis_cluster_url",
    "parse_size",
    "read_token",
]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Storage backends ``store`` may name: ``lmdb``, or a ``redis-cluster://`` URL.
STORES = ("lmdb", "redis-cluster")
REDIS_CLUSTER_SCHEME = "redis-cluster://"
_STORE_FORMS = "lmdb or redis-cluster://HOST:PORT[,HOST:PORT...][?OPTION=VALUE&...]"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?) ?([A-Za-z]*)", re.ASCII)
_MAX_SIZE = (1 << 63) - 1
# RFC 9110 11.2 token68: what fits in "Authorization: Bearer <token>".
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*", re.ASCII)


@dataclass(frozen=True)
class ServerConfig:
    """What ``lynxkv serve`` runs with. Validated on construction; never mutated."""

    #: Address to bind; loopback by default so that nothing is exposed by accident.
    host: str = "127.0.0.1"
    #: TCP port; 0 binds any free port (tests).
    port: int = 7470
    data_dir: Path = Path("lynx-data")
    #: Bytes stored at most; a PUT beyond it evicts the least recently used objects. (LMDB;
    #: a Redis Cluster's capacity is its masters' maxmemory.)
    max_bytes: int = 8 << 30
    max_object_bytes: int = 1 << 30
    #: The bearer token every route but /healthz requires; None: no authentication.
    auth_token: str | None = field(default=None, repr=False)
    log_level: str = "info"
    #: ``lmdb`` (embedded, in ``data_dir``) or a ``redis-cluster://`` URL (shared by any
    #: number of servers; see ``parse_redis_cluster_url``).
    store: str = "lmdb"

    def __post_init__(self) -> None:
        _check_host(self.host)
        _check_port(self.port)
        _check_path("data_dir", self.data_dir)
        _check_size("max_bytes", self.max_bytes)
        _check_size("max_object_bytes", self.max_object_bytes)
        if self.max_object_bytes > self.max_bytes:
            raise ValueError(
                f"max_object_bytes ({format_size(self.max_object_bytes)}) must not exceed"
                f" max_bytes ({format_size(self.max_bytes)})"
            )
        if self.auth_token is not None:
            _check_token(self.auth_token, "auth_token")
        _check_log_level(self.log_level)
        _check_store(self.store)


# Checks shared by ServerConfig and the parsers (which add the value's source).


def _check_host(host: object) -> None:
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ValueError(f"host must be a host name or IP address; got {host!r}")


def _check_port(port: object) -> None:
    if isinstance(port, bool) or not (isinstance(port, int) and 0 <= port <= 65535):
        raise ValueError(f"port must be an integer in 0..65535 (0: any free port); got {port!r}")


def _check_path(name: str, path: object) -> None:
    if not isinstance(path, Path) or not str(path):
        raise ValueError(f"{name} must be a path; got {path!r}")


def _check_size(name: str, size: object) -> None:
    if isinstance(size, bool) or not (isinstance(size, int) and 1 <= size <= _MAX_SIZE):
        raise ValueError(f"{name} must be a positive number of bytes; got {size!r}")


def _check_log_level(level: object) -> None:
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}; got {level!r}")


def _check_store(store: object) -> None:
    if isinstance(store, str) and store.startswith(REDIS_CLUSTER_SCHEME):
        parse_redis_cluster_url(store)
    elif store != "lmdb":
        raise ValueError(f"store must be {_STORE_FORMS}; got {store!r}")


def _check_token(token: str, where: str) -> None:
    if not _TOKEN68.fullmatch(token):
        raise ValueError(
            f"{where} must consist of letters, digits and -._~+/ (optionally ending in =)"
            " to fit an 'Authorization: Bearer' header"
        )


# The Redis Cluster URL.


@dataclass(frozen=True)
class RedisClusterUrl:
    """What a ``redis-cluster://`` store URL says: seed nodes and the store's options."""

    nodes: tuple[tuple[str, int], ...]
    options: RedisOptions


_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*", re.ASCII)


def parse_redis_cluster_url(url: str) -> RedisClusterUrl:
    """``redis-cluster://HOST:PORT[,HOST:PORT...][?OPTION=VALUE&...]``: seed nodes (any
    live node of the cluster will do; list several so that one may be down), and options
    named as ``RedisOptions``' fields (``?prefix=lynxkv&replicas=1&wait_ms=1000``)."""
    if not url.startswith(REDIS_CLUSTER_SCHEME):
        raise ValueError(f"a Redis Cluster URL starts with {REDIS_CLUSTER_SCHEME}; got {url!r}")
    rest = url.removeprefix(REDIS_CLUSTER_SCHEME)
    where = f"in store URL {url!r}"
    if "#" in rest:
        raise ValueError(f"{where}: a fragment (#...) means nothing here")
    netloc, _, query = rest.partition("?")
    if "@" in netloc:
        raise ValueError(f"{where}: credentials in the URL are not supported")
    if "/" in netloc.rstrip("/"):
        raise ValueError(f"{where}: a path means nothing here (a cluster has one database)")
    netloc = netloc.rstrip("/")
    if not netloc:
        raise ValueError(f"{where}: name at least one node as HOST:PORT")
    nodes = tuple(_parse_node(item, where) for item in netloc.split(","))
    twice = sorted({f"{h}:{p}" for h, p in nodes if nodes.count((h, p)) > 1})
    if twice:
        raise ValueError(f"{where}: node {twice[0]} is listed twice")
    return RedisClusterUrl(nodes, _parse_redis_options(query, where))


def _parse_node(item: str, where: str) -> tuple[str, int]:
    if item.startswith("["):  # an IPv6 literal (RFC 3986 3.2.2)
        host, sep, port = item[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{where}: {item!r} is not [IPv6]:PORT") from None
    else:
        host, sep, port = item.rpartition(":")
        if sep and not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{where}: {host!r} is not a host name or IPv4 address")
    if not sep:
        raise ValueError(f"{where}: {item!r} needs a port (HOST:PORT)")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(f"{where}: port {port!r} of {item!r} is not in 1..65535")
    return host, int(port)


def _parse_redis_options(query: str, where: str) -> RedisOptions:
    defaults = {f.name: f.default for f in dataclasses.fields(RedisOptions)}
    values: dict[str, Any] = {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{where}: the query is not NAME=VALUE&...") from None
    for name, text in pairs:
        if name not in defaults:
            known = ", ".join(defaults)
            raise ValueError(f"{where}: unknown option {name!r}; known: {known}")
        if name in values:
            raise ValueError(f"{where}: option {name!r} is given twice")
        values[name] = _option_value(name, text, defaults[name], where)
    try:
        return RedisOptions(**values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _option_value(name: str, text: str, default: object, where: str) -> object:
    try:
        if name == "piece_size":
            return parse_size(text)
        if isinstance(default, str):
            return text
        if isinstance(default, int):
            return int(text)
        return float(text)
    except ValueError:
        kind = "a size" if name == "piece_size" else type(default).__name__
        raise ValueError(f"{where}: option {name}={text!r} is not {kind}") from None


# Sizes.


def parse_size(value: str | int) -> int:
    """Bytes from an integer or a string such as ``"500MB"``, ``"64GiB"``, ``"1.5 GiB"``.

    Units (case-insensitive): B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB
    (powers of 1024); none means bytes. The result must be a whole number of bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size must be an integer or a string such as '64GiB'; got {value!r}")
    match = _SIZE.fullmatch(value.strip())
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(
            f"{value!r} is not a size: write a number and a unit among"
            " B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '64GiB')"
        )
    size = Fraction(match.group(1)) * unit
    if size.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """The shortest exact spelling of ``size`` that :func:`parse_size` reads back."""
    for unit in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB"):
        factor = _UNITS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def read_token(path: Path) -> str:
    """The bearer token in ``path``, without surrounding whitespace."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read auth token file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"auth token file {path} is not UTF-8 text") from exc
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    _check_token(token, f"the token in {path}")
    return token


# Parsers: a value from TOML (typed) or from a flag or variable (a string) -> field value.
# ``base`` is the folder relative paths start from (the TOML file's, or None).

_Parse = Callable[[object, Path | None], Any]


def _parse_host(value: object, base: Path | None) -> str:
    _check_host(value)
    assert isinstance(value, str)
    return value


def _parse_port(value: object, base: Path | None) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    _check_port(value)
    assert isinstance(value, int)
    return value


def _parse_path(value: object, base: Path | None) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a path; got {value!r}")
    path = Path(value).expanduser()
    return base / path if base is not None and not path.is_absolute() else path


def _parse_size(value: object, base: Path | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a size must be an integer or a string such as '64GiB'; got {value!r}")
    size = parse_size(value)
    _check_size("a size", size)
    return size


def _parse_log_level(value: object, base: Path | None) -> str:
    level = value.lower() if isinstance(value, str) else value
    _check_log_level(level)
    assert isinstance(level, str)
    return level


def _parse_store(value: object, base: Path | None) -> str:
    _check_store(value)
    assert isinstance(value, str)
    return value


@dataclass(frozen=True)
class _Setting:
    """One setting: its TOML key is ``name``; its flag and variable derive from it."""

    name: str
    metavar: str
    parse: _Parse
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "LYNXKV_" + self.name.upper()


_SIZE_HELP = "; units B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (of 1024)"
_SETTINGS = (
    _Setting("host", "HOST", _parse_host, "address to bind"),
    _Setting("port", "PORT", _parse_port, "TCP port to listen on; 0 picks a free port"),
    _Setting("data_dir", "PATH", _parse_path, "folder of the embedded LMDB store"),
    _Setting(
        "max_bytes",
        "SIZE",
        _parse_size,
        "bytes stored at most; storing more evicts the least recently used objects"
        " (lmdb; a Redis Cluster's capacity is its maxmemory)" + _SIZE_HELP,
    ),
    _Setting(
        "max_object_bytes", "SIZE", _parse_size, "largest object a PUT may store" + _SIZE_HELP
    ),
    _Setting(
        "auth_token_file",
        "PATH",
        _parse_path,
        "file holding the bearer token every route but /healthz then requires"
        " (Authorization: Bearer <token>); surrounding whitespace is ignored",
    ),
    _Setting("log_level", "LEVEL", _parse_log_level, "one of " + ", ".join(LOG_LEVELS)),
    _Setting(
        "store",
        "STORE",
        _parse_store,
        "storage backend: lmdb (embedded, in --data-dir), or redis-cluster://HOST:PORT[,...]"
        " (a Redis Cluster that several servers share), with options as ?NAME=VALUE&...: "
        + ", ".join(f.name for f in dataclasses.fields(RedisOptions)),
    ),
)
_BY_NAME = {s.name: s for s in _SETTINGS}


def _default_text(name: str) -> str:
    if name == "auth_token_file":
        return "none: no authentication"
    default = {f.name: f.default for f in dataclasses.fields(ServerConfig)}[name]
    if name.startswith("max_"):
        assert isinstance(default, int)
        return format_size(default)
    return str(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting to the ``serve`` parser."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML file of settings, keyed by the long flag names with _ for -"
        ' (max_bytes = "64GiB"); paths in it are relative to its folder.'
        " Precedence: flags > LYNXKV_* environment > this file > defaults",
    )
    for setting in _SETTINGS:
        parser.add_argument(
            setting.flag,
            metavar=setting.metavar,
            help=f"{setting.help} [env {setting.env}; default {_default_text(setting.name)}]",
        )


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """The config from defaults, ``args.config``, ``environ`` and the flags in ``args``."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = []
    if getattr(args, "config", None) is not None:
        layers.append(_from_file(Path(args.config)))
    layers += [_from_env(environ), _from_flags(args)]
    for layer in layers:
        for name, (value, source) in layer.items():
            values[name], sources[name] = value, source
    token_file = values.pop("auth_token_file", None)
    if token_file is not None:
        try:
            values["auth_token"] = read_token(token_file)
        except ValueError as exc:
            raise ValueError(f"{sources['auth_token_file']}: {exc}") from None
    return ServerConfig(**values)


_Layer = dict[str, tuple[Any, str]]


def _parse(setting: _Setting, value: object, source: str, base: Path | None) -> tuple[Any, str]:
    try:
        return setting.parse(value, base), source
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _from_flags(args: argparse.Namespace) -> _Layer:
    layer = {}
    for s in _SETTINGS:
        value = getattr(args, s.name, None)
        if value is not None:
            layer[s.name] = _parse(s, value, f"flag {s.flag}", None)
    return layer


def _from_env(environ: Mapping[str, str]) -> _Layer:
    return {
        s.name: _parse(s, environ[s.env], f"environment variable {s.env}", None)
        for s in _SETTINGS
        if environ.get(s.env)
    }


def _from_file(path: Path) -> _Layer:
    table = _read_toml(path)
    layer = {}
    for key, value in table.items():
        setting = _BY_NAME.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, _BY_NAME, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(_BY_NAME)}"
            raise ValueError(f"config file {path}: unknown setting {key!r}{hint}")
        layer[key] = _parse(setting, value, f"config file {path}, key {key!r}", path.parent)
    return layer


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
