"""The transformers engine: a causal LM whose prompt prefix comes from a lynxkv server.

:class:`TransformersEngine` wraps a :class:`~lynxkv.connector.model.LoadedModel` and a
:class:`~lynxkv.connector.base.KVConnector`. ``save_context`` prefills a prompt and
stores its full chunks; ``generate`` answers greedily in one of :data:`MODES`, loading
the cached prefix, and in ``lynx`` mode drafts on the Anchor and verifies on the
Residual (:mod:`lynxkv.connector.speculative`). Every store failure falls back to
recomputing the prefix. docs/connector.md describes the modes and the timeline.

torch and transformers are imported inside the functions (``import lynxkv`` stays light).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lynxkv.connector.base import KeySections, KVConnector, Layers, LoadHandle, SaveLayers
from lynxkv.connector.model import LoadedModel, prefill_cache, prefill_kv, require
from lynxkv.connector.speculative import DraftPolicy, Recorder, Timeline, accept_drafts
from lynxkv.errors import FormatError

if TYPE_CHECKING:
    import torch

__all__ = ["MODES", "DecodeOn", "Generation", "Mode", "ModeSpec", "TransformersEngine"]

Mode = Literal["bf16", "int8", "int4", "int8-lynx", "lynx", "none"]
#: Where a loaded prefix is decoded, and a saved one encoded (:class:`TransformersEngine`).
DecodeOn = Literal["auto", "client", "engine"]


@dataclass(frozen=True)
class ModeSpec:
    """Which codec's objects a mode loads, and what it does with them: decode on the
    anchor only, on the full code, or draft on the anchor and verify on the full code."""

    codec: str | None
    use: Literal["anchor", "full", "speculative", "none"]


#: The modes of :meth:`TransformersEngine.generate`. ``int8-lynx`` is the reference that
#: ``lynx`` must equal token for token; ``none`` recomputes everything (no store).
MODES: dict[str, ModeSpec] = {
    "bf16": ModeSpec("raw", "full"),
    "int8": ModeSpec("uniform-a4", "full"),
    "int4": ModeSpec("uniform-a4", "anchor"),
    "int8-lynx": ModeSpec("lynx-a4", "full"),
    "lynx": ModeSpec("lynx-a4", "speculative"),
    "none": ModeSpec(None, "none"),
}


@dataclass(frozen=True)
class Generation:
    """The tokens a request produced (the prompt excluded) and how it went."""

    mode: str
    tokens: list[int]
    timeline: Timeline


# -- torch helpers (shapes: the model's cache is [1, H, T, D] per layer) ---------------------


def _cache_from(model: Any, layers: Layers) -> Any:
    """A DynamicCache holding ``layers`` (per layer (K, V) [P, H, D]) in the model's dtype."""
    th = require("torch", "torch")
    transformers = require("transformers", "transformers")
    cache = transformers.DynamicCache(config=model.config)
    for i, (k, v) in enumerate(layers):
        cache.update(_to_cache(th, k, model), _to_cache(th, v, model), i)
    return cache


def _to_cache(th: Any, x: Any, model: Any) -> torch.Tensor:
    # x: [P, H, D] float32 (numpy) -> [1, H, P, D] in the model's dtype and device
    t = th.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out: torch.Tensor = t.to(device=model.device, dtype=model.dtype).transpose(0, 1)[None]
    return out.contiguous()


def _refine(model: Any, cache: Any, layers: Layers) -> None:
    """Drop everything after the prefix, then overwrite the prefix's K and V in place with
    ``layers`` (per layer (K, V) [P, H, D], the full decode)."""
    th = require("torch", "torch")
    prefix = int(layers[0][0].shape[0])
    _crop(cache, prefix)
    with th.inference_mode():
        for layer, (k, v) in zip(cache.layers, layers, strict=True):
            layer.keys[:, :, :prefix].copy_(_to_cache(th, k, model))
            layer.values[:, :, :prefix].copy_(_to_cache(th, v, model))


def _empty_cache(model: Any, layers: int, shape: tuple[int, int, int]) -> Any:
    """A DynamicCache of ``layers`` layers of [1, H, P, D] uninitialised K and V (``shape``
    is (P, H, D)), in the model's dtype and device, to be written in place."""
    th = require("torch", "torch")
    transformers = require("transformers", "transformers")
    p, heads, dim = shape
    cache = transformers.DynamicCache(config=model.config)
    for i in range(layers):
        k = th.empty((1, heads, p, dim), dtype=model.dtype, device=model.device)
        cache.update(k, th.empty_like(k), i)
    return cache


class _Prefix:
    """The prefix cache of one request, from its load handle: built from the arrays the
    client decoded (``engine=False``), or decoded here from verified sections by
    ``lynxkv.gpu`` straight into the cache's tensors (``engine=True``: CuPy kernels when
    the model is on a CUDA device, the numpy codec otherwise)."""

    def __init__(self, loaded: LoadedModel, handle: LoadHandle, *, engine: bool, chunk_tokens: int):
        self.model, self.handle, self.engine = loaded.model, handle, engine
        self.chunk_tokens = chunk_tokens
        #: what every loaded chunk must be: layers, and (tokens, KV heads, head dim)
        self.expect = (loaded.layers, (chunk_tokens, loaded.kv_heads, loaded.head_dim))
        self._anchors: list[Any] = []  # lynxkv.gpu.AnchorCache per chunk

    def _misfit(self, what: str) -> bool:
        """Fail the load for ``what`` was found; True."""
        layers, shape = self.expect
        want = f"{layers} layers of {shape} per chunk"
        self.handle.fail("load (shape)", FormatError(f"{what}; the model needs {want}"))
        return True

    def _headers_misfit(self, chunks: Sequence[KeySections]) -> bool:
        """Whether a chunk's header is not the model's shape (a chunk of another model or
        a foreign writer under the model's key): then the load fails."""
        for header, _ in chunks:
            if (header.layers, tuple(header.shape)) != self.expect:
                return self._misfit(f"a chunk holds {header.layers} layers of {header.shape}")
        return False

    def _arrays_misfit(self, layers: Layers) -> bool:
        """The same for the client's arrays (per layer (K, V) [P, H, D])."""
        count, (_, heads, dim) = self.expect
        want = (self.handle.tokens, heads, dim)
        for k, v in layers:
            if k.shape != want or v.shape != want:
                return self._misfit(f"the chunks hold K {k.shape} and V {v.shape}")
        if len(layers) != count:
            return self._misfit(f"the chunks hold {len(layers)} layers")
        return False

    def _arrays(self, layers: Layers | None) -> Any | None:
        """A cache from the client's arrays, if they are the model's shape."""
        if layers is None or self._arrays_misfit(layers):
            return None
        return _cache_from(self.model, layers)

    def anchor(self) -> Any | None:
        """A cache holding the anchor decode (blocks for it); ``None`` on failure."""
        if not self.engine:
            return self._arrays(self.handle.anchor())
        chunks = self.handle.anchor_sections()
        if chunks is None or self._headers_misfit(chunks):
            return None
        from lynxkv.gpu import decode_anchor

        first = chunks[0][0]
        shape = (self.handle.tokens, *first.shape[1:])
        cache = _empty_cache(self.model, first.layers, shape)
        out = [(layer.keys, layer.values) for layer in cache.layers]
        th = require("torch", "torch")
        with th.inference_mode():
            self._anchors = [
                decode_anchor(
                    sections, out, "hnd", header=header, token_offset=i * self.chunk_tokens
                )
                for i, (header, sections) in enumerate(chunks)
            ]
        return cache

    def full(self) -> Any | None:
        """A cache holding the full decode (blocks for it); ``None`` on failure."""
        if not self.engine:
            return self._arrays(self.handle.residual())
        cache = self.anchor()
        if cache is None or not self.refine(cache):
            return None
        return cache

    def refine(self, cache: Any) -> bool:
        """Drop what follows the prefix in ``cache`` (made by :meth:`anchor`) and overwrite
        the prefix with the full decode (blocks for it); False on failure."""
        if not self.engine:
            layers = self.handle.residual()
            if layers is None or self._arrays_misfit(layers):
                return False
            _refine(self.model, cache, layers)
            return True
        chunks = self.handle.residual_sections()
        if chunks is None:
            return False
        from lynxkv.gpu import refine_residual

        _crop(cache, self.handle.tokens)
        out = [(layer.keys, layer.values) for layer in cache.layers]
        th = require("torch", "torch")
        with th.inference_mode():
            for i, ((_, sections), anchors) in enumerate(zip(chunks, self._anchors, strict=True)):
                refine_residual(
                    sections, out, "hnd", anchors=anchors, token_offset=i * self.chunk_tokens
                )
        return True


def _crop(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of every layer (a negative count to ``crop``:
    its positive form is deprecated)."""
    remove = int(cache.get_seq_length()) - length
    if remove > 0:
        cache.crop(-remove)


def _forward(model: Any, cache: Any, ids: Sequence[int], keep: int) -> list[int]:
    """Feed ``ids`` after what ``cache`` holds; the greedy token after each of the last
    ``keep`` positions."""
    th = require("torch", "torch")
    batch = th.tensor([list(ids)], dtype=th.long, device=model.device)  # [1, n]
    with th.inference_mode():
        out = model(input_ids=batch, past_key_values=cache, use_cache=True, logits_to_keep=keep)
    # logits: [1, keep, V]; argmax takes the first of equal maxima, the same in every path
    return [int(t) for t in out.logits[0].float().argmax(dim=-1).tolist()]


def _where(name: str, value: str, model: Any) -> DecodeOn:
    """``decode_on`` / ``encode_on`` checked, with ``"auto"`` resolved for ``model``."""
    if value not in ("auto", "client", "engine"):
        raise ValueError(f"{name} must be 'auto', 'client' or 'engine', got {value!r}")
    if value != "auto":
        return "engine" if value == "engine" else "client"
    from lynxkv.gpu import gpu_available

    return "engine" if model.device.type == "cuda" and gpu_available() else "client"


def _eos_ids(model: Any) -> frozenset[int]:
    eos = model.config.eos_token_id
    if isinstance(eos, int):
        return frozenset({eos})
    return frozenset(int(e) for e in (eos or ()))


class TransformersEngine:
    """Greedy generation with the prompt's prefix from a lynxkv server at ``url``.

    ``max_draft`` bounds the drafts of ``lynx`` mode. ``draft_policy``: ``"overlap"``
    drafts while the residual streams (the method); ``"fixed"`` always drafts
    ``max_draft`` tokens before verifying (deterministic: tests and acceptance studies).
    ``decode_on``: ``"client"`` decodes each section on the host as it lands (numpy, in
    the client's worker threads), then copies the arrays into the cache; ``"engine"``
    only verifies sections on the host and decodes them with ``lynxkv.gpu`` straight
    into the cache's tensors (the CuPy kernels on a CUDA model); ``"auto"`` picks
    ``"engine"`` for a model on a CUDA device with CuPy, else ``"client"``. ``encode_on``
    likewise for saves: ``"client"`` copies the prefilled cache to numpy and encodes it
    with the numpy codec; ``"engine"`` hands the cache's own tensors to
    ``lynxkv.gpu.encode_chunks`` (the GPU encoder on a CUDA model; the same bytes).
    The client options (``timeout``, ``retries``, ...) are the connector's.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        url: str,
        *,
        chunk_tokens: int = 256,
        max_draft: int = 64,
        draft_policy: DraftPolicy = "overlap",
        decode_on: DecodeOn = "auto",
        encode_on: DecodeOn = "auto",
        **client_options: Any,
    ) -> None:
        if max_draft < 0:
            raise ValueError(f"max_draft must be non-negative, got {max_draft}")
        if draft_policy not in ("overlap", "fixed"):
            raise ValueError(f"draft_policy must be 'overlap' or 'fixed', got {draft_policy!r}")
        self.decode_on = _where("decode_on", decode_on, loaded.model)
        self.encode_on = _where("encode_on", encode_on, loaded.model)
        self.loaded = loaded
        self.max_draft = max_draft
        self.draft_policy: DraftPolicy = draft_policy
        self.connector = KVConnector(
            url, fingerprint=loaded.fingerprint, chunk_tokens=chunk_tokens, **client_options
        )
        self._eos = _eos_ids(loaded.model)

    def close(self) -> None:
        self.connector.close()

    def __enter__(self) -> TransformersEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- save ---------------------------------------------------------------------------------

    def save_context(
        self, prompt_ids: Sequence[int], codecs: Sequence[str] = ("lynx-a4",), *, wait: bool = True
    ) -> int:
        """Prefill the full chunks of ``prompt_ids`` and store them with each codec
        (encoded on the host or by ``lynxkv.gpu``: ``encode_on``). Returns the number of
        tokens handed to the store; store failures are counted in ``connector.stats``,
        never raised. ``wait=False`` returns as soon as the prefill is done."""
        ids = list(prompt_ids)
        c = self.connector.chunk_tokens
        n = len(ids) // c * c
        if n == 0:
            return 0
        kv: SaveLayers
        if self.encode_on == "engine":  # the cache's tensors, [1, H, n, D] -> [n, H, D] views
            cache = prefill_cache(self.loaded.model, ids[:n])
            kv = [(x.keys[0].transpose(0, 1), x.values[0].transpose(0, 1)) for x in cache.layers]
        else:
            kv = prefill_kv(self.loaded.model, ids[:n])  # per layer (K, V) [n, H, D]
        for codec in codecs:
            self.connector.save(ids[:n], kv, codec)
        if wait:
            self.connector.wait_for_save()
        return n

    # -- generate -------------------------------------------------------------------------------

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, mode: str = "lynx"
    ) -> Generation:
        """Greedy decoding of up to ``max_new_tokens`` tokens (fewer if an end-of-turn
        token comes) after ``prompt_ids``, the prefix loaded as ``mode`` says."""
        rec = Recorder(time.perf_counter())
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("the prompt must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        spec = MODES[mode]
        c = self.connector.chunk_tokens
        prefix = 0
        if spec.codec is not None:
            # at least one token stays uncached: its logits give the first new token
            usable = (len(ids) - 1) // c * c
            prefix = min(self.connector.lookup(ids, spec.codec), usable)
        if prefix == 0:
            return self._finish(mode, self._recompute(ids, max_new_tokens, rec), rec)
        engine = self.decode_on == "engine"
        handle = self.connector.load(ids, spec.codec or "", prefix, decode=not engine)
        try:
            if spec.use == "speculative":
                tokens = self._speculate(ids, handle, max_new_tokens, rec)
            else:
                tokens = self._cached(ids, handle, spec.use == "anchor", max_new_tokens, rec)
        finally:
            handle.close()
        return self._finish(mode, tokens, rec)

    def _finish(self, mode: str, tokens: list[int], rec: Recorder) -> Generation:
        return Generation(mode, tokens, rec.timeline())

    def _recompute(self, ids: list[int], max_new: int, rec: Recorder) -> list[int]:
        """No usable cache: prefill the whole prompt, then decode."""
        rec.recomputed = True
        rec.prefix_tokens, rec.suffix_tokens = 0, len(ids)
        cache = _cache_from(self.loaded.model, [])
        return self._decode(cache, ids, max_new, rec)

    def _cached(
        self, ids: list[int], handle: LoadHandle, anchor_only: bool, max_new: int, rec: Recorder
    ) -> list[int]:
        """One precision, waited for: build the prefix cache, prefill the suffix, decode."""
        built = self._prefix(handle)
        cache = built.anchor() if anchor_only else built.full()
        if cache is None:
            return self._recompute(ids, max_new, rec)
        rec.mark_loaded(handle, residual=not anchor_only)
        rec.prefix_tokens, rec.suffix_tokens = handle.tokens, len(ids) - handle.tokens
        return self._decode(cache, ids[handle.tokens :], max_new, rec)

    def _prefix(self, handle: LoadHandle) -> _Prefix:
        return _Prefix(
            self.loaded,
            handle,
            engine=self.decode_on == "engine",
            chunk_tokens=self.connector.chunk_tokens,
        )

    def _decode(self, cache: Any, feed: list[int], max_new: int, rec: Recorder) -> list[int]:
        """Prefill ``feed`` in one forward pass, then greedy single steps."""
        out: list[int] = []
        token = _forward(self.loaded.model, cache, feed, 1)[0]
        rec.emit(token)
        out.append(token)
        return self._continue(cache, out, max_new, rec)

    def _continue(self, cache: Any, out: list[int], max_new: int, rec: Recorder) -> list[int]:
        while len(out) < max_new and out[-1] not in self._eos:
            token = _forward(self.loaded.model, cache, [out[-1]], 1)[0]
            rec.emit(token)
            out.append(token)
        return out

    def _speculate(
        self, ids: list[int], handle: LoadHandle, max_new: int, rec: Recorder
    ) -> list[int]:
        """Draft on the anchor while the residual streams; verify in one pass; go on."""
        model, prefix = self.loaded.model, handle.tokens
        suffix = ids[prefix:]
        rec.prefix_tokens, rec.suffix_tokens = prefix, len(suffix)
        limit = min(self.max_draft, max_new)
        drafts: list[int] = []
        built = self._prefix(handle)
        cache = None
        if limit > 0:
            cache = built.anchor()
            if cache is not None:
                rec.mark_loaded(handle, residual=False)
                drafts.append(_forward(model, cache, suffix, 1)[0])
                rec.draft()
                while (
                    len(drafts) < limit
                    and drafts[-1] not in self._eos
                    and (self.draft_policy == "fixed" or not handle.residual_ready)
                ):
                    drafts.append(_forward(model, cache, [drafts[-1]], 1)[0])
                    rec.draft()
        refined = built.full() if cache is None else cache if built.refine(cache) else None
        if refined is None:
            # no full code: verify the drafts against a recomputed prefix instead
            rec.recomputed = True
            rec.prefix_tokens, rec.suffix_tokens = 0, len(ids)
            prefix, suffix = 0, ids
            cache = _cache_from(model, [])
        else:
            rec.mark_loaded(handle)
            cache = refined
        # suffix + drafts in one pass: position len(suffix) - 1 + i predicts token i
        targets = _forward(model, cache, suffix + drafts, len(drafts) + 1)
        out, accepted = accept_drafts(drafts, targets, max_new, self._eos)
        rec.verify(len(drafts), out, accepted)
        # keep the KV of the suffix and of the accepted drafts; the last emitted token is
        # fed by the next step, as in plain decoding
        _crop(cache, prefix + len(suffix) + len(out) - 1)
        return self._continue(cache, out, max_new, rec)
