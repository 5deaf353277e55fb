"""kopf handler registration, and nothing else: the state lives in `memo.runtime`
(runtime.Runtime), the logic in plain functions (spec, sizing, render, reconcile, status).

No handler here needs a finalizer (no on.delete, no timers or daemons): a PensieveDeployment
deletes with the operator stopped, its children following by garbage collection.
"""
from __future__ import annotations

import logging
from typing import Any

import kopf

from . import GROUP, KIND, PLURAL, VERSION
from .kube import ApiError
from .render import MANAGED_BY
from .runtime import Runtime, configure_kopf
from .settings import Settings

MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
CHILDREN = ("deployments.apps", "services", "configmaps", "serviceaccounts", "rolebindings.rbac.authorization.k8s.io",
            "poddisruptionbudgets.policy", "horizontalpodautoscalers.autoscaling", "networkpolicies.networking.k8s.io",
            "jobs.batch", "persistentvolumeclaims")


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """In a pod: the service account; elsewhere: $KUBECONFIG, read at login time."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    configure_kopf(settings)
    s = Settings.from_env()
    try:
        memo.runtime = await Runtime.start(s)
    except Exception as e:  # no usable API versions, or the API server is away: retry
        raise kopf.TemporaryError(f"API discovery failed: {e}", delay=5)
    logger.info("pensieve operator: API versions %s; settings %s", memo.runtime.apis.to_status(), s)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "runtime", None) is not None:
        await memo.runtime.stop()


@kopf.on.probe(id="apiVersions")
def probe_api_versions(memo: kopf.Memo, **_: Any) -> dict[str, str]:
    rt = getattr(memo, "runtime", None)
    return rt.apis.to_status() if rt else {}


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def pensieve_deployment_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    # A refused spec is reported in the status and the handler returns: the next change is
    # acted on at once (a kopf retry delay would hold it back).
    try:
        await memo.runtime.reconcile_key(namespace, name)
    except ApiError as e:
        raise kopf.TemporaryError(f"API error while reconciling: {e}", delay=5)


def _owner_name(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return ref.get("name")
    return None


async def child_changed(event: dict, body: Any, namespace: str, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """A deleted or edited child, or a Deployment or HPA whose status moved, re-runs its owner's reconcile."""
    owner = _owner_name(body)
    if event.get("type") is None or not owner or getattr(memo, "runtime", None) is None:
        return  # the initial listing: on.resume covers it
    try:
        await memo.runtime.reconcile_key(namespace, owner)
    except ApiError as e:
        logger.warning("reconcile of %s/%s after a child event failed: %s", namespace, owner, e)


for _resource in CHILDREN:
    kopf.on.event(_resource, labels=MANAGED, id=f"child-{_resource}")(child_changed)
