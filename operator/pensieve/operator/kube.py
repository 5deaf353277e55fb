"""A thin, generic REST client over the kubernetes package's ApiClient: one code path for
every kind and API version (the versions come from discovery at run time)."""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

from kubernetes import client, config

from .discovery import ApiRef, ApiVersions, choose_versions


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"{status}: {body[:500]}")
        self.status = status
        self.body = body


def raw_request(api: client.ApiClient, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", query: list[tuple[str, Any]] | None = None,
                raw: bool = False) -> Any:
    """One REST call with the client's configuration and credentials; JSON in, JSON out
    (`raw`: the response text, e.g. a pod's log)."""
    _m, url, headers, data, post = api.param_serialize(
        method=method, resource_path=path, query_params=query or [],
        header_params={"Accept": "*/*" if raw else "application/json", "Content-Type": content_type},
        body=body, auth_settings=["BearerToken"])
    resp = api.call_api(_m, url, header_params=headers, body=data, post_params=post)
    data_in = resp.read()
    text = data_in.decode() if isinstance(data_in, bytes) else (data_in or "")
    if resp.status == 404:
        raise NotFound(path)
    if resp.status == 409:
        raise Conflict(text)
    if not 200 <= resp.status < 300:
        raise ApiError(resp.status, text)
    if raw:
        return text
    return json.loads(text) if text else {}


def load_config() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # KUBECONFIG is read now, not when the kubernetes package was imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    return client.ApiClient()


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None):
        self.api = api_client or load_config()

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        return raw_request(self.api, method, path, body, content_type=content_type, query=query)

    def text(self, path: str, query: list[tuple[str, Any]] | None = None) -> str:
        return raw_request(self.api, "GET", path, query=query, raw=True)

    # Objects -----------------------------------------------------------------------------------------
    def get(self, api: ApiRef, namespace: str | None, name: str) -> dict[str, Any]:
        return self.request("GET", api.path(namespace, name))

    def get_or_none(self, api: ApiRef, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.get(api, namespace, name)
        except NotFound:
            return None

    def list(self, api: ApiRef, namespace: str | None = None, label_selector: str | None = None) -> list[dict[str, Any]]:
        q = [("labelSelector", label_selector)] if label_selector else []
        return self.request("GET", api.path(namespace), query=q).get("items", [])

    def create(self, api: ApiRef, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", api.path(namespace), body)

    def merge_patch(self, api: ApiRef, namespace: str | None, name: str, patch: dict[str, Any],
                    sub: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", api.path(namespace, name, sub), patch, content_type="application/merge-patch+json")

    def delete(self, api: ApiRef, namespace: str | None, name: str, *, uid: str | None = None) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", api.path(namespace, name), body)
        except NotFound:
            pass

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str, *, component: str) -> None:
        """A core/v1 Event about `obj` (posted by the operator's client, from handlers and loops alike)."""
        meta = obj["metadata"]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta.get("uid")},
                "type": type_, "reason": reason, "message": message[:1000], "count": 1,
                "firstTimestamp": now, "lastTimestamp": now, "source": {"component": component}}
        self.create(EVENTS, meta["namespace"], body)

    # Discovery ---------------------------------------------------------------------------------------
    def served(self, group: str, version: str) -> list[str] | None:
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        try:
            return [r["name"] for r in self.request("GET", path).get("resources", [])]
        except (NotFound, ApiError):
            return None

    def discover(self) -> ApiVersions:
        return choose_versions(self.served)


NODES = ApiRef("", "v1", "nodes", "Node", namespaced=False)
EVENTS = ApiRef("", "v1", "events", "Event")
