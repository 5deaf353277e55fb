"""`controller.kubernetes.io/pod-deletion-cost` from the engines' live sessions.

When a ReplicaSet scales down it deletes the pods with the lowest deletion cost
first. Keeping each engine pod's cost equal to its number of live sessions
(``pensieve_sessions_active`` on its /metrics) makes scale-down remove the emptiest
pods, so the fewest conversations lose their cache.

Plain functions (stdlib only: the operator never imports torch, and the router lives in
the engine distribution). ``scrape_sessions_active`` does HTTP (urllib, threads);
``sync_deletion_costs`` lists and patches pods through a ``Kube``; the kopf timer in
handlers.py runs it in a thread.
"""
from __future__ import annotations

import math
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

from .discovery import ApiRef
from .render import ENGINE_PORT_NAME, POD_DELETION_COST, pod_deletion_cost_patch, selector_string

ANNOTATION = POD_DELETION_COST
PODS = ApiRef("", "v1", "pods", "Pod")
METRIC = "pensieve_sessions_active"
INT32_MAX = 2**31 - 1
_SAMPLE = re.compile(r"^" + METRIC + r"(?:\{[^}]*\})?\s+([^\s]+)")


def parse_sessions_active(metrics_text: str) -> float | None:
    """The value of ``pensieve_sessions_active`` in a Prometheus text exposition
    (summed over label sets, if any), or None when absent."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            try:
                v = float(m.group(1))
            except ValueError:
                continue
            if math.isfinite(v):
                total += v
                seen = True
    return total if seen else None


def pod_deletion_costs(sessions_active: Mapping[str, float | None]) -> dict[str, str]:
    """Engine pod (IP or name) -> its live sessions, to the annotation value to set.

    The cost is the session count (an int32, as the annotation requires). A pod whose
    metrics could not be read (None) is left out: its annotation is better left as
    it was than reset to a value that would make it the first to go.
    """
    out: dict[str, str] = {}
    for pod, n in sessions_active.items():
        if n is None or not math.isfinite(n):
            continue
        out[pod] = str(max(0, min(INT32_MAX, int(round(n)))))
    return out


def scrape_sessions_active(addresses: Iterable[str], port: int | None = None, timeout: float = 2.0,
                           max_workers: int = 16) -> dict[str, float | None]:
    """GET http://ADDRESS[:PORT]/metrics for each and read pensieve_sessions_active;
    None for a pod that did not answer."""
    addresses = list(addresses)

    def one(addr: str) -> float | None:
        host = f"[{addr}]" if ":" in addr and not addr.startswith("[") and port else addr
        url = f"http://{host}:{port}/metrics" if port else f"http://{addr}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return parse_sessions_active(r.read().decode("utf-8", "replace"))
        except (OSError, ValueError):
            return None
    if not addresses:
        return {}
    with ThreadPoolExecutor(max_workers=min(max_workers, len(addresses))) as pool:
        return dict(zip(addresses, pool.map(one, addresses)))


def deletion_cost_patches(pods: Mapping[str, str], sessions_active: Mapping[str, float | None],
                          current: Mapping[str, str | None] | None = None) -> dict[str, dict]:
    """Pod name -> merge patch for the pods whose annotation must change.

    ``pods``: pod name -> pod IP; ``sessions_active``: pod IP -> sessions (from
    ``scrape_sessions_active``); ``current``: pod name -> its annotation now (to skip
    writes that change nothing)."""
    costs = pod_deletion_costs({name: sessions_active.get(ip) for name, ip in pods.items()})
    current = current or {}
    return {name: pod_deletion_cost_patch(int(v)) for name, v in costs.items() if current.get(name) != v}


def _is_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return (not pod.get("metadata", {}).get("deletionTimestamp") and bool(status.get("podIP"))
            and any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []))


def engine_port(pod: Mapping[str, Any], default: int = 8000) -> int:
    """The engine container's port named ``http`` (the first port, else ``default``)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        ports = c.get("ports") or []
        for p in ports:
            if p.get("name") == ENGINE_PORT_NAME:
                return int(p["containerPort"])
        if ports:
            return int(ports[0]["containerPort"])
    return default


def ready_engine_pods(pods: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, int, str | None]]:
    """Pod name -> (pod IP, engine port, current annotation) for the ready, not terminating pods."""
    out = {}
    for p in pods:
        if _is_ready(p):
            m = p["metadata"]
            out[m["name"]] = (p["status"]["podIP"], engine_port(p), (m.get("annotations") or {}).get(ANNOTATION))
    return out


def sync_deletion_costs(kube: Any, namespace: str, name: str, timeout: float = 2.0,
                        scrape=scrape_sessions_active) -> dict[str, dict]:
    """One round for a PensieveDeployment: list its engine pods, scrape the ready ones'
    /metrics, patch the annotation where it changed. Returns the patches applied; a pod
    that vanished meanwhile is skipped."""
    from .kube import NotFound  # the kubernetes client: only where the API is used

    pods = ready_engine_pods(kube.list(PODS, namespace, label_selector=selector_string(name)))
    by_port: dict[int, list[str]] = {}
    for ip, port, _ in pods.values():
        by_port.setdefault(port, []).append(ip)
    sessions: dict[str, float | None] = {}
    for port, ips in by_port.items():
        sessions.update({f"{ip}:{port}": v for ip, v in scrape(ips, port=port, timeout=timeout).items()})
    patches = deletion_cost_patches({n: f"{ip}:{port}" for n, (ip, port, _) in pods.items()}, sessions,
                                    {n: cur for n, (_, _, cur) in pods.items()})
    applied = {}
    for pod_name, patch in patches.items():
        try:
            kube.merge_patch(PODS, namespace, pod_name, patch)
            applied[pod_name] = patch
        except NotFound:
            pass
    return applied
