"""Conditions and the status block of a PensieveDeployment."""
from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Iterable, Mapping


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | None, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {"type": type_, "status": "Unknown" if status is None else ("True" if status else "False"),
            "reason": reason, "message": message[:1024], "observedGeneration": generation or 0}


def merge_conditions(previous: Iterable[Mapping[str, Any]] | None, new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep lastTransitionTime where a condition's status did not change."""
    prev = {c.get("type"): c for c in previous or []}
    out = []
    for c in new:
        p = prev.get(c["type"])
        c = dict(c)
        c["lastTransitionTime"] = p.get("lastTransitionTime", now()) if p and p.get("status") == c["status"] else now()
        out.append(c)
    return out


def get_condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def conditions_equal(a: Iterable[Mapping[str, Any]] | None, b: Iterable[Mapping[str, Any]] | None) -> bool:
    def strip(cs):
        return sorted((c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                      for c in cs or [])
    return strip(a) == strip(b)


# The status block, assembled in one place ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why the spec was not applied (children left as they are): InvalidSpec | NoMatchingNodes | NodesTooSmall."""
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Observed:
    """The children whose state the status reports, as read (None = absent)."""
    engine: Mapping[str, Any] | None = None
    router: Mapping[str, Any] | None = None
    hpa: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class StatusInputs:
    generation: int
    replicas_wanted: int
    router_replicas_wanted: int
    base: Mapping[str, Any]  # observedGeneration, apiVersions, selector
    endpoint: str | None
    observed: Observed
    sizing: Mapping[str, Any] | None = None  # Sizing.to_status(), None when not computed
    refusal: Refusal | None = None
    conflicts: tuple[str, ...] = ()
    capacity_warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    model_cache: Mapping[str, Any] | None = None  # model_cache.model_cache_status(), when spec.model.cache is on


def _dep(d: Mapping[str, Any] | None) -> dict[str, int]:
    st = (d or {}).get("status") or {}
    out = {k: int(st.get(k) or 0) for k in ("replicas", "readyReplicas", "updatedReplicas", "availableReplicas")}
    out["observedGeneration"] = int(st.get("observedGeneration") or 0)
    out["generation"] = int(((d or {}).get("metadata") or {}).get("generation") or 0)
    out["specReplicas"] = int(((d or {}).get("spec") or {}).get("replicas") or 0)
    return out


def autoscaling_problem(hpa: Mapping[str, Any] | None) -> str | None:
    """The HPA's own word that it cannot act (AbleToScale or ScalingActive False), or None."""
    for c in ((hpa or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") in ("AbleToScale", "ScalingActive") and c.get("status") == "False":
            return f"the HorizontalPodAutoscaler cannot act: {c.get('type')}=False {c.get('reason', '')}: {c.get('message', '')}"
    return None


def _ready(i: StatusInputs, eng: dict[str, int], rtr: dict[str, int]) -> tuple[bool, str, str]:
    """Ready means serving: a ready engine pod behind an available router, whatever the spec's state."""
    if i.replicas_wanted == 0 and eng["readyReplicas"] == 0:
        return False, "ScaledToZero", "replicas is 0"
    if eng["readyReplicas"] == 0:
        return False, "EnginesNotReady", f"0/{eng['specReplicas'] or i.replicas_wanted} engine pods ready"
    if i.router_replicas_wanted > 0 and rtr["availableReplicas"] == 0:
        return False, "RouterNotReady", "the router has no available pod"
    return True, "Serving", f"{eng['readyReplicas']} engine pods ready; endpoint {i.endpoint}"


def _progressing(i: StatusInputs, eng: dict[str, int]) -> tuple[bool, str, str]:
    if i.refusal is not None:
        return False, i.refusal.reason, "spec not applied; children left as they are"
    want = i.replicas_wanted
    rolled = eng["observedGeneration"] >= eng["generation"] and eng["updatedReplicas"] >= want and eng["replicas"] == want
    done = rolled and eng["readyReplicas"] >= want
    reason = "RollingOut" if not rolled else ("WaitingForPods" if not done else "Complete")
    return not done, reason, f"{eng['updatedReplicas']} updated, {eng['readyReplicas']} ready of {want}"


def _degraded(i: StatusInputs) -> tuple[bool, str, str]:
    """The first problem that needs a person, most severe first; AsExpected otherwise."""
    if i.refusal is not None:
        return True, i.refusal.reason, i.refusal.message
    if i.conflicts:
        return True, "ChildConflict", "; ".join(i.conflicts)
    if i.model_cache and i.model_cache.get("phase") == "Failed":
        return True, "ModelDownloadFailed", i.model_cache.get("message", "the model download failed")
    hpa = autoscaling_problem(i.observed.hpa)
    if hpa:
        return True, "AutoscalingInactive", hpa
    if i.capacity_warnings:
        return True, "InsufficientCapacity", "; ".join(i.capacity_warnings)
    return False, "AsExpected", "; ".join(i.notes) or "spec applied"


def assemble_status(i: StatusInputs, prev_status: Mapping[str, Any] | None) -> dict[str, Any]:
    """The whole status of a PensieveDeployment from what one reconcile saw (its only writer)."""
    prev = prev_status or {}
    eng, rtr = _dep(i.observed.engine), _dep(i.observed.router)
    conds = [condition("Ready", *_ready(i, eng, rtr), i.generation),
             condition("Progressing", *_progressing(i, eng), i.generation),
             condition("Degraded", *_degraded(i), i.generation)]
    st: dict[str, Any] = dict(i.base)
    st.update({"replicas": eng["replicas"], "readyReplicas": eng["readyReplicas"],
               "replicaSummary": f"{eng['readyReplicas']}/{i.replicas_wanted}",
               "conditions": merge_conditions(prev.get("conditions"), conds)})
    endpoint = i.endpoint or prev.get("endpoint")
    if endpoint:
        st["endpoint"] = endpoint
    sizing = i.sizing if i.sizing is not None else prev.get("sizing")
    if sizing is not None:
        st["sizing"] = sizing
    if i.model_cache is not None:
        st["modelCache"] = dict(i.model_cache)
    return _without_empty_strings(st)


def _without_empty_strings(obj: Any) -> Any:
    """Empty status fields are left out (some API servers decode "" in custom resources as null)."""
    if isinstance(obj, dict):
        return {k: _without_empty_strings(v) for k, v in obj.items() if v != ""}
    if isinstance(obj, list):
        return [_without_empty_strings(v) for v in obj]
    return obj


def status_changed(prev: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    prev = prev or {}
    if any(prev.get(k) != v for k, v in new.items() if k != "conditions"):
        return True
    return not conditions_equal(prev.get("conditions"), new.get("conditions"))


def status_patch(prev: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge patch from `prev` to `new`: keys `new` no longer has are nulled (status.sizing.resize
    goes once a re-size is applied); kopf's own `status.kopf`, if any, is left alone."""
    def diff(p: Any, n: Any, top: bool) -> Any:
        if not (isinstance(p, Mapping) and isinstance(n, Mapping)):
            return n
        out = {k: diff(p.get(k), v, False) for k, v in n.items()}
        out.update({k: None for k in p if k not in n and not (top and k == "kopf")})
        return out
    return diff(prev or {}, new, True)
