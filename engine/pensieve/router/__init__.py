"""Pensieve's session-affine router (never imports torch or pensieve.engine).

``python -m pensieve.router``: rendezvous hashing of the session id over the ready
engine endpoints with bounded load, SSE passthrough, its own /metrics. See app.py
(request path), hashing.py (choice), endpoints.py/static.py/kube.py (discovery),
deletion_cost.py (what the operator uses for pod-deletion-cost).
"""
from .deletion_cost import parse_sessions_active, pod_deletion_costs, scrape_sessions_active
from .hashing import choose, owner, rank

__all__ = ["choose", "owner", "rank", "pod_deletion_costs", "parse_sessions_active", "scrape_sessions_active"]
