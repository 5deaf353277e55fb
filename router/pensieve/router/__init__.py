"""Pensieve's session-affine router (never imports torch or pensieve.engine).

``python -m pensieve.router``: rendezvous hashing of the session id over the ready
engine endpoints with bounded load, SSE passthrough, its own /metrics. See app.py
(request path), hashing.py (choice), endpoints.py/static.py/kube.py (discovery). Pod-deletion cost is the operator's
(pensieve.operator.deletion_cost).
"""
from .hashing import choose, owner, rank

__all__ = ["choose", "owner", "rank"]
