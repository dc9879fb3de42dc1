#!/usr/bin/env bash
# The GPU machine's full check, run inside `bench/device.sh part2` (the real model and the
# wheels in place): every test marked `gpu` (kernels, encoder, the engine on SmolLM2),
# then bench/gpu.py, its output and JSON under $OUT. docs/benchmarks.md quotes this run.
#
#   bench/device.sh part1                         (carry [".gpu1"])
#   bench/device.sh part2 bash bench/gpu_suite.sh (carry [".gpu2"], right after)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/out}"
mkdir -p "$out"
start=$(date +%s)
timeout 400 python3 -m pytest tests/gpu tests/connector/test_engine.py -q -m gpu -n 8 \
    -p no:cacheprovider -p no:benchmark -rfEs >"$out/tests.txt" 2>&1
echo "pytest rc=$? in $(($(date +%s) - start)) s"
grep -E "passed|failed|error" "$out/tests.txt" | tail -2
grep -E "^(FAILED|ERROR)|^SKIPPED" "$out/tests.txt" | head -20
start=$(date +%s)
timeout 300 python3 bench/gpu.py --out "$out" >"$out/gpu.txt" 2>&1
echo "bench rc=$? in $(($(date +%s) - start)) s"
grep -v '^{' "$out/gpu.txt" | tail -24
