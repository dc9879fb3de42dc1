"""The GPU kernels once each, for a profiler (GPU only): warm-up launches, then the run.

    ncu -k regex:encode --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section InstructionStats \
        python3 bench/gpu_profile.py [--codec lynx-a4] [--gbytes 0.25]

Each kernel is launched twice per K|V kind, the first pair compiling and warming up:
encode, then decode_anchor (``dequant`` without a residual), then refine_residual, so
``-k regex:encode --launch-skip 2 --launch-count 2`` profiles the second encode pair
(K, then V) and ``-k regex:dequant --launch-skip 2 --launch-count 2`` the second
decode_anchor pair. The data are bench/gpu.py's cases, ``--gbytes`` of bf16 per kind.
"""

from __future__ import annotations

import argparse

import torch

from bench.gpu import Case, D, EncodeCase, H, T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", default="lynx-a4")
    parser.add_argument("--gbytes", type=float, default=0.25)
    args = parser.parse_args()
    n = int(args.gbytes * 1e9 / (2 * 2 * T * H * D))
    enc = EncodeCase(args.codec, n, seed=1)
    for _ in range(2):
        enc.run()
    torch.cuda.synchronize()
    del enc
    case = Case(args.codec, "hnd", n, seed=2)
    for full in (False, True):
        for _ in range(2):
            case.run(full)
    torch.cuda.synchronize()
    print(f"ran {args.codec}: {n} sections per K|V kind")


if __name__ == "__main__":
    main()
