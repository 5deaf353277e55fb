#!/usr/bin/env bash
# A/B of engine variants on one sweep point, in one device call (issue 12's diagnosis):
#   AB="old=.carry/ab/v0/engine new=engine" AB_MODES=pensieve AB_RATES=12 bash bench/ab_sweep.sh
# Each NAME=DIR runs bench/multiturn_sweep.py with DIR first on PYTHONPATH (an engine tree, e.g. an older
# commit's `git archive <commit> engine` unpacked under .carry/), the ShareGPT variant's timing and sizing,
# plus AB_EXTRA_<NAME> serve flags and AB_MODES_<NAME> cache modes if set. Writes $OUT/ab-NAME.json and the servers' step-statistics
# lines (engine_loop.StepLog) to $OUT/ab-steplog.txt.
set -uo pipefail
OUT="${OUT:-/tmp/pensieve-out}"
mkdir -p "$OUT"
ROOT="$PWD"
BASE="$ROOT/kernels:$ROOT/common:$ROOT/router:$ROOT/operator"
SWEEP="--variant sharegpt"
for pair in ${AB:-new=engine}; do
    name=${pair%%=*}; dir=${pair#*=}
    extra_var="AB_EXTRA_${name//-/_}"; extra="${!extra_var:-}"
    modes_var="AB_MODES_${name//-/_}"; modes="${!modes_var:-${AB_MODES:-pensieve}}"
    logs="/tmp/ab-logs-$name"; rm -rf "$logs"
    echo "== $name ($dir, $modes) ${extra}"
    PYTHONPATH="$ROOT/$dir:$BASE" timeout "${AB_LIMIT:-200}" python3 bench/multiturn_sweep.py run $SWEEP \
        --rates ${AB_RATES:-12} --modes "$modes" ${extra:+--server-extra "$extra"} \
        --log-dir "$logs" --out "$OUT/ab-$name.json" 2>&1 | grep -v '^wrote' | tail -n 4
    for f in "$logs"/server-*.log; do
        [ -f "$f" ] && { echo "--- $name $(basename "$f")"; grep -E "steps: |engine ready|warm-up|Traceback|Error" "$f"; } >>"$OUT/ab-steplog.txt"
    done
done
cat "$OUT/ab-steplog.txt" 2>/dev/null | cut -c1-400 | tail -n 60
