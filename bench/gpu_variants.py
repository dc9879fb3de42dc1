"""Compiled variants of the decode kernel, timed side by side in one process (GPU only).

Kernel changes are judged here rather than across bench/gpu.py runs (each call may land
on another H200): every variant decodes the same sections into the same destination,
each is first checked bit for bit against the numpy codec, and the variants are timed
in interleaved rounds (A B C A B C ...), the median of each taken, as GPU time of the
launches (bench/gpu.py's ``_time``; the host time of queueing them is printed too).
Beside them, ceilings: a bare streaming kernel writing 16-byte vectors and reading 0,
4, 8 or 16 bytes per vector (``stream_readN_write16``), torch's ``fill_`` on the same
output, and ``SKELETON=1`` (the kernel's loads and stores without its table lookups and
arithmetic; not checked, as it computes nothing).

    python3 bench/gpu_variants.py [--variants "base;SKELETON=1;STORE_CS=1;MIN_BLOCKS=2"]
        [--old FILE] [--codecs lynx-a4:hnd,uniform-a4:hnd] [--rounds 5] [--no-streams]
    python3 bench/gpu_variants.py --encode lynx-a4,uniform-a4 --codecs "" \
        --variants "base;MIN_BLOCKS=2"

``--encode`` times the encoding kernel's variants the same way (macros of
lynxkv.gpu.encode_source; ``MIN_BLOCKS`` is its ``ENC_MIN_BLOCKS``), each checked against
the numpy encoder first (bench/gpu.py's ``EncodeCase``); ``--old-encode FILE`` adds the
kernel of an earlier encode_source.py (same kernel signature) as ``old``.

A variant is ``base`` or comma-separated ``NAME=VALUE`` macros of lynxkv.gpu.cuda_source
(``TPT`` and ``MIN_BLOCKS`` among them; ``ROW_TABLE=1``: rows read from the int64 row
table, not computed (hnd) or read as int32 16-byte units (paged)); ``--old FILE`` adds
``old``: the kernel of a Python file that defines ``SOURCE`` (an earlier cuda_source.py,
with the same kernel signature). The last line is JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu import COPY_TBPS, Case, D, EncodeCase, H, T, _host_seconds, _time
from lynxkv.gpu.cuda_source import MIN_BLOCKS, SOURCE, TOKENS_PER_THREAD
from lynxkv.gpu.encode_source import ENC_MIN_BLOCKS
from lynxkv.gpu.encode_source import SOURCE as ENC_SOURCE


class Variant:
    """One compiled form of the kernel: macros, and the source they apply to."""

    def __init__(self, label: str, source: str = SOURCE) -> None:
        self.label, self.source = label, source
        macros = dict(d.split("=", 1) for d in label.split(",") if "=" in d)
        self.tpt = int(macros.pop("TPT", TOKENS_PER_THREAD))
        self.enc_min_blocks = int(macros.get("MIN_BLOCKS", ENC_MIN_BLOCKS))
        self.min_blocks = int(macros.pop("MIN_BLOCKS", MIN_BLOCKS))
        self.row_table = macros.pop("ROW_TABLE", "0") == "1"  # the int64 row table
        self.streams = int(macros.pop("STREAMS", "2"))  # encode: 1 = V after K, one stream
        self.defines = tuple(f"{k}={v}" for k, v in sorted(macros.items()))
        self.checked = not any(d.startswith("SKELETON=") for d in self.defines)
        self.name_of: Any = None  # an earlier encode kernel's instantiation names

    def encode_run(self, case: EncodeCase, source: str) -> None:
        defines = (*self.defines, f"ENC_MIN_BLOCKS={self.enc_min_blocks}")
        naming = {} if self.name_of is None else {"name_of": self.name_of}
        case.run(self.streams, defines=defines, source=source, **naming)

    def run(self, case: Case, full: bool) -> None:
        case.run(
            full,
            case.rows_table if self.row_table else None,
            tokens_per_thread=self.tpt,
            min_blocks=self.min_blocks,
            defines=self.defines,
            source=self.source,
        )


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("old_source", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_source(path: Path) -> str:
    return str(_load_module(path).SOURCE)


STREAM_SOURCE = r"""
template <typename In>  // In: what is read per 16-byte vector written (read = 0: nothing)
__global__ void stream(const In* __restrict__ src, uint4* __restrict__ dst, long long n,
                       int read) {
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step) {
        uint4 v = make_uint4(0x3f80u, 0x3f80u, 0x3f80u, (unsigned int)i);
        if (read) {
            const In x = __ldg(src + i);
            v.x ^= ((const unsigned int*)&x)[0];
            if (sizeof(In) >= 8) v.y ^= ((const unsigned int*)&x)[1];
            if (sizeof(In) >= 16) v.z ^= ((const unsigned int*)&x)[2];
        }
        dst[i] = v;
    }
}
"""


def _streams(out_bytes: int, repeats: int) -> dict[str, float]:
    """Ratios to copy bandwidth of a bare streaming kernel that writes ``out_bytes`` in
    16-byte vectors and reads 0, 4, 8 or 16 bytes per vector (0%, 20%, 33% and 50% of
    the bytes moved are reads): what the memory system gives at a kernel's mix of reads
    and writes (decode_anchor reads about 22% of its bytes, refine_residual 35%). Best
    of a one-item-per-thread grid and grid-stride grids of 4 to 16 blocks per SM."""
    import cupy as cp  # type: ignore[import-not-found,unused-ignore]

    types = {0: "unsigned int", 4: "unsigned int", 8: "uint2", 16: "uint4"}
    names = [f"stream<{t}>" for t in dict.fromkeys(types.values())]
    module = cp.RawModule(code=STREAM_SOURCE, options=("-std=c++17",), name_expressions=names)
    n = out_bytes // 16
    dst = torch.empty(n * 16, dtype=torch.uint8, device="cuda")
    src = torch.randint(0, 255, (n * 16,), dtype=torch.uint8, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict[str, float] = {}
    for read, in_type in types.items():
        kernel = module.get_function(f"stream<{in_type}>")
        args = (cp.from_dlpack(src), cp.from_dlpack(dst), np.int64(n), np.int32(read > 0))
        best = 0.0
        for grid in (-(-n // 256), sms * 4, sms * 8, sms * 16):
            run = functools.partial(kernel, (grid,), (256,), args)  # torch's default stream
            best = max(best, n * (16 + read) / _time(run, repeats) / 1e12 / COPY_TBPS)
        out[f"stream_read{read}_write16"] = best
    del src, dst
    return out


def _encode_variants(
    codec: str, variants: list[tuple[Variant, str]], n: int, args: argparse.Namespace
) -> dict[str, float]:
    """One codec's encoding kernel, each variant (and its source) checked, then timed in
    interleaved rounds."""
    case = EncodeCase(codec, n, seed=400)
    good = []
    for v, source in variants:
        v.encode_run(case, source)
        torch.cuda.synchronize()
        try:
            if v.checked:
                case.check()
            good.append((v, source))
        except SystemExit as exc:
            print(f"encode {codec} {v.label}: {exc}")
    times: dict[str, list[float]] = {v.label: [] for v, _ in good}
    for _ in range(args.rounds):
        for v, source in good:
            run = functools.partial(v.encode_run, case, source)
            times[v.label].append(_time(run, args.repeats, 1))
    row: dict[str, float] = {}
    print(f"encode {codec}:", end="")
    for v, _ in good:
        gbps = case.bytes_moved() / statistics.median(times[v.label]) / 1e9
        row[v.label] = round(gbps / COPY_TBPS / 1e3, 3)
        print(f" | {v.label} {gbps:.0f} ({row[v.label]:.3f})", end="")
    print()
    del case
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="base;SKELETON=1")
    parser.add_argument("--old", type=Path, default=None, help="a file defining SOURCE")
    parser.add_argument("--codecs", default="lynx-a4:hnd")
    parser.add_argument("--encode", default="", help="codecs whose encoding kernel to time")
    parser.add_argument("--old-encode", type=Path, default=None, help="an encode_source.py")
    parser.add_argument("--no-streams", action="store_true", help="skip the stream ceilings")
    parser.add_argument("--gbytes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per round")
    args = parser.parse_args()
    variants = [Variant(v) for v in args.variants.split(";") if v]
    if args.old is not None:
        variants.insert(0, Variant("old", _load_source(args.old)))
    n = int(args.gbytes * 1e9 / (2 * 2 * T * H * D))
    result: dict[str, Any] = {}
    enc_variants = [(v, ENC_SOURCE) for v in variants if v.label != "old"]
    if args.old_encode is not None:
        old, module = Variant("old"), _load_module(args.old_encode)
        if "fast" not in inspect.signature(module.kernel_name).parameters:  # before FAST
            old.name_of = lambda *args, fast=False: module.kernel_name(*args)
        enc_variants.insert(0, (old, str(module.SOURCE)))
    for codec in filter(None, args.encode.split(",")):
        result[f"encode[{codec}]"] = _encode_variants(codec, enc_variants, n, args)
    for i, item in enumerate(filter(None, args.codecs.split(","))):
        codec, layout = item.split(":")
        case = Case(codec, layout, n, seed=300 + i)
        out_bytes = sum(t.numel() * t.element_size() for t in case.out.values())
        if layout == "paged":
            out_bytes = case.cache.numel() * case.cache.element_size()

        def fill(case: Case = case) -> None:
            for t in case.out.values():
                t.fill_(1.0)

        fill_gbps = out_bytes / _time(fill, args.repeats) / 1e9
        ceilings = {} if args.no_streams or i else _streams(out_bytes, args.repeats)
        for name, value in ceilings.items():
            print(f"{name}: {value:.3f}")
            result[name] = round(value, 3)
        for full, kernel in ((False, "decode_anchor"), (True, "refine_residual")):
            good = []
            for v in variants:
                v.run(case, full)
                torch.cuda.synchronize()
                try:
                    if v.checked:
                        case.check(full)
                    good.append(v)
                except SystemExit as exc:  # a wrong variant is reported, not timed
                    print(f"{kernel} {codec} {layout} {v.label}: {exc}")
            times: dict[str, list[float]] = {v.label: [] for v in good}
            for _ in range(args.rounds):
                for v in good:
                    run = functools.partial(v.run, case, full)
                    times[v.label].append(_time(run, args.repeats, warmup=1))
            moved = case.bytes_moved(full)
            row: dict[str, float] = {"fill": round(fill_gbps / COPY_TBPS / 1e3, 3)}
            host = _host_seconds(functools.partial(variants[0].run, case, full), args.repeats)
            print(f"{kernel} {codec} {layout}: host {host * 1e6:.0f} us", end="")
            print(f" | fill_ {fill_gbps:.0f} GB/s", end="")
            for v in good:
                gbps = moved / statistics.median(times[v.label]) / 1e9
                row[v.label] = round(gbps / COPY_TBPS / 1e3, 3)
                print(f" | {v.label} {gbps:.0f} ({row[v.label]:.3f})", end="")
            print()
            result[f"{kernel}[{codec},{layout}]"] = row
        del case
        torch.cuda.empty_cache()
    print(json.dumps({"ratios": result, "copy_tbps_reference": COPY_TBPS}))


if __name__ == "__main__":
    main()
