#!/usr/bin/env bash
# Everything the engine and kernels need from a GPU, in one device call:
#   correctness (kernels suite, engine bf16 parity/batching/tiers), then figures
#   (kernel benchmark, engine throughput, swap-in overlap). Results under $OUT.
# Run from the repository root on the device machine: bash bench/gpu_session.sh
set -uo pipefail
OUT="${OUT:-/tmp/pensieve-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/engine:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 bench/kernels.py --out "$OUT/kernels_h100.json" 2>&1 | tee "$OUT/kernels.log" | tail -30
python3 bench/engine_throughput.py --shape llama3-8b --requests 256 --prompt-len 512 --output-len 128 \
    --out "$OUT/engine_throughput.json" 2>&1 | tail -20
python3 bench/swap_overlap.py --shape llama3-8b --history 4096 --new 200 --out "$OUT/swap_overlap.json" 2>&1 | tail -20
