"""The ``lynxkv`` command line.

Exit codes (the client commands' table is in ``lynxkv.client.commands``): 0 success;
1 bad input or a failed operation (one line on stderr saying why); 2 bad usage
(argparse's message); 3 not found; 4 unauthorized; 5 server error; 6 the server cannot be
reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lynxkv.errors import LynxError, NotFound, ServerError, StoreError, TransportError, Unauthorized

__all__ = ["main"]

CHUNK_SUFFIX = ".lkv"
EXIT_INTERRUPTED = 130
#: Exit status per error type; the first match wins (TransportError is an OSError).
_EXIT_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, 3),
    (Unauthorized, 4),
    (ServerError, 5),
    (StoreError, 5),
    (TransportError, 6),
)


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _read_kv(path: Path) -> list[tuple[Any, Any]]:
    """Per-layer (K, V) arrays from a safetensors file with tensors k.{i} and v.{i}."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CliError(f"cannot read {path} as safetensors: {exc}") from exc
    layers = len(tensors) // 2
    expected = {f"{kind}.{i}" for kind in ("k", "v") for i in range(layers)}
    if set(tensors) != expected or not tensors:
        names = ", ".join(sorted(tensors)[:6]) or "none"
        raise CliError(f"{path} must hold tensors k.0..k.N and v.0..v.N only; it has: {names}")
    return [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(layers)]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _object_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob(f"*{CHUNK_SUFFIX}"))
        if not files:
            raise CliError(f"{path} holds no {CHUNK_SUFFIX} objects")
        return files
    if not path.is_file():
        raise CliError(f"{path}: no such file or folder")
    return [path]


def cmd_encode(args: argparse.Namespace) -> None:
    from lynxkv.codec import encode_chunks, get_codec

    codec = get_codec(args.codec)
    kv = _read_kv(Path(args.input))
    objects = encode_chunks(kv, codec, tokens_per_object=args.tokens_per_object, model=args.model)
    out = Path(args.output)
    if len(objects) == 1:
        _write_atomic(out, objects[0])
        print(f"wrote {out} ({len(objects[0])} bytes)")
        return
    out.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(objects):
        _write_atomic(out / f"chunk-{i:05d}{CHUNK_SUFFIX}", data)
    print(f"wrote {len(objects)} objects to {out}/ ({sum(map(len, objects))} bytes)")


def cmd_decode(args: argparse.Namespace) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from lynxkv.codec import decode
    from lynxkv.codec.sections import DTYPES

    decoded = [
        decode(path.read_bytes(), part=args.part) for path in _object_files(Path(args.input))
    ]
    first = decoded[0].header
    for obj in decoded[1:]:
        h = obj.header
        if (h.layers, h.kv_heads, h.head_dim, h.dtype) != (
            first.layers,
            first.kv_heads,
            first.head_dim,
            first.dtype,
        ):
            raise CliError(
                "the objects in the folder do not share layers, heads, head dim and dtype"
            )
    dtype = DTYPES[first.dtype]
    tensors = {}
    for i in range(first.layers):
        for j, kind in enumerate("kv"):
            tensors[f"{kind}.{i}"] = np.concatenate([obj.kv[i][j] for obj in decoded]).astype(dtype)
    save_file(tensors, args.output)
    tokens = sum(o.header.tokens for o in decoded)
    print(f"wrote {args.output} ({first.layers} layers, {tokens} tokens, {args.part})")


def cmd_inspect(args: argparse.Namespace) -> None:
    from lynxkv.codec import parse_header
    from lynxkv.codec.container import PREAMBLE, parse_preamble

    headers = []
    for path in _object_files(Path(args.input)):
        with path.open("rb") as f:
            head = f.read(PREAMBLE.size)
            head += f.read(parse_preamble(head))
            size = f.seek(0, os.SEEK_END)
        header = parse_header(head)
        if size != header.total:
            raise CliError(f"{path} is {size} bytes; its header says {header.total}")
        headers.append({"file": str(path), **header.to_json()})
    print(json.dumps(headers[0] if len(headers) == 1 else {"objects": headers}, indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lynxkv",
        description="KV-cache storage and progressive streaming.",
        epilog=_exit_codes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("encode", help="encode a safetensors KV cache into objects")
    p.add_argument(
        "input", metavar="IN.safetensors", help="tensors k.{layer} and v.{layer}, each [T, H, D]"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OBJ", help="object file, or folder when several"
    )
    p.add_argument(
        "--codec", default="lynx-a4", help="codec preset (default lynx-a4; NAME+zstd compresses)"
    )
    p.add_argument(
        "--tokens-per-object", type=int, default=256, metavar="N", help="tokens per object (256)"
    )
    p.add_argument("--model", default="", help="model fingerprint to record in the header")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode objects back into a safetensors KV cache")
    p.add_argument("input", metavar="OBJ", help="object file or folder of objects")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument(
        "--part", choices=["anchor", "full"], default="full", help="anchor alone or full (default)"
    )
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("inspect", help="print an object's header as JSON")
    p.add_argument("input", metavar="OBJ", help="object file or folder of objects")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="run the kvstore daemon (HTTP API v1, docs/http-api.md)")
    _serve_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "demo", help="the main job: a saved context answered in int8-lynx, int4 and lynx modes"
    )
    p.add_argument("--tokens", type=int, default=4096, help="context length in tokens (4096)")
    p.add_argument(
        "--max-new-tokens", type=int, default=40, metavar="N", help="answer length at most (40)"
    )
    p.add_argument(
        "--link-gbps",
        type=float,
        default=0.2,
        metavar="GBPS",
        help="emulated link from the server in Gbit/s (0.2: the transfer is a visible part"
        " of the time on a small CPU; docs/connector.md 'The demo')",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="model dtype (float32: lynx equals int8-lynx barring exact ties)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.set_defaults(func=_demo)
    _client_commands(sub)
    return parser


def _client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    try:
        from lynxkv.client.commands import add_commands
    except ImportError:  # the client extra is missing: put, get, ls and rm are not offered
        return
    add_commands(sub)


def _exit_codes_help() -> str | None:
    try:
        from lynxkv.client.commands import EXIT_CODES_HELP
    except ImportError:
        return None
    return EXIT_CODES_HELP


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from lynxkv.kvstore.config import add_arguments
    except ImportError:  # the server extra is missing: serve will say so when run
        return
    add_arguments(parser)


def _serve(args: argparse.Namespace) -> None:
    try:
        from lynxkv.kvstore.config import load_config
        from lynxkv.kvstore.serve import serve
    except ImportError as exc:
        raise CliError(f"{exc.name} is not installed: pip install 'lynxkv[server]'") from exc
    try:
        config = load_config(args, os.environ)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    serve(config)


def _demo(args: argparse.Namespace) -> None:
    from lynxkv.demo import run_demo

    if args.tokens < 1 or args.max_new_tokens < 1 or args.link_gbps <= 0:
        raise CliError("--tokens and --max-new-tokens must be positive, --link-gbps above 0")
    run_demo(
        tokens=args.tokens,
        max_new_tokens=args.max_new_tokens,
        link_gbps=args.link_gbps,
        dtype=args.dtype,
        as_json=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (CliError, LynxError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"lynxkv: error: {message}", file=sys.stderr)
        return _exit_status(exc)
    except KeyboardInterrupt:
        print("lynxkv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _exit_status(exc: BaseException) -> int:
    return next((code for kind, code in _EXIT_STATUS if isinstance(exc, kind)), 1)


if __name__ == "__main__":
    sys.exit(main())
