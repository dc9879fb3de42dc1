"""The vLLM adapter driven through vLLM's documented call order, without vLLM: a real
server, real paged CPU tensors, minimal stand-ins for vLLM's request objects."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lynxkv.client.sync import Client
from lynxkv.codec import decode, encode
from lynxkv.connector.vllm import LynxVLLMConnector, Role
from tests.codec.kvgen import make_kv
from tests.conftest import running_server

LAYERS, HEADS, DIM = 2, 2, 16
BLOCK, BLOCKS, CHUNK = 16, 64, 64
PROMPT = 2 * CHUNK + 37  # two full chunks and a partial one
FP = "test-model"


def _config(url: str) -> Any:
    extra = {"url": url, "fingerprint": FP, "codec": "lynx-a4", "chunk_tokens": CHUNK}
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        cache_config=SimpleNamespace(block_size=BLOCK),
    )


def _caches() -> dict[str, torch.Tensor]:
    # per layer [2, num_blocks, block_size, H, D] float32
    return {
        f"model.layers.{i}.attn": torch.zeros(2, BLOCKS, BLOCK, HEADS, DIM) for i in range(LAYERS)
    }


def _request(rid: str, ids: list[int]) -> Any:
    return SimpleNamespace(request_id=rid, prompt_token_ids=ids)


def _blocks(ids: list[int]) -> Any:
    return SimpleNamespace(get_block_ids=lambda: (ids,))


def _sched_out(rid: str, ids: list[int], blocks: list[int], computed: int) -> Any:
    new = SimpleNamespace(
        req_id=rid, prompt_token_ids=ids, block_ids=(blocks,), num_computed_tokens=computed
    )
    return SimpleNamespace(
        scheduled_new_reqs=[new], num_scheduled_tokens={rid: len(ids) - computed}
    )


def _slots(blocks: list[int], n: int) -> torch.Tensor:
    return torch.tensor([blocks[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)])


def _step(worker: LynxVLLMConnector, meta: Any, caches: dict[str, torch.Tensor]) -> None:
    """What vLLM's model runner does around one forward pass."""
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(SimpleNamespace())
    for name, layer in caches.items():
        worker.wait_for_layer_load(name)
        worker.save_kv_layer(name, layer, None)  # after attention wrote the layer
    worker.wait_for_save()
    worker.clear_connector_metadata()


@contextlib.contextmanager
def _connectors(
    tmp_path: Path,
) -> Iterator[tuple[str, LynxVLLMConnector, LynxVLLMConnector, dict[str, torch.Tensor]]]:
    """A real server, a scheduler-side and a worker-side connector on it, and the worker's
    registered caches; both connectors are shut down on exit."""
    with running_server(tmp_path) as url:
        sched = LynxVLLMConnector(_config(url), Role.SCHEDULER)
        worker = LynxVLLMConnector(_config(url), Role.WORKER)
        try:
            caches = _caches()
            worker.register_kv_caches(caches)
            yield url, sched, worker, caches
        finally:
            sched.shutdown()
            worker.shutdown()


def test_save_then_load_through_the_call_order(tmp_path: Path) -> None:
    ids = list(range(1000, 1000 + PROMPT))
    kv = make_kv(seed=7, layers=LAYERS, tokens=PROMPT, heads=HEADS, dim=DIM, dtype="f32")
    with _connectors(tmp_path) as (url, sched, worker, caches):
        # request 1: nothing stored; its prefill (simulated) fills blocks 3..13
        r1 = _request("r1", ids)
        assert sched.get_num_new_matched_tokens(r1, 0) == (0, False)
        b1 = list(range(3, 3 + -(-PROMPT // BLOCK)))
        sched.update_state_after_alloc(r1, _blocks(b1), 0)
        meta = sched.build_connector_meta(_sched_out("r1", ids, b1, 0))
        assert not meta.loads and [s.tokens for s in meta.saves] == [2 * CHUNK]
        s1 = _slots(b1, PROMPT)
        for (k, v), layer in zip(kv, caches.values(), strict=True):
            layer[0, s1 // BLOCK, s1 % BLOCK] = torch.from_numpy(k)
            layer[1, s1 // BLOCK, s1 % BLOCK] = torch.from_numpy(v)
        _step(worker, meta, caches)
        assert sched.request_finished(r1, b1) == (False, None)
        assert worker.get_finished({"r1"}) == (None, None)
        assert worker.store.stats.chunks_saved == 2

        # request 2: same prompt, other blocks; the two full chunks load
        r2 = _request("r2", ids)
        assert sched.get_num_new_matched_tokens(r2, 0) == (2 * CHUNK, False)
        b2 = list(range(40, 40 + -(-PROMPT // BLOCK)))
        sched.update_state_after_alloc(r2, _blocks(b2), 2 * CHUNK)
        meta = sched.build_connector_meta(_sched_out("r2", ids, b2, 2 * CHUNK))
        assert [(s.start, s.end) for s in meta.loads] == [(0, 2 * CHUNK)] and not meta.saves
        for layer in caches.values():
            layer[:, 40:] = 0
        _step(worker, meta, caches)
        assert worker.get_finished({"r2"}) == (None, None)

        # the cache at r2's slots equals lynxkv's full decode of the stored objects
        keys = worker.store.keys(ids, "lynx-a4")
        with Client(url) as client:
            raw = [client.get(key) for key in keys]
        objs = [decode(data).kv for data in raw]
        anchors = [decode(data, "anchor").kv for data in raw]
        s2 = _slots(b2, 2 * CHUNK)
        for i, layer in enumerate(caches.values()):
            for kv_i in (0, 1):
                want = np.concatenate([o[i][kv_i] for o in objs])
                got = layer[kv_i, s2 // BLOCK, s2 % BLOCK].numpy()
                np.testing.assert_array_equal(got, want)
                # refined: closer to the source than the 4-bit anchor alone
                src = kv[i][kv_i][: 2 * CHUNK]
                anchor = np.concatenate([o[i][kv_i] for o in anchors])
                assert np.abs(got - src).max() < np.abs(anchor - src).max()
            # the uncached tail is untouched
            tail = _slots(b2, PROMPT)[2 * CHUNK :]
            assert not layer[:, tail // BLOCK, tail % BLOCK].any()
        assert worker.get_block_ids_with_load_errors() == set()


def test_dead_server_matches_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path) as url:
        pass  # the server is gone once the block exits: its port is free
    conn = LynxVLLMConnector(_config(url), Role.SCHEDULER)
    conn.store.close()
    conn.store = type(conn.store)(url, fingerprint=FP, chunk_tokens=CHUNK, retries=0, timeout=2)
    try:
        ids = list(range(PROMPT))
        assert conn.get_num_new_matched_tokens(_request("r", ids), 0) == (0, False)
        assert conn.store.stats.lookup_failures == 1
    finally:
        conn.shutdown()


def test_chunks_of_another_shape_are_load_errors(tmp_path: Path) -> None:
    """Objects under the model's keys but of another shape fail the load (its blocks are
    reported to vLLM, which recomputes them); the cache is not written, nothing raises."""
    ids = list(range(2000, 2000 + PROMPT))
    with _connectors(tmp_path) as (url, sched, worker, caches):
        wrong = make_kv(seed=8, layers=LAYERS, tokens=CHUNK, heads=HEADS + 1, dim=DIM)
        with Client(url) as client:
            for key in worker.store.keys(ids, "lynx-a4"):
                client.put(key, encode(wrong, "lynx-a4"))
        r = _request("r", ids)
        assert sched.get_num_new_matched_tokens(r, 0) == (2 * CHUNK, False)
        blocks = list(range(20, 20 + -(-PROMPT // BLOCK)))
        sched.update_state_after_alloc(r, _blocks(blocks), 2 * CHUNK)
        meta = sched.build_connector_meta(_sched_out("r", ids, blocks, 2 * CHUNK))
        _step(worker, meta, caches)
        errors = worker.get_block_ids_with_load_errors()
        assert set(blocks[: 2 * CHUNK // BLOCK]) <= errors <= set(blocks)  # the load's
        assert worker.store.stats.load_failures == 1
        assert not any(layer.any() for layer in caches.values())
