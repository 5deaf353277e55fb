#!/usr/bin/env python3
"""Copy the one CRD source (crds/) into the Helm chart (charts/pensieve-operator/crds/).

    python3 scripts/k8s/sync-chart-crd.py          # write
    python3 scripts/k8s/sync-chart-crd.py --check  # exit 1 when the copy drifted
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = "pensievedeployments.pensieve.ai.yaml"
SRC = ROOT / "crds" / NAME
DST = ROOT / "charts" / "pensieve-operator" / "crds" / NAME
HEADER = "# GENERATED from crds/{} by scripts/k8s/sync-chart-crd.py: edit the source, not this copy.\n".format(NAME)


def expected() -> str:
    return HEADER + SRC.read_text()


def main() -> int:
    if "--check" in sys.argv:
        if not DST.exists() or DST.read_text() != expected():
            print(f"{DST} differs from {SRC}: run python3 scripts/k8s/sync-chart-crd.py", file=sys.stderr)
            return 1
        return 0
    DST.parent.mkdir(parents=True, exist_ok=True)
    DST.write_text(expected())
    print(f"wrote {DST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
