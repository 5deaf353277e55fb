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
from .model_cache import fetch_progress, model_cache_status
from .render import Child, endpoint_url, model_cache_names, names, render_children, selector_string
from .settings import Settings
from .sizing import AppliedSize, compute_sizing, stable_sizing
from .spec import SpecError, parse_spec
from .status import Observed, Refusal, StatusInputs, assemble_status, get_condition

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
    """What one reconcile decided: the whole status to write, the events to post, what it changed.
    Spec refusals are in the status (Degraded) and need no retry: a spec change, a child's event or
    the next resync runs the reconcile again."""
    status: dict[str, Any]
    events: list[Event]
    actions: list[str]  # "created Deployment/x", "patched ...", "deleted ..."
    refusal: Refusal | None = None  # the spec was not applied, and why


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
    if desired["metadata"].get("annotations"):
        want_meta["annotations"] = desired["metadata"]["annotations"]
    have_meta = actual.get("metadata", {})
    if is_subset(want, actual) and is_subset(want_meta, have_meta):
        return None
    patch = _nulls_for_removed(want, actual)
    patch["metadata"] = want_meta
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
    if child.create_only:
        want = (child.body["metadata"].get("annotations") or {}).get(child.replace_on) if child.replace_on else None
        have = ((actual.get("metadata") or {}).get("annotations") or {}).get(child.replace_on) if child.replace_on else None
        if want != have:
            kube.delete(child.api, ns, child.name, uid=actual["metadata"]["uid"])
            actions.append(f"replaced {child.key}")
            return None
        return actual
    patch = drift_patch(child.body, actual)
    if patch is None:
        return actual
    try:
        updated = kube.merge_patch(child.api, ns, child.name, patch)
    except ApiError as e:
        if e.status == 422 and child.api.kind in ("PodDisruptionBudget", "Service", "RoleBinding", "Job"):
            # An immutable field changed (policy/v1beta1 selector, Service type details, roleRef,
            # a Job's template: a new model source): replace.
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


def _observe(kube: Kube, apis: ApiVersions, namespace: str, name: str, uid: str) -> Observed:
    """Read (never write) the children whose state the status reports; foreign objects count as absent."""
    n = names(name)

    def get(api: ApiRef, child: str) -> dict[str, Any] | None:
        obj = kube.get_or_none(api, namespace, child)
        return obj if obj is not None and owned_by(obj, uid) else None
    return Observed(engine=get(DEPLOYMENTS, n["engine"]), router=get(DEPLOYMENTS, n["router"]), hpa=get(apis.hpa, n["hpa"]))


def _events(prev_status: Mapping[str, Any], status: Mapping[str, Any], actions: list[str]) -> list[Event]:
    """A Normal event for what was changed; a Warning only when the Degraded condition changes."""
    events = [Event("Normal", "Reconciled", "; ".join(actions))] if actions else []
    before, now = get_condition(prev_status, "Degraded") or {}, get_condition(status, "Degraded") or {}
    if now.get("status") == "True" and (before.get("reason"), before.get("message")) != (now.get("reason"), now.get("message")):
        events.append(Event("Warning", now.get("reason", "Degraded"), now.get("message", "")))
    return events


def reconcile(kube: Kube, body: Mapping[str, Any], settings: Settings, apis: ApiVersions) -> Outcome:
    """One level-based pass over a PensieveDeployment: children brought to the spec (unless the spec
    is refused, when they are left as they are), and the status and events that follow."""
    meta = body["metadata"]
    namespace, name, uid = meta.get("namespace", "default"), meta["name"], meta["uid"]
    generation = meta.get("generation", 0)
    prev_status = {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"}
    raw_spec = body.get("spec") or {}
    inputs: dict[str, Any] = {
        "generation": generation, "base": {"observedGeneration": generation, "apiVersions": apis.to_status(),
                                           "selector": selector_string(name)},
        "replicas_wanted": raw_spec.get("replicas", 1) if isinstance(raw_spec.get("replicas", 1), int) else 1,
        "router_replicas_wanted": 1, "endpoint": None}
    actions: list[str] = []

    def finish(observed: Observed, **more: Any) -> Outcome:
        status = assemble_status(StatusInputs(observed=observed, **(inputs | more)), prev_status)
        return Outcome(status, _events(prev_status, status, actions), actions, more.get("refusal"))

    try:
        spec = parse_spec(body, default_engine_image=settings.engine_image, default_router_image=settings.router_image)
    except SpecError as e:
        return finish(_observe(kube, apis, namespace, name, uid), refusal=Refusal("InvalidSpec", f"invalid spec: {e}"))
    inputs.update(replicas_wanted=spec.replicas, router_replicas_wanted=spec.router.replicas, endpoint=endpoint_url(spec))

    observed = _observe(kube, apis, namespace, name, uid)
    fresh = compute_sizing(kube.list(NODES), spec, settings)
    sizing = stable_sizing(fresh, AppliedSize.from_deployment(observed.engine), spec)
    if not sizing.fits:
        return finish(observed, sizing=sizing.to_status(), refusal=Refusal(sizing.reason, sizing.message))

    children, absent, notes = render_children(spec, sizing, settings, apis, owner=body)
    conflicts: list[str] = []
    seen: dict[str, dict[str, Any] | None] = {}
    for child in children:
        seen[child.key] = ensure_child(kube, child, uid, actions, conflicts)
    for api, child_name in absent:
        ensure_absent(kube, api, spec.namespace, child_name, uid, actions)
    n = names(spec.name)
    observed = Observed(engine=seen.get(f"Deployment/{n['engine']}"), router=seen.get(f"Deployment/{n['router']}"),
                        hpa=seen.get(f"HorizontalPodAutoscaler/{n['hpa']}"))
    cache = None
    if spec.model_cache.enabled:
        mc = model_cache_names(spec)
        job = seen.get(f"Job/{mc['job']}")
        cache = model_cache_status(job, seen.get(f"PersistentVolumeClaim/{mc['claim']}"),
                                   fetch_progress(kube, spec.namespace, mc["job"]) if job else None)
    return finish(observed, sizing=sizing.to_status(), conflicts=tuple(conflicts),
                  capacity_warnings=tuple(sizing.warnings), notes=tuple(notes), model_cache=cache)
