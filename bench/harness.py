"""What every benchmark script shares: the common flags and the result file.

    ap = harness.parser(__doc__)            # --shape, --workdir, --out (each optional)
    ...
    harness.write_result(result, args.out)  # adds "command" and "machine", prints, writes JSON

Results carry the exact command line and the machine (docs/design.md, "Performance
method": a result is kept with the command that made it, and timings are compared
only within one run). torch is imported only when a GPU name is asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

SHAPE_DEFAULT = "llama3-8b"


def parser(description: str | None = None, *, shape: bool = True, workdir: bool = True, out: bool = True,
           out_required: bool = False) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if shape:
        ap.add_argument("--shape", default=SHAPE_DEFAULT, help="model shape from bench/shapes.py (dummy weights)")
    if workdir:
        ap.add_argument("--workdir", default="/tmp/pensieve-bench", help="where shape checkpoints are written")
    if out:
        ap.add_argument("--out", required=out_required, default=None, help="write the JSON result here")
    return ap


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def machine(device: str | None = None) -> dict:
    """Where the result was measured: platform, CPUs, and the GPU and library versions when torch is loaded."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    triton = sys.modules.get("triton")
    if triton is not None:
        info["triton"] = triton.__version__
    if device is not None:
        info["device"] = device
    return info


def write_result(result: dict, out: str | None, *, echo: bool = True, device: str | None = None) -> dict:
    """Add the command line and the machine, print the JSON (``echo``) and write it to ``out`` if given."""
    result = {"command": command(), "machine": machine(device), **result}
    text = json.dumps(result, indent=1, default=str)
    if echo:
        print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return result
