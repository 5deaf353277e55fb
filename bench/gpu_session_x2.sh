#!/usr/bin/env bash
# One device call on a two-GPU machine (nvidia-h200-x2): first the tensor-parallel steps over both
# GPUs, then two single-GPU parts of bench/gpu_session.sh at once, one per GPU (each part's steps
# and modes run in turn on its GPU; the sweep servers take free ports, their logs go apart).
#   TP_STEPS="tensor_parallel_tests tensor_parallel" GPU0_STEPS=sweep_sharegpt_ideal \
#   GPU1_STEPS=sweep_sharegpt_a GPU1_ENV="SHAREGPT_SWEEP='--variant sharegpt --rates 6' SWA_MODES=pensieve,gpu-only,none" \
#   bash bench/gpu_session_x2.sh
# Results: $OUT/session.log and the TP files; $OUT/gpu0/, $OUT/gpu1/ (each part's session.log and JSON).
set -uo pipefail
OUT="${OUT:-/tmp/pensieve-out}"
mkdir -p "$OUT"
# NVLink multicast stays off (the device README: it can take the host's shared GPUs down)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -n "${TP_STEPS:-}" ] && OUT="$OUT" STEPS="$TP_STEPS" bash bench/gpu_session.sh
for g in 0 1; do
    steps_var="GPU${g}_STEPS" env_var="GPU${g}_ENV"
    [ -n "${!steps_var:-}" ] || continue
    (if [ -n "${!env_var:-}" ]; then eval "export ${!env_var}"; fi; CUDA_VISIBLE_DEVICES=$g OUT="$OUT/gpu$g" SWEEP_LOGS="/tmp/sweep-logs-gpu$g" \
        STEPS="${!steps_var}" bash bench/gpu_session.sh >"$OUT/gpu$g.txt" 2>&1) &
done
wait
rm -f "$OUT/tensor_parallel.md"  # (its table is in session.log: the call returns 8 files at most)
for g in 0 1; do [ -f "$OUT/gpu$g.txt" ] && { echo "===== GPU $g"; cat "$OUT/gpu$g.txt"; rm -f "$OUT/gpu$g.txt"; }; done
exit 0
