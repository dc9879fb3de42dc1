"""Time to first token against bf16, int8 and int4, over emulated links (issue 7).

One in-process server (``lynxkv.demo.local_server``), SmolLM2-135M-Instruct, and for each
cached context a generated report with a question at its end (``lynxkv.demo._prompt``).
The report's full chunks are saved with the ``raw``, ``lynx-a4`` and ``uniform-a4`` codecs;
then, for each link speed (the client's receive-side rate limit), the model answers in
each mode, fetching the prefix over that link:

    bf16       raw objects, waited for
    int8-lynx  the lynx code's full 8 bits, waited for (the reference)
    int4       the uniform-a4 anchor only
    lynx       draft on the lynx anchor while the residual streams, verify on the full code

Per run: TTFT as first draft and as first verified token (from request start: lookup,
fetch and suffix prefill included), time to the 32nd verified token (or the last, when
the answer is shorter: ``tt32_tokens`` says which), bytes on the wire (anchor/residual,
from the fetch's stats), drafts, and whether the output equals int8-lynx's. The regime of
a run is the transfer time of the full bf16 cache at that link over one decode step
(measured: median single-token step of the int8-lynx run of that context and link); a
run is transfer-dominated when it is > 1. The model runs in float32 by default, so that
lynx == int8-lynx is exact (docs/connector.md, "The equality guarantee").

    python bench/ttft.py [--quick] [--device cpu|cuda] [--contexts 1024,2048,4096,8192]
                         [--links-gbps 1,10,25] [--dtype float32] [--out DIR]

The last line of the output is one JSON object: {"runs": [...], "summary": {...}}.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lynxkv.client.assembly import FetchStats
from lynxkv.codec.spec import CodecSpec
from lynxkv.connector.base import LoadHandle
from lynxkv.connector.model import LoadedModel, load_model
from lynxkv.connector.transformers import DecodeOn, Generation, TransformersEngine
from lynxkv.demo import _prompt, local_server

MODES = ("bf16", "int8-lynx", "int4", "lynx")
SAVE_CODECS = ("raw", "lynx-a4", "uniform-a4")
TT_N = 32
#: The paper's setting: Qwen3-32B (64 layers, 8 KV heads, head dim 128, bf16), 16K tokens,
#: 25 Gbit/s. The decode step is assumed: batch 1, about 65 GB of bf16 weights read per
#: step at about 3.3 TB/s (H100-class HBM), so about 20 ms.
PAPER_MODEL = {"layers": 64, "kv_heads": 8, "head_dim": 128}
PAPER_TOKENS = 16384
PAPER_GBPS = 25.0
PAPER_DECODE_STEP_S = 0.020


@dataclass(frozen=True)
class Settings:
    contexts: tuple[int, ...]
    links_gbps: tuple[float, ...]
    max_new: int
    dtype: str
    device: str
    decode_on: DecodeOn = "auto"
    repeats: int = 1


# -- pure helpers ----------------------------------------------------------------------------


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, elem_bytes: int = 2) -> int:
    """K and V of every layer for one token (bf16 by default)."""
    return 2 * layers * kv_heads * head_dim * elem_bytes


def paper_regime() -> dict[str, float]:
    """The paper's setting on the regime axis, with the assumed decode step."""
    cache = kv_bytes_per_token(**PAPER_MODEL) * PAPER_TOKENS
    transfer = cache * 8 / (PAPER_GBPS * 1e9)
    return {
        "cache_bytes": float(cache),
        "transfer_s": transfer,
        "decode_step_s": PAPER_DECODE_STEP_S,
        "regime": transfer / PAPER_DECODE_STEP_S,
    }


def fit_context(context: int, max_positions: int, chunk: int, reserve: int) -> int:
    """The largest multiple of ``chunk`` <= ``context`` that leaves ``reserve`` positions
    for the question and the answer."""
    return min(context, (max_positions - reserve) // chunk * chunk)


def decode_step(gen: Generation) -> float:
    """Median single-token decode step of a run without drafts (from its 2nd token on)."""
    times = gen.timeline.verified
    steps = [b - a for a, b in itertools.pairwise(times)]
    return statistics.median(steps) if steps else float("nan")


def _point(r: dict[str, Any]) -> tuple[int, float, int]:
    return r["context"], r["link_gbps"], r.get("repeat", 0)


def _median_ratio(runs: Sequence[dict[str, Any]], mode: str, other: str) -> float | None:
    """Median over transfer-dominated points of ``mode``'s first-draft TTFT over
    ``other``'s at the same context, link and repeat."""
    base = {_point(r): r["ttft_draft_s"] for r in runs if r["mode"] == other}
    ratios = [
        r["ttft_draft_s"] / base[_point(r)]
        for r in runs
        if r["mode"] == mode and r["regime"] > 1 and _point(r) in base
    ]
    return statistics.median(ratios) if ratios else None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median first-draft TTFT ratios over transfer-dominated runs (regime > 1), equality
    of every lynx run with int8-lynx, and the share of drafts accepted."""
    lynx = [r for r in runs if r["mode"] == "lynx"]
    drafted = sum(r["drafted"] for r in lynx)
    return {
        "lynx_vs_int4": _median_ratio(runs, "lynx", "int4"),
        "lynx_vs_int8": _median_ratio(runs, "lynx", "int8-lynx"),
        "all_equal": all(r["equal_int8_lynx"] for r in lynx),
        "acceptance": sum(r["accepted"] for r in lynx) / drafted if drafted else None,
        "transfer_dominated_runs": sum(1 for r in lynx if r["regime"] > 1),
        "paper": paper_regime(),
    }


# -- measuring -------------------------------------------------------------------------------


def _record_fetches(engine: TransformersEngine, sink: list[FetchStats | None]) -> None:
    """Keep each load's fetch stats (the handle drops its fetch on close)."""
    load = engine.connector.load

    def recording(
        ids: Sequence[int], codec: CodecSpec | str, tokens: int, *, decode: bool = True
    ) -> LoadHandle:
        handle = load(ids, codec, tokens, decode=decode)
        sink.append(handle.stats)
        return handle

    engine.connector.load = recording  # type: ignore[method-assign,assignment]


def _run_record(
    gen: Generation,
    fetch: FetchStats | None,
    ref: Generation,
    point: tuple[int, float, int],
) -> dict[str, Any]:
    t = gen.timeline
    context, gbps, repeat = point
    return {
        "mode": gen.mode,
        "context": context,
        "link_gbps": gbps,
        "repeat": repeat,
        **t.summary(TT_N),
        "anchor_bytes": None if fetch is None else fetch.anchor_bytes,
        "residual_bytes": None if fetch is None else fetch.residual_bytes,
        "fully_accepted": t.drafted > 0 and t.accepted == t.drafted,
        "tokens": len(gen.tokens),
        "equal_int8_lynx": gen.tokens == ref.tokens,
    }


def _add_regime(runs: list[dict[str, Any]], step_s: float, per_token: int) -> None:
    for r in runs:
        transfer = r["prefix_tokens"] * per_token * 8 / (r["link_gbps"] * 1e9)
        r.update(decode_step_s=step_s, full_cache_transfer_s=transfer, regime=transfer / step_s)


def _one_link(
    loaded: LoadedModel,
    url: str,
    ids: list[int],
    point: tuple[int, float, int],
    settings: Settings,
) -> list[dict[str, Any]]:
    fetches: list[FetchStats | None] = []
    gbps = point[1]
    with TransformersEngine(
        loaded, url, rate_limit_bps=gbps * 1e9, decode_on=settings.decode_on
    ) as engine:
        _record_fetches(engine, fetches)
        gens = [engine.generate(ids, settings.max_new, mode) for mode in MODES]
    ref = gens[MODES.index("int8-lynx")]
    runs = [_run_record(g, f, ref, point) for g, f in zip(gens, fetches, strict=True)]
    per_token = kv_bytes_per_token(loaded.layers, loaded.kv_heads, loaded.head_dim)
    _add_regime(runs, decode_step(ref), per_token)
    return runs


def _fit_prompt(loaded: LoadedModel, context: int) -> tuple[list[int], int]:
    """A prompt whose report holds at least ``context`` tokens, with as few extra report
    tokens (prefilled as suffix) as the generated text allows."""
    for extra in (8, 32, 96, 256):
        _doc, ids, report = _prompt(loaded, context + extra)
        if report >= context:
            break
    return ids, report


def _one_context(
    loaded: LoadedModel, url: str, context: int, settings: Settings
) -> list[dict[str, Any]]:
    ids, report = _fit_prompt(loaded, context)
    with TransformersEngine(loaded, url, decode_on=settings.decode_on) as engine:
        saved = engine.save_context(ids[: min(report, context)], SAVE_CODECS)
        for mode in MODES:  # warm-up: allocator, kernel compiles, connections
            engine.generate(ids, 2, mode)
        decode_on = engine.decode_on
    _log(f"context {context}: prompt {len(ids)} tokens, {saved} saved; decode on {decode_on}")
    runs: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        for gbps in settings.links_gbps:
            runs += _one_link(loaded, url, ids, (context, gbps, repeat), settings)
            _log(_table(runs[-len(MODES) :], header=False))
    for r in runs:
        r["decode_on"] = decode_on
    return runs


def measure(settings: Settings) -> list[dict[str, Any]]:
    loaded = load_model(dtype=settings.dtype, device=settings.device)
    limit = int(loaded.model.config.max_position_embeddings)
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="lynxkv-ttft-") as tmp,
        local_server(Path(tmp) / "data") as url,
    ):
        _log(f"server {url}; max_position_embeddings {limit}")
        for asked in settings.contexts:
            context = fit_context(asked, limit, 256, reserve=256)
            if context != asked:
                _log(f"context {asked} -> {context} (model limit {limit} positions)")
            runs += _one_context(loaded, url, context, settings)
    return runs


# -- output ----------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, flush=True)


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


_COLUMNS = (
    ("ctx", 6, lambda r: str(r["prefix_tokens"])),
    ("Gb/s", 6, lambda r: f"{r['link_gbps']:g}"),
    ("regime", 7, lambda r: f"{r['regime']:.1f}"),
    ("mode", 10, lambda r: r["mode"]),
    ("ttft-d", 7, lambda r: f"{r['ttft_draft_s']:.3f}"),
    ("ttft-v", 7, lambda r: f"{r['ttft_verified_s']:.3f}"),
    ("tt32", 12, lambda r: f"{r['tt32_s']:.3f} (#{r['tt32_tokens']})"),
    ("anc MB", 7, lambda r: _mb(r["anchor_bytes"])),
    ("res MB", 7, lambda r: _mb(r["residual_bytes"])),
    ("dr/acc", 7, lambda r: f"{r['drafted']}/{r['accepted']}"),
    ("full", 5, lambda r: "yes" if r["fully_accepted"] else "-"),
    ("=int8", 5, lambda r: "yes" if r["equal_int8_lynx"] else "NO"),
)


def _table(runs: Sequence[dict[str, Any]], header: bool = True) -> str:
    lines = [" ".join(f"{name:>{w}}" for name, w, _ in _COLUMNS)] if header else []
    lines += [" ".join(f"{cell(r):>{w}}" for _, w, cell in _COLUMNS) for r in runs]
    return "\n".join(lines)


def write_csv(runs: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)


def plot_ttft(runs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in runs})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 3.4), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        for mode in MODES:
            per_link: dict[float, list[float]] = {}
            for r in runs:
                if r["context"] == context and r["mode"] == mode:
                    per_link.setdefault(r["link_gbps"], []).append(r["ttft_draft_s"])
            links = sorted(per_link)
            ax.plot(links, [statistics.median(per_link[x]) for x in links], marker="o", label=mode)
        ax.set(xscale="log", yscale="log", xlabel="link (Gbit/s)", title=f"{context} cached")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("TTFT, first draft (s; median of repeats)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_acceptance(runs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lynx = [r for r in runs if r["mode"] == "lynx" and r["drafted"]]
    rates = [r["accepted"] / r["drafted"] for r in lynx]
    drafted, accepted = sum(r["drafted"] for r in lynx), sum(r["accepted"] for r in lynx)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.hist(rates, bins=[i / 10 for i in range(11)], edgecolor="black")
    ax.set(xlabel="accepted / drafted (lynx runs)", ylabel="runs", xlim=(0, 1))
    ax.set_title(f"{len(rates)} lynx runs: {accepted} of {drafted} drafts accepted")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _write_outputs(runs: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, out / "ttft.csv")
    plot_ttft(runs, out / "ttft.png")
    plot_acceptance(runs, out / "acceptance.png")
    _log(f"wrote {out}/ttft.csv, ttft.png, acceptance.png")


def _report(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    _log("\n" + _table(runs))
    paper = summary["paper"]
    _log(
        f"\nregime = bf16 full-cache transfer / decode step; paper (Qwen3-32B, 16K, 25 Gb/s):"
        f" {paper['cache_bytes'] / 1e9:.2f} GB, {paper['transfer_s']:.2f} s over an assumed"
        f" {paper['decode_step_s'] * 1e3:.0f} ms step = {paper['regime']:.0f}"
    )
    for key in ("lynx_vs_int4", "lynx_vs_int8", "all_equal", "acceptance"):
        _log(f"{key}: {summary[key]}")


# -- command line ----------------------------------------------------------------------------


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--contexts", type=_numbers, default=None)
    p.add_argument("--links-gbps", type=_numbers, default=None)
    p.add_argument("--max-new-tokens", type=int, default=TT_N)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--decode-on",
        choices=("auto", "client", "engine"),
        default="auto",
        help="where the prefix is decoded (TransformersEngine); auto: the GPU kernels on cuda",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs of every point")
    p.add_argument("--quick", action="store_true", help="contexts 1024,2048; links 0.05,0.2,1,10")
    p.add_argument("--out", type=Path, default=None, help="folder for the CSV and PNG plots")
    a = p.parse_args(argv)
    contexts = a.contexts or ((1024, 2048) if a.quick else (1024, 2048, 4096, 8192))
    links = a.links_gbps or ((0.05, 0.2, 1.0, 10.0) if a.quick else (1.0, 10.0, 25.0))
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    settings = Settings(
        tuple(int(c) for c in contexts),
        tuple(links),
        a.max_new_tokens,
        a.dtype,
        a.device,
        a.decode_on,
        a.repeats,
    )
    return settings, a.out


def main(argv: Sequence[str] | None = None) -> None:
    settings, out = parse_args(argv)
    started = time.perf_counter()
    _log(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.platform()}")
    _log(f"settings: {asdict(settings)}")
    runs = measure(settings)
    summary = summarize(runs)
    _report(runs, summary)
    if out is not None:
        _write_outputs(runs, out)
    _log(f"total {time.perf_counter() - started:.0f} s")
    print(json.dumps({"runs": runs, "summary": summary, "settings": asdict(settings)}))


if __name__ == "__main__":
    main()
