#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/engine -x`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"  # CPU machines run the Triton kernels in the interpreter
exec "$PENSIEVE_PY" -m pytest "$@"
