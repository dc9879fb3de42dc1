"""The transformers engine against a real server (port 0, real LMDB) and the real model."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lynxkv.connector.base import KVConnector
from lynxkv.connector.model import LoadedModel, load_model
from lynxkv.connector.texts import make_document
from lynxkv.connector.transformers import MODES, TransformersEngine
from lynxkv.gpu import gpu_available
from tests.conftest import running_server


def dead_url() -> str:
    """A URL where nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def chat_ids(loaded: LoadedModel, seed: int, tokens: int) -> list[int]:
    """A generated report of about ``tokens`` tokens and its question, chat-formatted."""
    tok = loaded.tokenizer
    doc = make_document(seed=seed, tokens=tokens, count_tokens=lambda s: len(tok(s).input_ids))
    messages = [{"role": "user", "content": doc.prompt()}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return [int(i) for i in ids]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("engine") / "data") as url:
        yield url


@pytest.mark.model
def test_every_mode_loads_the_prefix(smollm: LoadedModel, server_url: str) -> None:
    ids = chat_ids(smollm, seed=11, tokens=540)
    with TransformersEngine(smollm, server_url, max_draft=8) as engine:
        saved = engine.save_context(ids, codecs=("raw", "uniform-a4", "lynx-a4"))
        cached = (len(ids) - 1) // 256 * 256
        assert saved == len(ids) // 256 * 256 >= cached >= 512
        chunks = saved // 256
        for codec in ("raw", "uniform-a4", "lynx-a4"):
            assert engine.connector.lookup(ids, codec) == saved
        assert engine.connector.lookup(ids, "lynx-a2") == 0
        # saving again sends nothing new
        engine.save_context(ids, codecs=("lynx-a4",))
        stats = engine.connector.stats.snapshot()
        assert stats["chunks_saved"] == 3 * chunks
        assert stats["chunks_already_stored"] == chunks
        for mode in MODES:
            gen = engine.generate(ids, 8, mode)
            tl = gen.timeline
            assert 1 <= len(gen.tokens) <= 8
            assert len(tl.generated) == len(tl.verified) == len(gen.tokens)
            assert all(g <= v for g, v in zip(tl.generated, tl.verified, strict=True))
            assert list(tl.verified) == sorted(tl.verified)
            if mode == "none":
                assert tl.recomputed and tl.prefix_tokens == 0
                continue
            assert not tl.recomputed and tl.prefix_tokens == cached
            assert tl.suffix_tokens == len(ids) - cached
            assert tl.anchor_ready is not None
            if mode != "int4":
                assert tl.residual_ready is not None and tl.anchor_ready <= tl.residual_ready
            if mode == "lynx":
                assert tl.drafted >= 1 and 0 <= tl.accepted <= tl.drafted
                assert tl.ttft_draft <= tl.ttft_verified
            else:
                assert tl.drafted == tl.accepted == 0
        assert engine.connector.stats.snapshot()["load_failures"] == 0


@pytest.mark.model
def test_the_engine_decoding_sections_equals_the_client_decoding(
    smollm: LoadedModel, server_url: str
) -> None:
    """``decode_on="engine"`` (lynxkv.gpu writing into the cache; its numpy path here)
    builds the very caches the client's arrays build, so every mode answers the same."""
    check_engine_equals_client(smollm, server_url)


@pytest.mark.gpu
@pytest.mark.model
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_the_gpu_kernels_build_the_caches_the_client_builds(server_url: str) -> None:
    """The same on a CUDA model: the CuPy kernels against the client's numpy decode."""
    loaded = load_model(dtype="bfloat16", device="cuda")
    check_engine_equals_client(loaded, server_url, kernels=True)


def check_engine_equals_client(smollm: LoadedModel, server_url: str, kernels: bool = False) -> None:
    ids = chat_ids(smollm, seed=13, tokens=560)
    options: dict[str, Any] = {"max_draft": 6, "draft_policy": "fixed"}
    with (
        TransformersEngine(smollm, server_url, decode_on="client", **options) as client,
        TransformersEngine(smollm, server_url, decode_on="engine", **options) as engine,
    ):
        assert engine.decode_on == "engine" and client.decode_on == "client"
        if kernels:  # "auto" picks the kernels on a CUDA model
            with TransformersEngine(smollm, server_url) as auto:
                assert auto.decode_on == "engine"
        client.save_context(ids, codecs=("raw", "uniform-a4", "lynx-a4"))
        prefix = (len(ids) - 1) // 256 * 256
        for codec in ("raw", "uniform-a4", "lynx-a4"):
            caches = []
            for eng in (client, engine):
                handle = eng.connector.load(ids, codec, prefix, decode=eng is client)
                try:
                    built = eng._prefix(handle)
                    anchor, full = built.anchor(), built.full()
                finally:
                    handle.close()
                assert anchor is not None and full is not None
                caches.append((anchor, full))
            for a, b in zip(caches[0], caches[1], strict=True):
                for la, lb in zip(a.layers, b.layers, strict=True):
                    assert la.keys.shape == lb.keys.shape == (1, 3, prefix, 64)
                    assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        for mode in ("bf16", "int8", "int4", "int8-lynx", "lynx"):
            want, got = client.generate(ids, 10, mode), engine.generate(ids, 10, mode)
            assert got.tokens == want.tokens, mode
            assert not got.timeline.recomputed and got.timeline.prefix_tokens == prefix
            assert got.timeline.drafted == want.timeline.drafted
            assert got.timeline.accepted == want.timeline.accepted
        assert (
            engine.generate(ids, 10, "lynx").tokens == engine.generate(ids, 10, "int8-lynx").tokens
        )
        assert engine.connector.stats.snapshot()["load_failures"] == 0
        with pytest.raises(ValueError, match="decode_on"):
            TransformersEngine(smollm, server_url, decode_on="gpu")  # type: ignore[arg-type]


@pytest.mark.model
def test_the_engine_encoding_its_tensors_stores_the_clients_bytes(
    smollm: LoadedModel, tmp_path: Path
) -> None:
    """``encode_on="engine"`` hands the cache's tensors to lynxkv.gpu.encode_chunks (its
    numpy path here): the objects stored are the client path's, byte for byte."""
    check_engine_encode(smollm, tmp_path)


@pytest.mark.gpu
@pytest.mark.model
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_the_gpu_encoder_stores_what_the_numpy_encoder_stores(tmp_path: Path) -> None:
    """The same on a CUDA model, within the GPU encoder's contract (lynxkv.gpu.compare)."""
    check_engine_encode(load_model(dtype="bfloat16", device="cuda"), tmp_path, kernels=True)


def check_engine_encode(loaded: LoadedModel, tmp_path: Path, kernels: bool = False) -> None:
    from lynxkv.gpu.compare import compare_objects

    ids = chat_ids(loaded, seed=14, tokens=540)
    codecs = ("raw", "uniform-a4", "lynx-a4")
    stored = []
    for side in ("client", "engine"):
        with (
            running_server(tmp_path / side) as url,
            TransformersEngine(loaded, url, encode_on=side) as engine,
        ):
            assert engine.encode_on == side
            saved = engine.save_context(ids, codecs=codecs)
            assert saved >= 512 and engine.connector.stats.snapshot()["save_failures"] == 0
            keys = [key for codec in codecs for key in engine.connector.keys(ids[:saved], codec)]
            stored.append(engine.connector.fetch_objects(keys).result(60))
            if kernels:
                with TransformersEngine(loaded, url) as auto:
                    assert auto.encode_on == "engine"
    client, engine_side = stored
    assert len(client) == len(engine_side) == 3 * (saved // 256)
    for a, b in zip(client, engine_side, strict=True):
        if a != b:  # the numpy path must give the same bytes; the kernels, within the bound
            assert kernels
            diff = compare_objects(b, a)
            assert diff.within(), diff.describe()


def test_a_sections_load_refuses_the_array_methods_and_back(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as url, KVConnector(url, fingerprint="m") as conn:
        ids = list(range(300))
        kv = [(np.ones((256, 2, 8), np.float32), np.ones((256, 2, 8), np.float32))]
        conn.save(ids, kv, "lynx-a4")
        conn.wait_for_save()
        sections = conn.load(ids, "lynx-a4", 256, decode=False)
        arrays = conn.load(ids, "lynx-a4", 256)
        try:
            with pytest.raises(ValueError, match="decode=False"):
                sections.anchor()
            with pytest.raises(ValueError, match="decode=True"):
                arrays.anchor_sections()
            chunks = sections.residual_sections()
            assert chunks is not None and len(chunks) == 1
            header, residual = chunks[0]
            assert header.layers == 1 and {s.ref.stream for s in residual} == {"residual"}
            assert len(residual) == 2  # K and V
        finally:
            sections.close()
            arrays.close()


@pytest.mark.model
def test_dead_server_recomputes(smollm: LoadedModel) -> None:
    ids = chat_ids(smollm, seed=12, tokens=300)
    with TransformersEngine(smollm, dead_url(), retries=0, timeout=2.0) as engine:
        assert engine.save_context(ids) >= 256  # handed over; the store is down
        stats = engine.connector.stats.snapshot()
        assert stats["save_failures"] == 1 and stats["chunks_saved"] == 0
        reference = engine.generate(ids, 6, "none").tokens
        for mode in ("lynx", "int8-lynx", "int4", "bf16"):
            gen = engine.generate(ids, 6, mode)
            assert gen.tokens == reference, mode
            assert gen.timeline.recomputed
        assert engine.connector.stats.snapshot()["lookup_failures"] == 4


def test_save_never_raises_and_counts() -> None:
    import numpy as np

    kv = [(np.zeros((256, 1, 8), np.float32), np.zeros((256, 1, 8), np.float32))]
    with KVConnector(dead_url(), fingerprint="m", retries=0, timeout=2.0) as conn:
        conn.save(list(range(256)), kv, "raw")
        conn.save(list(range(300)), kv, "lynx-a4")
        conn.wait_for_save()
        assert conn.stats.snapshot()["save_failures"] == 2
        assert conn.lookup(list(range(256)), "raw") == 0
        handle = conn.load(list(range(256)), "raw", 256)
        assert handle.anchor() is None and handle.residual() is None
        handle.close()
        stats = conn.stats.snapshot()
        assert stats["lookup_failures"] == 1 and stats["load_failures"] == 1


def test_connector_round_trip(tmp_path: Path) -> None:
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(0)
    # per layer (K, V) [512, 2, 16] bf16: the raw codec keeps 16-bit values exactly
    kv = [
        tuple(rng.standard_normal((512, 2, 16)).astype(ml_dtypes.bfloat16) for _ in "kv")
        for _ in range(2)
    ]
    ids = list(range(600))
    with running_server(tmp_path / "data") as url, KVConnector(url, fingerprint="m") as conn:
        conn.save(ids, kv, "raw")  # type: ignore[arg-type]
        conn.wait_for_save()
        assert conn.lookup(ids, "raw") == 512
        assert conn.lookup([*ids[:520], 7, *ids[521:]], "raw") == 512
        assert conn.lookup([*ids[:300], 7, *ids[301:]], "raw") == 256
        assert conn.lookup([9, *ids[1:]], "raw") == 0
        handle = conn.load(ids, "raw", 512)
        full = handle.residual()
        assert full is not None and handle.residual_ready
        for (k, v), (k2, v2) in zip(kv, full, strict=True):
            assert np.array_equal(k.astype(np.float32), k2)
            assert np.array_equal(v.astype(np.float32), v2)
        handle.close()
        with pytest.raises(ValueError, match="multiple of 256"):
            conn.load(ids, "raw", 300)
