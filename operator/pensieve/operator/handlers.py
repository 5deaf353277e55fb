"""kopf handler registration, and nothing else: the logic lives in plain functions
(spec, sizing, render, reconcile, status)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import kopf

from . import GROUP, KIND, PLURAL, VERSION
from .deletion_cost import sync_deletion_costs
from .kube import ApiError, Kube, NotFound
from .reconcile import PDEPS, Outcome, reconcile
from .render import MANAGED_BY
from .settings import Settings
from .status import conditions_equal, get_condition

MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
# Timers are registered at import time, so their intervals come from the settings read here.
_IMPORT_SETTINGS = Settings.from_env()
RESYNC_SECONDS = _IMPORT_SETTINGS.resync_seconds
DELETION_COST_SECONDS = _IMPORT_SETTINGS.deletion_cost_seconds


@dataclasses.dataclass
class _KeyState:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    pending: bool = False


_states: dict[tuple[str, str], _KeyState] = {}
_runtime: dict[str, Any] = {}


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """In a pod: the service account; elsewhere: $KUBECONFIG, read at login time."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    s = Settings.from_env()
    settings.peering.standalone = True  # one replica, Deployment strategy Recreate
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pensieve.ai")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="pensieve.ai", key="last-handled-configuration")
    kube = Kube()
    try:
        apis = await asyncio.to_thread(kube.discover)
    except Exception as e:  # no usable API versions, or the API server is away: retry
        raise kopf.TemporaryError(f"API discovery failed: {e}", delay=5)
    _states.clear()
    _runtime.update(settings=s, kube=kube, apis=apis)
    logger.info("pensieve operator: API versions %s; settings %s", apis.to_status(), s)


@kopf.on.probe(id="apiVersions")
def probe_api_versions(**_: Any) -> dict[str, str]:
    apis = _runtime.get("apis")
    return apis.to_status() if apis else {}


async def _reconcile_key(namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter) -> Outcome | None:
    """Run the reconciler for one object, coalescing triggers that arrive while it runs."""
    st = _states.setdefault((namespace, name), _KeyState())
    if st.lock.locked():
        st.pending = True
        return None
    outcome = None
    async with st.lock:
        while True:
            st.pending = False
            outcome = await asyncio.to_thread(_reconcile_once, namespace, name)
            if outcome is not None:
                _post_events(outcome, logger)
            if not st.pending:
                break
    return outcome


def _reconcile_once(namespace: str, name: str) -> Outcome | None:
    kube: Kube = _runtime["kube"]
    try:
        body = kube.get(PDEPS, namespace, name)
    except NotFound:
        return None
    if body["metadata"].get("deletionTimestamp"):
        return None  # children go with it (ownerReferences)
    outcome = reconcile(kube, body, _runtime["settings"], _runtime["apis"])
    outcome.status.pop("kopf", None)
    outcome.status = _without_empty_strings(outcome.status)
    prev = body.get("status") or {}
    changed = {k: v for k, v in outcome.status.items() if k != "conditions" and prev.get(k) != v}
    if changed or not conditions_equal(prev.get("conditions"), outcome.status.get("conditions")):
        kube.merge_patch(PDEPS, namespace, name, {"status": outcome.status}, sub="status")
    prev_degraded = get_condition(prev, "Degraded") or {}
    now_degraded = get_condition(outcome.status, "Degraded") or {}
    outcome.body = body  # type: ignore[attr-defined]
    # Warnings only when the Degraded condition changes, not on every resync.
    if (prev_degraded.get("reason"), prev_degraded.get("message")) == (now_degraded.get("reason"), now_degraded.get("message")):
        outcome.events = [e for e in outcome.events if e.type != "Warning"]
    elif now_degraded.get("status") == "True" and not any(e.type == "Warning" for e in outcome.events):
        from .reconcile import Event
        outcome.events.append(Event("Warning", now_degraded.get("reason", "Degraded"), now_degraded.get("message", "")))
    return outcome


def _without_empty_strings(obj: Any) -> Any:
    """Status fields that are empty are left out (some API servers decode "" in custom resources as null)."""
    if isinstance(obj, dict):
        return {k: _without_empty_strings(v) for k, v in obj.items() if v != ""}
    if isinstance(obj, list):
        return [_without_empty_strings(v) for v in obj]
    return obj


def _post_events(outcome: Outcome, logger: Any) -> None:
    body = getattr(outcome, "body", None)
    for ev in outcome.events:
        (logger.warning if ev.type == "Warning" else logger.info)("%s: %s", ev.reason, ev.message)
        if body is not None:
            kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message[:1000])


async def _handle(namespace: str, name: str, logger: Any) -> None:
    try:
        outcome = await _reconcile_key(namespace, name, logger)
    except ApiError as e:
        raise kopf.TemporaryError(f"API error while reconciling: {e}", delay=5)
    if outcome is None:
        return
    degraded = get_condition(outcome.status, "Degraded") or {}
    if degraded.get("status") == "True" and degraded.get("reason") == "InvalidSpec":
        # Nothing to retry until the spec changes.
        raise kopf.PermanentError(degraded.get("message", "invalid spec"))
    if degraded.get("status") == "True" and degraded.get("reason") in ("NoMatchingNodes", "NodesTooSmall"):
        raise kopf.TemporaryError(degraded.get("message", "does not fit"), delay=RESYNC_SECONDS)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def pensieve_deployment_changed(namespace: str, name: str, logger: Any, **_: Any) -> None:
    await _handle(namespace, name, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS, idle=None)
async def pensieve_deployment_resync(namespace: str, name: str, logger: Any, **_: Any) -> None:
    try:
        await _reconcile_key(namespace, name, logger)
    except ApiError as e:
        logger.warning("resync failed: %s", e)


@kopf.timer(GROUP, VERSION, PLURAL, id="pod-deletion-cost", interval=DELETION_COST_SECONDS,
            initial_delay=DELETION_COST_SECONDS, idle=None)
async def engine_pod_deletion_cost(namespace: str, name: str, logger: Any, **_: Any) -> None:
    """Engine pods' controller.kubernetes.io/pod-deletion-cost := their live sessions."""
    if "kube" not in _runtime:
        return
    s: Settings = _runtime["settings"]
    try:
        patched = await asyncio.to_thread(sync_deletion_costs, _runtime["kube"], namespace, name,
                                          s.deletion_cost_timeout_seconds)
    except ApiError as e:
        logger.warning("pod-deletion-cost refresh failed: %s", e)
        return
    if patched:
        logger.debug("pod-deletion-cost: %s", {k: v["metadata"]["annotations"] for k, v in patched.items()})


def _owner_name(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return ref.get("name")
    return None


async def _child_event(event: dict, body: Any, namespace: str, logger: Any) -> None:
    if event.get("type") is None:  # the initial listing: on.resume covers it
        return
    owner = _owner_name(body)
    if owner and "kube" in _runtime:
        try:
            await _reconcile_key(namespace, owner, logger)
        except ApiError as e:
            logger.warning("reconcile of %s/%s after a child event failed: %s", namespace, owner, e)


# A deleted or edited child, or a Deployment whose status moved, re-runs its owner's reconcile.
for _resource in ("deployments.apps", "services", "configmaps", "serviceaccounts",
                  "roles.rbac.authorization.k8s.io", "rolebindings.rbac.authorization.k8s.io",
                  "poddisruptionbudgets.policy", "horizontalpodautoscalers.autoscaling"):
    async def _on_child(event: dict, body: Any, namespace: str, logger: Any, **_: Any) -> None:
        await _child_event(event, body, namespace, logger)
    kopf.on.event(_resource, labels=MANAGED, id=f"child-{_resource}")(_on_child)
