import argparse
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lynxkv.kvstore.config import (
    RedisClusterUrl,
    ServerConfig,
    add_arguments,
    format_size,
    load_config,
    parse_redis_cluster_url,
    parse_size,
    read_token,
)
from lynxkv.kvstore.redis_layout import RedisOptions

GiB = 1 << 30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lynxkv serve")
    add_arguments(parser)
    return parser


def _load(argv: Sequence[str] = (), env: dict[str, str] | None = None) -> ServerConfig:
    return load_config(_parser().parse_args(list(argv)), env or {})


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    config = _load()
    assert config == ServerConfig()
    assert config.host == "127.0.0.1" and config.port == 7470
    assert config.data_dir == Path("lynx-data")
    assert config.max_bytes == 8 * GiB and config.max_object_bytes == GiB
    assert config.auth_token is None and config.log_level == "info" and config.store == "lmdb"


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().port = 1  # type: ignore[misc]


def test_every_source(tmp_path: Path) -> None:
    token = _write(tmp_path / "token", "  s3cret-Token_1~+/==\n")
    toml = _write(
        tmp_path / "lynx.toml",
        'host = "0.0.0.0"\nport = 8000\ndata_dir = "data"\nmax_bytes = "64GiB"\n'
        'max_object_bytes = 1048576\nauth_token_file = "token"\nlog_level = "DEBUG"\n'
        'store = "lmdb"\n',
    )
    config = _load(["--config", str(toml)])
    assert config == ServerConfig(
        host="0.0.0.0",
        port=8000,
        data_dir=tmp_path / "data",  # relative to the file
        max_bytes=64 * GiB,
        max_object_bytes=1 << 20,
        auth_token="s3cret-Token_1~+/==",
        log_level="debug",
    )
    env = {
        "LYNXKV_HOST": "::1",
        "LYNXKV_PORT": "9000",
        "LYNXKV_DATA_DIR": "rel",
        "LYNXKV_MAX_BYTES": "500MB",
        "LYNXKV_MAX_OBJECT_BYTES": "1.5 MiB",
        "LYNXKV_AUTH_TOKEN_FILE": str(token),
        "LYNXKV_LOG_LEVEL": "warning",
        "LYNXKV_STORE": "lmdb",
    }
    assert _load(env=env) == ServerConfig(
        host="::1",
        port=9000,
        data_dir=Path("rel"),  # relative to the working directory
        max_bytes=500 * 10**6,
        max_object_bytes=3 << 19,
        auth_token="s3cret-Token_1~+/==",
        log_level="warning",
    )
    flags = [
        "--host=10.0.0.1",
        "--port=0",
        "--data-dir=/srv/lynx",
        "--max-bytes=2GB",
        "--max-object-bytes=1GB",
        f"--auth-token-file={token}",
        "--log-level=error",
        "--store=lmdb",
    ]
    assert _load(flags) == ServerConfig(
        host="10.0.0.1",
        port=0,
        data_dir=Path("/srv/lynx"),
        max_bytes=2 * 10**9,
        max_object_bytes=10**9,
        auth_token="s3cret-Token_1~+/==",
        log_level="error",
    )


def test_precedence(tmp_path: Path) -> None:
    toml = _write(tmp_path / "c.toml", 'port = 1001\nhost = "file"\nlog_level = "debug"\n')
    env = {"LYNXKV_PORT": "1002", "LYNXKV_HOST": "env"}
    config = _load(["--config", str(toml), "--port", "1003"], env)
    assert (config.port, config.host, config.log_level) == (1003, "env", "debug")
    assert _load(["--config", str(toml)], env).port == 1002
    assert _load(["--config", str(toml)]).port == 1001


def test_an_empty_variable_is_unset() -> None:
    assert _load(env={"LYNXKV_PORT": "", "LYNXKV_AUTH_TOKEN_FILE": ""}) == ServerConfig()


def test_help_documents_every_setting() -> None:
    text = re.sub(r"-\s+", "-", " ".join(_parser().format_help().split()))  # argparse wraps
    for flag, env, default in [
        ("--host HOST", "LYNXKV_HOST", "127.0.0.1"),
        ("--port PORT", "LYNXKV_PORT", "7470"),
        ("--data-dir PATH", "LYNXKV_DATA_DIR", "lynx-data"),
        ("--max-bytes SIZE", "LYNXKV_MAX_BYTES", "8GiB"),
        ("--max-object-bytes SIZE", "LYNXKV_MAX_OBJECT_BYTES", "1GiB"),
        ("--auth-token-file PATH", "LYNXKV_AUTH_TOKEN_FILE", "none: no authentication"),
        ("--log-level LEVEL", "LYNXKV_LOG_LEVEL", "info"),
        ("--store STORE", "LYNXKV_STORE", "lmdb"),
    ]:
        assert flag in text
        assert f"[env {env}; default {default}]" in text
    assert "--config PATH" in text


# Sizes
@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1),
        ("0", 0),
        ("1024", 1024),
        ("10B", 10),
        ("1KB", 1000),
        ("1kb", 1000),
        ("500MB", 500 * 10**6),
        ("2GB", 2 * 10**9),
        ("1TB", 10**12),
        ("1KiB", 1024),
        ("64MiB", 64 << 20),
        ("64GiB", 64 << 30),
        ("64gib", 64 << 30),
        ("2TiB", 2 << 40),
        ("1.5GiB", 3 << 29),
        ("0.5KB", 500),
        (" 8 GiB ", 8 << 30),
        ("007MB", 7 * 10**6),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "",
        "GiB",
        "1.5",
        "0.0001KB",
        "-1",
        "1e9",
        "1 G",
        "1GiBs",
        "1 2",
        "1_000",
        "１GB",
        "1  GB",
        "1.GB",
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|whole number"):
        parse_size(text)


@given(st.integers(0, 1 << 62))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size() -> None:
    assert [format_size(n) for n in (8 << 30, 1536 << 20, 500 * 10**6, 1000, 1023, 0)] == [
        "8GiB",
        "1536MiB",
        "500MB",
        "1KB",
        "1023B",
        "0B",
    ]


# Tokens
def test_read_token(tmp_path: Path) -> None:
    assert read_token(_write(tmp_path / "t", "\n\tabc123=\r\n")) == "abc123="


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        (" \n\t", "is empty"),
        ("two words", "to fit an 'Authorization: Bearer' header"),
        ("tök", "to fit"),
        ("a=b", "to fit"),
    ],
)
def test_read_token_rejects(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_token(_write(tmp_path / "t", content))


def test_read_token_rejects_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read auth token file .*missing"):
        read_token(tmp_path / "missing")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_token(tmp_path / "bin")


def test_the_token_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(ServerConfig(auth_token="hunter2"))


# Bad values name their source.
BAD_VALUES = [
    ("port", "70000", "port must be an integer in 0..65535"),
    ("port", "-1", "port must be"),
    ("port", "http", "port must be"),
    ("port", "80.0", "port must be"),
    ("port", "99999999999999999999", "port must be"),
    ("host", " ", "host must be"),
    ("host", "a b", "host must be"),
    ("max_bytes", "lots", "'lots' is not a size"),
    ("max_bytes", "0", "a size must be a positive number of bytes"),
    ("max_bytes", "1.5B", "not a whole number of bytes"),
    ("max_object_bytes", "10T", "is not a size"),
    ("log_level", "verbose", "log_level must be one of debug, info, warning, error, critical"),
    ("store", "LMDB", "store must be lmdb or redis-cluster://HOST:PORT"),
    ("store", "redis://h:1", "store must be lmdb or redis-cluster://HOST:PORT"),
    ("store", "redis-cluster://h", r"'h' needs a port \(HOST:PORT\)"),
    ("store", "redis-cluster://h:1?replicas=x", "option replicas='x' is not int"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_bad_flag(name: str, value: str, message: str) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"^flag {flag}: .*{message}"):
        _load([f"{flag}={value}"])


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_bad_variable(name: str, value: str, message: str) -> None:
    env = "LYNXKV_" + name.upper()
    with pytest.raises(ValueError, match=f"^environment variable {env}: .*{message}"):
        _load(env={env: value})


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_bad_file_value(tmp_path: Path, name: str, value: str, message: str) -> None:
    toml = _write(tmp_path / "c.toml", f"{name} = {value!r}\n".replace("'", '"'))
    with pytest.raises(ValueError, match=f"^config file .*c.toml, key '{name}': .*{message}"):
        _load(["--config", str(toml)])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("port = 7470.0", "port must be"),
        ("port = true", "port must be"),
        ("port = [1]", "port must be"),
        ("host = 1", "host must be"),
        ("data_dir = 1", "must be a path"),
        ('data_dir = ""', "must be a path"),
        ("max_bytes = true", "a size must be an integer or a string"),
        ("max_bytes = 1.5", "a size must be an integer or a string"),
        ("max_bytes = -1", "a size must be a positive number"),
        ("log_level = 1", "log_level must be one of"),
        ("store = {}", "store must be lmdb or"),
        ("auth_token_file = 3", "must be a path"),
    ],
)
def test_bad_file_types(tmp_path: Path, line: str, message: str) -> None:
    toml = _write(tmp_path / "c.toml", line + "\n")
    with pytest.raises(ValueError, match=f"^config file .*c.toml, key '.*': .*{message}"):
        _load(["--config", str(toml)])


def test_every_source_is_checked_even_when_overridden(tmp_path: Path) -> None:
    toml = _write(tmp_path / "c.toml", 'port = "x"\n')
    with pytest.raises(ValueError, match="key 'port'"):
        _load(["--config", str(toml), "--port", "1"])
    with pytest.raises(ValueError, match="LYNXKV_PORT"):
        _load(["--port", "1"], {"LYNXKV_PORT": "x"})


def test_unknown_file_keys(tmp_path: Path) -> None:
    toml = _write(tmp_path / "c.toml", "prot = 1\n")
    with pytest.raises(ValueError, match=r"unknown setting 'prot'; did you mean 'port'\?"):
        _load(["--config", str(toml)])
    toml = _write(tmp_path / "c.toml", "[server]\nport = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'server'; known: host, port, data_dir"):
        _load(["--config", str(toml)])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read config file .*nope\.toml"):
        _load(["--config", str(tmp_path / "nope.toml")])
    toml = _write(tmp_path / "c.toml", "port = \n")
    with pytest.raises(ValueError, match=r"c\.toml is not valid TOML"):
        _load(["--config", str(toml)])
    with pytest.raises(ValueError, match="cannot read config file"):
        _load(["--config", str(tmp_path)])  # a folder


def test_bad_token_files_name_their_source(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty", "\n")
    with pytest.raises(
        ValueError,
        match=f"^flag --auth-token-file: auth token file {re.escape(str(empty))} is empty",
    ):
        _load([f"--auth-token-file={empty}"])
    with pytest.raises(
        ValueError, match=r"^environment variable LYNXKV_AUTH_TOKEN_FILE: cannot read"
    ):
        _load(env={"LYNXKV_AUTH_TOKEN_FILE": str(tmp_path / "missing")})
    toml = _write(tmp_path / "c.toml", 'auth_token_file = "missing"\n')
    with pytest.raises(ValueError, match=r"^config file .*, key 'auth_token_file': cannot read"):
        _load(["--config", str(toml)])


def test_only_the_winning_token_file_is_read(tmp_path: Path) -> None:
    token = _write(tmp_path / "token", "good")
    env = {"LYNXKV_AUTH_TOKEN_FILE": str(tmp_path / "missing")}
    assert _load([f"--auth-token-file={token}"], env).auth_token == "good"


def test_object_limit_within_store_limit() -> None:
    with pytest.raises(
        ValueError, match=r"max_object_bytes \(2GiB\) must not exceed max_bytes \(1GiB\)"
    ):
        _load(["--max-bytes=1GiB", "--max-object-bytes=2GiB"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": ""}, "host must be"),
        ({"port": 65536}, "port must be"),
        ({"port": True}, "port must be"),
        ({"port": "7470"}, "port must be"),
        ({"data_dir": "x"}, "data_dir must be a path"),
        ({"max_bytes": 0}, "max_bytes must be a positive"),
        ({"max_object_bytes": 1 << 63}, "max_object_bytes must be a positive"),
        ({"max_bytes": 1.0}, "max_bytes must be a positive"),
        ({"auth_token": ""}, "auth_token must consist of"),
        ({"auth_token": "a b"}, "auth_token must consist of"),
        ({"log_level": "INFO"}, "log_level must be one of"),
        ({"store": "redis"}, "store must be lmdb or redis-cluster://"),
        ({"store": "redis-cluster://"}, "name at least one node"),
    ],
)
def test_server_config_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig(**kwargs)  # type: ignore[arg-type]


# The Redis Cluster URL.


def test_a_redis_cluster_url_from_every_source(tmp_path: Path) -> None:
    url = "redis-cluster://10.0.0.1:7000,cache-2.example.com:7001?prefix=prod&replicas=2"
    want = ServerConfig(store=url)
    assert _load([f"--store={url}"]) == want
    assert _load(env={"LYNXKV_STORE": url}) == want
    assert _load(["--config", str(_write(tmp_path / "c.toml", f'store = "{url}"\n'))]) == want


@pytest.mark.parametrize(
    ("url", "nodes", "options"),
    [
        ("redis-cluster://127.0.0.1:7000", (("127.0.0.1", 7000),), RedisOptions()),
        (
            "redis-cluster://a:1,b.example:65535,[::1]:7000/",
            (("a", 1), ("b.example", 65535), ("::1", 7000)),
            RedisOptions(),
        ),
        (
            "redis-cluster://h:6379?prefix=t-1.x&piece_size=4MiB&replicas=0&wait_ms=50"
            "&retire_grace_s=0&upload_ttl_s=30.5&stats_cache_s=0&access_flush_s=1&timeout_s=2",
            (("h", 6379),),
            RedisOptions(
                prefix="t-1.x",
                piece_size=4 << 20,
                replicas=0,
                wait_ms=50,
                retire_grace_s=0,
                upload_ttl_s=30.5,
                stats_cache_s=0,
                access_flush_s=1,
                timeout_s=2,
            ),
        ),
        ("redis-cluster://h:1?piece_size=65536", (("h", 1),), RedisOptions(piece_size=65536)),
    ],
)
def test_redis_cluster_urls(
    url: str, nodes: tuple[tuple[str, int], ...], options: RedisOptions
) -> None:
    assert parse_redis_cluster_url(url) == RedisClusterUrl(nodes, options)
    assert ServerConfig(store=url).store == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h:1", "a Redis Cluster URL starts with redis-cluster://"),
        ("redis-cluster://", "name at least one node as HOST:PORT"),
        ("redis-cluster://h:1,", "'' needs a port"),
        ("redis-cluster://h", "'h' needs a port"),
        ("redis-cluster://h:", "port '' of 'h:' is not in 1..65535"),
        ("redis-cluster://h:0", "port '0' of 'h:0' is not in 1..65535"),
        ("redis-cluster://h:65536", "port '65536' of 'h:65536' is not in 1..65535"),
        ("redis-cluster://h:+1", "port '\\+1' of 'h:\\+1' is not in 1..65535"),
        ("redis-cluster://h:1x", "port '1x' of 'h:1x' is not in 1..65535"),
        ("redis-cluster://bad_host:1", "'bad_host' is not a host name or IPv4 address"),
        ("redis-cluster://-h:1", "'-h' is not a host name"),
        ("redis-cluster://::1:7000", "'::1' is not a host name"),
        ("redis-cluster://[::g]:7000", "'\\[::g\\]:7000' is not \\[IPv6\\]:PORT"),
        ("redis-cluster://[::1]", "'\\[::1\\]' is not \\[IPv6\\]:PORT"),
        ("redis-cluster://h:1,h:1", "node h:1 is listed twice"),
        ("redis-cluster://user:pw@h:1", "credentials in the URL are not supported"),
        ("redis-cluster://h:1/0", "a path means nothing here"),
        ("redis-cluster://h:1#x", "a fragment"),
        ("redis-cluster://h:1?replicas", "the query is not NAME=VALUE"),
        ("redis-cluster://h:1?replica=1", "unknown option 'replica'; known: prefix, piece_size"),
        ("redis-cluster://h:1?replicas=1&replicas=2", "option 'replicas' is given twice"),
        ("redis-cluster://h:1?replicas=-1", "replicas must be an integer in \\[0, 16\\]"),
        ("redis-cluster://h:1?replicas=1.5", "option replicas='1.5' is not int"),
        ("redis-cluster://h:1?wait_ms=0", "wait_ms must be an integer in \\[1, 3600000\\]"),
        ("redis-cluster://h:1?piece_size=big", "option piece_size='big' is not a size"),
        ("redis-cluster://h:1?piece_size=1KB", "piece_size must be an integer in \\[1024,"),
        ("redis-cluster://h:1?piece_size=1GiB", "piece_size must be an integer in"),
        ("redis-cluster://h:1?prefix=", "prefix must match"),
        ("redis-cluster://h:1?prefix=a:b", "prefix must match"),
        ("redis-cluster://h:1?prefix=%7Bx%7D", "prefix must match"),
        ("redis-cluster://h:1?retire_grace_s=-1", "retire_grace_s must be a number of seconds"),
        ("redis-cluster://h:1?stats_cache_s=nan", "stats_cache_s must be a number of seconds"),
        ("redis-cluster://h:1?upload_ttl_s=inf", "upload_ttl_s must be a number of seconds"),
        ("redis-cluster://h:1?upload_ttl_s=0.5", "upload_ttl_s must be a number of seconds >= 1"),
        ("redis-cluster://h:1?timeout_s=1", "timeout_s \\(1.0 s\\) must exceed wait_ms"),
    ],
)
def test_bad_redis_cluster_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_cluster_url(url)
    if url.startswith("redis-cluster://"):
        with pytest.raises(ValueError, match=f"^flag --store: in store URL .*{message}"):
            _load([f"--store={url}"])


def test_the_store_help_names_the_redis_options() -> None:
    text = re.sub(r"-\s+", "-", " ".join(_parser().format_help().split()))  # argparse wraps
    assert "redis-cluster://HOST:PORT[,...]" in text
    assert "piece_size" in text and "replicas" in text and "wait_ms" in text
