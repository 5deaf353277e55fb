"""Level-based reconciliation of one PensieveDeployment: read the world, compare with
what the spec asks for, create what is missing, patch what drifted, delete optional
children that are switched off, never touch what this object does not own; then
compute the status. Synchronous and free of kopf, so tests can call it directly."""
from __future__ import annotations

import dataclasses
import logging
from decimal import Decimal
from typing import Any, Mapping

from . import GROUP, KIND, PLURAL, VERSION
from .discovery import ApiRef, ApiVersions
from .kube import ApiError, Conflict, Kube, NODES
from .quantity import parse_quantity
from .render import Child, endpoint_url, names, render_children, selector_string
from .settings import Settings
from .sizing import Sizing, compute_sizing
from .spec import PensieveSpec, SpecError, parse_spec
from .status import condition, merge_conditions

log = logging.getLogger("pensieve.operator")
PDEPS = ApiRef(GROUP, VERSION, PLURAL, KIND)
DEPLOYMENTS = ApiRef("apps", "v1", "deployments", "Deployment")

# Maps the operator owns entirely: keys it no longer renders are removed.
EXACT_MAPS = {("data",), ("spec", "template", "spec", "nodeSelector"), ("spec", "selector")}


@dataclasses.dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass
class Outcome:
    status: dict[str, Any]
    events: list[Event]
    actions: list[str]  # "created Deployment/x", "patched ...", "deleted ..."


# Comparison -----------------------------------------------------------------------------------------
def _scalar_equal(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if b is None and a in (False, 0, ""):
        return True  # the API server omits zero values (omitempty)
    if isinstance(a, str) and isinstance(b, str):
        try:
            return parse_quantity(a) == parse_quantity(b)
        except (ValueError, ArithmeticError):
            return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return Decimal(str(a)) == Decimal(str(b))
    return False


def is_subset(desired: Any, actual: Any, path: tuple[str, ...] = ()) -> bool:
    """Every field the operator renders has the rendered value (server defaults are ignored)."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return False
        if path in EXACT_MAPS and set(desired) != set(actual):
            return False
        return all(is_subset(v, actual.get(k), path + (k,)) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(actual, list) and len(desired) == len(actual) and \
            all(is_subset(d, a, path) for d, a in zip(desired, actual))
    return _scalar_equal(desired, actual)


def _nulls_for_removed(desired: Any, actual: Any, path: tuple[str, ...] = ()) -> Any:
    """Merge patch of `desired`, with null for keys of exact maps that are no longer rendered."""
    if isinstance(desired, Mapping):
        out = {k: _nulls_for_removed(v, (actual or {}).get(k) if isinstance(actual, Mapping) else None, path + (k,))
               for k, v in desired.items()}
        if path in EXACT_MAPS and isinstance(actual, Mapping):
            out.update({k: None for k in actual if k not in desired})
        return out
    return desired


def drift_patch(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings `actual` to `desired`, or None when nothing drifted."""
    want = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}
    want_meta = {"labels": desired["metadata"].get("labels", {})}
    have_meta = actual.get("metadata", {})
    if is_subset(want, actual) and is_subset(want_meta, have_meta):
        return None
    patch = _nulls_for_removed(want, actual)
    patch["metadata"] = {"labels": want_meta["labels"]}
    return patch


def owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    return any(r.get("uid") == owner_uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


# Reconcile ------------------------------------------------------------------------------------------
def ensure_child(kube: Kube, child: Child, owner_uid: str, actions: list[str], conflicts: list[str]) -> dict[str, Any] | None:
    ns = child.body["metadata"]["namespace"]
    actual = kube.get_or_none(child.api, ns, child.name)
    if actual is None:
        try:
            created = kube.create(child.api, ns, child.body)
        except Conflict:  # created meanwhile (e.g. a concurrent reconcile); next pass compares it
            return kube.get_or_none(child.api, ns, child.name)
        actions.append(f"created {child.key}")
        return created
    if not owned_by(actual, owner_uid):
        conflicts.append(f"{child.key} exists and is not owned by this {KIND}; left untouched")
        return actual
    patch = drift_patch(child.body, actual)
    if patch is None:
        return actual
    try:
        updated = kube.merge_patch(child.api, ns, child.name, patch)
    except ApiError as e:
        if e.status == 422 and child.api.kind in ("PodDisruptionBudget", "Service"):
            # An immutable field changed (policy/v1beta1 selector, Service type details): replace.
            kube.delete(child.api, ns, child.name, uid=actual["metadata"]["uid"])
            actions.append(f"replaced {child.key}")
            return None
        raise
    actions.append(f"patched {child.key}")
    return updated


def ensure_absent(kube: Kube, api: ApiRef, namespace: str, name: str, owner_uid: str, actions: list[str]) -> None:
    actual = kube.get_or_none(api, namespace, name)
    if actual is not None and owned_by(actual, owner_uid):
        kube.delete(api, namespace, name, uid=actual["metadata"]["uid"])
        actions.append(f"deleted {api.kind}/{name}")


def reconcile(kube: Kube, body: Mapping[str, Any], settings: Settings, apis: ApiVersions) -> Outcome:
    meta = body["metadata"]
    generation = meta.get("generation", 0)
    prev_status = body.get("status") or {}
    events: list[Event] = []
    actions: list[str] = []
    base_status: dict[str, Any] = {"observedGeneration": generation, "apiVersions": apis.to_status(),
                                   "selector": selector_string(meta["name"])}

    def refused(reason: str, message: str, sizing: Sizing | None = None) -> Outcome:
        conds = [condition("Ready", False, reason, message, generation),
                 condition("Progressing", False, reason, "spec not applied; children left as they are", generation),
                 condition("Degraded", True, reason, message, generation)]
        st = dict(prev_status)
        st.pop("kopf", None)
        st.update(base_status)
        st["conditions"] = merge_conditions(prev_status.get("conditions"), conds)
        if sizing is not None:
            st["sizing"] = sizing.to_status()
        events.append(Event("Warning", reason, message))
        return Outcome(st, events, actions)

    try:
        spec = parse_spec(body, default_engine_image=settings.engine_image, default_router_image=settings.router_image)
    except SpecError as e:
        return refused("InvalidSpec", f"invalid spec: {e}")

    nodes = kube.list(NODES)
    sizing = compute_sizing(nodes, spec, settings)
    if not sizing.fits:
        return refused(sizing.reason, sizing.message, sizing)

    children, absent, notes = render_children(spec, sizing, settings, apis, owner=body)
    conflicts: list[str] = []
    observed: dict[str, dict[str, Any] | None] = {}
    for child in children:
        observed[child.key] = ensure_child(kube, child, meta["uid"], actions, conflicts)
    for api, name in absent:
        ensure_absent(kube, api, spec.namespace, name, meta["uid"], actions)
    if actions:
        events.append(Event("Normal", "Reconciled", "; ".join(actions)))
    return Outcome(compute_status(spec, sizing, observed, prev_status, generation, base_status, conflicts, notes),
                   events, actions)


def _dep_status(d: Mapping[str, Any] | None) -> dict[str, int]:
    st = (d or {}).get("status") or {}
    return {k: int(st.get(k) or 0) for k in ("replicas", "readyReplicas", "updatedReplicas", "availableReplicas")} | {
        "observedGeneration": int(st.get("observedGeneration") or 0),
        "generation": int(((d or {}).get("metadata") or {}).get("generation") or 0)}


def compute_status(spec: PensieveSpec, sizing: Sizing, observed: Mapping[str, Any], prev_status: Mapping[str, Any],
                   generation: int, base_status: Mapping[str, Any], conflicts: list[str], notes: list[str]) -> dict[str, Any]:
    n = names(spec.name)
    eng = _dep_status(observed.get(f"Deployment/{n['engine']}"))
    rtr = _dep_status(observed.get(f"Deployment/{n['router']}"))
    want = spec.replicas
    rolled = eng["observedGeneration"] >= eng["generation"] and eng["updatedReplicas"] >= want and eng["replicas"] == want
    engines_ready = eng["readyReplicas"] >= want and rolled
    router_ready = spec.router.replicas == 0 or rtr["availableReplicas"] >= 1
    if want == 0:
        ready = (False, "ScaledToZero", "replicas is 0")
    elif engines_ready and router_ready:
        ready = (True, "AllReplicasReady", f"{eng['readyReplicas']}/{want} engine pods ready; endpoint {endpoint_url(spec)}")
    elif not engines_ready:
        ready = (False, "EnginesNotReady", f"{eng['readyReplicas']}/{want} engine pods ready")
    else:
        ready = (False, "RouterNotReady", "the router has no available pod")
    progressing = (not rolled or not engines_ready, "RollingOut" if not rolled else ("WaitingForPods" if not engines_ready else "Complete"),
                   f"{eng['updatedReplicas']} updated, {eng['readyReplicas']} ready of {want}")
    problems = conflicts + list(sizing.warnings)
    if conflicts:
        degraded = (True, "ChildConflict", "; ".join(problems))
    elif sizing.warnings:
        degraded = (True, "InsufficientCapacity", "; ".join(problems))
    else:
        degraded = (False, "AsExpected", "; ".join(notes) or "spec applied")
    conds = [condition("Ready", *ready, generation), condition("Progressing", *progressing, generation),
             condition("Degraded", *degraded, generation)]
    st = dict(base_status)
    st.update({
        "replicas": eng["replicas"],
        "readyReplicas": eng["readyReplicas"],
        "replicaSummary": f"{eng['readyReplicas']}/{want}",
        "endpoint": endpoint_url(spec),
        "sizing": sizing.to_status(),
        "conditions": merge_conditions(prev_status.get("conditions"), conds),
    })
    return st
