"""The Helm chart, rendered and installed by the real Helm engine (helm-sdkpy), installs
what manifests/ installs."""
from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from conftest import ROOT, wait_for
from pensieve.operator.kube import raw_request

CHART = ROOT / "charts" / "pensieve-operator"
PATHS = {"ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts/{name}",
         "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}",
         "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}",
         "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
         "Namespace": "/api/v1/namespaces/{name}"}


def manifests_objects():
    objs = []
    for f in ("namespace.yaml", "rbac.yaml", "operator.yaml"):
        objs += [d for d in yaml.safe_load_all((ROOT / "manifests" / f).read_text()) if d]
    return objs


def key(o):
    return o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")


def test_chart_installs_what_manifests_install(control_plane, crd, api):
    helm = pytest.importorskip("helm_sdkpy", reason="helm-sdkpy comes from requirements/py312-only.txt")
    cfg = helm.Configuration(namespace="pensieve-system", kubeconfig=str(control_plane.kubeconfig))
    result = asyncio.run(helm.Install(cfg).run("pensieve-operator", str(CHART), create_namespace=True, wait=False, timeout=120))
    text = json.dumps(result)
    manifest = result.get("manifest") if isinstance(result, dict) else None
    assert manifest, f"no rendered manifest in Helm's result: {text[:500]}"
    rendered = [d for d in yaml.safe_load_all(manifest) if d]
    want = manifests_objects()
    # The chart leaves the namespace to Helm (create_namespace), as charts do.
    assert {key(o) for o in rendered} == {key(o) for o in want if o["kind"] != "Namespace"}
    by_key = {key(o): o for o in rendered}
    for o in want:
        if o["kind"] == "ClusterRole":
            assert by_key[key(o)]["rules"] == o["rules"], "chart and manifests grant different permissions"
        if o["kind"] == "Deployment":
            got = by_key[key(o)]["spec"]
            assert got["replicas"] == 1 and got["strategy"] == {"type": "Recreate"}
            env = lambda d: {e["name"]: e["value"] for e in d["template"]["spec"]["containers"][0]["env"]}
            assert env(got) == env(o["spec"])
    # Installed: every object exists in the cluster, the namespace included; the CRD was already there.
    for o in want:
        kind, name, ns = key(o)
        wait_for(lambda: raw_request(api, "GET", PATHS[kind].format(ns=ns, name=name)), 20, f"{kind}/{name}")
    status = asyncio.run(helm.Status(cfg).run("pensieve-operator"))
    assert "deployed" in json.dumps(status).lower()
    asyncio.run(helm.Uninstall(cfg).run("pensieve-operator", wait=False))


def test_chart_namespaced_mode_grants_in_the_watched_namespaces_only(control_plane, crd, api):
    helm = pytest.importorskip("helm_sdkpy", reason="helm-sdkpy comes from requirements/py312-only.txt")
    watched = ["team-a", "team-b"]
    for ns in watched:
        raw_request(api, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    cfg = helm.Configuration(namespace="pensieve-ns", kubeconfig=str(control_plane.kubeconfig))
    result = asyncio.run(helm.Install(cfg).run("pensieve-operator", str(CHART), create_namespace=True, wait=False, timeout=120,
                                               values={"settings": {"namespaces": ",".join(watched)}}))
    rendered = [d for d in yaml.safe_load_all(result["manifest"]) if d]
    kinds = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in rendered}
    try:
        # The namespaced rights: a RoleBinding in each watched namespace, no cluster-wide binding of them.
        assert ("ClusterRoleBinding", "pensieve-operator", None) not in kinds
        for ns in watched:
            rb = wait_for(lambda: raw_request(api, "GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/pensieve-operator"),
                          20, f"RoleBinding in {ns}")
            assert rb["roleRef"]["name"] == "pensieve-operator"
            assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "pensieve-operator", "namespace": "pensieve-ns"}]
        # The cluster-scoped reads stay cluster-wide; the operator knows its namespaces and its own namespace.
        assert ("ClusterRoleBinding", "pensieve-operator-cluster", None) in kinds
        dep = next(o for o in rendered if o["kind"] == "Deployment")
        env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["PENSIEVE_OPERATOR_NAMESPACES"] == "team-a,team-b"
        assert env["PENSIEVE_OPERATOR_OPERATOR_NAMESPACE"] == "pensieve-ns"
    finally:
        asyncio.run(helm.Uninstall(cfg).run("pensieve-operator", wait=False))
