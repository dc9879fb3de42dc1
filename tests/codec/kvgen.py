"""Synthetic KV caches with the structure real ones have (per-channel offsets, a few
outlier channels in K, heavier tails in V), for tests that need many fresh inputs."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
from numpy.typing import NDArray

DTYPES: dict[str, Any] = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}


def make_kv(
    seed: int,
    layers: int = 2,
    tokens: int = 300,
    heads: int = 3,
    dim: int = 64,
    dtype: str = "bf16",
) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    """Per layer (K, V), each [T, H, D] in ``dtype``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        offset = rng.normal(0, 2, size=(1, heads, dim))
        scale = np.exp(rng.normal(0, 0.7, size=(1, heads, dim)))
        scale[0, :, rng.integers(0, dim, size=2)] *= 8  # outlier channels
        k = offset + scale * rng.standard_normal((tokens, heads, dim))
        v = rng.standard_t(5, size=(tokens, heads, dim)) * 0.5
        out.append((k.astype(DTYPES[dtype]), v.astype(DTYPES[dtype])))
    return out
