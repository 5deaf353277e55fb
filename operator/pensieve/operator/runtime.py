"""The operator's running state and loops, kept in kopf's `memo` by handlers.py.

Owns: the settings, the API client, the API versions (re-discovered on every resync, so a CRD
installed later, such as ServiceMonitor's, is used from the next resync on), one lock per
PensieveDeployment (triggers that arrive while a reconcile runs are coalesced into one more
pass), and two operator-wide loops: the resync of every PensieveDeployment and the
pod-deletion-cost refresh.

The loops are operator tasks, not kopf timers: a kopf timer or daemon makes kopf put a finalizer
on every object, and a deletion then hangs while the operator is away. Nothing here needs to run
when a PensieveDeployment is deleted (its children go by garbage collection), so no finalizer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable

import kopf

from .deletion_cost import sync_deletion_costs
from .discovery import ApiVersions
from .kube import ApiError, Kube, NotFound
from .reconcile import PDEPS, Outcome, reconcile
from .settings import Settings
from .status import status_patch, status_changed

log = logging.getLogger("pensieve.operator")


@dataclasses.dataclass
class _KeyState:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    pending: bool = False


@dataclasses.dataclass
class Runtime:
    settings: Settings
    kube: Kube
    apis: ApiVersions
    keys: dict[tuple[str, str], _KeyState] = dataclasses.field(default_factory=dict)
    tasks: list[asyncio.Task] = dataclasses.field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings) -> "Runtime":
        kube = Kube()
        apis = await asyncio.to_thread(kube.discover)
        rt = cls(settings, kube, apis)
        rt.tasks = [asyncio.create_task(rt._every(settings.resync_seconds, rt.resync_all), name="pensieve-resync"),
                    asyncio.create_task(rt._every(settings.deletion_cost_seconds, rt.refresh_deletion_costs),
                                        name="pensieve-deletion-cost")]
        return rt

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # One object ----------------------------------------------------------------------------------
    async def reconcile_key(self, namespace: str, name: str) -> Outcome | None:
        """Reconcile one PensieveDeployment; a trigger arriving meanwhile runs one more pass after it."""
        st = self.keys.setdefault((namespace, name), _KeyState())
        if st.lock.locked():
            st.pending = True
            return None
        outcome = None
        async with st.lock:
            while True:
                st.pending = False
                outcome = await asyncio.to_thread(self._reconcile_once, namespace, name)
                if not st.pending:
                    break
        return outcome

    def _reconcile_once(self, namespace: str, name: str) -> Outcome | None:
        try:
            body = self.kube.get(PDEPS, namespace, name)
        except NotFound:
            self.keys.pop((namespace, name), None)
            return None
        if body["metadata"].get("deletionTimestamp"):
            return None  # children go with it (ownerReferences)
        outcome = reconcile(self.kube, body, self.settings, self.apis)
        prev = body.get("status") or {}
        if status_changed(prev, outcome.status):
            self.kube.merge_patch(PDEPS, namespace, name, {"status": status_patch(prev, outcome.status)}, sub="status")
        for ev in outcome.events:
            (log.warning if ev.type == "Warning" else log.info)("%s/%s %s: %s", namespace, name, ev.reason, ev.message)
            try:
                self.kube.post_event(body, ev.type, ev.reason, ev.message, component="pensieve-operator")
            except ApiError as e:  # an event is worth less than the reconcile that made it
                log.warning("event %s on %s/%s not posted: %s", ev.reason, namespace, name, e)
        return outcome

    # Operator-wide loops -------------------------------------------------------------------------
    async def _every(self, seconds: float, fn: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (a loop must outlive one bad round)
                log.warning("%s failed: %s", getattr(fn, "__name__", fn), e)

    async def _list_pdeps(self) -> list[tuple[str, str]]:
        spaces = self.settings.namespaces or (None,)
        items: list[dict[str, Any]] = []
        for ns in spaces:
            items += await asyncio.to_thread(self.kube.list, PDEPS, ns)
        return [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in items]

    async def resync_all(self) -> None:
        """Re-discover the served API versions, then reconcile every PensieveDeployment (nodes,
        HPA conditions and new CRDs change without an event on the object)."""
        try:
            apis = await asyncio.to_thread(self.kube.discover)
            if apis != self.apis:
                log.info("API versions changed: %s", apis.to_status())
                self.apis = apis
        except Exception as e:  # noqa: BLE001  (keep the last good versions)
            log.warning("API re-discovery failed, keeping %s: %s", self.apis.to_status(), e)
        for ns, name in await self._list_pdeps():
            try:
                await self.reconcile_key(ns, name)
            except ApiError as e:
                log.warning("resync of %s/%s failed: %s", ns, name, e)

    async def refresh_deletion_costs(self) -> None:
        """Engine pods' controller.kubernetes.io/pod-deletion-cost := their live sessions."""
        for ns, name in await self._list_pdeps():
            try:
                patched = await asyncio.to_thread(sync_deletion_costs, self.kube, ns, name,
                                                  self.settings.deletion_cost_timeout_seconds)
            except ApiError as e:
                log.warning("pod-deletion-cost refresh of %s/%s failed: %s", ns, name, e)
                continue
            if patched:
                log.debug("pod-deletion-cost %s/%s: %s", ns, name,
                          {k: v["metadata"]["annotations"] for k, v in patched.items()})


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's own settings for this operator (one replica: no peering)."""
    settings.peering.standalone = True  # one replica, Deployment strategy Recreate
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pensieve.ai")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="pensieve.ai", key="last-handled-configuration")
