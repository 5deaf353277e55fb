"""spec.sessions: where the engines keep conversations (the engine's session store).

Exactly one of three places, chosen by the spec:

- ``store.secretKeyRef`` (external): a Redis or Valkey the user runs; its URL
  (``redis://[:PASSWORD@]HOST:PORT/DB``) is read from a Secret key and reaches
  the engines as ``PENSIEVE_SESSION_STORE`` through ``valueFrom``, so it never
  appears in the ConfigMap or the pod spec.
- ``managed: true``: the operator runs a one-replica Valkey StatefulSet and a
  Service ``<name>-sessions``, both owned by the PensieveDeployment (deleted
  with it); the engines get ``redis://<name>-sessions.<ns>.svc:6379/0``.
  Data on an emptyDir (``managedStorage`` empty: lost when the store pod is
  deleted) or a PVC per store pod (``managedStorage: 10Gi``). Append-only file on,
  ``noeviction``: when full, saving a turn fails loudly (503) instead of
  silently evicting other conversations.
- neither (embedded, the default): each engine pod keeps a SQLite file on a
  volume at SESSION_DIR: an emptyDir (survives container restarts, not the pod's
  deletion) or a PVC (``embedded.claimName``; ReadWriteOnce, so one replica).
  With several replicas every engine has its own store: a session re-homed to
  another engine is not found there. The operator says so in the status.

This module owns the parsing, the engine settings and the managed store's
manifests; render.py only calls it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from .quantity import parse_bytes

SESSION_DIR = "/var/lib/pensieve/sessions"
STORE_PORT = 6379
DEFAULT_MANAGED_IMAGE = "valkey/valkey:8.0"
STORE_UID = 999  # the valkey (and redis) images' unprivileged user


@dataclasses.dataclass(frozen=True)
class SessionsSpec:
    managed: bool = False
    secret_name: str = ""              # store.secretKeyRef.name: external store
    secret_key: str = "url"
    managed_image: str = DEFAULT_MANAGED_IMAGE
    managed_storage: str = ""          # PVC size of the managed store; "" = emptyDir
    managed_memory: str = "1Gi"        # the managed store's memory limit
    embedded_claim: str = ""           # PVC of the embedded SQLite file; "" = emptyDir
    idle_timeout_seconds: int = 3600   # PENSIEVE_SESSION_IDLE_TIMEOUT (0: never)
    max_per_key: int = 1000            # PENSIEVE_MAX_SESSIONS_PER_KEY (0: unbounded)

    @property
    def mode(self) -> str:
        return "external" if self.secret_name else "managed" if self.managed else "embedded"


def parse_sessions(r, spec: Mapping[str, Any], replicas: int | None, errors: list[str]) -> SessionsSpec:
    """``r`` is spec._Reader (collects errors). Cross-field rules live here too."""
    p = "spec.sessions"
    s = r.obj(spec.get("sessions"), p)
    store = r.obj(s.get("store"), f"{p}.store")
    ref = r.obj(store.get("secretKeyRef"), f"{p}.store.secretKeyRef")
    emb = r.obj(s.get("embedded"), f"{p}.embedded")
    out = SessionsSpec(
        managed=r.bool(s, "managed", p, False),
        secret_name=r.str(ref, "name", f"{p}.store.secretKeyRef", required=bool(store)),
        secret_key=r.str(ref, "key", f"{p}.store.secretKeyRef", "url") or "url",
        managed_image=r.str(s, "managedImage", p, DEFAULT_MANAGED_IMAGE) or DEFAULT_MANAGED_IMAGE,
        managed_storage=r.str(s, "managedStorage", p, ""),
        managed_memory=r.str(s, "managedMemory", p, "1Gi") or "1Gi",
        embedded_claim=r.str(emb, "claimName", f"{p}.embedded"),
        idle_timeout_seconds=r.int(s, "idleTimeoutSeconds", p, 3600, lo=0),
        max_per_key=r.int(s, "maxPerKey", p, 1000, lo=0),
    )
    if out.secret_name and out.managed:
        errors.append(f"{p}: store and managed are exclusive: give a Redis URL Secret or let the operator run one")
    if out.embedded_claim and out.mode != "embedded":
        errors.append(f"{p}.embedded: only used without store or managed")
    if out.embedded_claim and replicas is not None and replicas > 1:
        errors.append(f"{p}.embedded.claimName: a SQLite file on one PVC serves one engine replica, got replicas "
                      f"{replicas}; use managed: true or a store for several")
    for key, value in (("managedStorage", out.managed_storage), ("managedMemory", out.managed_memory)):
        if value:
            try:
                parse_bytes(value)
            except ValueError:
                errors.append(f"{p}.{key}: not a quantity: {value!r}")
    return out


def store_name(name: str) -> str:
    return f"{name}-sessions"


def managed_url(name: str, namespace: str) -> str:
    return f"redis://{store_name(name)}.{namespace}.svc:{STORE_PORT}/0"


def session_env(name: str, namespace: str, s: SessionsSpec) -> dict[str, str]:
    """Plain engine settings (the ConfigMap). The external URL is not here: see secret_env."""
    env = {"PENSIEVE_SESSION_IDLE_TIMEOUT": str(s.idle_timeout_seconds),
           "PENSIEVE_MAX_SESSIONS_PER_KEY": str(s.max_per_key)}
    if s.mode == "managed":
        env["PENSIEVE_SESSION_STORE"] = managed_url(name, namespace)
    elif s.mode == "embedded":
        env["PENSIEVE_SESSION_STORE"] = f"sqlite://{SESSION_DIR}/sessions.sqlite3"
    return env


def secret_env(s: SessionsSpec) -> list[dict[str, Any]]:
    """Container env entries: the external store's URL straight from its Secret."""
    if s.mode != "external":
        return []
    return [{"name": "PENSIEVE_SESSION_STORE",
             "valueFrom": {"secretKeyRef": {"name": s.secret_name, "key": s.secret_key}}}]


def embedded_volume(s: SessionsSpec) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(volume, mount) holding the embedded SQLite file, or None."""
    if s.mode != "embedded":
        return None
    if s.embedded_claim:
        vol = {"name": "sessions", "persistentVolumeClaim": {"claimName": s.embedded_claim}}
    else:
        vol = {"name": "sessions", "emptyDir": {}}
    return vol, {"name": "sessions", "mountPath": SESSION_DIR}


def notes(replicas: int | None, autoscaling_max: int | None, s: SessionsSpec) -> list[str]:
    most = max(replicas or 0, autoscaling_max or 0)
    if s.mode == "embedded" and most > 1:
        return [f"sessions: up to {most} engine replicas with the embedded store: each engine keeps its own "
                "conversations, so a session moved to another engine (engine lost, scale change) is not found "
                "there; set spec.sessions.managed or spec.sessions.store to share them"]
    return []


def _max_memory(limit: str) -> int:
    """The store's maxmemory: 3/4 of its container limit (the rest: fork for rewrites, buffers)."""
    return parse_bytes(limit) * 3 // 4


def render_managed_store(name: str, s: SessionsSpec, meta: Callable[[str, str], dict[str, Any]],
                         selector: dict[str, str], pod_labels: dict[str, str]) -> list[dict[str, Any]]:
    """[StatefulSet, Service] of the managed store. ``meta(name, component)`` makes owned metadata."""
    n = store_name(name)
    container = {
        "name": "store",
        "image": s.managed_image,
        "args": ["--port", str(STORE_PORT), "--dir", "/data", "--appendonly", "yes", "--save", "",
                 "--maxmemory", str(_max_memory(s.managed_memory)), "--maxmemory-policy", "noeviction",
                 "--protected-mode", "no"],
        "ports": [{"name": "redis", "containerPort": STORE_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "100m", "memory": s.managed_memory},
                      "limits": {"memory": s.managed_memory}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": STORE_UID,
                            "runAsGroup": STORE_UID},
    }
    pod_spec: dict[str, Any] = {"containers": [container], "enableServiceLinks": False,
                                "securityContext": {"fsGroup": STORE_UID}}
    sts_spec: dict[str, Any] = {
        "serviceName": n,
        "replicas": 1,
        "selector": {"matchLabels": selector},
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if s.managed_storage:
        sts_spec["volumeClaimTemplates"] = [{
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": s.managed_storage}}}}]
    else:
        pod_spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(n, "sessions"), "spec": sts_spec}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta(n, "sessions"),
               "spec": {"selector": selector,
                        "ports": [{"name": "redis", "port": STORE_PORT, "targetPort": "redis", "protocol": "TCP"}]}}
    return [statefulset, service]
