"""Lynx speculation: the acceptance rule, and ``lynx`` == ``int8-lynx`` on the real model.

The equality runs the model in float32: in bf16, one batched forward pass (verification)
and single decode steps (the reference) round differently, and a near-tie between the
top two logits can then flip an argmax although both are "greedy on the same cache".
docs/connector.md explains the choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lynxkv.connector.base import LoadHandle
from lynxkv.connector.model import LoadedModel
from lynxkv.connector.speculative import accept_drafts
from lynxkv.connector.transformers import TransformersEngine
from tests.conftest import model_or_skip, running_server
from tests.connector.test_engine import chat_ids

EOS = {2}


@pytest.mark.parametrize(
    ("drafts", "targets", "max_new", "out", "accepted"),
    [
        ([], [5], 4, [5], 0),
        ([5, 6, 7], [5, 6, 7, 8], 9, [5, 6, 7, 8], 3),  # all accepted, plus the next token
        ([5, 6, 7], [5, 9, 7, 8], 9, [5, 9], 1),  # the model's token at the first mismatch
        ([5, 6, 7], [4, 6, 7, 8], 9, [4], 0),
        ([5, 2, 7], [5, 2, 7, 8], 9, [5, 2], 2),  # an accepted end-of-turn ends it
        ([5, 6, 7], [5, 6, 7, 8], 2, [5, 6], 2),  # max_new ends it
        ([5, 6], [5, 9, 1], 1, [5], 1),
    ],
)
def test_accept_drafts(
    drafts: list[int], targets: list[int], max_new: int, out: list[int], accepted: int
) -> None:
    assert accept_drafts(drafts, targets, max_new, EOS) == (out, accepted)


def test_accept_drafts_needs_one_more_target() -> None:
    with pytest.raises(ValueError, match="expected 3 targets"):
        accept_drafts([1, 2], [1, 2], 4, EOS)


@pytest.fixture(scope="module")
def smollm_f32() -> LoadedModel:
    return model_or_skip("float32")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("spec") / "data") as u:
        yield u


#: (seed, report tokens): 16 contexts with 512 cached tokens, then 1024, 1536 and 2048.
PROMPTS = [(s, 520) for s in range(100, 116)] + [(116, 1030), (117, 1030), (118, 1540), (119, 2050)]
MAX_NEW = 16


@pytest.mark.model
def test_lynx_equals_int8_lynx(smollm_f32: LoadedModel, url: str) -> None:
    rows = []
    drafted = accepted = 0
    with (
        TransformersEngine(smollm_f32, url, draft_policy="fixed") as fixed,
        TransformersEngine(smollm_f32, url, rate_limit_bps=2e8) as overlap,
    ):
        for n, (seed, tokens) in enumerate(PROMPTS):
            ids = chat_ids(smollm_f32, seed, tokens)
            assert fixed.save_context(ids) >= 512
            # vary the draft budget; two prompts draft for real while the residual streams
            engine = overlap if n in (3, 11) else fixed
            engine.max_draft = (4, 8, 16, 24, 64)[n % 5]
            reference = engine.generate(ids, MAX_NEW, "int8-lynx")
            lynx = engine.generate(ids, MAX_NEW, "lynx")
            tl = lynx.timeline
            assert not tl.recomputed and not reference.timeline.recomputed
            assert 512 <= tl.prefix_tokens <= 2048 and tl.prefix_tokens % 256 == 0
            rows.append((seed, tl.prefix_tokens, engine.max_draft, tl.drafted, tl.accepted))
            assert lynx.tokens == reference.tokens, (seed, lynx.tokens, reference.tokens)
            assert 0 <= tl.accepted <= tl.drafted
            drafted += tl.drafted
            accepted += tl.accepted
        assert fixed.connector.stats.snapshot()["load_failures"] == 0
    print("\nseed prefix max_draft drafted accepted")
    for row in rows:
        print(*row)
    print(f"lynx == int8-lynx on {len(rows)} prompts; accepted {accepted} of {drafted} drafts")
    assert drafted > 0


@pytest.mark.model
def test_failed_residual_verifies_on_a_recomputed_prefix(
    smollm_f32: LoadedModel, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = chat_ids(smollm_f32, 130, 520)
    with TransformersEngine(smollm_f32, url, draft_policy="fixed", max_draft=8) as engine:
        engine.save_context(ids)
        reference = engine.generate(ids, 12, "none")
        # the residual is lost after the anchor arrived (as a damaged object would be)
        monkeypatch.setattr(LoadHandle, "residual", lambda self, timeout=None: None)
        lynx = engine.generate(ids, 12, "lynx")
    assert lynx.timeline.recomputed and lynx.timeline.drafted == 8
    assert lynx.tokens == reference.tokens


@pytest.mark.model
@pytest.mark.parametrize("noise", [0.5, 100.0])
def test_rejected_drafts_are_dropped(
    smollm_f32: LoadedModel, url: str, monkeypatch: pytest.MonkeyPatch, noise: float
) -> None:
    """Drafts from a damaged anchor are rejected, yet the output is int8-lynx's: this
    exercises the mismatch token, the crop of rejected drafts' KV and the decode after."""
    import numpy as np

    ids = chat_ids(smollm_f32, 131, 520)
    rng = np.random.default_rng(0)
    real_anchor = LoadHandle.anchor

    def damaged(self: LoadHandle, timeout: float | None = None) -> Any:
        layers = real_anchor(self, timeout)
        assert layers is not None
        # per layer (K, V) [P, H, D]: relative noise of the given size
        return [
            tuple(x + noise * x.std() * rng.standard_normal(x.shape).astype(np.float32) for x in kv)
            for kv in layers
        ]

    with TransformersEngine(smollm_f32, url, draft_policy="fixed", max_draft=12) as engine:
        engine.save_context(ids)
        reference = engine.generate(ids, 20, "int8-lynx")
        monkeypatch.setattr(LoadHandle, "anchor", damaged)
        lynx = engine.generate(ids, 20, "lynx")
    tl = lynx.timeline
    print(f"\nnoise {noise}: accepted {tl.accepted} of {tl.drafted}")
    assert tl.drafted == 12 and tl.accepted < tl.drafted
    assert lynx.tokens == reference.tokens


def test_module_has_no_torch_at_import(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, lynxkv.connector, lynxkv.connector.keys, lynxkv.connector.base, "
        "lynxkv.connector.speculative, lynxkv.connector.transformers; "
        "print('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert out.stdout.strip() == "False"
