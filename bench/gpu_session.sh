#!/usr/bin/env bash
# Everything the engine and kernels need from a GPU, in one device call:
#   correctness (kernels suite, engine bf16 parity/batching/tiers), then figures
#   (kernel benchmark, engine throughput, swap-in overlap). Results under $OUT.
# Run from the repository root on the device machine: bash bench/gpu_session.sh
# Each step has its own time limit so that one slow step cannot eat the call.
set -uo pipefail
OUT="${OUT:-/tmp/pensieve-out}"
LOGS="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/engine:$PWD/kernels:$PWD/common:$PWD/router:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# STEPS (space-separated names below) picks a subset: STEPS="kernel_tests kernels_bench" bash bench/gpu_session.sh
# Not in the default list (they need 2+ GPUs: nvidia-h200-x2 or -x4):
#   STEPS="tensor_parallel_tests tensor_parallel" bash bench/gpu_session.sh    (one device call, < 10 min)
#   STEPS="tensor_parallel_70b" bash bench/gpu_session.sh                      (a second call)
# The multi-turn sweep (issue 12; bench/results/h200/MULTITURN_PLAN.md), one step per device call, in order:
#   sweep_sharegpt_a (pensieve, gpu-only), sweep_sharegpt_b (none) with sweep_sharegpt_ideal (the bound on any
#   cache), sweep_long_a (pensieve), sweep_long_b (the others). Each sweep step also keeps its servers'
#   step-statistics log lines (steplog.txt).
STEPS="${STEPS:-kernel_tests engine_gpu_tests server_gpu_tests speed_engine speed_hf speed_http kernels_bench swap_overlap tier_invariant tier_invariant_fp32 profile_step}"
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local t0=$(date +%s)
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, $(( $(date +%s) - t0 ))s"
    # the device call returns at most 8 files: every step's whole log goes into one
    { echo "===== $name: rc=$rc"; cat "$LOGS/$name.log"; } >>"$OUT/session.log"
    grep -v '^\s*File \|^    ' "$LOGS/$name.log" | tail -n "${TAIL:-25}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$OUT/session.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step kernel_tests "${KT_LIMIT:-100}" python3 -m pytest -q -p no:cacheprovider -x -rs tests/kernels
step engine_gpu_tests "${ET_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/engine/test_gpu.py \
    tests/engine/test_gpu_smollm2.py
step server_gpu_tests "${SG_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider -rs -m gpu \
    tests/server/test_engine_process.py
step alloc_check "${AC_LIMIT:-120}" python3 bench/alloc_check.py
step speed_engine "${SE_LIMIT:-240}" python3 bench/engine_speed.py engine --out "$OUT/speed_engine.json"
step speed_hf "${SH_LIMIT:-150}" python3 bench/engine_speed.py hf --out "$OUT/speed_hf.json"
step speed_http "${SP_LIMIT:-150}" python3 bench/engine_speed.py http --out "$OUT/speed_http.json"
[ -f "$OUT/speed_engine.json" ] && python3 bench/engine_speed.py merge "$OUT"/speed_engine.json "$OUT"/speed_hf.json \
    "$OUT"/speed_http.json --out "$OUT/engine_speed.json" && rm -f "$OUT"/speed_*.json \
    && python3 bench/engine_speed.py table "$OUT/engine_speed.json" --out "$OUT/engine_speed.md" && cat "$OUT/engine_speed.md"
step kernels_bench "${KB_LIMIT:-120}" python3 bench/kernels.py --out "$OUT/kernels_h100.json"
step engine_throughput "${TP_LIMIT:-60}" python3 bench/engine_throughput.py --shape llama3-8b --requests 256 \
    --prompt-len 512 --output-len 128 --out "$OUT/engine_throughput.json"
step swap_overlap "${SO_LIMIT:-80}" python3 bench/swap_overlap.py --shape llama3-8b --history 4096 --new 200 \
    --cpu-cache-bytes 8Gi --out "$OUT/swap_overlap.json"
step tier_invariant "${TI_LIMIT:-70}" python3 bench/tier_invariant.py --shape llama3-8b --out "$OUT/tier_invariant.json"
step tier_invariant_fp32 "${TF_LIMIT:-100}" python3 bench/tier_invariant.py --shape llama3-8b --dtype float32 \
    --out "$OUT/tier_invariant_fp32.json"
step profile_step "${PS_LIMIT:-70}" python3 bench/profile_step.py --shape llama3-8b --history 4096 --new 200 --decodes 256
step sweep_check "${SWEEP_LIMIT:-480}" bash bench/sweep_check.sh
# (the CPU tests of tests/engine/test_tensor_parallel.py run in CI)
step tensor_parallel_tests "${TPT_LIMIT:-120}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/engine/test_tensor_parallel_gpu.py
step tp_collectives "${TCL_LIMIT:-90}" env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT python3 bench/tp_collectives.py \
    --size "${TP_SIZE:-2}" --out "$OUT/tp_collectives.json"
step tensor_parallel "${TPB_LIMIT:-420}" python3 bench/tensor_parallel.py all --sizes 1 "${TP_SIZE:-2}" \
    ${TP_PROFILE:+--profile} --out "$OUT/tensor_parallel.json"
step tensor_parallel_70b "${TPC_LIMIT:-540}" python3 bench/tensor_parallel.py part --tp "${TP_SIZE:-2}" \
    --shape llama2-70b --out "$OUT/tensor_parallel_70b.json"
# ShareGPT at 2-12 sessions/s (40 s per point) and the long variant at 0.5-2 (45 s per point); sized at the top
# rate. Think times of 6 s (30 s x 0.2) let most sessions play most of their turns within a point; the sweeps
# before 2026-11-29 13:00 (think 15 s, 35 s points) sent only a third of the planned turns, most of them first turns.
# (the variants' timing and sizing are bench/multiturn_sweep.py's VARIANTS; these pick rates that fit the calls)
SHAREGPT_SWEEP="${SHAREGPT_SWEEP:---variant sharegpt --rates 2 4 8 12 16}"
LONG_SWEEP="${LONG_SWEEP:---variant long --rates 0.5 1 2}"
SWEEP_LOGS="${SWEEP_LOGS:-/tmp/sweep-logs}"  # (two sweeps at once, one per GPU, need two)
step sweep_sharegpt_a "${SW_LIMIT:-560}" python3 bench/multiturn_sweep.py run $SHAREGPT_SWEEP --modes "${SWA_MODES:-pensieve,gpu-only}" \
    --log-dir $SWEEP_LOGS --out "$OUT/sharegpt-a.json"
step sweep_sharegpt_b "${SW_LIMIT:-560}" python3 bench/multiturn_sweep.py run $SHAREGPT_SWEEP --modes none \
    --log-dir $SWEEP_LOGS --out "$OUT/sharegpt-b.json"
# The bound on any cache: gpu-only with a GPU tier that holds every conversation (nothing is ever recomputed
# or copied), on the same workload; not a mode of its own, so its part is kept apart from the merge.
step sweep_sharegpt_ideal "${SWI_LIMIT:-200}" python3 bench/multiturn_sweep.py run $SHAREGPT_SWEEP --rates 2 12 16 \
    --modes gpu-only --server-extra "--num-gpu-blocks 8000" --log-dir $SWEEP_LOGS-ideal --out "$OUT/sharegpt-ideal.json"
step sweep_long_a "${SW_LIMIT:-560}" python3 bench/multiturn_sweep.py run $LONG_SWEEP --modes pensieve \
    --log-dir $SWEEP_LOGS --out "$OUT/long-a.json"
step sweep_long_b "${SW_LIMIT:-560}" python3 bench/multiturn_sweep.py run $LONG_SWEEP --modes "${SLB_MODES:-gpu-only,none}" \
    --log-dir $SWEEP_LOGS --out "$OUT/long-b.json"
# the servers' step-statistics lines (engine_loop.StepLog) of this call's sweep steps
find "$SWEEP_LOGS" "$SWEEP_LOGS-ideal" -name 'server-*.log' -newer "$LOGS" 2>/dev/null | sort | while read -r f; do
    { echo "--- $f"; grep -E "steps: |engine ready|Traceback" "$f"; } >>"$OUT/steplog.txt"
done
