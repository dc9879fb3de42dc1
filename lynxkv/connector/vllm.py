"""The vLLM adapter: a ``KVConnectorBase_V1`` on :class:`KVConnector` and the paged kernels.

When vllm imports, :class:`LynxVLLMConnector` subclasses vLLM's ``KVConnectorBase_V1``
(and its metadata ``KVConnectorMetadata``); otherwise it subclasses a tiny local stand-in
(:class:`_LocalBase`) with the same worker-side metadata plumbing, so a harness can drive
it without vLLM. vLLM's objects (Request, KVCacheBlocks, SchedulerOutput, ForwardContext,
AttentionMetadata) are duck-typed: only the attributes named below are read.

Interface read from vllm-project/vllm ``vllm/distributed/kv_transfer/kv_connector/v1/base.py``
(commit 003df2961dd8). Call order assumed, per engine step:

scheduler: ``get_num_new_matched_tokens(request, num_computed_tokens)`` (reads
``request.request_id``, ``request.prompt_token_ids``) -> ``update_state_after_alloc(request,
blocks, n)`` (``blocks.get_block_ids()``: a tuple of block-id lists, group 0 used) ->
``build_connector_meta(scheduler_output)`` (``scheduled_new_reqs[i].req_id``,
``.prompt_token_ids``, ``.block_ids``, ``.num_computed_tokens``;
``num_scheduled_tokens[req_id]``).
worker: ``register_kv_caches({layer_name: [2, num_blocks, block_size, H, D]})`` once (dict
order is layer order) -> per step ``bind_connector_metadata`` -> ``start_load_kv`` ->
per layer ``wait_for_layer_load`` and ``save_kv_layer`` -> ``wait_for_save`` ->
``get_finished``.

Loads are synchronous (``get_num_new_matched_tokens`` answers ``(n, False)``): the
objects are fetched in the background from ``start_load_kv`` on, and each
``wait_for_layer_load`` writes that layer's anchor with ``decode_anchor`` and refines it
at once with ``refine_residual``, so the cache holds the full-precision decode. Saves copy
the request's slots out of the paged cache in ``save_kv_layer``; ``wait_for_save`` hands
them to :meth:`KVConnector.save` and blocks until they are stored.
"""

from __future__ import annotations

import concurrent.futures
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from numpy.typing import NDArray

from lynxkv.codec import Header, ObjectDecoder, Section
from lynxkv.connector.base import KVConnector, StoreFailure
from lynxkv.errors import FormatError
from lynxkv.gpu import decode_anchor, refine_residual

__all__ = ["LoadSpec", "LynxConnectorMetadata", "LynxVLLMConnector", "Role", "SaveSpec"]

DEFAULT_CODEC = "lynx-a4"


class Role(enum.Enum):
    """The local stand-in of vLLM's ``KVConnectorRole`` (matched by name)."""

    SCHEDULER = 0
    WORKER = 1


class _LocalMetadata:
    """Stand-in of ``KVConnectorMetadata`` when vllm is absent."""


class _LocalBase:
    """Stand-in of ``KVConnectorBase_V1`` when vllm is absent: the metadata plumbing the
    model runner uses, nothing else."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        self._vllm_config = vllm_config
        self._role = role
        self._kv_cache_config = kv_cache_config
        self._connector_metadata: Any = None

    @property
    def role(self) -> Any:
        return self._role

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        self._connector_metadata = connector_metadata

    def clear_connector_metadata(self) -> None:
        self._connector_metadata = None

    def _get_connector_metadata(self) -> Any:
        assert self._connector_metadata is not None
        return self._connector_metadata


if TYPE_CHECKING:
    _Base = _LocalBase
    _MetaBase = _LocalMetadata
else:
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorBase_V1 as _Base,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorMetadata as _MetaBase,
        )
    except ImportError:
        _Base, _MetaBase = _LocalBase, _LocalMetadata


@dataclass(frozen=True)
class LoadSpec:
    """Load tokens ``[start, end)`` of ``token_ids`` into the request's blocks."""

    req_id: str
    token_ids: tuple[int, ...]
    start: int
    end: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class SaveSpec:
    """Save the first ``tokens`` tokens (full chunks) of ``token_ids`` from its blocks."""

    req_id: str
    token_ids: tuple[int, ...]
    tokens: int
    block_ids: tuple[int, ...]


@dataclass
class LynxConnectorMetadata(_MetaBase):
    """Scheduler -> worker, one per step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


def _group0(block_ids: Any) -> tuple[int, ...]:
    """vLLM gives block ids per KV-cache group (a tuple of lists); one group is used."""
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        block_ids = block_ids[0]
    return tuple(int(b) for b in block_ids)


def slots_for(block_ids: Sequence[int], block_size: int, lo: int, hi: int, keep: range) -> Any:
    """int64 [hi - lo]: the slot of each token ``lo..hi-1``; -1 outside ``keep`` or the
    allocated blocks."""
    out = torch.full((hi - lo,), -1, dtype=torch.int64)
    for t in range(max(lo, keep.start), min(hi, keep.stop)):
        block = t // block_size
        if block < len(block_ids):
            out[t - lo] = block_ids[block] * block_size + t % block_size
    return out


def _to_numpy(x: torch.Tensor) -> NDArray[Any]:
    """A CPU copy as numpy; bf16 through ml_dtypes (numpy has no bfloat16)."""
    x = x.detach().to("cpu").contiguous()
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


@dataclass
class _Load:
    spec: LoadSpec
    keys: list[str]
    first_chunk: int
    fetch: concurrent.futures.Future[list[bytes]] | None
    objects: list[tuple[Header, list[Section]]] | None = None
    failed: bool = False


class LynxVLLMConnector(_Base):
    """``KVConnectorBase_V1`` over a lynxkv server (module docstring: the call order).

    Config: ``vllm_config.kv_transfer_config.kv_connector_extra_config`` with ``url`` and
    ``fingerprint`` (required), ``codec`` (default ``lynx-a4``), ``chunk_tokens`` (256),
    ``tp_rank`` (0); the block size is ``vllm_config.cache_config.block_size``.
    """

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        self.codec: str = str(extra.get("codec", DEFAULT_CODEC))
        self.block_size: int = int(vllm_config.cache_config.block_size)
        self.store = KVConnector(
            str(extra["url"]),
            fingerprint=str(extra["fingerprint"]),
            chunk_tokens=int(extra.get("chunk_tokens", 256)),
            tp_rank=int(extra.get("tp_rank", 0)),
        )
        self.chunk_tokens = self.store.chunk_tokens
        # scheduler side
        self._matched: dict[str, tuple[int, int]] = {}  # req_id -> (computed, external)
        self._loads: list[LoadSpec] = []
        self._loaded_end: dict[str, int] = {}
        # worker side
        self._caches: dict[str, torch.Tensor] = {}
        self._layer_index: dict[str, int] = {}
        self._active: list[_Load] = []
        self._save_rows: dict[str, dict[int, tuple[NDArray[Any], NDArray[Any]]]] = {}
        self._load_errors: set[int] = set()

    # -- scheduler side -----------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Stored full-chunk tokens beyond ``num_computed_tokens``; loads are synchronous.
        At least the last prompt token is left to compute (its logits are needed). One
        ``POST /v1/lookup``; a store failure answers 0."""
        ids = list(request.prompt_token_ids)
        cached = min(self.store.lookup(ids, self.codec), len(ids) - 1)
        external = max(0, cached - num_computed_tokens)
        self._matched[request.request_id] = (num_computed_tokens, external)
        return external, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        computed, _ = self._matched.pop(request.request_id, (0, 0))
        spec = LoadSpec(
            req_id=str(request.request_id),
            token_ids=tuple(request.prompt_token_ids),
            start=computed,
            end=computed + num_external_tokens,
            block_ids=_group0(blocks.get_block_ids()),
        )
        self._loads.append(spec)
        self._loaded_end[spec.req_id] = spec.end

    def build_connector_meta(self, scheduler_output: Any) -> LynxConnectorMetadata:
        """This step's loads, and a save for each new request whose full chunks are all
        computed in this step and not loaded. Resets the pending loads."""
        meta = LynxConnectorMetadata(loads=self._loads)
        self._loads = []
        c = self.chunk_tokens
        for new in scheduler_output.scheduled_new_reqs:
            ids = tuple(new.prompt_token_ids)
            full = len(ids) // c * c
            done = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
            loaded = self._loaded_end.pop(new.req_id, 0)
            if full and done >= full and loaded < full:
                meta.saves.append(SaveSpec(new.req_id, ids, full, _group0(new.block_ids)))
        return meta

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Saves are copied out of the cache before ``wait_for_save`` returns: the blocks
        may be freed at once."""
        self._matched.pop(request.request_id, None)
        self._loaded_end.pop(request.request_id, None)
        return False, None

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """``kv_caches``: layer name -> [2, num_blocks, block_size, H, D], in layer order."""
        self._caches = dict(kv_caches)
        self._layer_index = {name: i for i, name in enumerate(self._caches)}

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Start fetching every object this step loads; returns at once."""
        meta = self._get_connector_metadata()
        c = self.chunk_tokens
        for spec in meta.loads:
            first, last = spec.start // c, -(-spec.end // c)
            keys = self.store.keys(spec.token_ids[: last * c], self.codec)[first:]
            fetch = self.store.fetch_objects(keys) if keys else None
            self._active.append(_Load(spec, keys, first, fetch))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Write this layer of every active load: anchor, then the residual on top."""
        layer = self._layer_index[layer_name]
        out = list(self._caches.values())
        for load in self._active:
            for j, (header, sections) in enumerate(self._objects(load)):
                lo = (load.first_chunk + j) * self.chunk_tokens
                spec = load.spec
                slots = slots_for(
                    spec.block_ids,
                    self.block_size,
                    lo,
                    lo + header.shape[0],
                    range(spec.start, spec.end),
                ).to(out[0].device)
                mine = [s for s in sections if s.ref.layer == layer]
                anchors = decode_anchor(
                    [s for s in mine if s.ref.stream == "anchor"],
                    out,
                    "paged",
                    header=header,
                    slot_mapping=slots,
                )
                refine_residual(
                    [s for s in mine if s.ref.stream == "residual"],
                    out,
                    "paged",
                    anchors=anchors,
                    slot_mapping=slots,
                )

    def _objects(self, load: _Load) -> list[tuple[Header, list[Section]]]:
        """The load's objects as verified sections (fetched once); [] after a failure,
        with the load's blocks reported by ``get_block_ids_with_load_errors``."""
        if load.objects is None and not load.failed:
            try:
                raw = load.fetch.result() if load.fetch is not None else []
                load.objects = [self._fitting(_sections(data)) for data in raw]
            except StoreFailure as exc:
                load.failed = True
                self.store.report_failure("load_failures", "load", exc)
                self._load_errors.update(load.spec.block_ids)
        return load.objects or []

    def _fitting(self, obj: tuple[Header, list[Section]]) -> tuple[Header, list[Section]]:
        """``obj`` if it has the registered caches' shape; a chunk of another shape under
        this model's key (a foreign or buggy writer) raises FormatError: a failed load."""
        header = obj[0]
        first = next(iter(self._caches.values()))
        want = (len(self._caches), (self.chunk_tokens, *first.shape[-2:]))
        if (header.layers, tuple(header.shape)) != want:
            raise FormatError(
                f"a chunk holds {header.layers} layers of {header.shape}; the caches need"
                f" {want[0]} of {want[1]}"
            )
        return obj

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Copy this layer's K and V of every request saved this step out of the cache."""
        meta = self._get_connector_metadata()
        layer = self._layer_index[layer_name]
        for spec in meta.saves:
            slots = slots_for(spec.block_ids, self.block_size, 0, spec.tokens, range(spec.tokens))
            if bool((slots < 0).any()):
                continue  # blocks missing: never store a partial chunk
            slots = slots.to(kv_layer.device)
            rows = kv_layer[:, slots // self.block_size, slots % self.block_size]  # [2, T, H, D]
            self._save_rows.setdefault(spec.req_id, {})[layer] = (
                _to_numpy(rows[0]),
                _to_numpy(rows[1]),
            )

    def wait_for_save(self) -> None:
        """Store every request whose layers were all copied; blocks until stored (or
        counted as failed: a failure is never raised)."""
        meta = self._get_connector_metadata()
        layers = len(self._caches)
        for spec in meta.saves:
            rows = self._save_rows.pop(spec.req_id, {})
            if len(rows) == layers:
                kv = [rows[i] for i in range(layers)]
                self.store.save(spec.token_ids[: spec.tokens], kv, self.codec)
        self.store.wait_for_save()
        self._active = []

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Nothing is asynchronous across steps (loads are synchronous and saves done in
        ``wait_for_save``), so no request is ever reported: vLLM only expects ids here for
        requests whose ``request_finished`` answered True or whose load was async."""
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self.store.close()


def _sections(data: bytes) -> tuple[Header, list[Section]]:
    decoder = ObjectDecoder()
    sections = decoder.feed(data)
    if not decoder.complete() or decoder.header is None:
        raise FormatError(f"truncated object: {decoder.missing()}")
    return decoder.header, sections
