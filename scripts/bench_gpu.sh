#!/usr/bin/env bash
# On a GPU machine with the README's install done: check cuDNN attention against the reference, then
# benchmark the train step of GPT-2 small and the 1B LLaMA in bfloat16 (MFU vs the vendor's peak),
# at 2k and at 8k context (and a LLaMA 3 shape, its 128k vocabulary's loss in chunks, at 8k).
#   scripts/bench_gpu.sh [results.json]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
JAX_PLATFORMS=cuda,cpu "$python" -m pytest -q tests/test_gpu.py
"$python" scripts/benchmark.py --suite=gpu --repeats=3 --output_json="${1:-bench_gpu.json}"
