"""Attention-output error (vNMSE) and size of every codec preset on real KV caches.

For each generated context of T = P + n tokens, SmolLM2-135M-Instruct (CPU, bf16) runs
once; its K and V of all positions and the post-RoPE queries of the last n positions
are captured. The first P positions are the cached prefix: they are encoded with each
codec, decoded from the anchor alone and in full, and the last n queries attend over
[decoded prefix ; exact suffix]. vNMSE = mean over layers of ||o - o'||^2 / ||o||^2,
averaged over contexts. "K only" / "V only" read back only K (or only V) from the
anchor, the other exact: they split the anchor's error. Bits per element: the anchor
stream's sections (codes and metadata), and the whole object (header included). Times
are ratios measured side by side in this process (best of --repeats, interleaved).

    python bench/quality.py [--contexts 1024,2048,4096] [--queries 32] [--alpha-sweep]

The last line of the output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from lynxkv.codec import CODECS, CodecSpec, decode, encode, get_codec, parse_header
from lynxkv.connector.model import LoadedModel, load_model
from lynxkv.connector.probe import (
    F32,
    Capture,
    CodecQuality,
    capture,
    measure_codec,
    measure_object,
    prefix_kv,
    reference_outputs,
)
from lynxkv.connector.texts import make_document

ALPHAS = (0.05, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
SWEEP_BASE = "lynx-a4"
ERROR_KEYS = ("vnmse_anchor", "vnmse_full", "vnmse_anchor_k", "vnmse_anchor_v")
QUALITY_KEYS = ("anchor_bits", "full_bits", *ERROR_KEYS)


@dataclasses.dataclass(frozen=True)
class Context:
    prefix_tokens: int
    capture: Capture
    reference: list[F32]


def build_context(lm: LoadedModel, prefix_tokens: int, queries: int, seed: int) -> Context:
    tok = lm.tokenizer
    total = prefix_tokens + queries
    doc = make_document(seed, total, lambda s: len(tok(s).input_ids))
    ids = tok(doc.text).input_ids[:total]
    cap = capture(lm.model, ids, queries)
    return Context(prefix_tokens, cap, reference_outputs(cap))


def _elapsed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def zstd_sizes(plain: bytes, packed: bytes) -> tuple[float, float | None]:
    """Stored bytes with zstd over without, for the anchor and the residual stream."""
    a, b = (parse_header(d).to_json()["streams"] for d in (plain, packed))
    residual = a["residual"]["bytes"]
    return (
        b["anchor"]["bytes"] / a["anchor"]["bytes"],
        b["residual"]["bytes"] / residual if residual else None,
    )


def zstd_decode_times(plain: bytes, packed: bytes, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` decode times, plain and +zstd, anchor-only and full."""
    objects = {"plain": plain, "zstd": packed}
    times: dict[str, list[float]] = {f"{p}_{k}": [] for p in ("anchor", "full") for k in objects}
    for _ in range(repeats):  # interleaved, so that drift on a busy machine hits both sides
        for kind, data in objects.items():
            cut = data[: parse_header(data).anchor_end]
            times[f"anchor_{kind}"].append(_elapsed(functools.partial(decode, cut, part="anchor")))
            times[f"full_{kind}"].append(_elapsed(functools.partial(decode, data, part="full")))
    best = {key: min(values) for key, values in times.items()}
    return {
        "anchor_zstd_decode_time_ratio": best["anchor_zstd"] / best["anchor_plain"],
        "full_zstd_decode_time_ratio": best["full_zstd"] / best["full_plain"],
        "anchor_decode_ms": 1e3 * best["anchor_plain"],
        "full_decode_ms": 1e3 * best["full_plain"],
    }


def mean_quality(rows: Sequence[CodecQuality]) -> dict[str, float]:
    return {key: statistics.fmean(getattr(r, key) for r in rows) for key in QUALITY_KEYS}


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def evaluate_preset(
    lm: LoadedModel, contexts: Sequence[Context], name: str, repeats: int
) -> dict[str, Any]:
    """Bits, vNMSE and zstd size ratios (means over contexts) and zstd decode-time ratios
    (on the last, largest context only: timing is the slow part) of preset ``name``."""
    rows, sizes, times = [], [], {}
    for ctx in contexts:
        prefix = prefix_kv(ctx.capture, ctx.prefix_tokens)
        plain = encode(prefix, name, model=lm.fingerprint)
        packed = encode(prefix, get_codec(f"{name}+zstd"), model=lm.fingerprint)
        rows.append(measure_object(ctx.capture, ctx.reference, plain))
        sizes.append(zstd_sizes(plain, packed))
        if ctx is contexts[-1]:
            times = zstd_decode_times(plain, packed, repeats)
    return {
        **mean_quality(rows),
        "anchor_zstd_ratio": _mean_or_none([a for a, _ in sizes]),
        "residual_zstd_ratio": _mean_or_none([r for _, r in sizes]),
        **times,
    }


def _quality(contexts: Sequence[Context], spec: CodecSpec) -> dict[str, float]:
    return mean_quality(
        [measure_codec(c.capture, c.reference, c.prefix_tokens, spec) for c in contexts]
    )


def alpha_sweep(contexts: Sequence[Context], alphas: Sequence[float]) -> list[dict[str, float]]:
    """The same alpha for K and V; read K's best from "K only", V's from "V only"."""
    rows = []
    for alpha in alphas:
        spec = dataclasses.replace(
            CODECS[SWEEP_BASE], alpha_k=alpha, alpha_v=alpha, name=f"{SWEEP_BASE}@{alpha:g}"
        )
        quality = _quality(contexts, spec)
        rows.append({"alpha": alpha, **{key: quality[key] for key in ERROR_KEYS}})
    return rows


def ablation(contexts: Sequence[Context]) -> list[dict[str, Any]]:
    """From the paper's scheme to lynx-a4, one change at a time."""
    spec = CODECS["lynx-a4-paper"]
    ours = CODECS["lynx-a4"]
    steps: list[tuple[str, dict[str, Any]]] = [
        ("paper: chunk mean, V chunks per channel, f16 chunk meta, alpha 1", {}),
        ("+ chunk centred on the middle of its range", {"center": "mid"}),
        ("+ V chunked per token over a head", {"v_chunk": "token"}),
        ("+ u8 chunk metadata", {"chunk_meta": "u8"}),
        (
            f"+ alpha_k {ours.alpha_k:g}, alpha_v {ours.alpha_v:g} (= lynx-a4)",
            {"alpha_k": ours.alpha_k, "alpha_v": ours.alpha_v},
        ),
    ]
    rows = []
    for label, change in steps:
        spec = dataclasses.replace(spec, **change)
        rows.append({"step": label, **_quality(contexts, spec)})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_ablation(rows: Sequence[dict[str, Any]]) -> None:
    print("\nablation, from the paper's scheme to lynx-a4:")
    print(
        f"{'step':<66} {'anchor b/e':>10} {'vNMSE anchor':>13} {'K only':>9} {'V only':>9} "
        f"{'vNMSE full':>11}"
    )
    for r in rows:
        print(
            f"{r['step']:<66} {r['anchor_bits']:>10.3f} {r['vnmse_anchor']:>13.3e} "
            f"{r['vnmse_anchor_k']:>9.2e} {r['vnmse_anchor_v']:>9.2e} {r['vnmse_full']:>11.3e}"
        )


def print_tables(codecs: dict[str, dict[str, Any]], sweep: list[dict[str, float]] | None) -> None:
    head = (
        f"{'codec':<16} {'anchor b/e':>10} {'full b/e':>9} {'vNMSE anchor':>13} {'vNMSE full':>11} "
        f"{'anc K only':>11} {'anc V only':>11} {'zstd anc':>9} {'zstd res':>9} "
        f"{'dec anc x':>9} {'dec full x':>10}"
    )
    print(head)
    print("-" * len(head))
    for name, f in codecs.items():
        print(
            f"{name:<16} {f['anchor_bits']:>10.3f} {f['full_bits']:>9.3f} "
            f"{f['vnmse_anchor']:>13.3e} "
            f"{f['vnmse_full']:>11.3e} {f['vnmse_anchor_k']:>11.3e} {f['vnmse_anchor_v']:>11.3e} "
            f"{_fmt(f['anchor_zstd_ratio'], '.3f'):>9} {_fmt(f['residual_zstd_ratio'], '.3f'):>9} "
            f"{f['anchor_zstd_decode_time_ratio']:>9.2f} {f['full_zstd_decode_time_ratio']:>10.2f}"
        )
    print(
        "b/e: bits per element. anc K/V only: vNMSE with only K (only V) read from the anchor.\n"
        "zstd anc/res: stored bytes with zstd over without, per stream (mean over contexts).\n"
        "dec x: decode time of the +zstd object over the plain one, anchor-only and full\n"
        "decode (largest context)."
    )
    if sweep:
        print(f"\nalpha sweep ({SWEEP_BASE}):")
        print(
            f"{'alpha':>7} {'vNMSE anchor':>13} {'vNMSE full':>11} "
            f"{'anc K only':>11} {'anc V only':>11}"
        )
        for row in sweep:
            print(
                f"{row['alpha']:>7g} {row['vnmse_anchor']:>13.3e} {row['vnmse_full']:>11.3e} "
                f"{row['vnmse_anchor_k']:>11.3e} {row['vnmse_anchor_v']:>11.3e}"
            )


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--contexts",
        default="1024,2048,4096",
        help="cached prefix lengths P in tokens, comma-separated (default %(default)s)",
    )
    p.add_argument("--queries", type=int, default=32, help="queries n per context (default 32)")
    p.add_argument("--alpha-sweep", action="store_true", help=f"also sweep alpha for {SWEEP_BASE}")
    p.add_argument("--seed", type=int, default=0, help="seed of the first generated context")
    p.add_argument("--repeats", type=int, default=3, help="decode timing repeats (best of)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = sorted(int(s) for s in args.contexts.split(",") if s.strip())
    if not sizes or min(sizes) < 1 or args.queries < 1 or args.repeats < 1:
        raise SystemExit("--contexts, --queries and --repeats must be positive")
    # The model comes from the installed wheel: never reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    lm = load_model(dtype="bfloat16", device="cpu")
    print(
        f"model loaded in {time.perf_counter() - started:.1f} s, fingerprint {lm.fingerprint[:16]}"
    )
    contexts = [build_context(lm, n, args.queries, args.seed + i) for i, n in enumerate(sizes)]
    print(f"captured {len(contexts)} contexts (prefix {sizes}, +{args.queries} queries)")
    codecs = {name: evaluate_preset(lm, contexts, name, args.repeats) for name in CODECS}
    sweep = alpha_sweep(contexts, ALPHAS) if args.alpha_sweep else None
    steps = ablation(contexts)
    print()
    print_tables(codecs, sweep)
    print_ablation(steps)
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    result: dict[str, Any] = {
        "codecs": codecs,
        "contexts": sizes,
        "queries": args.queries,
        "model": {"name": "SmolLM2-135M-Instruct (GGUF Q4_1, bf16)", "fingerprint": lm.fingerprint},
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1),
    }
    result["ablation"] = steps
    if sweep is not None:
        result["alpha_sweep"] = {SWEEP_BASE: sweep}
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
