"""Discovery from the engine Service's EndpointSlices: a LIST then a WATCH
(label ``kubernetes.io/service-name=<service>``), with the official synchronous
``kubernetes`` client's ``watch.Watch`` in a background thread that hands each new
view to the event loop.

* API version: ``discovery.k8s.io/v1`` where served, else ``v1beta1`` (Kubernetes
  1.20 serves only v1beta1). Objects are handled as plain JSON, which is the same
  for both versions in what is read here (addresses, conditions.ready, ports,
  targetRef).
* Ready: an endpoint counts when ``conditions.ready`` is true. A missing value
  means "unknown", which the API documents should be read as ready; the
  endpoint-slice controller always sets it. Terminating pods are published with
  ready false, so a draining engine leaves the set.
* A Service may have several slices (address families, more than 100 endpoints):
  the view is their union.
* Watch expiry (410 Gone, or an ERROR event with code 410): LIST again, which
  replaces the whole view. Any other failure: back off and LIST again. A watch that
  simply times out resumes from the last resourceVersion seen.

``SliceState`` is the pure part (events in, view out) that the unit tests feed with
recorded events; the kubernetes package is imported only when the watcher starts.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from .endpoints import normalize

log = logging.getLogger("pensieve.router")

SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
View = dict[str, bool]
OnView = Callable[[View, dict[str, dict]], None]


def default_namespace() -> str:
    try:
        with open(SA_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


class SliceState:
    """Folds EndpointSlice objects (plain JSON dicts) into address -> ready."""

    def __init__(self, engine_port: int | None = None):
        self.engine_port = engine_port or None
        self.slices: dict[str, dict] = {}

    def reset(self, items: list[dict]) -> None:
        self.slices = {s["metadata"]["name"]: s for s in items}

    def apply(self, event_type: str, obj: dict) -> None:
        name = obj.get("metadata", {}).get("name")
        if not name:
            return
        if event_type in ("ADDED", "MODIFIED"):
            self.slices[name] = obj
        elif event_type == "DELETED":
            self.slices.pop(name, None)

    def port_of(self, s: dict) -> int:
        ports = [p for p in s.get("ports") or [] if p.get("port")]
        if self.engine_port and any(p["port"] == self.engine_port for p in ports):
            return self.engine_port
        named = [p for p in ports if p.get("name") == "http"]
        if named:
            return named[0]["port"]
        if len(ports) == 1:
            return ports[0]["port"]
        return self.engine_port or 8000

    def view(self) -> tuple[View, dict[str, dict]]:
        view: View = {}
        meta: dict[str, dict] = {}
        for s in self.slices.values():
            if s.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
                continue
            port = self.port_of(s)
            for ep in s.get("endpoints") or []:
                ready = (ep.get("conditions") or {}).get("ready")
                ready = True if ready is None else bool(ready)
                for a in ep.get("addresses") or []:
                    addr = normalize(f"[{a}]" if ":" in a else a, port)
                    view[addr] = view.get(addr, False) or ready
                    ref = ep.get("targetRef") or {}
                    if ref.get("name"):
                        meta[addr] = {"pod": ref["name"]}
        return view, meta


class EndpointSliceWatcher:
    def __init__(self, namespace: str, service: str, on_view: OnView, *, engine_port: int | None = None,
                 api_client: Any = None, kubeconfig: str | None = None, watch_timeout: int = 300,
                 backoff: float = 1.0):
        self.namespace = namespace
        self.service = service
        self.on_view = on_view
        self.state = SliceState(engine_port)
        self.api_client = api_client
        self.kubeconfig = kubeconfig
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.version: str | None = None
        self._stop = threading.Event()
        self._watch = None
        self.thread = threading.Thread(target=self.run, name="endpointslice-watch", daemon=True)
        self.relists = 0

    # -- plumbing -----------------------------------------------------------------------------
    def _client(self):
        if self.api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config(config_file=self.kubeconfig or os.environ.get("KUBECONFIG") or None)
            self.api_client = client.ApiClient()
        return self.api_client

    def _path(self, version: str) -> str:
        return f"/apis/discovery.k8s.io/{version}/namespaces/{self.namespace}/endpointslices"

    def _get(self, version: str, *, watch: bool = False, resource_version: str | None = None,
             timeout_seconds: int | None = None, allow_watch_bookmarks: bool | None = None,
             _preload_content: bool = True, _request_timeout: Any = None):
        """GET the slices (a list, or with watch=True a stream); the response object
        is what ``watch.Watch().stream`` reads lines from."""
        api = self._client()
        query: list[tuple[str, Any]] = [("labelSelector", f"kubernetes.io/service-name={self.service}")]
        if watch:
            query.append(("watch", "true"))
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if timeout_seconds:
            query.append(("timeoutSeconds", timeout_seconds))
        if allow_watch_bookmarks:
            query.append(("allowWatchBookmarks", "true"))
        method, url, headers, body, post = api.param_serialize(
            method="GET", resource_path=self._path(version), query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        resp = api.call_api(method, url, header_params=headers, body=body, post_params=post,
                            _request_timeout=_request_timeout)
        return resp.response  # urllib3 response, not yet read

    def pick_version(self) -> str:
        for version in ("v1", "v1beta1"):
            r = self._get(version, _request_timeout=10)
            try:
                data = r.data  # read it all, so the connection can be reused
                if r.status == 200:
                    return version
                if r.status != 404:
                    raise RuntimeError(f"listing EndpointSlices ({version}): HTTP {r.status} {data[:300]!r}")
            finally:
                r.release_conn()
        raise RuntimeError("the API server serves neither discovery.k8s.io/v1 nor v1beta1 EndpointSlices")

    def _list(self) -> str:
        import json

        assert self.version is not None
        r = self._get(self.version, _request_timeout=30)
        try:
            if r.status != 200:
                raise RuntimeError(f"listing EndpointSlices: HTTP {r.status} {r.data[:300]!r}")
            doc = json.loads(r.data)
        finally:
            r.release_conn()
        self.state.reset(doc.get("items") or [])
        self._publish()
        return doc["metadata"]["resourceVersion"]

    def _publish(self) -> None:
        view, meta = self.state.view()
        self.on_view(view, meta)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        while not self._stop.is_set():
            try:
                if self.version is None:
                    self.version = self.pick_version()
                    log.info("watching EndpointSlices %s/%s (discovery.k8s.io/%s)", self.namespace, self.service,
                             self.version)
                rv = self._list()
                self.relists += 1
                while not self._stop.is_set():
                    w = self._watch = watch.Watch(return_type=dict)
                    fn = lambda **kw: self._get(self.version, **kw)  # noqa: E731
                    for ev in w.stream(fn, resource_version=rv, timeout_seconds=self.watch_timeout,
                                       allow_watch_bookmarks=True, deserialize=False,
                                       _request_timeout=(10, self.watch_timeout + 30)):
                        obj = ev.get("object") or {}
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if ev["type"] == "BOOKMARK":
                            continue
                        self.state.apply(ev["type"], obj)
                        self._publish()
                        if self._stop.is_set():
                            break
                    # A watch that ended by its timeout resumes from rv.
            except ApiException as e:
                if self._stop.is_set():
                    break
                if e.status == 410:
                    log.info("EndpointSlice watch expired (410); listing again")
                    continue
                log.warning("EndpointSlice watch failed (%s); listing again in %.0fs", e, self.backoff)
                self._stop.wait(self.backoff)
            except Exception as e:  # noqa: BLE001 - the API server may blink; keep going
                if self._stop.is_set():
                    break
                log.warning("EndpointSlice watch failed (%r); listing again in %.0fs", e, self.backoff)
                self._stop.wait(self.backoff)

    def start(self) -> "EndpointSliceWatcher":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self.thread.join(5)
