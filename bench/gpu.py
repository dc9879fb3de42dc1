"""Bandwidth of the GPU kernels (lynxkv.gpu) on about 1 GB of KV, on one GPU.

For each case: a few sections are encoded by the numpy codec (fresh random KV), copied
to the device and replicated to about 1 GB of output, then one launch per K|V kind
decodes all of them, as ``decode_anchor`` / ``refine_residual`` do for a batch.
Before timing, every case's output is checked bit for bit against the numpy codec
(``decode_tensor``, rounded to bf16 by torch). Timing: CUDA events around one decode
of the whole set (a launch per K|V kind), after warm-up, median of repeats, with the
stream held by a spin kernel while the host queues the launches, so that the figure is
the kernels' GPU time (``_time``); ``w/ launch`` (``ratio_with_launch``) starts the
clock before the host's launch work instead: 70-660 us a run from Python, which cut
the earlier figures of these kernels by a fifth to a third. GB/s counts the bytes the
kernel must move: payload read (anchor; anchor and residual for refine) plus output
written.
``ratio`` is against 4.27 TB/s, the device-to-device copy bandwidth measured on this
GPU kind (a torch copy measured in the same run is printed beside it).

``encode`` rows time the encoding kernel the same way: about 1 GB of bf16 K and V in the
engine's [1, H, T, D] layout (one section per job), one launch per K|V kind. Before
timing, a sample of sections is compared with the numpy encoder field by field
(``lynxkv.gpu.compare``; the contract: at most 1 in 100,000 codes differ, by one). GB/s
counts the bf16 input read plus the payloads written (anchor with its metadata, and
residual).

``staged_*`` rows time the public API end to end from host bytes (pinned staging, H2D
copies on a side stream overlapped with the kernels): bounded by the host link, they
count payload bytes crossing it per second and have no ratio to device copy bandwidth.

    python bench/gpu.py [--gbytes 1.0] [--repeats 20] [--out DIR]

The last line of the output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lynxkv.codec import CODECS, ObjectDecoder, encode
from lynxkv.codec.sections import decode_tensor, encode_tensor
from lynxkv.gpu import decode_anchor, refine_residual
from lynxkv.gpu import encode_chunks as gpu_encode_chunks
from lynxkv.gpu.compare import CodeDiff, compare_sections
from lynxkv.gpu.cuda_source import ROWS_AFFINE, ROWS_TABLE, ROWS_UNITS
from lynxkv.gpu.device import launch_dequant
from lynxkv.gpu.encode import launch_encode, side_stream
from lynxkv.gpu.encode_tables import regions
from lynxkv.gpu.staging import aligned_offsets
from lynxkv.gpu.tables import make_plan
from lynxkv.gpu.targets import Rows
from tests.codec.kvgen import make_kv

COPY_TBPS = 4.27
T, H, D = 256, 8, 128  # one 256-token chunk of a Llama-3-8B-like layer
SOURCES = 4  # distinct encoded sections per K|V kind; replicated on the device


#: GPU clock cycles the stream is held before a timed run (about 10 ms), so that the
#: host has queued all of the run's launches when the start event fires
HOLD_CYCLES = 20_000_000


def _time(fn: Callable[[], None], repeats: int, warmup: int = 3, host: bool = False) -> float:
    """Median seconds of ``fn`` by CUDA events.

    By default the GPU time of ``fn``'s launches alone: the stream is held by a spin
    kernel (``torch.cuda._sleep``) while the host runs ``fn`` (argument packing and
    launches, tens of microseconds per launch from Python), so that the start event
    fires when the launches are already queued. ``host=True`` starts the clock before
    ``fn`` runs on the host, so host work on the critical path counts (the staged
    paths, whose figure is meant to include it).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        if not host:
            torch.cuda._sleep(HOLD_CYCLES)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)) / 1e3)
    return float(statistics.median(times))


def _host_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Median host seconds of ``fn`` (queueing its launches, not waiting for them)."""
    times = []
    for _ in range(repeats):
        torch.cuda._sleep(HOLD_CYCLES)  # type: ignore[no-untyped-call]
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    return float(statistics.median(times))


class Case:
    """``n`` sections per K|V kind of one codec, on the device, and their destination."""

    def __init__(self, codec: str, layout: str, n: int, seed: int) -> None:
        self.spec = CODECS[codec]
        self.layout, self.n = layout, n
        kv_pairs = make_kv(seed, layers=SOURCES, tokens=T, heads=H, dim=D)
        self.src: dict[str, list[tuple[bytes, bytes]]] = {"k": [], "v": []}
        for k, v in kv_pairs:
            self.src["k"].append(encode_tensor(k, self.spec, "k", "bf16"))
            self.src["v"].append(encode_tensor(v, self.spec, "v", "bf16"))
        dev = torch.device("cuda")
        self.payload: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bases: dict[str, tuple[int, int]] = {}
        self.anchor_bytes = len(self.src["k"][0][0]) + len(self.src["v"][0][0])
        self.residual_bytes = len(self.src["k"][0][1]) + len(self.src["v"][0][1])
        for kind in ("k", "v"):
            # every section its own copy, 256-byte aligned (as the stager lays them out)
            pieces = []
            for stream in (0, 1):
                offs, _ = aligned_offsets([len(self.src[kind][0][stream])] * 2)
                step = offs[1]
                host = np.zeros((SOURCES, step), dtype=np.uint8)
                for i in range(SOURCES):
                    data = self.src[kind][i][stream]
                    host[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
                one = torch.from_numpy(host).to(dev)
                pieces.append(one.repeat(-(-n // SOURCES), 1)[:n].contiguous())
            self.payload[kind] = (pieces[0], pieces[1])
        if layout == "hnd":  # [n, H, T, D] per kind: section j is "layer" j
            self.out = {
                kv: torch.empty((n, H, T, D), dtype=torch.bfloat16, device=dev) for kv in "kv"
            }
            self.row_off = torch.arange(T, device=dev, dtype=torch.int64) * D
            self.rows = Rows(ROWS_AFFINE, self.row_off, 0, D)  # row t at t * D, computed
            self.stride_h = T * D
        else:  # vLLM [2, blocks, 16, H, D] per layer, shuffled slots
            blocks = n * T // 16
            self.cache = torch.empty((2, blocks, 16, H, D), dtype=torch.bfloat16, device=dev)
            self.out = {"k": self.cache[0], "v": self.cache[1]}
            # row_off is shared by a launch's jobs, so each section gets its own 256 slots
            # (a base per job) and its tokens land in them shuffled, as a slot mapping does
            rows = torch.randperm(T, device=dev).to(torch.int64)
            self.row_off = rows * (H * D)
            units = (self.row_off // 8).to(torch.int32)  # 16-byte units of bf16
            self.rows = Rows(ROWS_UNITS, units)
            self.stride_h = D
        self.jobs = {kv: self._jobs(kv) for kv in "kv"}
        self.rows_table = Rows(ROWS_TABLE, self.row_off)  # the int64 table, for comparison

    def _jobs(self, kv: str) -> tuple[torch.Tensor, torch.Tensor]:
        anchor, residual = self.payload[kv]
        idx = torch.arange(self.n, device=anchor.device, dtype=torch.int64)
        a = anchor.data_ptr() + idx * anchor.stride(0)
        r = residual.data_ptr() + idx * residual.stride(0)
        per = T * H * D  # elements of one section's destination
        dst = self.out[kv].data_ptr() + idx * per * 2
        return torch.stack([a, torch.zeros_like(a), dst], 1), torch.stack([a, r, dst], 1)

    def run(self, full: bool, rows: Rows | None = None, **variant: Any) -> None:
        """Decode every section (``full``: anchor and residual); ``rows`` and ``variant``
        (``launch_dequant``'s compile options) select a variant for gpu_variants.py."""
        for kv in ("k", "v"):
            plan = make_plan(self.spec, kv, T, H, D)
            jobs = self.jobs[kv][1 if full else 0]
            launch_dequant(
                self.spec,
                kv,
                plan,
                (T, H, D),
                jobs,
                rows or self.rows,
                torch.bfloat16,
                self.stride_h,
                full,
                **variant,
            )

    def check(self, full: bool) -> None:
        """Every section of a sample against the numpy codec, bit for bit."""
        for kv in ("k", "v"):
            out = self.out[kv].reshape(self.n, -1)
            for j in sorted({0, 1, SOURCES - 1, self.n - 1}):
                a, r = self.src[kv][j % SOURCES]
                ref = decode_tensor(self.spec, kv, (T, H, D), "bf16", a, r if full else None)
                want = torch.from_numpy(ref).to(torch.bfloat16)  # [T, H, D]
                if self.layout == "hnd":
                    got = out[j].view(H, T, D).permute(1, 0, 2).cpu()
                else:
                    rows = (self.row_off // (H * D)).cpu()
                    got = out[j].view(T, H, D)[rows].cpu()
                if not torch.equal(got, want):
                    bad = int((got != want).sum())
                    raise SystemExit(
                        f"MISMATCH {self.spec.name} {self.layout} {kv} full={full}: {bad}"
                    )

    def bytes_moved(self, full: bool) -> int:
        payload = self.anchor_bytes + (self.residual_bytes if full else 0)
        return self.n * (payload + 2 * 2 * T * H * D)


class EncodeCase:
    """``n`` [1, H, T, D] bf16 sections per K|V kind on the device, and their payloads."""

    def __init__(self, codec: str, n: int, seed: int) -> None:
        self.spec = CODECS[codec]
        self.n = n
        dev = torch.device("cuda")
        self.src = make_kv(seed, layers=SOURCES, tokens=T, heads=H, dim=D)
        self.inputs: dict[str, torch.Tensor] = {}
        self.regions = {kv: regions(self.spec, kv, (T, H, D)) for kv in ("k", "v")}
        self.out: dict[str, torch.Tensor] = {}
        self.jobs: dict[str, torch.Tensor] = {}
        for j, kv in enumerate(("k", "v")):
            layers = [torch.from_numpy(np.asarray(p[j]).view(np.int16)) for p in self.src]
            hnd = torch.stack(layers).view(torch.bfloat16).permute(0, 2, 1, 3).to(dev)
            x = hnd.repeat(-(-n // SOURCES), 1, 1, 1)[:n].contiguous()  # [n, H, T, D]
            reg = self.regions[kv]
            out = torch.zeros(n * reg.stride, dtype=torch.uint8, device=dev)
            idx = torch.arange(n, device=dev, dtype=torch.int64)
            base = out.data_ptr() + idx * reg.stride
            src = x.data_ptr() + idx * x.stride(0) * x.element_size()
            self.jobs[kv] = torch.stack([src, base + reg.anchor, base + reg.residual], 1)
            self.inputs[kv], self.out[kv] = x, out
        self.status = torch.zeros(1, dtype=torch.int32, device=dev)

    def run(self, streams: int = 2, **variant: Any) -> None:
        """Both kinds once, as encode() launches them: V on a second stream beside K
        (``streams=1``: one after the other); ``variant``: launch_encode's ``defines``
        and ``source``."""
        main = torch.cuda.current_stream()
        side = side_stream(main.device) if streams == 2 else main
        side.wait_stream(main)
        for kv in ("k", "v"):
            x = self.inputs[kv]
            with torch.cuda.stream(side if kv == "v" else main):
                launch_encode(
                    self.spec,
                    kv,
                    (T, H, D),
                    torch.bfloat16,
                    self.jobs[kv],
                    (x.stride(2), x.stride(1)),
                    self.status,
                    **variant,
                )
        main.wait_stream(side)

    def check(self) -> CodeDiff:
        """A sample of sections against the numpy encoder, field by field."""
        if int(self.status.item()):
            raise SystemExit(f"ENCODE {self.spec.name}: input flagged {int(self.status.item())}")
        total = CodeDiff()
        for kv in ("k", "v"):
            reg = self.regions[kv]
            host = self.out[kv].view(self.n, reg.stride).cpu().numpy()
            for j in sorted({0, 1, SOURCES - 1, self.n - 1}):
                row = host[j]
                ours = (
                    row[reg.anchor : reg.anchor + reg.anchor_size].tobytes(),
                    row[reg.residual : reg.residual + reg.residual_size].tobytes(),
                )
                x = self.src[j % SOURCES][0 if kv == "k" else 1]
                ref = encode_tensor(x, self.spec, kv, "bf16")
                total += compare_sections(self.spec, kv, (T, H, D), ours, ref)
        if not total.within():
            raise SystemExit(f"ENCODE MISMATCH {self.spec.name}: {total.describe()}")
        return total

    def bytes_moved(self) -> int:
        payload = sum(r.anchor_size + r.residual_size for r in self.regions.values())
        return self.n * (payload + 2 * 2 * T * H * D)


def _staged_encode(repeats: int) -> float:
    """Public ``encode_chunks`` from device tensors to object bytes (32 layers x 8 objects):
    GB/s of bf16 input; bound by the host (copy out, checksums, headers)."""
    kv = make_kv(8, layers=32, tokens=T * 8, heads=H, dim=D)
    dev = torch.device("cuda")

    def hnd(x: Any) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(x).view(np.int16)).view(torch.bfloat16)
        return t.permute(1, 0, 2).unsqueeze(0).contiguous().to(dev)

    k, v = [hnd(a) for a, _ in kv], [hnd(b) for _, b in kv]
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        gpu_encode_chunks(k, v, "lynx-a4", tokens_per_object=T, backend="cupy")
        if i:  # the first call compiles and warms up
            times.append(time.perf_counter() - start)
    return 2 * 2 * 32 * T * 8 * H * D / statistics.median(times) / 1e9


def _staged(n_objects: int, repeats: int) -> dict[str, float]:
    """Public API from host bytes: objects of 32 layers, like a Llama-3-8B chunk."""
    kv = make_kv(7, layers=32, tokens=T, heads=H, dim=D)
    decoder = ObjectDecoder()
    sections = decoder.feed(encode(kv, "lynx-a4"))
    header = decoder.header
    assert header is not None
    anchors = [s for s in sections if s.ref.stream == "anchor"]
    residuals = [s for s in sections if s.ref.stream == "residual"]
    dev = torch.device("cuda")
    out = [
        tuple(torch.empty((1, H, T * n_objects, D), dtype=torch.bfloat16, device=dev) for _ in "kv")
        for _ in range(32)
    ]
    caches: list[Any] = []

    def anchor_all() -> None:
        caches.clear()
        for i in range(n_objects):
            caches.append(decode_anchor(anchors, out, "hnd", header=header, token_offset=i * T))

    def refine_all() -> None:
        for i in range(n_objects):
            refine_residual(residuals, out, "hnd", anchors=caches[i], token_offset=i * T)

    t_a = _time(anchor_all, repeats, warmup=2, host=True)
    t_r = _time(refine_all, repeats, warmup=2, host=True)
    a_bytes = n_objects * sum(len(s.payload) for s in anchors)
    r_bytes = n_objects * sum(len(s.payload) for s in residuals)
    return {"anchor_gbps": a_bytes / t_a / 1e9, "residual_gbps": r_bytes / t_r / 1e9}


def _copy_tbps(size: int, repeats: int) -> float:
    """Device-to-device copy bandwidth (read + written) of a torch copy of ``size`` bytes."""
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    return 2 * size / _time(copy, repeats) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gbytes", type=float, default=1.0, help="output bytes per kernel run")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write gpu.json here too")
    args = parser.parse_args()
    n = int(args.gbytes * 1e9 / (2 * 2 * T * H * D))  # sections per K|V kind
    props = torch.cuda.get_device_properties(0)
    copy_tbps = _copy_tbps(int(args.gbytes * 1e9) // 2, args.repeats)
    rows: list[tuple[str, str, str, float, float, float, float]] = []
    kernels: dict[str, dict[str, float]] = {}
    cases = [
        ("lynx-a4", "hnd"),
        ("lynx-a4", "paged"),
        ("lynx-a4-paper", "hnd"),
        ("lynx-a2", "hnd"),
        ("uniform-a4", "hnd"),
    ]
    for i, (codec, layout) in enumerate(cases):
        case = Case(codec, layout, n, seed=100 + i)
        for full, kernel in ((False, "decode_anchor"), (True, "refine_residual")):
            case.run(full)
            torch.cuda.synchronize()
            case.check(full)
            seconds = _time(functools.partial(case.run, full), args.repeats)
            launched = _time(functools.partial(case.run, full), args.repeats, host=True)
            moved = case.bytes_moved(full)
            gbps = moved / seconds / 1e9
            ratio = gbps / (COPY_TBPS * 1e3)
            rows.append(
                (kernel, codec, layout, moved / 1e9, seconds * 1e3, gbps, moved / launched / 1e9)
            )
            name = (
                kernel if (codec, layout) == ("lynx-a4", "hnd") else f"{kernel}[{codec},{layout}]"
            )
            kernels[name] = {
                "gbps": round(gbps, 1),
                "ratio": round(ratio, 3),
                "ms": round(seconds * 1e3, 3),
                "ratio_with_launch": round(moved / launched / 1e12 / COPY_TBPS, 3),
            }
        del case
        torch.cuda.empty_cache()
    checks: dict[str, CodeDiff] = {}
    for i, codec in enumerate(("lynx-a4", "uniform-a4", "lynx-a4-paper")):
        enc = EncodeCase(codec, n, seed=200 + i)
        enc.run()
        torch.cuda.synchronize()
        checks[codec] = enc.check()
        seconds = _time(enc.run, args.repeats)
        launched = _time(enc.run, args.repeats, host=True)
        moved = enc.bytes_moved()
        gbps = moved / seconds / 1e9
        rows.append(
            ("encode", codec, "hnd", moved / 1e9, seconds * 1e3, gbps, moved / launched / 1e9)
        )
        kernels["encode" if codec == "lynx-a4" else f"encode[{codec},hnd]"] = {
            "gbps": round(gbps, 1),
            "ratio": round(gbps / (COPY_TBPS * 1e3), 3),
            "ms": round(seconds * 1e3, 3),
            "ratio_with_launch": round(moved / launched / 1e12 / COPY_TBPS, 3),
            "codes_checked": checks[codec].codes,
            "mismatches": checks[codec].mismatches,
            "meta_mismatches": checks[codec].meta_differ,
        }
        del enc
        torch.cuda.empty_cache()
    staged = _staged(n_objects=8, repeats=max(3, args.repeats // 4))
    staged["encode_api_gbps"] = _staged_encode(repeats=3)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs; torch copy {copy_tbps:.2f} TB/s"
    )
    heads = ("kernel", "codec", "layout", "GB moved", "ms", "GB/s", "ratio", "w/ launch")
    print("{:<16} {:<14} {:<6} {:>9} {:>8} {:>8} {:>6} {:>9}".format(*heads))
    for kernel, codec, layout, gb, ms, gbps, launched in rows:
        ratio, with_launch = gbps / (COPY_TBPS * 1e3), launched / (COPY_TBPS * 1e3)
        print(
            f"{kernel:<16} {codec:<14} {layout:<6} {gb:9.3f} {ms:8.3f} {gbps:8.1f} {ratio:6.3f}"
            f" {with_launch:9.3f}"
        )
    for codec, diff in checks.items():
        print(f"encode check {codec} (sampled sections vs numpy): {diff.describe()}")
    print(
        f"staged API (lynx-a4, 32 layers x 8 objects, host bytes): anchor "
        f"{staged['anchor_gbps']:.1f} GB/s, residual {staged['residual_gbps']:.1f} GB/s of payload"
    )
    print(
        f"encode API (lynx-a4, 32 layers x 8 objects, device tensors to object bytes): "
        f"{staged['encode_api_gbps']:.1f} GB/s of bf16 input"
    )
    result = {
        "kernels": kernels,
        "staged": {k: round(v, 2) for k, v in staged.items()},
        "copy_tbps_measured": round(copy_tbps, 3),
        "copy_tbps_reference": COPY_TBPS,
        "shape": {"tokens": T, "heads": H, "dim": D, "sections_per_kind": n, "out": "bf16"},
        "device": props.name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    line = json.dumps(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
