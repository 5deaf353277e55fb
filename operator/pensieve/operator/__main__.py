"""`python -m pensieve.operator`: run the operator with settings from PENSIEVE_OPERATOR_*."""
from __future__ import annotations

import logging

import kopf

from .settings import Settings


def main() -> None:
    s = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=False)
    kopf.run(
        clusterwide=not s.namespaces,
        namespaces=list(s.namespaces),
        standalone=True,
        liveness_endpoint=f"http://{s.liveness}/healthz" if s.liveness else None,
    )


if __name__ == "__main__":
    main()
