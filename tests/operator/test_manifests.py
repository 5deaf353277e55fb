"""The CRD (one source, chart copy in step), manifests/, the chart's values and the Dockerfiles."""
import asyncio
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pensieve.operator.settings import Settings
from pensieve.operator.sizing import compute_sizing
from pensieve.operator.render import render_children
from pensieve.operator.discovery import choose_versions

from pdep_helpers import NODES, make_spec

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "pensievedeployments.pensieve.ai.yaml"
CHART = ROOT / "charts" / "pensieve-operator"
CONTRACT_METRICS = {
    "pensieve_num_requests_running", "pensieve_num_requests_waiting", "pensieve_num_requests_swapped",
    "pensieve_gpu_cache_usage_ratio", "pensieve_cpu_cache_usage_ratio", "pensieve_gpu_cache_blocks",
    "pensieve_cpu_cache_blocks", "pensieve_sessions_active", "pensieve_prompt_tokens_total",
    "pensieve_generation_tokens_total", "pensieve_context_tokens_total", "pensieve_swap_bytes_total",
    "pensieve_evicted_tokens_total", "pensieve_requests_total", "pensieve_time_to_first_token_seconds",
    "pensieve_inter_token_latency_seconds", "pensieve_request_latency_seconds", "pensieve_cache_config_info",
}


def load_all(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def test_chart_crd_is_the_generated_copy():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s" / "sync-chart-crd.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _walk(schema, path="$"):
    yield path, schema
    for k, v in (schema.get("properties") or {}).items():
        yield from _walk(v, f"{path}.{k}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_crd_is_structural_and_complete():
    crd = load_all(CRD)[0]
    assert crd["spec"]["names"]["shortNames"] == ["pdep"] and crd["spec"]["scope"] == "Namespaced"
    (v,) = crd["spec"]["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert v["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                                          "labelSelectorPath": ".status.selector"}
    assert "status" in v["subresources"]
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Ready", "Degraded", "Replicas", "Endpoint", "Age"]
    schema = v["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        if path == "$.metadata":
            continue
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if "default" in node:
            assert node["default"] != "", f"{path}: an empty-string default is dropped by Kubernetes 1.20"
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert spec["properties"]["replicas"]["minimum"] == 0
    assert spec["properties"]["engine"]["properties"]["cacheMode"]["enum"] == ["pensieve", "gpu-only", "none"]


def _defaults(schema):
    """Apply the schema's defaults to {} the way the API server does (objects with default {})."""
    out = {}
    for k, v in (schema.get("properties") or {}).items():
        if v.get("type") == "object" and "default" in v:
            out[k] = _defaults(v)
        elif "default" in v:
            out[k] = v["default"]
    return out


def test_schema_defaults_match_the_parser():
    """A spec defaulted by the API server parses to the same values as one the parser defaults itself."""
    spec_schema = load_all(CRD)[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    server = _defaults(spec_schema)
    model = {"source": {"hostPath": {"path": "/m"}}}
    a = make_spec(**{**server, "model": model})
    b = make_spec(model=model, replicas=1)
    assert dataclasses.replace(a) == b


def test_cpu_cache_pattern_agrees_with_the_parser():
    pat = re.compile(load_all(CRD)[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                     ["properties"]["cache"]["properties"]["cpuCache"]["pattern"])
    for ok in ("auto", "64Gi", "1.5Ti", "1000000", "500M"):
        assert pat.match(ok)
        make_spec(cache={"cpuCache": ok})
    for bad in ("lots", "64 Gi", "-1Gi", ""):
        assert not pat.match(bad)


def test_operator_deployment_and_rbac():
    (dep,) = load_all(ROOT / "manifests" / "operator.yaml")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert Settings.from_env(env) == Settings()  # the manifest spells out the defaults
    assert set(env) == {"PENSIEVE_OPERATOR_" + f.name.upper() for f in dataclasses.fields(Settings)}
    rbac = {d["metadata"]["name"]: d for d in load_all(ROOT / "manifests" / "rbac.yaml") if d["kind"] == "ClusterRole"}
    rules = rbac["pensieve-operator"]["rules"]
    # Every child the operator renders (on old and new clusters) is covered, with no wildcard anywhere.
    for old in (True, False):
        served = {("autoscaling", "v2beta2" if old else "v2"): ["horizontalpodautoscalers"],
                  ("policy", "v1beta1" if old else "v1"): ["poddisruptionbudgets"],
                  ("discovery.k8s.io", "v1beta1" if old else "v1"): ["endpointslices"],
                  ("monitoring.coreos.com", "v1"): ["servicemonitors"]}
        apis = choose_versions(lambda g, v: served.get((g, v)))
        spec = make_spec(autoscaling={"enabled": True}, monitoring={"serviceMonitor": True}, sessions={"managed": True})
        children, _, _ = render_children(spec, compute_sizing([NODES["A10"]()], spec, Settings()), Settings(), apis)
        for child in children:
            assert any(child.api.group in r["apiGroups"] and child.api.plural in r["resources"]
                       and {"get", "create", "patch", "delete"} <= set(r["verbs"]) for r in rules), child.key
            if child.api.kind == "RoleBinding":  # the one ClusterRole the operator may bind, by name
                assert any(r["resources"] == ["clusterroles"] and r["verbs"] == ["bind"]
                           and r["resourceNames"] == [child.body["roleRef"]["name"]] for r in rules)
                assert child.body["roleRef"]["name"] in rbac
    # No Role or ClusterRole is written at run time, and nothing escalates or impersonates.
    every = [r for role in rbac.values() for r in role["rules"]]
    assert not any({"roles", "clusterroles"} & set(r["resources"]) and set(r["verbs"]) - {"bind", "get", "list", "watch"}
                   for r in every)
    assert not any({"escalate", "impersonate"} & set(r["verbs"]) for r in every)
    assert not any(r["resources"] == ["clusterroles"] and not r.get("resourceNames") for r in every)
    # The router's ClusterRole reads only.
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in rbac["pensieve-router"]["rules"])
    # Cluster-scoped grants: reads only.
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in rbac["pensieve-operator-cluster"]["rules"])
    rules = every
    assert not any("*" in r["apiGroups"] + r["resources"] + r["verbs"] for r in rules)


def test_sample_parses_and_fits_an_h100_node():
    (sample,) = load_all(ROOT / "manifests" / "samples" / "pensieve.yaml")
    s = Settings()
    from pensieve.operator.spec import parse_spec
    sample["metadata"]["namespace"] = "default"
    spec = parse_spec(sample, default_engine_image=s.engine_image, default_router_image=s.router_image)
    assert compute_sizing([NODES["8xH100"]()], spec, s).fits


def test_monitoring_uses_contract_metric_names():
    dash = json.loads((ROOT / "manifests" / "monitoring" / "grafana-dashboard.json").read_text())
    used = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            used |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"pensieve_[a-z_]+", t["expr"])}
    assert used <= CONTRACT_METRICS, used - CONTRACT_METRICS
    assert {"pensieve_num_requests_waiting", "pensieve_time_to_first_token_seconds", "pensieve_context_tokens_total"} <= used
    rules = yaml.safe_load(load_all(ROOT / "manifests" / "monitoring" / "prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == "pensieve_num_requests_waiting"
    (so,) = load_all(ROOT / "manifests" / "monitoring" / "keda-scaledobject.yaml")
    assert so["spec"]["scaleTargetRef"]["kind"] == "PensieveDeployment"
    (sm,) = load_all(ROOT / "manifests" / "monitoring" / "servicemonitor.yaml")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_chart_values_mirror_settings():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).upper(): v for k, v in values["settings"].items()}
    assert set(snake) == {f.name.upper() for f in dataclasses.fields(Settings)}
    assert Settings.from_env({"PENSIEVE_OPERATOR_" + k: str(v) for k, v in snake.items()}) == Settings()


def test_chart_lints_with_the_helm_engine():
    helm = pytest.importorskip("helm_sdkpy", reason="helm-sdkpy is installed from requirements/py312-only.txt")
    cfg = helm.Configuration(namespace="pensieve-system")
    result = asyncio.run(helm.Lint(cfg).run(str(CHART)))
    assert "error" not in json.dumps(result).lower() or result.get("errors") in (None, [], 0), result


@pytest.mark.parametrize("name", ["engine-cuda", "engine-cpu", "operator", "router"])
def test_dockerfiles_run_as_non_root(name):
    text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    if name in ("operator", "router"):
        assert "torch" not in re.sub(r"#.*", "", text)
