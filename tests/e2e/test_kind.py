"""Install the operator with manifests/, apply the sample (CPU variant), chat through the endpoint."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

import yaml

from conftest import IMAGES, ROOT, kubectl, wait_for

NS = "pensieve-e2e"


def _sample_cpu() -> dict:
    body = yaml.safe_load((ROOT / "manifests" / "samples" / "pensieve.yaml").read_text())
    body["metadata"]["namespace"] = NS
    spec = body["spec"]
    spec["replicas"] = 2
    spec["resources"] = {"gpusPerPod": 0, "nodeSelector": {"pensieve.ai/pool": "serving"}}
    spec["engine"].update(image=IMAGES["engine-cpu"], imagePullPolicy="Never", dtype="float32")
    spec["router"].update(image=IMAGES["router"])
    spec["cache"]["cpuCache"] = "1Gi"
    spec["autoscaling"]["enabled"] = False
    spec["model"]["source"] = {"huggingFace": {"id": os.environ.get("PENSIEVE_E2E_MODEL_ID", "Qwen/Qwen2.5-0.5B-Instruct")}}
    return body


def test_install_apply_and_chat(kind_cluster):
    ctx = kind_cluster
    kubectl(ctx, "apply", "-f", str(ROOT / "crds"))
    kubectl(ctx, "apply", "-f", str(ROOT / "manifests" / "namespace.yaml"), "-f", str(ROOT / "manifests" / "rbac.yaml"),
            "-f", str(ROOT / "manifests" / "operator.yaml"))
    kubectl(ctx, "-n", "pensieve-system", "set", "image", "deployment/pensieve-operator", f"operator={IMAGES['operator']}")
    kubectl(ctx, "-n", "pensieve-system", "set", "env", "deployment/pensieve-operator",
            f"PENSIEVE_OPERATOR_ENGINE_IMAGE={IMAGES['engine-cpu']}", f"PENSIEVE_OPERATOR_ROUTER_IMAGE={IMAGES['router']}")
    kubectl(ctx, "-n", "pensieve-system", "rollout", "status", "deployment/pensieve-operator", "--timeout=180s")
    kubectl(ctx, "create", "namespace", NS, check=False)
    kubectl(ctx, "apply", "-f", "-", input=yaml.safe_dump(_sample_cpu()))

    def ready():
        o = json.loads(kubectl(ctx, "-n", NS, "get", "pdep", "chat", "-o", "json").stdout)
        conds = {c["type"]: c for c in o.get("status", {}).get("conditions", [])}
        return o if conds.get("Ready", {}).get("status") == "True" else None
    o = wait_for(ready, 900, "PensieveDeployment Ready")
    assert o["status"]["readyReplicas"] == 2
    for kind in ("deployment/chat-engine", "service/chat-engine", "deployment/chat-router", "service/chat", "configmap/chat-engine"):
        kubectl(ctx, "-n", NS, "get", kind)
    # Scale through the scale subresource.
    kubectl(ctx, "-n", NS, "scale", "pdep/chat", "--replicas=3")
    wait_for(lambda: json.loads(kubectl(ctx, "-n", NS, "get", "deployment", "chat-engine", "-o", "json").stdout)["spec"]["replicas"] == 3,
             120, "engine Deployment scaled")
    # Chat through the endpoint (the router Service), port-forwarded.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pf = subprocess.Popen(["kubectl", "--context", ctx, "-n", NS, "port-forward", "service/chat", f"{port}:80"])
    try:
        time.sleep(3)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     headers={"Content-Type": "application/json", "X-Session-ID": "e2e-1"},
                                     data=json.dumps({"model": o["spec"]["model"]["servedName"], "max_tokens": 8,
                                                      "messages": [{"role": "user", "content": "Hello!"}]}).encode())
        body = wait_for(lambda: json.loads(urllib.request.urlopen(req, timeout=120).read()), 300, "a chat completion")
        assert body["choices"][0]["message"]["content"]
    finally:
        pf.terminate()
    kubectl(ctx, "-n", NS, "delete", "pdep", "chat")
    wait_for(lambda: "chat-engine" not in kubectl(ctx, "-n", NS, "get", "deployments", "-o", "name").stdout, 180, "garbage collection")
