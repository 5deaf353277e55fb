"""The stand-in for the model cache's download Job (run by the stand-in kubelet for pods of
component model-fetch): "downloads" a model into the claim's host directory, counts itself in
<claim>/.standin-downloads (one line per download: what the cluster tier asserts on), prints
progress lines as the real download does, writes the source's marker, exits 0.

    python standin_fetch.py REPO REVISION DEST MARKER   (container paths; PENSIEVE_STANDIN_MOUNTS maps them)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from standin_kubelet import host_path  # noqa: E402


def main() -> None:
    repo, rev, dest, marker = sys.argv[1:5]
    mounts = dict(m.split("=", 1) for m in os.environ.get("PENSIEVE_STANDIN_MOUNTS", "").split(",") if m)
    host_dest, host_marker = host_path(dest, mounts), host_path(marker, mounts)
    if host_dest is None or host_marker is None:
        sys.exit(f"standin_fetch: {dest} or {marker} is not under a mounted claim ({mounts})")
    root = Path(host_path(next(iter(mounts)), mounts))
    with open(root / ".standin-downloads", "a") as f:
        f.write(f"{repo}@{rev} {os.environ.get('POD_NAME', os.getpid())}\n")
    print(f"pensieve-fetch: downloading {repo}@{rev}", flush=True)
    Path(host_dest).mkdir(parents=True, exist_ok=True)
    for i in range(3):
        time.sleep(float(os.environ.get("PENSIEVE_STANDIN_FETCH_SECONDS", "1.5")))
        print(f"Fetching 3 files: {100 * (i + 1) // 3}%| {i + 1}/3", flush=True)
    (Path(host_dest) / "config.json").write_text(json.dumps({"model_type": "standin", "source": f"{repo}@{rev}"}))
    Path(host_marker).write_text(rev)
    print("pensieve-fetch: complete, 1 files", flush=True)


if __name__ == "__main__":
    main()
