"""Measure what a codec does to attention: capture a real model's queries, keys and
values, then recompute attention outputs with the cached prefix replaced.

The capture runs the model once with a recording attention function registered in
transformers' ``AttentionInterface``; it records the post-RoPE tensors that the model's
own attention receives and delegates to sdpa, so the forward pass is unchanged. The
recomputation is plain numpy in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from lynxkv.codec import CodecSpec, decode, encode, get_codec, parse_header
from lynxkv.connector.model import LayerKV, as_batch, require, to_numpy

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROBE_ATTENTION",
    "Capture",
    "CodecQuality",
    "attention_outputs",
    "capture",
    "measure_codec",
    "measure_object",
    "prefix_kv",
    "probe_attention",
    "reference_outputs",
    "replaced_prefix_outputs",
    "vnmse",
]

#: The name the recording attention function is registered under.
PROBE_ATTENTION = "lynxkv_probe"

F32 = NDArray[np.float32]


@dataclass
class _Recorder:
    """Collects, per layer, what the attention function saw on one forward pass."""

    last: int
    queries: dict[int, F32] = field(default_factory=dict)
    outputs: dict[int, F32] = field(default_factory=dict)
    kv: dict[int, LayerKV] = field(default_factory=dict)


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "lynxkv_probe_recorder", default=None
)


def _probe_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa, plus a copy of its inputs and output for the recorder in context (if any)."""
    sdpa = require("transformers.integrations.sdpa_attention", "transformers")
    out: torch.Tensor
    out, _ = sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    recorder = _RECORDER.get()
    if recorder is not None:
        n = recorder.last
        layer = int(module.layer_idx)
        # query: [1, Hq, T, D]; key, value: [1, H, T, D]; out: [1, T, Hq, D]
        recorder.queries[layer] = to_numpy(query[0, :, -n:, :].transpose(0, 1).float())
        recorder.outputs[layer] = to_numpy(out[0, -n:].float())
        recorder.kv[layer] = (to_numpy(key[0].transpose(0, 1)), to_numpy(value[0].transpose(0, 1)))
    return out, None


def _register() -> None:
    """Register the recorder with transformers (idempotent: a dict update)."""
    modeling_utils = require("transformers.modeling_utils", "transformers")
    masking_utils = require("transformers.masking_utils", "transformers")
    modeling_utils.AttentionInterface.register(PROBE_ATTENTION, _probe_forward)
    # A name without a mask function gets no mask at all; ours needs sdpa's.
    masking_utils.AttentionMaskInterface.register(PROBE_ATTENTION, masking_utils.sdpa_mask)


@contextlib.contextmanager
def probe_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with the recording attention inside the block, then restore its own."""
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass(frozen=True)
class Capture:
    """One context as the model's attention saw it."""

    #: per layer (K, V), each [T, H, D] in the model's dtype, K post-RoPE
    kv: list[LayerKV]
    #: per layer [n, Hq, D] float32: post-RoPE queries of the last n positions
    queries: list[F32]
    #: per layer [n, Hq, D] float32: the model's attention output for those queries
    outputs: list[F32]

    @property
    def tokens(self) -> int:
        return int(self.kv[0][0].shape[0])

    @property
    def last(self) -> int:
        return int(self.queries[0].shape[0])


def capture(model: Any, input_ids: Sequence[int] | torch.Tensor, last: int) -> Capture:
    """One forward pass over ``input_ids``, recording every layer's K and V and the
    queries and attention outputs of the ``last`` positions."""
    th = require("torch", "torch")
    ids = as_batch(input_ids, model.device)
    if not 1 <= last <= ids.shape[1]:
        raise ValueError(f"last must be in [1, {ids.shape[1]}], got {last}")
    recorder = _Recorder(last=last)
    token = _RECORDER.set(recorder)
    try:
        with probe_attention(model), th.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        _RECORDER.reset(token)
    layers = range(int(model.config.num_hidden_layers))
    return Capture(
        kv=[recorder.kv[i] for i in layers],
        queries=[recorder.queries[i] for i in layers],
        outputs=[recorder.outputs[i] for i in layers],
    )


def attention_outputs(q: F32, k: F32, v: F32) -> F32:
    """Causal GQA attention of the last n positions over all T keys, in float32.

    q: [n, Hq, D], the queries of positions T-n .. T-1; k, v: [T, H, D] -> [n, Hq, D].
    Query head j reads kv head j // (Hq / H), as transformers' ``repeat_kv`` lays them out.
    """
    n, hq, d = q.shape
    t, h, _ = k.shape
    g = hq // h
    if hq != g * h or n > t:
        raise ValueError(f"bad shapes: q {q.shape}, k {k.shape}")
    qg = q.reshape(n, h, g, d).transpose(1, 2, 0, 3).reshape(h, g * n, d)  # [H, g*n, D]
    scores = qg @ k.transpose(1, 2, 0) * np.float32(d**-0.5)  # [H, g*n, T]
    scores = scores.reshape(h, g, n, t)
    # position T-n+i sees keys 0 .. T-n+i
    visible = np.arange(t)[None, :] <= (t - n + np.arange(n))[:, None]  # [n, T]
    scores = np.where(visible, scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights.reshape(h, g * n, t) @ v.transpose(1, 0, 2)  # [H, g*n, D]
    result: F32 = out.reshape(h, g, n, d).transpose(2, 0, 1, 3).reshape(n, hq, d)
    return result.astype(np.float32, copy=False)


def reference_outputs(cap: Capture) -> list[F32]:
    """Per layer [n, Hq, D]: attention outputs with the exact cache (float32 math)."""
    return [
        attention_outputs(q, k.astype(np.float32), v.astype(np.float32))
        for q, (k, v) in zip(cap.queries, cap.kv, strict=True)
    ]


def replaced_prefix_outputs(cap: Capture, prefix: Sequence[tuple[F32, F32]]) -> list[F32]:
    """Per layer [n, Hq, D]: attention outputs of the last n queries when the first P
    positions of K and V are ``prefix`` (per layer [P, H, D], e.g. decoded from a codec)
    and the rest are exact. P must leave the queried positions exact: P <= T - n."""
    if len(prefix) != len(cap.kv):
        raise ValueError(f"prefix has {len(prefix)} layers, the capture {len(cap.kv)}")
    out = []
    for q, (k, v), (pk, pv) in zip(cap.queries, cap.kv, prefix, strict=True):
        p = pk.shape[0]
        if p > cap.tokens - cap.last or pk.shape[1:] != k.shape[1:] or pv.shape != pk.shape:
            raise ValueError(
                f"prefix {pk.shape} does not fit a capture of {k.shape}, last {cap.last}"
            )
        k32 = np.concatenate([pk.astype(np.float32), k[p:].astype(np.float32)])  # [T, H, D]
        v32 = np.concatenate([pv.astype(np.float32), v[p:].astype(np.float32)])
        out.append(attention_outputs(q, k32, v32))
    return out


def vnmse(reference: Sequence[F32], test: Sequence[F32]) -> float:
    """Mean over layers of ||o - o'||^2 / ||o||^2 (the paper's attention-output error)."""
    per_layer = [
        float(np.sum((o.astype(np.float64) - t) ** 2) / np.sum(o.astype(np.float64) ** 2))
        for o, t in zip(reference, test, strict=True)
    ]
    return float(np.mean(per_layer))


@dataclass(frozen=True)
class CodecQuality:
    """What one codec does to one context's attention, and what it costs in bits."""

    codec: str
    anchor_bits: float  # bits per element of the Anchor stream (metadata included)
    full_bits: float  # bits per element of the whole object (header included)
    anchor_bytes: int
    residual_bytes: int
    vnmse_anchor: float
    vnmse_full: float
    #: the anchor's error split: only K, or only V, read back from the anchor
    vnmse_anchor_k: float
    vnmse_anchor_v: float


def prefix_kv(cap: Capture, tokens: int) -> list[LayerKV]:
    """Per layer (K, V) of the first ``tokens`` positions, [P, H, D] in the model's dtype."""
    return [(k[:tokens], v[:tokens]) for k, v in cap.kv]


def measure_object(cap: Capture, reference: Sequence[F32], data: bytes) -> CodecQuality:
    """Decode an object holding the first P positions of ``cap`` (from the anchor alone,
    and in full), and compare attention outputs to ``reference``
    (:func:`reference_outputs` of ``cap``)."""
    header = parse_header(data)
    anchor = decode(data[: header.anchor_end], part="anchor").kv
    full = decode(data, part="full").kv
    exact = [(k.astype(np.float32), v.astype(np.float32)) for k, v in prefix_kv(cap, header.tokens)]
    streams = header.to_json()["streams"]

    def error(kv: Sequence[tuple[F32, F32]]) -> float:
        return vnmse(reference, replaced_prefix_outputs(cap, kv))

    return CodecQuality(
        codec=header.codec.name,
        anchor_bits=float(streams["anchor"]["bits_per_element"]),
        full_bits=float(streams["all"]["bits_per_element"]),
        anchor_bytes=int(streams["anchor"]["bytes"]),
        residual_bytes=int(streams["residual"]["bytes"]),
        vnmse_anchor=error(anchor),
        vnmse_full=error(full),
        vnmse_anchor_k=error([(ak, ev) for (ak, _), (_, ev) in zip(anchor, exact, strict=True)]),
        vnmse_anchor_v=error([(ek, av) for (_, av), (ek, _) in zip(anchor, exact, strict=True)]),
    )


def measure_codec(
    cap: Capture,
    reference: Sequence[F32],
    prefix_tokens: int,
    codec: CodecSpec | str,
    *,
    model: str = "",
) -> CodecQuality:
    """:func:`measure_object` of the first ``prefix_tokens`` positions encoded with ``codec``."""
    spec = get_codec(codec) if isinstance(codec, str) else codec
    return measure_object(cap, reference, encode(prefix_kv(cap, prefix_tokens), spec, model=model))
