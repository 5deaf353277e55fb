"""`python -m pensieve.operator`: run the operator with settings from PENSIEVE_OPERATOR_*."""
from __future__ import annotations

import kopf

from .settings import Settings


def main() -> None:
    s = Settings.from_env()
    # kopf's handler is the only one on the root logger (a second one printed every line twice).
    kopf.configure(verbose=False, log_format=kopf.LogFormat[s.log_format.upper()])
    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not s.namespaces,
        namespaces=list(s.namespaces),
        standalone=True,
        liveness_endpoint=f"http://{s.liveness}/healthz" if s.liveness else None,
    )


if __name__ == "__main__":
    main()
