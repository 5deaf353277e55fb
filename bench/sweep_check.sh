#!/usr/bin/env bash
# The swap-out width check of the multi-turn sweep (issue 12), one device call: the first sweep's top rate
# (bench/results/h200/README.md), pensieve mode with ahead-of-time copies at the default width, at the old
# width (32 programs) and through DMA, then gpu-only; one server each. RATES overrides the rates, PARTS the parts.
# Run by bench/gpu_session.sh (STEPS=sweep_check); results: $OUT/sweep-<label>.json.
set -uo pipefail
OUT="${OUT:-/tmp/pensieve-out}"
part() {  # part LABEL MODE EXTRA-SERVE-FLAGS
    python3 bench/multiturn_sweep.py run --variant sharegpt --modes "$2" --rates ${RATES:-8} --window 24 --drain 18 \
        --time-scale 0.5 --tpot 0.015 --server-extra "$3" --log-dir "/tmp/sweep-logs/$1" --out "$OUT/sweep-$1.json" \
        2>&1 | grep -v '^wrote'
}
# PARTS picks labels (default: all four, in this order)
for label in ${PARTS:-pensieve pensieve-ahead32 pensieve-dma gpu-only}; do
    case $label in
        pensieve) part pensieve pensieve "" ;;
        pensieve-ahead32) part pensieve-ahead32 pensieve "--swap-ahead-programs 32" ;;
        pensieve-dma) part pensieve-dma pensieve "--swap-impl dma" ;;
        gpu-only) part gpu-only gpu-only "" ;;
        *) echo "unknown part $label" >&2; exit 2 ;;
    esac
done
