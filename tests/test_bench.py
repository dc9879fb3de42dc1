"""The pure parts of the benchmark scripts: what turns runs into the reported figures."""

from __future__ import annotations

from typing import Any

import pytest

from bench.ttft import fit_context, kv_bytes_per_token, paper_regime, parse_args, summarize


def run(mode: str, ttft: float, repeat: int = 0, regime: float = 5.0, **kw: Any) -> dict[str, Any]:
    return {
        "mode": mode,
        "context": 1024,
        "link_gbps": 1.0,
        "repeat": repeat,
        "ttft_draft_s": ttft,
        "regime": regime,
        "drafted": 0,
        "accepted": 0,
        "equal_int8_lynx": True,
        **kw,
    }


def test_ratios_pair_runs_of_the_same_point_and_repeat() -> None:
    runs = [
        run("int4", 1.0, 0),
        run("int8-lynx", 2.0, 0),
        run("lynx", 1.1, 0, drafted=4, accepted=4),
        # a second repeat, much slower: paired with its own baselines, not the first's
        run("int4", 10.0, 1),
        run("int8-lynx", 20.0, 1),
        run("lynx", 9.0, 1, drafted=4, accepted=2),
        # not transfer-dominated: left out of the ratios, not of acceptance and equality
        run("int4", 1.0, 2, regime=0.5),
        run("lynx", 5.0, 2, regime=0.5, drafted=2, accepted=2, equal_int8_lynx=False),
    ]
    summary = summarize(runs)
    assert summary["lynx_vs_int4"] == pytest.approx((1.1 + 0.9) / 2)
    assert summary["lynx_vs_int8"] == pytest.approx((0.55 + 0.45) / 2)
    assert summary["acceptance"] == pytest.approx(8 / 10)
    assert summary["all_equal"] is False
    assert summary["transfer_dominated_runs"] == 2


def test_no_transfer_dominated_run_gives_no_ratio() -> None:
    summary = summarize([run("int4", 1.0, regime=0.9), run("lynx", 1.0, regime=0.9)])
    assert summary["lynx_vs_int4"] is None and summary["acceptance"] is None


def test_regime_and_context_helpers() -> None:
    assert kv_bytes_per_token(30, 3, 64) == 23040  # SmolLM2-135M: 23 KB per token in bf16
    paper = paper_regime()
    assert paper["cache_bytes"] == 64 * 1024**3 / 16  # 256 KiB per token, 16K tokens
    assert paper["regime"] == pytest.approx(68.7, abs=0.1)
    assert fit_context(8192, 8192, 256, reserve=256) == 7936
    assert fit_context(1024, 8192, 256, reserve=256) == 1024


def test_arguments() -> None:
    settings, out = parse_args(["--quick", "--repeats", "3", "--decode-on", "engine"])
    assert settings.contexts == (1024, 2048) and settings.repeats == 3 and out is None
    assert settings.decode_on == "engine"
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
