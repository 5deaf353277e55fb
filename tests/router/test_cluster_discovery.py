"""EndpointSlice discovery against a real API server (Kubernetes 1.20 from the
cluster tier's cached build: it serves discovery.k8s.io/v1beta1 only). The router
runs as `python -m pensieve.router --discovery endpointslices`; the test writes the
engine Service's EndpointSlices itself and watches the router's view follow them:
appear, turn ready, drain (ready false), disappear."""
from __future__ import annotations

from waiting import wait_for as _wait_for

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fakes import free_port

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def api_server():
    sys.path.insert(0, str(CLUSTER))
    try:
        from k8s_controlplane import ControlPlane, bin_dir
    finally:
        sys.path.remove(str(CLUSTER))
    bins = bin_dir()
    if not (bins / "kube-apiserver").exists() or shutil.which("etcd") is None:
        pytest.skip(f"no cached control plane at {bins} (scripts/k8s/build-control-plane.sh builds it) or no etcd")
    cp = ControlPlane(bins).start()
    yield cp
    cp.stop()


def metric(url: str, name: str) -> float | None:
    for line in urllib.request.urlopen(url + "/metrics", timeout=5).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def wait_for(fn, timeout, what):
    return _wait_for(fn, timeout, what, interval=0.2)


def test_router_follows_endpointslices(api_server, tmp_path):
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(api_server.kubeconfig))
    core = client.CoreV1Api(api)
    ns = f"router-{int(time.time()) % 100000}"
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service(ns, {"metadata": {"name": "chat-engine"}, "spec": {
        "clusterIP": "None", "ports": [{"name": "http", "port": 8000}]}})

    def body(name, eps):
        return {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "chat-engine",
                                                      "endpointslice.kubernetes.io/managed-by": "pensieve-test"}},
                "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": r}} for ip, r in eps]}

    base = f"/apis/discovery.k8s.io/v1beta1/namespaces/{ns}/endpointslices"

    def call(method, path, doc=None):
        m, url, h, data, post = api.param_serialize(method=method, resource_path=path, body=doc,
                                                    header_params={"Content-Type": "application/json",
                                                                   "Accept": "application/json"},
                                                    auth_settings=["BearerToken"])
        r = api.call_api(m, url, header_params=h, body=data, post_params=post)
        assert 200 <= r.status < 300, r.read()
        return json.loads(r.read() or b"{}")

    call("POST", base, body("chat-engine-a", [("10.7.0.2", True), ("10.7.0.6", False)]))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PENSIEVE_ROUTER_DISCOVERY="endpointslices", PENSIEVE_ROUTER_SERVICE="chat-engine",
               PENSIEVE_ROUTER_NAMESPACE=ns, PENSIEVE_ROUTER_PORT=str(port), PENSIEVE_ROUTER_ENGINE_PORT="8000",
               PENSIEVE_ROUTER_KUBECONFIG=str(api_server.kubeconfig), PENSIEVE_ROUTER_MODEL="m")
    log = open(tmp_path / "router.log", "wb")
    router = subprocess.Popen([sys.executable, "-m", "pensieve.router"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: metric(url, "pensieve_router_ready_endpoints") == 1, 30, "the listed slice")
        assert urllib.request.urlopen(url + "/ready", timeout=5).status == 200
        # The second endpoint turns ready; a second slice appears.
        call("PUT", f"{base}/chat-engine-a", dict(body("chat-engine-a", [("10.7.0.2", True), ("10.7.0.6", True)]),
                                                  metadata=dict(call("GET", f"{base}/chat-engine-a")["metadata"])))
        wait_for(lambda: metric(url, "pensieve_router_ready_endpoints") == 2, 15, "ready condition")
        call("POST", base, body("chat-engine-b", [("10.7.0.10", True)]))
        wait_for(lambda: metric(url, "pensieve_router_ready_endpoints") == 3, 15, "second slice")
        # One drains (ready false), then a slice goes away.
        call("PUT", f"{base}/chat-engine-a", dict(body("chat-engine-a", [("10.7.0.2", False), ("10.7.0.6", True)]),
                                                  metadata=dict(call("GET", f"{base}/chat-engine-a")["metadata"])))
        wait_for(lambda: metric(url, "pensieve_router_ready_endpoints") == 2, 15, "draining endpoint")
        call("DELETE", f"{base}/chat-engine-b")
        wait_for(lambda: metric(url, "pensieve_router_ready_endpoints") == 1, 15, "deleted slice")
        call("DELETE", f"{base}/chat-engine-a")
        wait_for(lambda: metric(url, "pensieve_router_ready_endpoints") == 0, 15, "no endpoints")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/ready", timeout=5)
        assert e.value.code == 503
        text = (tmp_path / "router.log").read_text()
        assert "discovery.k8s.io/v1beta1" in text  # 1.20 serves only v1beta1; picked by the watcher
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(15)
        except subprocess.TimeoutExpired:
            router.kill()
        print((tmp_path / "router.log").read_text()[-3000:])
