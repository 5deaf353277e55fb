#!/usr/bin/env bash
# One device call: GPU correctness (tests/kernels on CUDA) then the benchmark.
# Run from the directory that holds kernels/, tests/, bench/ and pytest.ini:
#   bash bench/gpu_kernels.sh            (writes $OUT/pytest.log, $OUT/bench.log, $OUT/kernels.json)
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
python3 -m pytest tests/kernels -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest.log" | tail -8
echo "pytest wall $(( $(date +%s) - t0 ))s"
python3 bench/kernels.py --out "$OUT/kernels.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^\s*File\|^    ' | tail -80
