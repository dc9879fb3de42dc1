import math
from typing import Any

import numpy as np
import pytest

from lynxkv.connector.model import LoadedModel, prefill_kv
from lynxkv.connector.probe import (
    PROBE_ATTENTION,
    Capture,
    CodecQuality,
    attention_outputs,
    capture,
    measure_codec,
    reference_outputs,
    replaced_prefix_outputs,
    vnmse,
)
from lynxkv.connector.texts import make_document

F32 = np.ndarray[Any, np.dtype[np.float32]]


def _naive_attention(q: F32, k: F32, v: F32) -> F32:
    """One query, one head at a time, in float64: the oracle for ``attention_outputs``."""
    n, hq, d = q.shape
    t, h, _ = k.shape
    out = np.zeros((n, hq, d))
    for i in range(n):
        pos = t - n + i
        for j in range(hq):
            kv_head = j // (hq // h)
            s = k[: pos + 1, kv_head].astype(np.float64) @ q[i, j] / math.sqrt(d)
            w = np.exp(s - s.max())
            out[i, j] = (w / w.sum()) @ v[: pos + 1, kv_head]
    return out.astype(np.float32)


def _random(
    seed: int, n: int, t: int, hq: int = 9, h: int = 3, d: int = 16
) -> tuple[F32, F32, F32]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, hq, d)).astype(np.float32) * 2
    k = rng.standard_normal((t, h, d)).astype(np.float32) * 2
    v = rng.standard_normal((t, h, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize(
    ("n", "t", "hq", "h"), [(1, 1, 1, 1), (4, 9, 9, 3), (7, 40, 4, 2), (8, 8, 6, 6)]
)
def test_attention_matches_a_naive_loop(n: int, t: int, hq: int, h: int) -> None:
    q, k, v = _random(n * t, n, t, hq, h)
    np.testing.assert_allclose(attention_outputs(q, k, v), _naive_attention(q, k, v), atol=2e-5)


def test_attention_rejects_more_queries_than_keys() -> None:
    q, k, v = _random(0, 5, 4)
    with pytest.raises(ValueError, match="bad shapes"):
        attention_outputs(q, k, v)


def _fake_capture(seed: int, layers: int = 2, n: int = 3, t: int = 20) -> Capture:
    parts = [_random(seed + i, n, t) for i in range(layers)]
    return Capture(kv=[(k, v) for _, k, v in parts], queries=[q for q, _, _ in parts], outputs=[])


def test_an_exact_prefix_reproduces_the_reference() -> None:
    cap = _fake_capture(1)
    ref = reference_outputs(cap)
    same = replaced_prefix_outputs(cap, [(k[:10], v[:10]) for k, v in cap.kv])
    assert vnmse(ref, same) == 0.0


def test_a_zeroed_prefix_changes_the_outputs() -> None:
    cap = _fake_capture(2)
    ref = reference_outputs(cap)
    zeros = replaced_prefix_outputs(
        cap, [(np.zeros_like(k[:10]), np.zeros_like(v[:10])) for k, v in cap.kv]
    )
    assert vnmse(ref, zeros) > 1e-3


def test_the_prefix_may_not_reach_the_queried_positions() -> None:
    cap = _fake_capture(3, n=3, t=20)
    with pytest.raises(ValueError, match="does not fit"):
        replaced_prefix_outputs(cap, [(k[:18], v[:18]) for k, v in cap.kv])


def test_vnmse_is_the_mean_over_layers_of_relative_errors() -> None:
    o = [np.ones((2, 3, 4), np.float32), np.full((2, 3, 4), 2.0, np.float32)]
    assert vnmse(o, [x * 1.1 for x in o]) == pytest.approx(0.01)
    assert vnmse(o, [o[0], o[1] * 0.0]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def context_ids(smollm: LoadedModel) -> list[int]:
    """A real context: 512 cached tokens and 16 queried ones."""
    tok = smollm.tokenizer
    doc = make_document(2024, 528, lambda s: len(tok(s).input_ids))
    return list(tok(doc.text).input_ids[:528])


@pytest.fixture(scope="module")
def probed(smollm: LoadedModel, context_ids: list[int]) -> tuple[Capture, list[F32]]:
    """The capture of ``context_ids`` and its exact attention outputs."""
    cap = capture(smollm.model, context_ids, 16)
    return cap, reference_outputs(cap)


@pytest.mark.model
def test_capture_sees_the_models_cache(
    smollm: LoadedModel, context_ids: list[int], probed: tuple[Capture, list[F32]]
) -> None:
    cap, _ = probed
    kv = prefill_kv(smollm.model, context_ids)
    assert cap.tokens == 528 and cap.last == 16
    for (ck, cv), (k, v) in zip(cap.kv, kv, strict=True):
        np.testing.assert_array_equal(ck.view(np.uint16), k.view(np.uint16))
        np.testing.assert_array_equal(cv.view(np.uint16), v.view(np.uint16))


@pytest.mark.model
def test_capture_restores_the_attention(
    smollm: LoadedModel, probed: tuple[Capture, list[F32]]
) -> None:
    assert smollm.model.config._attn_implementation not in (PROBE_ATTENTION, None)


@pytest.mark.model
def test_numpy_attention_reproduces_the_models(probed: tuple[Capture, list[F32]]) -> None:
    cap, ref = probed
    assert [q.shape for q in cap.queries] == [(16, 9, 64)] * 30
    # the model computes in bf16: a few 1e-6 of relative error, far below any codec's
    assert vnmse(cap.outputs, ref) < 1e-4


@pytest.fixture(scope="module")
def qualities(probed: tuple[Capture, list[F32]]) -> dict[str, CodecQuality]:
    cap, ref = probed
    return {name: measure_codec(cap, ref, 512, name) for name in ("lynx-a4", "uniform-a4", "raw")}


@pytest.mark.model
def test_raw_is_exact(qualities: dict[str, CodecQuality]) -> None:
    raw = qualities["raw"]
    assert raw.vnmse_anchor == raw.vnmse_full == 0.0
    assert raw.anchor_bits == 16.0


@pytest.mark.model
def test_lynx_residual_refines_the_anchor(qualities: dict[str, CodecQuality]) -> None:
    lynx = qualities["lynx-a4"]
    assert lynx.vnmse_full < lynx.vnmse_anchor / 10
    assert lynx.anchor_bits <= 5.1 and lynx.full_bits <= 9.1


@pytest.mark.model
@pytest.mark.xfail(
    strict=True,
    reason="issue 2 target not met on SmolLM2: the lynx-a4 anchor is on a par with the "
    "KIVI-grouped int4 anchor, not clearly better (docs/codec.md, 'Against the targets')",
)
def test_lynx_anchor_beats_the_uniform_anchor(qualities: dict[str, CodecQuality]) -> None:
    """The design's premise: at 4 bits, the Lynx anchor keeps attention closer than int4."""
    assert qualities["lynx-a4"].vnmse_anchor < qualities["uniform-a4"].vnmse_anchor


@pytest.mark.model
def test_lynx_anchor_is_on_a_par_with_int4_in_fewer_bits(
    qualities: dict[str, CodecQuality],
) -> None:
    lynx, int4 = qualities["lynx-a4"], qualities["uniform-a4"]
    assert lynx.anchor_bits < int4.anchor_bits
    assert lynx.vnmse_anchor < 1.5 * int4.vnmse_anchor
