"""A thin, generic REST client over the kubernetes package's ApiClient: one code path for
every kind and API version (the versions come from discovery at run time)."""
from __future__ import annotations

import json
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


def load_config() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None):
        self.api = api_client or load_config()

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            resp = self.api.call_api(path, method, query_params=query or [], header_params=headers, body=body,
                                     auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
        except client.ApiException as e:
            text = e.body.decode() if isinstance(e.body, bytes) else str(e.body)
            if e.status == 404:
                raise NotFound(path) from None
            if e.status == 409:
                raise Conflict(text) from None
            raise ApiError(e.status, text) from None
        data = resp.data
        return json.loads(data) if data else {}

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
