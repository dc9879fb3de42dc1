"""``lynxkv demo`` in-process on a short context: the summary line and its invariants."""

from __future__ import annotations

import json

import pytest

from lynxkv.cli import main
from lynxkv.demo import DEMO_MODES, run_demo
from lynxkv.errors import MissingDependency


@pytest.mark.model
def test_demo_json_summary(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        returned = run_demo(tokens=600, max_new_tokens=6, link_gbps=0.2, as_json=True)
    except MissingDependency as exc:
        pytest.skip(str(exc))
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.loads(json.dumps(returned))
    assert set(summary["modes"]) == set(DEMO_MODES)
    assert summary["lynx_equals_int8"] is True, out
    assert summary["dtype"] == "float32"
    assert 0 <= summary["accepted"] <= summary["drafted"]
    for name, mode in summary["modes"].items():
        assert 0 < mode["ttft_draft_s"] <= mode["ttft_verified_s"] <= mode["tt32_s"], name
        assert mode["prefix_tokens"] == 512 and not mode["recomputed"], name
    assert summary["modes"]["lynx"]["drafted"] >= 1


def test_demo_rejects_a_bad_link(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--link-gbps", "0"]) == 1
    assert "--link-gbps" in capsys.readouterr().err
